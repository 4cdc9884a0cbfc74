"""Store size against KD-target fidelity (issue 11, P2): bytes per token of each store, and the per-token KL
between the bucket distributions a reference store and each other store give the loss.

    python bench/bench_store_size.py REF.zarr OTHER.zarr ... [--windows 128] [--temperatures 1,2,4]
    python bench/bench_store_size.py REF.zarr --variants   # offline variants of REF, no teacher needed

Stores must be built from the same text (same windows). For each store: bytes/token on disk with and
without the teacher embedding (stored once, V x d), per array, and KL(reference || store) over the k + 1
buckets at each temperature, averaged over tokens (deterministic). The entries are matched by id, so stores
in probability order (fixed16) and id order (compact) compare directly. `--variants` re-encodes REF's own
arrays in memory (compact encodings at several steps, coverage-adaptive k at several thresholds, codecs)
and reports the same figures; coverage-adaptive KL is against the reference with the folded tokens' mass
spread over the tail as the student would see it (the dropped ids become tail tokens: the reference's
bucket for each is compared with an equal share of the extra tail mass, an upper bound).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from goose.cache.reader import CacheReader
from goose.cache.schema import EMBEDDING_ARRAY, decode_topk, encode_logprobs, encode_topk, fold_topk, round_mantissa
from goose.cache.stats import store_nbytes
from goose.pipeline.stage_two.losses import teacher_bucket_logprobs


def _by_id(ids, lp):
    order = np.argsort(ids, -1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lp, order, -1)


def bucket_kl(ref: dict, other: dict, temps, T: float) -> float:
    """Mean over tokens of KL(ref buckets || other buckets) at T; both must hold the same id sets."""
    rid, rlp = _by_id(ref["topk_ids"].astype(np.int64), ref["topk_logprobs"])
    oid, olp = _by_id(other["topk_ids"].astype(np.int64), other["topk_logprobs"])
    if not (rid == oid).all():
        raise SystemExit("the stores hold different top-k ids: were they built from the same text and teacher?")
    p = teacher_bucket_logprobs(torch.from_numpy(rlp), torch.from_numpy(ref["tail_logmass"]), temps, T).double()
    q = teacher_bucket_logprobs(torch.from_numpy(olp), torch.from_numpy(other["tail_logmass"]), temps, T).double()
    return float((p.exp() * (p - q)).sum(-1).mean())


def store_bytes(url: str, n_tokens: int) -> dict:
    total = store_nbytes(url)
    emb = store_nbytes(url, prefix=EMBEDDING_ARRAY)
    return {"bytes_per_token": total / n_tokens, "without_embedding": (total - emb) / n_tokens}


def compare_stores(ref_url: str, urls: list[str], windows: int, temps_eval) -> list[dict]:
    ref = CacheReader(ref_url)
    fields = ["topk_ids", "topk_logprobs", "tail_logmass"]
    ref_data = ref.read(0, windows, fields)
    rows = []
    for url in [ref_url, *urls]:
        r = CacheReader(url)
        data = r.read(0, windows, fields)
        arrays = {name: store_nbytes(url, prefix=name) / r.spec.n_tokens for name in r.spec.arrays()}
        row = {"store": url, "encoding": r.spec.topk_encoding, "step": r.spec.logprob_step,
               "tail_keepbits": r.spec.tail_keepbits,
               "compression": f"{r.spec.compression}-{r.spec.compression_level}",
               **store_bytes(url, r.spec.n_tokens), "arrays": {k: round(v, 2) for k, v in arrays.items()}}
        for T in temps_eval:
            row[f"kl_T{T:g}"] = bucket_kl(ref_data, data, ref.spec.tail_temperatures, T)
        rows.append(row)
    return rows


def _coded_size(a: np.ndarray, codec, chunk: int) -> int:
    return sum(len(codec.encode(np.ascontiguousarray(a[s : s + chunk]))) for s in range(0, a.shape[0], chunk))


def variants(ref_url: str, windows: int, temps_eval) -> list[dict]:
    """Offline re-encodings of the reference's own top-k arrays (the other arrays as stored)."""
    from numcodecs import Blosc, Zstd

    ref = CacheReader(ref_url)
    spec = ref.spec
    temps = spec.tail_temperatures
    d = ref.read(0, windows, ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "gold_nll", "entropy"])
    n_tok = windows * spec.seq_len
    cw = spec.chunk_windows
    codecs = {"zstd-3": Zstd(level=3), "blosc-3": Blosc("zstd", 3, Blosc.SHUFFLE), "blosc-5": Blosc("zstd", 5, Blosc.SHUFFLE)}
    rest = {name: d[name] for name in ("input_ids", "gold_nll")}
    rest["entropy"] = d["entropy"].astype(np.float16)
    rows = []

    def add(label, arrays, data, codec_names=("zstd-3", "blosc-3", "blosc-5")):
        row = {"variant": label}
        for cn in codec_names:
            row[cn] = sum(_coded_size(a, codecs[cn], cw) for a in [*arrays, *rest.values()]) / n_tok
        for T in temps_eval:
            row[f"kl_T{T:g}"] = bucket_kl(d, data, temps, T) if data is not None else None
        rows.append(row)

    add("fixed16 (v3), tail fp32", [d["topk_ids"].astype(np.uint16), encode_logprobs(d["topk_logprobs"], 2.0**-10),
                                   d["tail_logmass"]], d)
    for step in (2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6):
        for keep in (23, 12):
            tail = round_mantissa(d["tail_logmass"], keep)
            gaps, rel = encode_topk(d["topk_ids"], d["topk_logprobs"], step, np.uint16)
            ids, lp = decode_topk(gaps, rel, tail[..., temps.index(1.0)], step)
            add(f"compact step 1/{round(1 / step)}, tail {keep} bits", [gaps, rel, tail],
                {"topk_ids": ids, "topk_logprobs": lp, "tail_logmass": tail})
    # coverage-adaptive k on top of compact 1/16: the dropped entries are padded (gap 0, rel 0xFFFF), which
    # the compressor removes; the KL is against the reference with each folded id's bucket compared with an
    # equal share of the extra tail mass (what a student that knows nothing about them would be taught)
    step = 2.0**-4
    for thr in (0.9, 0.95, 0.99):
        keep_n, tail = fold_topk(d["topk_logprobs"], d["tail_logmass"], temps, thr)
        tail = round_mantissa(tail, 12)
        pad = np.arange(spec.top_k) >= keep_n[..., None]
        gaps, rel = encode_topk(np.where(pad, spec.vocab_size + np.arange(spec.top_k), d["topk_ids"]),
                                d["topk_logprobs"], step, np.uint16)
        gaps = np.where(np.cumsum(gaps.astype(np.int64), -1) >= spec.vocab_size, 0, gaps).astype(np.uint16)
        rel = np.where(gaps == 0, 0xFFFF, rel).astype(np.uint16)
        row_kl = {}
        for T in temps_eval:
            row_kl[T] = _fold_kl(d, keep_n, tail, temps, T, spec.vocab_size)
        row = {"variant": f"adaptive k (coverage {thr}), compact 1/16, mean k {keep_n.mean():.1f}"}
        for cn in ("zstd-3", "blosc-3", "blosc-5"):
            row[cn] = sum(_coded_size(a, codecs[cn], cw) for a in [gaps, rel, tail, *rest.values()]) / n_tok
        row.update({f"kl_T{T:g}": row_kl[T] for T in temps_eval})
        rows.append(row)
    return rows


def _fold_kl(d, keep_n, tail, temps, T, V) -> float:
    """KL(reference buckets || folded target spread over the reference's buckets): a folded id gets the
    extra tail mass shared equally among the V - k' tail ids (an upper bound on what the fold loses)."""
    lp = torch.from_numpy(d["topk_logprobs"]).double()
    p = teacher_bucket_logprobs(lp.float(), torch.from_numpy(d["tail_logmass"]), temps, T).double()
    k = lp.shape[-1]
    kept = torch.arange(k) < torch.from_numpy(keep_n)[..., None]
    masked = torch.where(kept, lp, torch.full_like(lp, -1e4)).float()
    qf = teacher_bucket_logprobs(masked, torch.from_numpy(tail), temps, T).double()  # kept + folded tail
    n_tail = (V - torch.from_numpy(keep_n)).double()
    share = qf[..., -1] - n_tail.log()  # each folded or tail id's share
    q = torch.where(kept, qf[..., :-1], share[..., None])
    q_tail = share + float(np.log(V - k))  # the reference's tail bucket: V - k of those shares
    q = torch.cat([q, q_tail[..., None]], -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref")
    ap.add_argument("others", nargs="*")
    ap.add_argument("--windows", type=int, default=128, help="windows compared (from the start)")
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--variants", action="store_true", help="offline re-encodings of REF instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    temps = [float(t) for t in args.temperatures.split(",")]
    rows = variants(args.ref, args.windows, temps) if args.variants else compare_stores(
        args.ref, args.others, args.windows, temps)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print({k: (round(v, 2) if isinstance(v, float) and not k.startswith("kl") else
                   (f"{v:.2e}" if isinstance(v, float) else v)) for k, v in row.items()})


if __name__ == "__main__":
    main()

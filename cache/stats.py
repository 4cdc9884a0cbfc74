"""What is in a store (`info`) and whether every chunk of it is sound (`verify`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .integrity import StoreFiles, block_key, checksum
from .reader import CacheReader
from .schema import CHECKSUM_ARRAY, EMBEDDING_ARRAY, HIDDEN_PREFIXES, decode_logprobs, decode_topk

def store_nbytes(url: str, storage_options: dict | None = None, prefix: str = "") -> int:
    """Bytes on disk (or in the bucket) under the store, optionally under one array's prefix.

    Another job may be writing the same store (`--shard` jobs, torchrun ranks): a chunk's temporary file can
    vanish between being listed and being sized, which makes fsspec's `du` raise. Then the listing is summed
    file by file, skipping what vanished (the figure is then as of a moment during those writes)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    target = f"{path.rstrip('/')}/{prefix}" if prefix else path
    if not fs.exists(target):
        return 0
    try:
        return int(fs.du(target))
    except FileNotFoundError:
        pass
    total = 0
    for name in fs.find(target):
        try:
            total += int(fs.size(name) or 0)
        except FileNotFoundError:
            continue
    return total


def _coverage(tail_logmass_t1: np.ndarray) -> np.ndarray:
    """Teacher mass inside the top-k at T=1, per token: 1 - exp(tail log-mass)."""
    return -np.expm1(tail_logmass_t1.astype(np.float64))


def store_info(url: str, *, storage_options: dict | None = None, max_windows: int | None = None) -> dict:
    """Schema, provenance, sizes, bytes/token, mean top-k coverage and teacher perplexity from gold_nll."""
    reader = CacheReader(url, storage_options=storage_options, allow_incomplete=True)
    spec = reader.spec
    blocks = reader.blocks_done()
    sizes = {name: store_nbytes(url, storage_options, name) for name in [*spec.arrays(), EMBEDDING_ARRAY]}
    total = store_nbytes(url, storage_options)
    t1 = spec.tail_temperatures.index(1.0)
    n_cov = n_nll = 0
    sum_cov = sum_nll = 0.0
    done_windows = 0
    for block in np.flatnonzero(blocks):
        start, stop = spec.block_range(int(block))
        if max_windows is not None:
            stop = min(stop, start + max_windows - done_windows)
            if stop <= start:
                break
        part = reader.read(start, stop, ["tail_logmass", "gold_nll"])
        cov = _coverage(part["tail_logmass"][..., t1])
        sum_cov += float(cov.sum(dtype=np.float64))
        n_cov += cov.size
        nll = part["gold_nll"][np.isfinite(part["gold_nll"])]
        sum_nll += float(nll.sum(dtype=np.float64))
        n_nll += nll.size
        done_windows += stop - start
    mean_nll = sum_nll / n_nll if n_nll else float("nan")
    return {
        "url": url,
        "schema_version": reader.meta.get("schema_version"),
        "complete": reader.complete,
        "blocks_done": int(blocks.sum()),
        "blocks": int(spec.n_blocks),
        "created_at": reader.meta.get("created_at"),
        "completed_at": reader.meta.get("completed_at"),
        "package_version": reader.meta.get("package_version"),
        "spec": spec.to_attrs(),
        "provenance": reader.provenance,
        "windows": spec.n_windows,
        "tokens": spec.n_tokens,
        "bytes_on_disk": total,
        "bytes_per_token": total / spec.n_tokens,
        "array_bytes": sizes,
        "array_bytes_per_token": {k: v / spec.n_tokens for k, v in sizes.items()},
        "windows_measured": done_windows,
        "mean_topk_coverage": sum_cov / n_cov if n_cov else float("nan"),
        "teacher_mean_nll": mean_nll,
        "teacher_ppl": math.exp(mean_nll) if n_nll else float("nan"),
    }


@dataclass
class VerifyReport:
    url: str
    chunks_checked: int = 0
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _check_chunk(part: dict, spec, tol: float = 1e-3) -> list[str]:
    """Every invariant of one chunk's arrays; returns failure descriptions (empty when sound)."""
    bad = []
    n, k = part["input_ids"].shape[0], spec.top_k
    for name, array_spec in spec.arrays().items():
        a = part[name]
        want = (n,) + array_spec.shape[1:]
        if a.shape != want or a.dtype != np.dtype(array_spec.dtype):
            bad.append(f"{name} is {a.shape} {a.dtype}, schema says {want} {array_spec.dtype}")
    if bad:
        return bad
    V = spec.vocab_size
    t1 = spec.tail_temperatures.index(1.0)
    compact = spec.topk_encoding == "compact"
    if compact:  # the top-1, then the rest by id as gaps (>= 1 after the first); log-probs relative to the top-1
        gaps = part["topk_ids"].astype(np.int64)
        rest = np.cumsum(gaps[..., 1:], axis=-1)
        if k > 2 and (gaps[..., 2:] < 1).any() or k > 1 and (rest == gaps[..., :1]).any():
            bad.append("topk_ids (gaps) not ascending: an id repeats")
        if k and (part["topk_logprobs"][..., 0] != 0).any():
            bad.append("topk_logprobs (relative to the top-1) do not start at 0")
        top_ids, logp = decode_topk(part["topk_ids"], part["topk_logprobs"], part["tail_logmass"][..., t1],
                                    spec.logprob_step)
    else:
        top_ids, logp = part["topk_ids"], decode_logprobs(part["topk_logprobs"], spec.logprob_step)
    for name, ids in (("input_ids", part["input_ids"]), ("topk_ids", top_ids), ("sample_ids", part.get("sample_ids"))):
        if ids is not None and ids.size and int(ids.max()) >= V:
            bad.append(f"{name} has ids >= vocabulary size {V}")
    tail_nan = compact and np.isnan(part["tail_logmass"]).any()  # compact log p come from the tail: reported below
    if not tail_nan and not np.isfinite(logp).all():
        bad.append("topk_logprobs not finite")
    elif not compact and k > 1 and (np.diff(logp, axis=-1) > 0).any():
        bad.append("topk_logprobs not sorted descending")
    if not compact and k > 1 and (np.diff(part["topk_ids"].astype(np.int64), axis=-1) == 0).any():
        bad.append("topk_ids repeat an id")
    if "loss_mask" in part and (part["loss_mask"] > 1).any():
        bad.append("loss_mask holds values other than 0 and 1")
    tail = part["tail_logmass"]
    if np.isnan(tail).any() or (tail == np.inf).any():
        bad.append("tail_logmass not finite")
    elif (tail > 0).any():
        bad.append("tail_logmass above 0 (a log-mass is <= 0)")
    elif np.isfinite(logp).all():
        # head and tail add up to one at T=1 (the head is fixed point: allow a little slack)
        total = np.exp(logp.astype(np.float64)).sum(-1) + np.exp(tail[..., t1].astype(np.float64))
        if not (np.abs(total - 1) < 1e-2).all():
            bad.append(f"top-k and tail mass do not sum to 1 at T=1: min {total.min():.4g} max {total.max():.4g}")
    nll = part["gold_nll"]
    if not np.isnan(nll[:, -1]).all() or not np.isfinite(nll[:, :-1]).all() or (nll[:, :-1] < -tol).any():
        bad.append("gold_nll must be finite and >= 0 except NaN at each window's last position")
    ent = part["entropy"].astype(np.float32)
    if not np.isfinite(ent).all() or (ent < -1e-2).any():
        bad.append("entropy negative or not finite")
    if spec.samples:
        if (part["sample_counts"].astype(np.int64).sum(-1) != spec.samples).any():
            bad.append(f"sample_counts do not sum to {spec.samples}")
    for name in part:
        if name.startswith(HIDDEN_PREFIXES) and part[name].dtype.kind == "f":
            if not np.isfinite(part[name].astype(np.float32)).all():
                bad.append(f"{name} not finite")
    return bad


def _check_checksums(reader: CacheReader, report: VerifyReport, storage_options: dict | None) -> None:
    """Recompute the crc32 of every stored object that has one recorded; name each that differs."""
    if not reader.has_checksums:
        report.warnings.append(f"schema v{reader.meta.get('schema_version')} store: no checksums were recorded, so "
                               f"damage that still decodes cannot be detected; rebuild it to get them")
        return
    files = StoreFiles(reader.url, storage_options)
    names = (reader.meta.get("checksums") or {}).get("arrays") or []
    try:
        recorded = reader.group[CHECKSUM_ARRAY][:]
    except Exception as exc:  # noqa: BLE001
        report.failures.append(f"{CHECKSUM_ARRAY}: unreadable: {type(exc).__name__}: {exc}")
        return
    done = reader.blocks_done()
    for block in np.flatnonzero(done):
        where = reader.where(int(block))
        for j, name in enumerate(names):
            want = int(recorded[block, j])
            data = files.read(block_key(reader.group[name], int(block)))
            if data is None:
                continue  # already reported as missing
            if want < 0:
                report.failures.append(f"{name} {where}: no checksum recorded")
            elif checksum(data) != want:
                report.failures.append(f"{name} {where}: checksum differs (stored bytes changed since writing)")
    for key, want in ((reader.meta.get("checksums") or {}).get("once") or {}).items():
        data = files.read(key)
        if data is not None and checksum(data) != want:
            report.failures.append(f"{key.split('/c/')[0]} ({key}): checksum differs (stored bytes changed since writing)")


def verify_store(url: str, *, storage_options: dict | None = None) -> VerifyReport:
    """Check that every object is present and matches its checksum, then read every chunk and check shapes,
    dtypes and the numeric invariants; failures name the array and the chunk."""
    reader = CacheReader(url, storage_options=storage_options, allow_incomplete=True, check=False)
    spec = reader.spec
    report = VerifyReport(url)
    if not reader.complete:
        report.failures.append("store is not marked complete")
    done = reader.blocks_done()
    if (done == 0).any():
        report.failures.append(f"{int((done == 0).sum())} of {len(done)} blocks never written")
    report.failures.extend(reader.integrity_problems())
    missing = {key for _, key, _ in reader.missing_objects()}
    _check_checksums(reader, report, storage_options)
    names = list(spec.arrays())
    cw = spec.chunk_windows
    for chunk, start in enumerate(range(0, spec.n_windows, cw)):
        stop = min(start + cw, spec.n_windows)
        where = f"chunk {chunk} (windows {start}-{stop - 1})"
        block = start // spec.block_windows
        if any(block_key(reader.group[name], block) in missing for name in names if name in reader.group):
            continue  # reported above; its fill values would only add noise
        part, unreadable = {}, []
        for name in names:
            try:  # array by array, straight from zarr, so the message names the array that fails
                part[name] = reader.group[name][start:stop]
            except Exception as exc:  # noqa: BLE001 - a corrupt chunk can fail in any codec
                unreadable.append(f"{where}: {name} unreadable: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}")
        if unreadable:
            report.failures.extend(unreadable)
            continue
        report.failures.extend(f"{where}: {msg}" for msg in _check_chunk(part, spec))
        report.chunks_checked += 1
    if reader.complete:
        try:
            emb = reader.teacher_embedding(check=False)  # checksum: reported above
            if emb.shape != spec.embedding_spec().shape or not np.isfinite(emb.astype(np.float32)).all():
                report.failures.append(f"{EMBEDDING_ARRAY} has shape {emb.shape} or non-finite values")
        except Exception as exc:  # noqa: BLE001
            report.failures.append(f"{EMBEDDING_ARRAY}: unreadable: {exc}")
    return report

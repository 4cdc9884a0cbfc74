"""Issue 11, P2: the compact top-k encoding (schema v4), the coverage-adaptive fold measured for it, the
hidden-state PCA projection, and old-format stores still reading. Brute-force references throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from goose.cache.integrity import attrs_checksum
from goose.cache.reader import CacheReader
from goose.cache.schema import (
    COMPACT_LOGPROB_STEP,
    StoreSpec,
    decode_topk,
    encode_topk,
    fit_pca,
    fold_topk,
    round_mantissa,
)
from goose.cache.writer import CacheWriter
from goose.pipeline.stage_two.losses import teacher_bucket_logprobs
from goose.pipeline.stage_one.targets import teacher_targets

TEMPS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def _targets(V=512, k=32, offset=0.0, scale=3.0, seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n, V, generator=g, dtype=torch.float32) * scale + offset
    ids = torch.randint(0, V, (1, n), generator=g)
    out = teacher_targets(logits, ids, top_k=k, tail_temperatures=TEMPS)
    return {name: t[0].numpy() for name, t in out.items()}, logits[0].double()


def _by_id(ids, lp):
    order = np.argsort(ids, -1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lp, order, -1)


@pytest.mark.parametrize("offset", [0.0, -80.0])
@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("step", [COMPACT_LOGPROB_STEP, 2.0**-5, 2.0**-3])
def test_compact_bucket_distribution_within_the_stated_bound(offset, scale, step):
    t, _ = _targets(offset=offset, scale=scale)
    gaps, rel = encode_topk(t["topk_ids"], t["topk_logprobs"], step, np.uint16)
    tail = round_mantissa(t["tail_logmass"], 12)
    ids, lp = decode_topk(gaps, rel, tail[:, 0], step)
    assert (ids[:, 0] == t["topk_ids"][:, 0]).all()  # the top-1 first, exactly
    assert (np.diff(lp, axis=-1) <= 0).all()  # by probability
    ids, lp = _by_id(ids.astype(np.int64), lp)
    ref_ids, ref_lp = _by_id(t["topk_ids"].astype(np.int64), t["topk_logprobs"])
    assert (ids == ref_ids).all()
    # every log p relative to the top-1 within step / 2, and head + tail = 1 exactly (fp64)
    err = (lp - lp.max(-1, keepdims=True)) - (ref_lp - ref_lp.max(-1, keepdims=True))
    assert np.abs(err).max() <= step / 2 + 1e-5
    total = np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail[:, 0].astype(np.float64))
    assert np.abs(total - 1).max() < 1e-6
    # tail log-masses: relative error <= 2^-13 (12 kept bits), mass error <= 4.5e-5
    assert (np.abs(tail - t["tail_logmass"]) <= np.abs(t["tail_logmass"]) * 2.0**-13 + 1e-30).all()
    assert np.abs(np.exp(tail.astype(np.float64)) - np.exp(t["tail_logmass"].astype(np.float64))).max() < 4.5e-5
    # the bucket distribution the loss sees: KL(fp32 reference || dequantised) <= step^2 / 8 / T^2 per token
    # (Hoeffding on the head's inner distribution) plus the rounding of the tail (tiny)
    for T in (1.0, 1.1, 2.0, 4.0):
        p = teacher_bucket_logprobs(torch.from_numpy(ref_lp), torch.from_numpy(t["tail_logmass"]), TEMPS, T).double()
        q = teacher_bucket_logprobs(torch.from_numpy(lp), torch.from_numpy(tail), TEMPS, T).double()
        kl = (p.exp() * (p - q)).sum(-1)
        assert kl.max() <= step**2 / 8 / T**2 + 1e-6, (T, float(kl.max()))


def test_compact_encoding_of_an_empty_tail_and_ties():
    ids = np.array([[5, 3, 9, 0]])
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    gaps, rel = encode_topk(ids, lp, 2.0**-4, np.uint16)
    assert gaps.tolist() == [[5, 0, 3, 6]]  # the top-1 (5), then 0, 3, 9 as gaps
    assert rel[0, 0] == 0
    out_ids, out_lp = decode_topk(gaps, rel, np.array([-np.inf], dtype=np.float32), 2.0**-4)  # k = V: no tail
    assert out_ids.tolist() == [[5, 3, 9, 0]]  # back in probability order
    assert abs(np.exp(out_lp.astype(np.float64)).sum() - 1) < 1e-6
    assert np.allclose(out_lp[0], np.log([0.4, 0.3, 0.2, 0.1]), atol=2.0**-5 + 1e-6)
    # a tie after rounding keeps the true top-1 first (position), the rest by id
    ids = np.array([[7, 2, 4]])
    lp = np.log(np.array([[0.3001, 0.3, 0.2999]]))
    out_ids, _ = decode_topk(*encode_topk(ids, lp, 2.0**-4, np.uint16), np.array([np.log(0.1)]), 2.0**-4)
    assert out_ids.tolist() == [[7, 2, 4]]


def test_round_mantissa_matches_a_brute_force_rounding_and_keeps_specials():
    x = np.array([-1.2345678, -30.123, -0.0001234, 0.0, -np.inf, np.nan, -1e4], dtype=np.float32)
    for keep in (7, 12, 16):
        y = round_mantissa(x, keep)
        for a, b in zip(x, y):
            if not np.isfinite(a):
                assert (np.isnan(a) and np.isnan(b)) or a == b
                continue
            m, e = np.frexp(np.float64(a))  # a = m 2^e, 0.5 <= |m| < 1: keep + 1 significant bits
            want = np.ldexp(np.round(m * 2.0 ** (keep + 1)) / 2.0 ** (keep + 1), e)
            assert b == np.float32(want), (keep, a, b, want)
        assert (y.view(np.uint32)[np.isfinite(x)] & np.uint32((1 << (23 - keep)) - 1) == 0).all()


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_coverage_adaptive_fold_keeps_the_mass_exactly(threshold):
    t, logits = _targets(V=512, k=48, scale=3.0)
    keep, tail = fold_topk(t["topk_logprobs"], t["tail_logmass"], TEMPS, threshold)
    lp = t["topk_logprobs"].astype(np.float64)
    for j, T in enumerate(TEMPS):
        # brute force from the full logits: the mass outside the kept entries at T
        full = torch.log_softmax(logits / T, -1).numpy()
        kept_ids = [t["topk_ids"][i, :keep[i]] for i in range(len(keep))]
        head = np.array([np.exp(full[i, kept_ids[i]]).sum() for i in range(len(keep))])
        assert np.abs(head + np.exp(tail[:, j]) - 1).max() < 1e-6
        assert np.abs(np.exp(tail[:, j]) - (1 - head)).max() < 1e-6
    # the kept prefix covers the threshold (or is all k), and is the shortest that does
    cover = np.cumsum(np.exp(lp), -1)
    for i, n in enumerate(keep):
        assert n == lp.shape[-1] or cover[i, n - 1] >= threshold
        assert n == 1 or cover[i, n - 2] < threshold


def test_pca_reconstruction_of_a_known_rank_is_exact():
    rng = np.random.default_rng(0)
    d, r = 48, 6
    mean = rng.normal(0, 5, d)
    coords = rng.normal(0, 1, (2, 300, r)) * np.array([30, 10, 5, 2, 1, 0.5])
    mix = np.linalg.qr(rng.normal(size=(d, r)))[0].T  # r orthonormal directions
    h = (coords @ mix + mean).astype(np.float32)
    m, basis = fit_pca(h, r)
    assert basis.shape == (r, d) and np.allclose(basis @ basis.T, np.eye(r), atol=1e-5)
    recon = (h - m) @ basis.T @ basis + m
    assert np.abs(recon - h).max() < 1e-3 * np.abs(h).max()
    # a refit gives the same basis (signs fixed)
    assert np.array_equal(fit_pca(h, r)[1], basis)


def _spec(**kw):
    base = dict(n_windows=4, seq_len=8, vocab_size=64, top_k=4, tail_temperatures=(1.0, 2.0), chunk_windows=2,
                hidden_size=4)
    return StoreSpec(**{**base, **kw})


def _block(spec, rng, hidden=None):
    n, L, k = spec.block_windows, spec.seq_len, spec.top_k
    ids = np.stack([rng.permutation(spec.vocab_size)[:k] for _ in range(n * L)]).reshape(n, L, k)
    z = np.sort(rng.normal(0, 2, (n, L, k + 1)), -1)[..., ::-1]
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    lp = (z - lse).astype(np.float32)
    tail = np.stack([lp[..., -1], lp[..., -1] * 0.5], -1).astype(np.float32)  # any log-masses < 0
    data = {"input_ids": rng.integers(0, spec.vocab_size, (n, L)), "topk_ids": ids, "topk_logprobs": lp[..., :k],
            "tail_logmass": tail, "gold_nll": np.where(np.arange(L) < L - 1, 1.0, np.nan) * np.ones((n, L)),
            "entropy": np.ones((n, L))}
    data.update(hidden or {})
    return data


def test_hidden_pca_store_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    spec = _spec(hidden_layers=(1,), hidden_size=16, hidden_pca_rank=3, topk_encoding="compact",
                 logprob_step=2.0**-4, tail_keepbits=12)
    mix = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
    states = [(rng.normal(size=(2, 8, 3)) * [9, 3, 1]) @ mix + 2.0 for _ in range(2)]
    mean, basis = fit_pca(states[0], 3)
    url = str(tmp_path / "s.zarr")
    w = CacheWriter.open(url, spec, {"test": 1}, package_version="t")
    w.write_pca_basis({1: (mean, basis)})
    for b in range(2):
        coords = ((states[b] - mean) @ basis.T).astype(np.float16)
        w.write_block(b, _block(spec, rng, {"hidden/1": coords}))
    w.finalize(np.zeros((64, 16), np.float32), {})
    reader = CacheReader(url)
    got = reader.read(0, 4, ["hidden/1"])["hidden/1"]
    assert got.shape == (4, 8, 16)
    want = np.concatenate(states)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()  # fp16 coordinates
    raw = reader.read(0, 4, ["hidden/1"], dequantize=False)["hidden/1"]
    assert raw.shape == (4, 8, 3) and raw.dtype == np.float16
    m, bs = reader.pca_basis()[1]
    assert np.array_equal(bs, basis) and np.array_equal(m, mean)
    assert "hidden_pca/1/basis/c/0/0" in reader.meta["checksums"]["once"]


def _write_store(url: str, spec, rng, n_blocks: int = 2) -> list[dict]:
    """A finished store of `n_blocks` random blocks; returns the blocks as written."""
    w = CacheWriter.open(url, spec, {"test": 1}, package_version="t")
    blocks = [_block(spec, rng) for _ in range(n_blocks)]
    for b, data in enumerate(blocks):
        w.write_block(b, data)
    w.finalize(np.zeros((64, 4), np.float32), {})
    return blocks


def test_compact_store_reads_as_the_loss_takes_it(tmp_path):
    rng = np.random.default_rng(2)
    spec = _spec(topk_encoding="compact", logprob_step=2.0**-4, tail_keepbits=12)
    url = str(tmp_path / "c.zarr")
    blocks = _write_store(url, spec, rng)
    got = CacheReader(url).read_indices([3, 0])
    ref = {name: np.concatenate([blk[name] for blk in blocks]) for name in blocks[0]}
    assert (got["topk_ids"][..., 0] == ref["topk_ids"][[3, 0]][..., 0]).all()
    ids, lp = _by_id(ref["topk_ids"][[3, 0]], ref["topk_logprobs"][[3, 0]])
    got["topk_ids"], got["topk_logprobs"] = _by_id(got["topk_ids"].astype(np.int64), got["topk_logprobs"])
    assert (got["topk_ids"] == ids).all()
    rel_err = (got["topk_logprobs"] - got["topk_logprobs"].max(-1, keepdims=True)) - (lp - lp.max(-1, keepdims=True))
    assert np.abs(rel_err).max() <= 2.0**-5 + 1e-5
    from goose.cache.stats import verify_store
    report = verify_store(url)
    assert report.ok, report.failures


def test_old_format_store_still_reads(tmp_path):
    """A schema-v3 store (fixed16 top-k, no v4 spec keys) reads exactly as before."""
    rng = np.random.default_rng(3)
    spec = _spec()
    url = str(tmp_path / "v3.zarr")
    blocks = _write_store(url, spec, rng)
    group = zarr.open_group(url, mode="r+")
    attrs = dict(group.attrs["goose"])
    attrs["schema_version"] = 3
    attrs["spec"] = {key: v for key, v in attrs["spec"].items()
                     if key not in ("topk_encoding", "tail_keepbits", "hidden_pca_rank")}
    attrs["attrs_crc32"] = attrs_checksum(attrs)
    group.attrs.put({"goose": attrs})
    reader = CacheReader(url)
    assert reader.meta["schema_version"] == 3 and reader.spec.topk_encoding == "fixed16"
    got = reader.read(0, 4)
    ref = {name: np.concatenate([blk[name] for blk in blocks]) for name in blocks[0]}
    assert (got["topk_ids"] == ref["topk_ids"]).all()  # probability order, as written
    assert np.abs(got["topk_logprobs"] - ref["topk_logprobs"]).max() <= 2.0**-11 + 1e-6
    assert (got["tail_logmass"] == ref["tail_logmass"]).all()  # fp32 as computed


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_cache_teacher_with_hidden_pca(tmp_path, tiny_teacher, corpus_file, dtype):
    """End to end: the basis is block 0's PCA, every window's stored coordinates are its states projected on
    it, the reader reconstructs them, and a rerun (resume after block 0) writes the identical store."""
    from transformers import AutoModelForCausalLM

    from test_cache_teacher import assert_same_store, make_cfg
    from goose.pipeline.stage_one.cache_teacher import run_cache_teacher

    cfg = make_cfg(tmp_path / "p.zarr", tiny_teacher, corpus_file, hidden_layers="0,-1", hidden_dtype=dtype,
                   hidden_pca_rank=4)
    run_cache_teacher(cfg)
    reader = CacheReader(cfg.output)
    assert reader.spec.hidden_pca_rank == 4 and reader.array("hidden/2").shape[-1] == 4
    data = reader.read(0, reader.n_windows)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(data["input_ids"].astype(np.int64)), output_hidden_states=True)
    bases = reader.pca_basis()
    for layer in (0, 2):
        h = out.hidden_states[layer].double().numpy()
        mean, basis = fit_pca(h[: reader.spec.block_windows], 4)  # fitted on block 0
        assert np.abs(bases[layer][1] - basis).max() < 1e-4 and np.abs(bases[layer][0] - mean).max() < 1e-4
        want = (h - mean) @ basis.T @ basis + mean  # the best rank-4 reconstruction through that basis
        scale = np.abs(h).max()
        assert np.abs(data[f"hidden/{layer}"] - want).max() < (2e-2 if dtype == "int8" else 2e-3) * scale
    # resume: drop the last block's mark, rerun: the same store byte for byte in every array
    import shutil

    ref = tmp_path / "ref.zarr"
    shutil.copytree(cfg.output, ref)
    group = zarr.open_group(cfg.output, mode="r+")
    attrs = dict(group.attrs["goose"])
    attrs["complete"] = False
    attrs["attrs_crc32"] = attrs_checksum(attrs)
    group.attrs.put({"goose": attrs})
    done = group["blocks_done"]
    done[done.shape[0] - 1] = 0
    run_cache_teacher(cfg)
    assert_same_store(ref, cfg.output)


def test_hidden_pca_needs_one_process(tmp_path, tiny_teacher, corpus_file):
    from test_cache_teacher import make_cfg
    from goose.errors import GooseError
    from goose.pipeline.stage_one.cache_teacher import run_cache_teacher

    cfg = make_cfg(tmp_path / "p.zarr", tiny_teacher, corpus_file, hidden_layers="-1", hidden_pca_rank=4,
                   shard=(0, 2))
    with pytest.raises(GooseError, match="needs one process"):
        run_cache_teacher(cfg)
    cfg = make_cfg(tmp_path / "p.zarr", tiny_teacher, corpus_file, hidden_pca_rank=4)
    with pytest.raises(GooseError, match="needs --hidden-layers"):
        run_cache_teacher(cfg)

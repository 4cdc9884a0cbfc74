"""Masked (instruction) data: prompt/response and pre-tokenised rows packed with a loss mask, stored in the
store, and honoured by KD, CE, RS-KD, alignment and validation, against brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from goose.cache.reader import CacheReader
from goose.cache.schema import StoreSpec
from goose.cache.stats import verify_store
from goose.cli import main
from goose.errors import GooseError
from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.stage_two.config import load_config
from goose.pipeline.data import DataSpec
from goose.pipeline.stage_two.losses import ce_loss, cosine_align, kd_loss, mse_align, rskd_loss, standardize_channels
from goose.pipeline.stage_one.targets import teacher_targets
from goose.pipeline.stage_two.train import Trainer

from conftest import SHARED, need

SEQ = 32
TEMPS = (1.0, 1.5, 2.0)


def _texts(n: int) -> list[str]:
    text = need(SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()[:40000]
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paras[:n]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cache(out, teacher, files, **data) -> str:
    cfg = CacheTeacherConfig(output=str(out), teacher=str(teacher), data=DataSpec(data_files=(str(files),), **data),
                             seq_len=SEQ, top_k=16, tail_temperatures=TEMPS, hidden_layers="1", samples=4,
                             chunk_windows=4, batch_size=4, device="cpu", progress=False)
    run_cache_teacher(cfg)
    return str(out)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    texts = _texts(60)
    rows = [{"prompt": f"Q{i}: " + a[:80], "response": b} for i, (a, b) in enumerate(zip(texts[::2], texts[1::2]))]
    return rows, _write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, tiny_teacher, pairs):
    return _cache(tmp_path_factory.mktemp("ms") / "m.zarr", tiny_teacher, pairs[1], text_column="prompt",
                  response_column="response")


def test_prompt_response_mask_is_zero_exactly_on_prompt_predictions(masked_store, tiny_teacher, pairs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    stream, target = [], []  # brute force: re-tokenise every row; target[j] = 1 when token j is a response/EOS token
    for row in pairs[0]:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        r = tok(row["response"], add_special_tokens=False)["input_ids"]
        stream += p + r + [tok.eos_token_id]
        target += [0] * len(p) + [1] * (len(r) + 1)
    reader = CacheReader(masked_store)
    assert reader.spec.loss_mask and "loss_mask" in reader.fields()
    assert reader.meta["spec"]["loss_mask"] is True
    got = reader.read(0, reader.n_windows, ["input_ids", "loss_mask"])
    n = reader.n_windows
    assert n == len(stream) // SEQ
    np.testing.assert_array_equal(got["input_ids"].reshape(-1), stream[: n * SEQ])
    want = np.array(target[1 : n * SEQ + 1] + [0] * max(0, n * SEQ + 1 - len(target)), dtype=np.uint8)
    assert got["loss_mask"].dtype == np.uint8
    np.testing.assert_array_equal(got["loss_mask"].reshape(-1), want)  # mask[t] = is token t + 1 a response token
    assert 0 < want.mean() < 1
    report = verify_store(masked_store)  # the mask is checksummed and checked like every array
    assert report.ok, report.failures
    assert "loss_mask" in reader.meta["checksums"]["arrays"]


def test_pretokenised_rows_keep_their_mask(tmp_path, tiny_teacher):
    g = np.random.default_rng(0)
    rows = []
    for _ in range(30):
        n = int(g.integers(5, 40))
        rows.append({"input_ids": g.integers(0, 50000, n).tolist(), "loss_mask": g.integers(0, 2, n).tolist()})
    files = _write_jsonl(tmp_path / "tok.jsonl", rows)
    store = _cache(tmp_path / "t.zarr", tiny_teacher, files, text_column="input_ids")
    eos = 50256
    stream = [t for r in rows for t in r["input_ids"] + [eos]]
    target = [m for r in rows for m in r["loss_mask"] + [r["loss_mask"][-1]]]
    got = CacheReader(store).read(0, CacheReader(store).n_windows, ["input_ids", "loss_mask"])
    n = len(got["input_ids"])
    np.testing.assert_array_equal(got["input_ids"].reshape(-1), stream[: n * SEQ])
    np.testing.assert_array_equal(got["loss_mask"].reshape(-1), target[1 : n * SEQ + 1])

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [1, 0]}] * 40)
    with pytest.raises(GooseError, match="loss_mask"):
        _cache(tmp_path / "bad.zarr", tiny_teacher, bad, text_column="input_ids")


# ---- losses against brute force over the masked positions only ------------------------------------


def _case(B=3, L=7, V=200, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    zt, zs = torch.randn(B, L, V, generator=g) * 3, torch.randn(B, L, V, generator=g) * 2
    t = teacher_targets(zt, torch.zeros(B, L, dtype=torch.long), top_k=k, tail_temperatures=TEMPS)
    mask = (torch.rand(B, L, generator=g) < 0.5).to(torch.int16)  # as the loader hands it over
    mask[0, 0] = 1
    ids = torch.randint(0, V, (B, L), generator=g)
    return zt, zs, t["topk_ids"].clone(), t["topk_logprobs"].clone(), t["tail_logmass"].clone(), mask, ids


def _bucket_kl_per_token(zt, zs, ti, T):
    def buckets(z):
        p = torch.softmax(z.double() / T, -1)
        outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ti, False)
        return torch.cat([p.gather(-1, ti), (p * outside).sum(-1, keepdim=True)], -1)

    p, q = buckets(zt), buckets(zs)
    return T * T * (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("T", [1.0, 1.5, 2.0])
def test_masked_kd_is_the_mean_over_masked_positions(T):
    zt, zs, ti, lp, tail, mask, _ = _case()
    got = kd_loss(zs, ti, lp, tail, TEMPS, T, mask=mask)
    ref = _bucket_kl_per_token(zt, zs, ti, T)[mask.bool()].mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_masked_ce_and_rskd_are_means_over_masked_positions():
    _, zs, _, _, _, mask, ids = _case()
    got = ce_loss(zs, ids, mask=mask)
    logq = F.log_softmax(zs.double(), -1)
    nll = -logq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # prediction at t of token t + 1
    torch.testing.assert_close(got.double(), nll[mask[:, :-1].bool()].mean(), rtol=1e-5, atol=1e-6)

    g = torch.Generator().manual_seed(1)
    sids = torch.randint(0, zs.shape[-1], zs.shape[:2] + (4,), generator=g)
    counts = torch.randint(1, 5, sids.shape, generator=g)
    t = counts.double() / counts.sum(-1, keepdim=True)
    per = (t * (t.log() - logq.gather(-1, sids))).sum(-1)
    torch.testing.assert_close(rskd_loss(zs, sids, counts, mask=mask).double(), per[mask.bool()].mean(),
                               rtol=1e-5, atol=1e-6)


def test_masked_alignment_and_an_all_zero_batch():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    proj = torch.nn.Linear(8, 6)
    diff = (proj(hs) - standardize_channels(ht)).square().mean(-1)
    torch.testing.assert_close(mse_align(hs, ht, proj, mask=mask), diff[mask.bool()].mean())
    cos = 1 - F.cosine_similarity(proj(hs), standardize_channels(ht), dim=-1)
    torch.testing.assert_close(cosine_align(hs, ht, proj, mask=mask), cos[mask.bool()].mean())

    zt, zs, ti, lp, tail, mask, ids = _case()
    zs.requires_grad_(True)
    zero = torch.zeros_like(mask)
    loss = kd_loss(zs, ti, lp, tail, TEMPS, 1.0, mask=zero) + ce_loss(zs, ids, mask=zero)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(zs.grad).all() and float(zs.grad.abs().max()) == 0.0


# ---- stage two on stores with and without a mask ----------------------------------------------------


def _train_cfg(store, out, *overrides):
    base = ["model.preset=tiny", "batch_size=4", "steps=4", "val_every=4", "log_every=1", "ckpt_every=4",
            "val_windows=4", "tensorboard=false", "optim.warmup_steps=1", "device=cpu"]
    return load_config(None, base + list(overrides), cache=store, out=str(out))


def _steps(trainer, n=3):
    return [{k: float(v) for k, v in trainer.train_step().items() if isinstance(v, (int, float, torch.Tensor))}
            for _ in range(n)]


ALIGN = ["loss.align_weight=0.5", "loss.align.warmup_steps=0", "loss.align.ramp_steps=1", "loss.ce_weight=0.5"]


def test_all_ones_mask_trains_exactly_like_no_mask(tmp_path, tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    # a token after the last window, so that every prediction in the store has its target (else the last is 0)
    texts = next(t for n in range(40, 60) for t in [_texts(n)]
                 if sum(len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in t) % SEQ)
    plain = _cache(tmp_path / "plain.zarr", tiny_teacher, _write_jsonl(tmp_path / "plain.jsonl",
                                                                        [{"text": t} for t in texts]))
    rows = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    rows = [dict(r, loss_mask=[1] * len(r["input_ids"])) for r in rows]
    ones = _cache(tmp_path / "ones.zarr", tiny_teacher, _write_jsonl(tmp_path / "ones.jsonl", rows),
                  text_column="input_ids")
    a, b = CacheReader(plain), CacheReader(ones)
    assert not a.spec.loss_mask and "loss_mask" not in a.meta["spec"] and b.spec.loss_mask
    np.testing.assert_array_equal(a.read(0, a.n_windows, ["input_ids"])["input_ids"],
                                  b.read(0, b.n_windows, ["input_ids"])["input_ids"])
    assert (b.read(0, b.n_windows, ["loss_mask"])["loss_mask"] == 1).all()
    for overrides in ([], ALIGN, ["loss.kd=rskd"]):
        ta = Trainer(_train_cfg(plain, tmp_path / f"a{len(overrides)}{overrides[:1]}", *overrides), progress=False)
        tb = Trainer(_train_cfg(ones, tmp_path / f"b{len(overrides)}{overrides[:1]}", *overrides), progress=False)
        assert "loss_mask" in tb.fields and "loss_mask" not in ta.fields
        sa, sb = _steps(ta), _steps(tb)
        for x, y in zip(sa, sb):
            assert {"kd", "ce", "loss", "grad_norm"} <= set(x) and ("align" in x) == bool(overrides == ALIGN)
            for key in ("kd", "ce", "align", "loss", "grad_norm"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (overrides, key)
        va, vb = ta.validate(), tb.validate()
        for key in ("val_loss", "teacher_ppl", "val_kl", "val_top1_agree"):
            assert va[key] == pytest.approx(vb[key], rel=1e-6), key


def test_masked_store_trains_and_validates_over_masked_tokens(tmp_path, masked_store):
    trainer = Trainer(_train_cfg(masked_store, tmp_path / "run", *ALIGN), progress=False)
    assert "loss_mask" in trainer.fields
    for m in _steps(trainer, 2):
        assert all(np.isfinite(v) for v in m.values())
    val = trainer.validate()
    assert np.isfinite(val["val_loss"]) and val["val_ppl"] > 1


def test_old_store_without_the_array_still_trains(tmp_path, tiny_teacher, corpus_file):
    store = _cache(tmp_path / "old.zarr", tiny_teacher, corpus_file)
    reader = CacheReader(store)
    assert "loss_mask" not in reader.meta["spec"] and "loss_mask" not in reader.fields()
    spec = dict(reader.meta["spec"])  # what a store written before masks holds: read as unmasked
    assert StoreSpec.from_attrs(spec).loss_mask is False
    trainer = Trainer(_train_cfg(store, tmp_path / "run"), progress=False)
    assert "loss_mask" not in trainer.fields
    for m in _steps(trainer, 2):
        assert np.isfinite(m["loss"])


def test_cli_response_column(tmp_path, tiny_teacher, pairs):
    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tiny_teacher), "--data-files", pairs[1],
                                  "--text-column", "prompt", "--response-column", "response", "--seq-len", str(SEQ),
                                  "--top-k", "8", "--device", "cpu", "--no-progress", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["spec"]["loss_mask"] is True
    r = CliRunner().invoke(main, ["cache-teacher", "--teacher", str(tiny_teacher), "--data-files", pairs[1],
                                  "--text-column", "prompt", "--response-column", "answer", "--seq-len", str(SEQ),
                                  "--device", "cpu", "--no-progress", "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code != 0 and "answer" in r.output

"""Stage one against brute force: every stored value equals a direct full-logit computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from conftest import ENWIKI_TEACHER, GPT2_TOKENIZER, WIKITEXT_VALID, need, save_tiny_teacher
from goose.cache.reader import CacheReader
from goose.cache.stats import store_info, verify_store
from goose.cache.writer import CacheWriter
from goose.errors import GooseError
from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.data import DataSpec
from goose.pipeline.stage_one.targets import draw_samples, quantize_int8


def make_cfg(output, teacher, corpus, **kw) -> CacheTeacherConfig:
    defaults = dict(teacher=str(teacher), data=DataSpec(data_files=(str(corpus),)), seq_len=32, max_tokens=320,
                    top_k=8, chunk_windows=2, batch_size=2, progress=False, dtype="fp32", device="cpu")
    defaults.update(kw)
    return CacheTeacherConfig(output=str(output), **defaults)


def store_arrays(url) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(url), mode="r")
    out = {}

    def visit(g, prefix=""):
        for name, node in g.members():
            if isinstance(node, zarr.Group):
                visit(node, f"{prefix}{name}/")
            else:
                out[f"{prefix}{name}"] = node[:]

    visit(group)
    return out


def assert_same_store(a, b):
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    meta_a = zarr.open_group(str(a), mode="r").attrs["goose"]
    meta_b = zarr.open_group(str(b), mode="r").attrs["goose"]
    assert meta_a["spec"] == meta_b["spec"] and meta_a["complete"] and meta_b["complete"]
    prov_a, prov_b = dict(meta_a["provenance"]), dict(meta_b["provenance"])
    assert prov_a == prov_b


def test_gpt2_tokenizer_loads_from_folder():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(need(GPT2_TOKENIZER)))
    assert tok("Hello world")["input_ids"] == [15496, 995]


@pytest.mark.parametrize("encoding", ["fixed16", "compact"])
def test_stored_values_equal_full_logit_computation(tmp_path, tiny_teacher, corpus_file, encoding):
    cfg = make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file, samples=20, hidden_layers="0,-1",
                   tail_temperatures=(1.0, 2.0, 3.5), topk_encoding=encoding)
    compact = encoding == "compact"
    summary = run_cache_teacher(cfg)
    assert summary["windows"] == 10 and summary["tokens"] == 320
    reader = CacheReader(cfg.output)
    data = reader.read(0, reader.n_windows)
    assert reader.spec.hidden_layers == (0, 2) and reader.spec.token_dtype == "uint16"
    assert data["input_ids"].dtype == np.uint16 and data["topk_logprobs"].dtype == np.float32

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).eval()
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    z = out.logits.double()

    # top-k: the stored ids are torch.topk's, with their log-probabilities (fixed16: fixed point, 4.9e-4 nats;
    # compact: by id, each within step / 2 of the top-1 and renormalised against the tail, so within a step)
    ref_vals, ref_ids = z.topk(8, dim=-1)
    if compact:  # read back by probability, the top-1 exact: entries whose rounded log p tie may swap
        assert (torch.from_numpy(data["topk_ids"][..., 0].astype(np.int64)) == ref_ids[..., 0]).all()
        ref_ids, order = ref_ids.sort(-1)
        ref_vals = ref_vals.gather(-1, order)
        order = np.argsort(data["topk_ids"], -1)
        data["topk_ids"] = np.take_along_axis(data["topk_ids"], order, -1)
        data["topk_logprobs"] = np.take_along_axis(data["topk_logprobs"], order, -1)
        assert (torch.from_numpy(data["topk_ids"].astype(np.int64)) == ref_ids).all()
    at_ids = z.gather(-1, torch.from_numpy(data["topk_ids"].astype(np.int64)))
    torch.testing.assert_close(at_ids, ref_vals, atol=1e-5, rtol=1e-5)
    ref_logp = ref_vals - torch.logsumexp(z, -1, keepdim=True)
    bound = reader.spec.logprob_step if compact else 5e-4
    assert (torch.from_numpy(data["topk_logprobs"]).double() - ref_logp).abs().max() <= bound
    # tail log-mass at every stored temperature: the probability outside the top-k, summed by brute force
    outside = torch.ones_like(z, dtype=torch.bool).scatter(-1, torch.from_numpy(data["topk_ids"].astype(np.int64)), False)
    for j, t in enumerate((1.0, 2.0, 3.5)):
        ref_tail = (torch.softmax(z / t, -1) * outside).sum(-1).log()
        torch.testing.assert_close(torch.from_numpy(data["tail_logmass"][..., j]).double(), ref_tail,
                                   atol=1e-5, rtol=2.0**-13 + 1e-5 if compact else 1e-5)  # compact: 12 bits
    # gold NLL = cross-entropy on the next token; last position NaN
    nll = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(torch.from_numpy(data["gold_nll"][:, :-1]).double().reshape(-1), nll,
                               atol=1e-4, rtol=1e-5)
    assert np.isnan(data["gold_nll"][:, -1]).all()
    p = z.softmax(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(torch.from_numpy(data["entropy"].astype(np.float64)), entropy, atol=5e-3, rtol=2e-3)
    # hidden states (fp16) and the embedding matrix
    for layer in (0, 2):
        torch.testing.assert_close(torch.from_numpy(data[f"hidden/{layer}"]).float(), out.hidden_states[layer],
                                   atol=2e-3, rtol=2e-3)
    from transformers import AutoTokenizer

    assert reader.save_tokenizer(tmp_path / "tok")  # the store carries its tokenizer
    stored_tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert stored_tok("Hello world")["input_ids"] == [15496, 995]
    emb = reader.teacher_embedding()
    # the float16 rounding of the weights, bit for bit numpy's (the store converts with torch)
    np.testing.assert_array_equal(emb, model.transformer.wte.weight.detach().numpy().astype(np.float16))
    # RS-KD samples: exactly what 20 seeded draws per token give, counted by np.unique
    counts, sample_ids = data["sample_counts"], data["sample_ids"]
    assert (counts.sum(-1) == 20).all()
    for w in (0, 7):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + w)
        draws = torch.multinomial(torch.softmax(out.logits[w].float(), -1), 20, replacement=True, generator=gen)
        for pos in (0, 5, 31):
            uniq, cnt = np.unique(draws[pos].numpy(), return_counts=True)
            n = len(uniq)
            np.testing.assert_array_equal(sample_ids[w, pos, :n], uniq)
            np.testing.assert_array_equal(counts[w, pos, :n], cnt)
            assert (counts[w, pos, n:] == 0).all()
    # the store's summary statistics agree with the direct computation
    info = store_info(cfg.output)
    mass = p.gather(-1, torch.from_numpy(data["topk_ids"].astype(np.int64))).sum(-1).mean().item()
    assert info["mean_topk_coverage"] == pytest.approx(mass, abs=1e-3)
    assert info["teacher_ppl"] == pytest.approx(float(nll.mean().exp()), rel=1e-4)
    assert verify_store(cfg.output).ok


def test_draw_samples_counts_match_unique():
    logits = torch.randn(2, 3, 50) * 2
    ids, counts = draw_samples(logits, 30, [5, 6])
    for b, seed in enumerate((5, 6)):
        gen = torch.Generator().manual_seed(seed)
        draws = torch.multinomial(torch.softmax(logits[b], -1), 30, replacement=True, generator=gen)
        for pos in range(3):
            uniq, cnt = np.unique(draws[pos].numpy(), return_counts=True)
            assert ids[b, pos, : len(uniq)].tolist() == uniq.tolist()
            assert counts[b, pos, : len(uniq)].tolist() == cnt.tolist()


def test_int8_hidden_states_dequantize_within_half_a_step(tmp_path, tiny_teacher, corpus_file):
    cfg = make_cfg(tmp_path / "q.zarr", tiny_teacher, corpus_file, hidden_layers="1", hidden_dtype="int8")
    run_cache_teacher(cfg)
    reader = CacheReader(cfg.output)
    raw = reader.read(0, 4, ["hidden/1", "hidden_scale/1", "hidden_channel_scale/1", "input_ids"], dequantize=False)
    assert raw["hidden/1"].dtype == np.int8 and raw["hidden_scale/1"].dtype == np.float16
    deq = reader.read(0, 4, ["hidden/1"])["hidden/1"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).eval()
    with torch.no_grad():
        h = model(torch.from_numpy(raw["input_ids"].astype(np.int64)), output_hidden_states=True).hidden_states[1]
    step = raw["hidden_scale/1"].astype(np.float32)[..., None] * raw["hidden_channel_scale/1"].astype(np.float32)[:, None]
    assert (np.abs(deq - h.numpy()) <= 0.5 * step + 1e-3 * np.abs(h.numpy()) + 1e-6).all()


def test_int8_keeps_ordinary_channels_beside_outlier_channels():
    # GPT-2's residual stream: a few channels ~100x the typical one, and a first position far above the rest
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 128, 256, generator=g)
    h[..., [7, 99, 200]] *= 100.0
    h[:, 0] *= 30.0
    q, token, channel = quantize_int8(h)
    deq = q.float() * token.float().unsqueeze(-1) * channel.float().unsqueeze(1)
    ordinary = [c for c in range(256) if c not in (7, 99, 200)]
    rel = (deq - h)[:, 1:, ordinary].norm() / h[:, 1:, ordinary].norm()
    assert rel < 0.02, f"ordinary channels off by {rel:.1%}"
    # per-token absmax alone (the v1 store) loses a large part of them
    scale = h.abs().amax(-1, keepdim=True) / 127
    old = (torch.round(h / scale) * scale - h)[:, 1:, ordinary].norm() / h[:, 1:, ordinary].norm()
    assert old > 0.15
    assert (deq - h)[:, 0].norm() / h[:, 0].norm() < 0.02  # the outlier token keeps its own range


def test_large_vocabulary_uses_int32_ids(tmp_path, corpus_file):
    teacher = save_tiny_teacher(tmp_path / "big_vocab", vocab_size=70000, n_layer=1)
    cfg = make_cfg(tmp_path / "v.zarr", teacher, corpus_file, max_tokens=96)
    run_cache_teacher(cfg)
    data = CacheReader(cfg.output).read(0, 3, ["input_ids", "topk_ids"])
    assert data["topk_ids"].dtype == np.int32 and data["input_ids"].dtype == np.int32
    assert verify_store(cfg.output).ok


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    kw = dict(samples=8, hidden_layers="1")
    full = make_cfg(tmp_path / "full.zarr", tiny_teacher, corpus_file, **kw)
    run_cache_teacher(full)

    part = make_cfg(tmp_path / "part.zarr", tiny_teacher, corpus_file, **kw)
    real_write = CacheWriter.write_block
    calls = {"n": 0}

    class DiesOnWrite:  # an array whose write crashes, after the arrays before it were written
        def __init__(self, array):
            self.array = array

        def __getattr__(self, name):
            return getattr(self.array, name)

        def __setitem__(self, key, value):
            raise RuntimeError("simulated crash")

    def crashing_write(self, block, data):
        calls["n"] += 1
        if calls["n"] == 3:  # block 3 dies half-written: ids and top-k on disk, gold_nll and after not
            self._arrays = {**self._arrays, "gold_nll": DiesOnWrite(self._arrays["gold_nll"])}
        return real_write(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cache_teacher(part)
    monkeypatch.setattr(CacheWriter, "write_block", real_write)
    half = CacheReader(str(part.output), allow_incomplete=True)
    assert not half.complete and half.blocks_done().sum() == 2
    with pytest.raises(GooseError, match="not complete"):
        CacheReader(str(part.output))

    from goose.pipeline.stage_one import cache_teacher

    sizes = []  # the size the kernels are chosen by: the whole store's, so a resume chooses as the first run did
    real_choice = cache_teacher.use_compiled_targets
    monkeypatch.setattr(cache_teacher, "use_compiled_targets", lambda cfg, device, vocab, tokens: sizes.append(tokens)
                        or real_choice(cfg, device, vocab, tokens))
    summary = run_cache_teacher(part)
    assert summary["blocks_resumed_from"] == 2 and summary["tokens_computed"] == 3 * 2 * 32
    assert sizes == [summary["tokens"]] and summary["tokens"] > summary["tokens_computed"]
    assert_same_store(full.output, part.output)
    again = run_cache_teacher(part)  # a finished store: nothing to do, nothing changed
    assert again["already_complete"] and again["tokens_computed"] == 0
    assert_same_store(full.output, part.output)


def test_existing_store_with_other_parameters_is_refused(tmp_path, tiny_teacher, corpus_file):
    cfg = make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file)
    run_cache_teacher(cfg)
    before = store_arrays(cfg.output)
    with pytest.raises(GooseError, match=r"other parameters \(spec.top_k: 8 -> 4"):
        run_cache_teacher(make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file, top_k=4))
    with pytest.raises(GooseError, match="data_fingerprint"):
        run_cache_teacher(make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file, max_tokens=352))
    after = store_arrays(cfg.output)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_other_weights_in_the_same_folder_are_refused(tmp_path, corpus_file):
    folder = save_tiny_teacher(tmp_path / "teacher", n_layer=1, seed=0)
    cfg = make_cfg(tmp_path / "s.zarr", folder, corpus_file, max_tokens=64)
    run_cache_teacher(cfg)
    save_tiny_teacher(folder, n_layer=1, seed=1)  # same config and path, new checkpoint
    with pytest.raises(GooseError, match="weights_hash"):
        run_cache_teacher(cfg)


def test_sharded_blosc_store_round_trips(tmp_path, tiny_teacher, corpus_file):
    plain = make_cfg(tmp_path / "plain.zarr", tiny_teacher, corpus_file)
    sharded = make_cfg(tmp_path / "sharded.zarr", tiny_teacher, corpus_file, shard_chunks=2, compression="blosc")
    run_cache_teacher(plain)
    run_cache_teacher(sharded)
    assert CacheReader(str(sharded.output)).spec.block_windows == 4
    a, b = store_arrays(plain.output), store_arrays(sharded.output)
    for name in a:
        if name not in ("blocks_done", "chunk_checksums"):  # bookkeeping per block: shards are blocks here
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert verify_store(sharded.output).ok


def test_fsspec_memory_url(tiny_teacher, corpus_file):
    cfg = make_cfg("memory://goose-test/s.zarr", tiny_teacher, corpus_file, max_tokens=128)
    summary = run_cache_teacher(cfg)
    assert summary["bytes_on_disk"] > 0
    reader = CacheReader("memory://goose-test/s.zarr")
    assert reader.complete and reader.read(0, 4)["topk_ids"].shape == (4, 32, 8)


def test_enwiki_teacher_on_wikitext_passes_verify_and_matches_hf_loss(tmp_path):
    teacher = need(ENWIKI_TEACHER)
    cfg = make_cfg(tmp_path / "wt2.zarr", teacher, need(WIKITEXT_VALID), seq_len=128, max_tokens=2048,
                   top_k=64, chunk_windows=4, batch_size=4, hidden_layers="2")
    run_cache_teacher(cfg)
    assert verify_store(cfg.output).ok
    reader = CacheReader(cfg.output)
    ids = torch.from_numpy(reader.read(0, reader.n_windows, ["input_ids"])["input_ids"].astype(np.int64))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # HF's own mean next-token NLL over the same windows
    info = store_info(cfg.output)
    assert info["teacher_mean_nll"] == pytest.approx(loss, abs=1e-4)
    assert 0.3 < info["mean_topk_coverage"] < 1.0


@pytest.mark.parametrize("pca_rank", [0, 4])
@pytest.mark.parametrize("schedule", ["targets_thread", "batch_workers"])
def test_every_schedule_equals_targets_in_order(tiny_teacher, corpus_file, tmp_path, monkeypatch, schedule, pca_rank):
    """On CPU a batch's targets (and GPT-2's LM head) are computed while the next batch's forward runs, or
    whole batches on two worker threads, across block boundaries (and with a PCA basis fitted on block 0);
    the arrays are identical to the whole model's logits reduced in order at one torch thread, the batches
    really ran on the schedule's threads, and threads started afterwards keep the caller's thread count."""
    import threading

    from goose.cache.schema import StoreSpec
    from goose.pipeline.stage_one import cache_teacher
    from goose.pipeline.stage_one.cache_teacher import compute_blocks
    from goose.pipeline.teacher import load_teacher

    teacher = load_teacher(str(tiny_teacher), dtype="fp32", device="cpu")
    assert teacher.body_and_head() is not None  # the overlapped path runs the LM head on the targets thread
    spec = StoreSpec(n_windows=17, seq_len=16, vocab_size=teacher.vocab_size, top_k=8, tail_temperatures=(1.0, 2.0),
                     hidden_layers=(1, 2), hidden_pca_rank=pca_rank,
                     hidden_size=teacher.hidden_size, hidden_dtype="int8", samples=4, chunk_windows=7)
    cfg = make_cfg(tmp_path / "unused.zarr", tiny_teacher, corpus_file, batch_size=2)
    windows = np.random.default_rng(0).integers(0, teacher.vocab_size, (17, 16))
    blocks = [(b, windows[slice(*spec.block_range(b))], None) for b in (0, 1, 2)]  # 7 + 7 + 3 windows
    ran_on = []
    batch_targets = cache_teacher._batch_targets

    def recording(*args, **kw):
        ran_on.append((threading.current_thread().name, torch.get_num_threads()))
        return batch_targets(*args, **kw)

    monkeypatch.setattr(cache_teacher, "_batch_targets", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch workers at two threads run one torch thread each: so does the reference
    try:
        in_order = list(compute_blocks(teacher, blocks, spec, cfg, schedule="in_order"))
    finally:
        torch.set_num_threads(threads)
    assert {name for name, _ in ran_on} == {threading.current_thread().name}
    ran_on.clear()
    torch.set_num_threads(2)
    try:
        overlapped = list(compute_blocks(teacher, blocks, spec, cfg, schedule=schedule))
        later = []
        probe = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        assert later == [2]
    finally:
        torch.set_num_threads(threads)
    assert len(ran_on) == 10  # 4 + 4 + 2 batches of (up to) 2 windows
    assert all(name.startswith("goose-targets") and n == 1 for name, n in ran_on)
    assert len({name for name, _ in ran_on}) == (2 if schedule == "batch_workers" else 1)
    assert [b for b, _, _ in in_order] == [b for b, _, _ in overlapped] == [0, 1, 2]
    for (_, a, basis_a), (_, b, basis_b) in zip(in_order, overlapped):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert (basis_a is None) == (basis_b is None)
    assert (in_order[0][2] is not None) == bool(pca_rank)
    np.testing.assert_array_equal(np.concatenate([d["input_ids"] for _, d, _ in overlapped]), windows)


def test_non_finite_teacher_logits_fail_with_one_line_and_no_complete_store(tiny_teacher, corpus_file, tmp_path,
                                                                             monkeypatch):
    """The error raised on the targets thread reaches the command as its one-line message, naming the windows."""
    real = torch.nn.Linear.forward

    def nan_head(self, x):  # GPT-2's only nn.Linear is its LM head (its blocks use Conv1D)
        out = real(self, x)
        out[-1, 3, 5] = float("nan")  # every batch
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", nan_head)
    out = tmp_path / "nan.zarr"
    with pytest.raises(GooseError, match=r"non-finite logits in windows 0\.\.1; try --dtype fp32"):
        run_cache_teacher(make_cfg(out, tiny_teacher, corpus_file))
    assert not zarr.open_group(str(out), mode="r").attrs["goose"]["complete"]


def test_compiled_targets_store_equals_eager_store(tmp_path):
    """`compile_targets` on: enwiki-tiny's store through the compiled kernels holds the eager store's values
    (ids exactly; quantised codes within one step where fp32 rounding crossed a boundary, almost never)."""
    teacher = need(ENWIKI_TEACHER)
    stores = {}
    for on in (True, False):
        cfg = make_cfg(tmp_path / f"{on}.zarr", teacher, need(WIKITEXT_VALID), seq_len=128, max_tokens=2048,
                       top_k=64, chunk_windows=4, batch_size=4, compile_targets=on)
        assert run_cache_teacher(cfg)["targets_compiled"] is on
        stores[on] = store_arrays(cfg.output)
    compiled, eager = stores[True], stores[False]
    # the 4 MB embedding is written in 2 MB row chunks, each checksummed and read back whole
    reader = CacheReader(cfg.output)
    assert reader.array("teacher_embedding").chunks == (4096, 256)
    assert sum(key.startswith("teacher_embedding/") for key in reader.group.attrs["goose"]["checksums"]["once"]) == 2
    assert verify_store(cfg.output).ok
    from transformers import AutoModelForCausalLM

    wte = AutoModelForCausalLM.from_pretrained(str(teacher)).get_input_embeddings().weight.detach()
    np.testing.assert_array_equal(reader.teacher_embedding(), wte.numpy().astype(np.float16))
    assert sorted(compiled) == sorted(eager)
    for name in eager:
        a, b = compiled[name], eager[name]
        if name == "chunk_checksums":  # of the bytes written, which may differ by those rounding steps
            continue
        if "ids" in name or name == "input_ids":
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif np.issubdtype(b.dtype, np.integer):
            assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1, name
            assert (a == b).mean() > 0.99, name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=name)


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_teacher, corpus_file, tmp_path, monkeypatch):
    """Where inductor cannot build the kernels (no C++ compiler, say), the run warns once and finishes with
    the eager ops: the store equals one made without compiling. An error while running them is not taken for
    a compiler's. And the default picks compiling only for a CPU run large enough to repay it."""
    from goose.pipeline.stage_one import cache_teacher, targets as targets_mod

    def no_compiler(*a, **kw):
        raise RuntimeError("inductor: no working C++ compiler found")

    monkeypatch.setattr(targets_mod, "compiled_reductions", no_compiler)
    monkeypatch.setattr(cache_teacher, "_COMPILE_FAILED", [])
    with pytest.warns(UserWarning, match="compiled teacher targets failed .*no working C\\+\\+ compiler"):
        summary = run_cache_teacher(make_cfg(tmp_path / "fallback.zarr", tiny_teacher, corpus_file, compile_targets=True))
    assert summary["targets_compiled"] is False
    assert len(cache_teacher._COMPILE_FAILED) == 1  # once: every later batch goes straight to eager
    run_cache_teacher(make_cfg(tmp_path / "eager.zarr", tiny_teacher, corpus_file, compile_targets=False))
    assert_same_store(tmp_path / "fallback.zarr", tmp_path / "eager.zarr")

    def broken_kernels(*a, **kw):  # built fine, then fails at run time: the run's error, no fallback
        raise MemoryError("out of memory in a kernel")

    monkeypatch.setattr(cache_teacher, "_COMPILE_FAILED", [])
    monkeypatch.setattr(targets_mod, "compiled_reductions", lambda *a, **kw: None)
    monkeypatch.setattr(targets_mod, "topk_rows", broken_kernels)
    with pytest.raises(MemoryError):
        run_cache_teacher(make_cfg(tmp_path / "broken.zarr", tiny_teacher, corpus_file, compile_targets=True))
    assert cache_teacher._COMPILE_FAILED == []

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = make_cfg(tmp_path / "x.zarr", tiny_teacher, corpus_file)
    assert not cache_teacher.use_compiled_targets(auto, cpu, 8192, 100_000)  # compiling would cost more
    assert cache_teacher.use_compiled_targets(auto, cpu, 8192, 2_000_000)
    assert cache_teacher.use_compiled_targets(auto, cpu, 50257, 200_000)
    assert not cache_teacher.use_compiled_targets(auto, cuda, 50257, 10**9)  # GPU reductions are cheap already
    forced = make_cfg(tmp_path / "x.zarr", tiny_teacher, corpus_file, compile_targets=False)
    assert not cache_teacher.use_compiled_targets(forced, cpu, 50257, 10**9)


def test_several_writer_threads_write_the_same_store_and_a_crash_keeps_only_whole_blocks(
        tmp_path, tiny_teacher, corpus_file, monkeypatch):
    """BlockWriterPool: 3 threads write the bytes 1 thread writes; when one thread's block dies half-written,
    the command fails with that error, every block marked done is whole (verify passes on them), and a rerun
    finishes a store equal to the uninterrupted one."""
    import threading

    kw = dict(samples=8, hidden_layers="1", hidden_dtype="int8")
    one = make_cfg(tmp_path / "one.zarr", tiny_teacher, corpus_file, writer_threads=1, **kw)
    run_cache_teacher(one)
    many = make_cfg(tmp_path / "many.zarr", tiny_teacher, corpus_file, writer_threads=3, **kw)
    seen = set()
    real_write = CacheWriter.write_block

    def counting_write(self, block, data):
        seen.add(threading.current_thread().name)
        return real_write(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", counting_write)
    run_cache_teacher(many)
    assert len(seen) > 1  # blocks really went to several threads
    assert_same_store(one.output, many.output)

    part = make_cfg(tmp_path / "part.zarr", tiny_teacher, corpus_file, writer_threads=3, **kw)

    def crashing_write(self, block, data):
        if block == 2:
            self_arrays = dict(self._arrays)
            real_set = self_arrays["gold_nll"]

            class Dies:
                def __getattr__(self, name):
                    return getattr(real_set, name)

                def __setitem__(self, key, value):
                    raise RuntimeError("simulated crash in a writer thread")

            writer_copy = object.__new__(type(self))
            writer_copy.__dict__.update(self.__dict__, _arrays={**self_arrays, "gold_nll": Dies()})
            return real_write(writer_copy, block, data)
        return real_write(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash in a writer thread"):
        run_cache_teacher(part)
    monkeypatch.setattr(CacheWriter, "write_block", real_write)
    half = CacheReader(str(part.output), allow_incomplete=True)
    done = half.blocks_done()
    assert done[2] == 0 and not half.complete
    assert not half.integrity_problems()  # the blocks marked done are whole
    run_cache_teacher(part)
    assert_same_store(one.output, part.output)


def test_a_store_that_will_not_fit_the_disk_stops_after_its_first_block(tmp_path, tiny_teacher, corpus_file,
                                                                        monkeypatch):
    """The projection from the first written block's stored bytes against the disk's free space: with too
    little free, cache-teacher stops with one line naming both figures, keeps the finished block, and a rerun
    with space finishes a store equal to an uninterrupted one."""
    import collections
    import shutil

    kw = dict(samples=8, hidden_layers="1", hidden_dtype="int8")
    full = make_cfg(tmp_path / "full.zarr", tiny_teacher, corpus_file, **kw)
    run_cache_teacher(full)
    cfg = make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file, **kw)
    usage = collections.namedtuple("usage", "total used free")
    block_bytes = []
    real_write = CacheWriter.write_block

    def recording_write(self, block, data):
        real_write(self, block, data)
        block_bytes.append(self.block_nbytes[block])

    monkeypatch.setattr(CacheWriter, "write_block", recording_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 2000, 2000))
    with pytest.raises(GooseError, match=r"will not fit: its 4 unfinished blocks need about .* GB more .* 0.0 GB free"):
        run_cache_teacher(cfg)
    half = CacheReader(str(cfg.output), allow_incomplete=True)
    assert half.blocks_done().sum() >= 1 and not half.complete
    # the figure is the block's stored bytes: the chunk files of every per-window array of that block
    assert 4 * block_bytes[0] > 2000
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    run_cache_teacher(cfg)
    assert_same_store(full.output, cfg.output)


def test_top_k_encoded_on_the_device_writes_the_same_store(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    """On CUDA stage one encodes the compact top-k in torch before the copy to the host; forced on here (CPU
    tensors), the store is the one the host's numpy encode writes, byte for byte."""
    from goose.pipeline.stage_one import cache_teacher

    host = make_cfg(tmp_path / "host.zarr", tiny_teacher, corpus_file, samples=4)
    run_cache_teacher(host)
    calls = []
    monkeypatch.setattr(cache_teacher, "encode_topk_on_device", lambda device: calls.append(device) or True)
    device = make_cfg(tmp_path / "device.zarr", tiny_teacher, corpus_file, samples=4)
    run_cache_teacher(device)
    assert calls  # the torch encode ran
    assert_same_store(host.output, device.output)


def test_torch_top_k_encode_equals_numpy_on_ties_and_extremes():
    """cache.device_codec.encode_topk against cache.schema.encode_topk: ties in log p (the first maximum is
    the top-1; equal rel steps), rounding halves, a log p past the uint16 floor, any input order."""
    from goose.cache.device_codec import encode_topk as encode_torch
    from goose.cache.schema import encode_topk as encode_numpy

    rng = np.random.default_rng(0)
    step = 2.0**-4
    ids = np.stack([rng.permutation(50257)[:64] for _ in range(300)]).reshape(3, 100, 64)
    lp = (-rng.exponential(3.0, size=ids.shape)).astype(np.float32)
    lp[0, :, :5] = 0.0  # a five-way tie for the top-1 (every other log p is below 0)
    lp[1, :, 0], lp[1, :, 10] = 0.0, -2.5 * step  # the top-1, and an entry exactly 2.5 steps below it
    lp[2, :, 3] = -5000.0  # beyond 65535 steps: clipped
    want = encode_numpy(ids, lp, step, np.uint16)
    got = encode_torch(torch.from_numpy(ids), torch.from_numpy(lp), step)
    for w, g in zip(want, got):
        assert np.array_equal(g.numpy().astype(w.dtype), w)

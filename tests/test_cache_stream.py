"""Stage one streams its input: memory flat in the corpus size, the same windows as packing in memory,
resume on the same windows, `--max-tokens` still caps, and a failing background write fails the run."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from conftest import GPT2_TOKENIZER, SHARED, need
from goose.cache.reader import CacheReader
from goose.cache.writer import CacheWriter
from goose.errors import GooseError
from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.data import (
    DataSpec,
    WindowSpill,
    count_windows,
    iter_windows,
    load_texts,
    open_texts,
    tokenize_and_pack,
    windows_fingerprint,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(GPT2_TOKENIZER)))


def write_corpus(path, n_docs: int, first: int = 0) -> None:
    """n_docs JSON lines of Shakespeare (about 120 tokens each), every document distinct."""
    text = need(SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    with open(path, "w") as f:
        for i in range(first, first + n_docs):
            start = (i * 997) % (len(text) - 600)
            f.write(json.dumps({"text": f"{i}: {text[start : start + 500]}"}) + "\n")


def write_shards(folder, n_files: int, docs_per_file: int = 250) -> tuple[str, ...]:
    """A corpus in several files, as large corpora come (datasets buffers up to a file's worth of rows)."""
    folder.mkdir()
    for i in range(n_files):
        write_corpus(folder / f"part{i:03d}.jsonl", docs_per_file, first=i * docs_per_file)
    return tuple(str(folder / f"part{i:03d}.jsonl") for i in range(n_files))


def packing_peak(files, tokenizer, seq_len=64) -> tuple[int, int]:
    """Peak traced memory of stage one's input path: the counting pass into a spill file, then every
    window read back from it."""
    ds = open_texts(DataSpec(data_files=files))
    tracemalloc.start()
    try:
        with WindowSpill(seq_len, len(tokenizer), masked=False) as spill:
            n, _ = count_windows(ds, tokenizer, text_column="text", seq_len=seq_len, spill=spill)
            seen = sum(len(w) for w, _ in spill.batches())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    return n, peak


def test_packing_memory_is_flat_in_the_corpus_size(tmp_path, tokenizer):
    small, large = write_shards(tmp_path / "small", 4), write_shards(tmp_path / "large", 16)
    packing_peak(small[:1], tokenizer)  # warm-up: first-use allocations of datasets and the tokenizer
    n_small, peak_small = packing_peak(small, tokenizer)
    n_large, peak_large = packing_peak(large, tokenizer)
    assert n_large >= 3.9 * n_small
    assert peak_large < 1.10 * peak_small, (peak_small, peak_large)
    # and the bound is one that packing in memory (what stage one did before) fails: its windows alone are
    # n_large * 64 * 8 bytes (about 3.7 MB here)
    tracemalloc.start()
    try:
        tokenize_and_pack(open_texts(DataSpec(data_files=large)), tokenizer, text_column="text", seq_len=64)
        _, in_memory = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_memory > 1.10 * peak_small, (peak_small, in_memory)


def test_streamed_windows_equal_packing_in_memory(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    write_corpus(path, 40)
    stream = open_texts(DataSpec(data_files=(str(path),)))
    whole = tokenize_and_pack(load_texts(DataSpec(data_files=(str(path),))), tokenizer, text_column="text", seq_len=48)
    for batch_docs in (1, 7, 256):
        streamed = np.concatenate(list(iter_windows(stream, tokenizer, text_column="text", seq_len=48,
                                                    batch_docs=batch_docs)))
        np.testing.assert_array_equal(streamed, whole)
    n, fingerprint = count_windows(stream, tokenizer, text_column="text", seq_len=48)
    assert (n, fingerprint) == (len(whole), windows_fingerprint(whole))
    capped = np.concatenate(list(iter_windows(stream, tokenizer, text_column="text", seq_len=48, max_tokens=100)))
    np.testing.assert_array_equal(capped, whole[:2])  # 100 tokens cap: two whole windows


def test_spilled_windows_read_back_as_packed(tmp_path, tokenizer):
    """The spill gives back exactly the windows (and masks) the counting pass packed, as int64, in the batches
    appended; its files are never visible in their directory (unlinked at creation, so not even a kill leaves
    them behind); a directory it cannot write to is a one-line error."""
    path = tmp_path / "c.jsonl"
    write_corpus(path, 40)
    stream = open_texts(DataSpec(data_files=(str(path),)))
    whole = tokenize_and_pack(load_texts(DataSpec(data_files=(str(path),))), tokenizer, text_column="text", seq_len=48)
    for vocab, dtype in ((len(tokenizer), np.uint16), (70_000, np.int32)):
        with WindowSpill(48, vocab, masked=False, directory=str(tmp_path)) as spill:
            n, fingerprint = count_windows(stream, tokenizer, text_column="text", seq_len=48, spill=spill)
            assert spill.dtype == dtype and (n, fingerprint) == (len(whole), windows_fingerprint(whole))
            back = list(spill.batches())
            assert all(w.dtype == np.int64 and m is None for w, m in back)
            np.testing.assert_array_equal(np.concatenate([w for w, _ in back]), whole)
            # read twice (a second pass over the same spill gives the same)
            np.testing.assert_array_equal(np.concatenate([w for w, _ in spill.batches()]), whole)
            assert not list(tmp_path.glob("goose-*"))  # while in use
    # masked windows: the mask comes back with them
    windows = whole[:5]
    mask = (np.arange(windows.size).reshape(windows.shape) % 3 == 0).astype(np.uint8)
    with pytest.raises(RuntimeError):
        with WindowSpill(48, len(tokenizer), masked=True, directory=str(tmp_path)) as spill:
            spill.append(windows[:2], mask[:2])
            spill.append(windows[2:], mask[2:])
            (w1, m1), (w2, m2) = spill.batches()  # in the batches appended
            assert len(w1) == 2
            np.testing.assert_array_equal(np.concatenate([w1, w2]), windows)
            np.testing.assert_array_equal(np.concatenate([m1, m2]), mask)
            raise RuntimeError("an error inside the block")
    assert not list(tmp_path.glob("goose-*"))
    with pytest.raises(GooseError, match="cannot create the temporary copy of the token windows in .*TMPDIR"):
        WindowSpill(48, len(tokenizer), masked=False, directory=str(tmp_path / "absent"))


def make_cfg(output, teacher, corpus, **kw) -> CacheTeacherConfig:
    defaults = dict(teacher=str(teacher), data=DataSpec(data_files=(str(corpus),)), seq_len=32, max_tokens=320,
                    top_k=8, chunk_windows=2, batch_size=2, progress=False, dtype="fp32", device="cpu")
    defaults.update(kw)
    return CacheTeacherConfig(output=str(output), **defaults)


def test_store_holds_the_streamed_windows_and_max_tokens_caps(tmp_path, tiny_teacher, corpus_file, tokenizer,
                                                                monkeypatch):
    import goose.pipeline.data as data

    passes = []
    real = data._text_batches  # every read of the text goes through it, whichever function packs

    def counted(*args, **kw):
        passes.append(1)
        yield from real(*args, **kw)

    monkeypatch.setattr(data, "_text_batches", counted)
    cfg = make_cfg(tmp_path / "s.zarr", tiny_teacher, corpus_file, max_tokens=330)
    summary = run_cache_teacher(cfg)
    assert len(passes) == 1  # tokenised once: the teacher pass reads the counting pass's spill
    assert summary["windows"] == 10
    whole = tokenize_and_pack(load_texts(cfg.data), tokenizer, text_column="text", seq_len=32, max_tokens=330)
    stored = CacheReader(cfg.output).read(0, 10, ["input_ids"])["input_ids"].astype(np.int64)
    np.testing.assert_array_equal(stored, whole)


def test_a_failing_background_write_fails_the_run_and_nothing_after_it_is_written(tmp_path, tiny_teacher,
                                                                                  corpus_file, monkeypatch):
    cfg = make_cfg(tmp_path / "f.zarr", tiny_teacher, corpus_file)
    real = CacheWriter.write_block
    written = []

    def write_block(self, block, data):
        if block == 1:
            raise ValueError("simulated write failure")
        real(self, block, data)
        written.append(block)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    with pytest.raises(ValueError, match="simulated write failure"):
        run_cache_teacher(cfg)
    assert written == [0]  # the writer thread stopped at the failure
    half = CacheReader(cfg.output, allow_incomplete=True)
    assert not half.complete and half.blocks_done().tolist() == [1, 0, 0, 0, 0]
    monkeypatch.setattr(CacheWriter, "write_block", real)
    summary = run_cache_teacher(cfg)  # resume: the same windows, from block 1
    assert summary["blocks_resumed_from"] == 1 and CacheReader(cfg.output).complete


def test_windows_read_back_unlike_the_counted_ones_are_refused(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    """The teacher pass checks the windows it reads back against the counting pass's count and fingerprint
    (here the spill gives one window less): an error, and the store is not marked complete."""
    cfg = make_cfg(tmp_path / "c.zarr", tiny_teacher, corpus_file, max_tokens=None)
    real = WindowSpill.batches

    def fewer(self):
        windows = np.concatenate([w for w, _ in real(self)])
        yield windows[:-1], None

    monkeypatch.setattr(WindowSpill, "batches", fewer)
    with pytest.raises(GooseError, match="the windows read back are not the counted ones"):
        run_cache_teacher(cfg)
    assert not CacheReader(cfg.output, allow_incomplete=True).complete


def test_a_resume_with_other_targets_arithmetic_is_refused(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    """The store's provenance names how its targets were computed (eager or compiled kernels, and the
    arithmetic's revision): an unfinished store is not resumed by a goose that rounds differently (its blocks
    would mix two roundings); a complete one is only reported."""
    import goose.pipeline.stage_one.cache_teacher as ct

    cfg = make_cfg(tmp_path / "r.zarr", tiny_teacher, corpus_file)
    real, revision = CacheWriter.write_block, ct.TARGETS_REVISION["eager"]

    def write_block(self, block, data):
        if block == 1:
            raise ValueError("simulated write failure")
        real(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    with pytest.raises(ValueError, match="simulated write failure"):
        run_cache_teacher(cfg)
    monkeypatch.setattr(CacheWriter, "write_block", real)
    monkeypatch.setitem(ct.TARGETS_REVISION, "compiled", ct.TARGETS_REVISION["compiled"] + 1)  # not this store's
    monkeypatch.setitem(ct.TARGETS_REVISION, "eager", revision + 1)
    with pytest.raises(GooseError, match=f"provenance.targets: 'eager r{revision}' -> 'eager r{revision + 1}'"):
        run_cache_teacher(cfg)
    monkeypatch.setitem(ct.TARGETS_REVISION, "eager", revision)
    assert run_cache_teacher(cfg)["blocks_resumed_from"] == 1
    monkeypatch.setitem(ct.TARGETS_REVISION, "eager", revision + 1)
    assert run_cache_teacher(cfg)["already_complete"]

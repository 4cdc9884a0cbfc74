"""The training loader: plans cover the pool, are seeded, and resume at the exact next batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from goose.pipeline.stage_two.loader import CacheLoader, epoch_plan


def test_epoch_plan_covers_the_pool_once_and_is_seeded():
    pool = np.arange(3, 203)
    plan = epoch_plan(pool, chunk_windows=16, batch_size=8, seed=1, epoch=0, buffer_chunks=2)
    flat = np.concatenate(plan)
    assert len(flat) == len(set(flat)) == 200 and set(flat) <= set(pool)
    assert all(len(b) == 8 for b in plan)
    again = epoch_plan(pool, 16, 8, seed=1, epoch=0, buffer_chunks=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    other = epoch_plan(pool, 16, 8, seed=1, epoch=1, buffer_chunks=2)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other))
    # locality: a batch draws from the chunks of its buffer (plus a few carried-over windows)
    assert max(len(np.unique(b // 16)) for b in plan) <= 4


def test_loader_workers_and_resume_give_the_same_batches(store):
    def make(workers):
        loader = CacheLoader(store, ["input_ids", "topk_logprobs"], batch_size=4, chunk_windows=8, seed=3,
                             num_workers=workers)
        loader.set_pool(np.arange(40), 0)
        return loader

    plain = make(0)
    ref = [plain.next()["input_ids"] for _ in range(14)]  # crosses an epoch boundary (10 batches/epoch)
    with_workers = make(2)
    assert all(torch.equal(a, with_workers.next()["input_ids"]) for a in ref)
    first = make(0)
    for _ in range(6):
        first.next()
    resumed = make(0)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, resumed.next()["input_ids"]) for a in ref[6:])
    assert resumed.state_dict() == {"epoch": 1, "position": 4, "pool_id": 0, "skip": []}


def test_close_joins_the_read_ahead_thread(store):
    """A read-ahead thread left running at interpreter exit aborted a finished run ("terminate called
    without an active exception", exit -6); close must leave no thread behind."""
    loader = CacheLoader(store, ["input_ids", "topk_logprobs"], batch_size=4, chunk_windows=8, seed=3, prefetch=2)
    loader.set_pool(np.arange(40), 0)
    loader.next()
    thread = loader._iter.thread
    assert thread.is_alive()  # it is reading ahead
    loader.close()
    assert not thread.is_alive()


def test_gather_windows_equals_indexing_the_whole_array(store):
    """Whole-chunk reads (`gather_windows`) against the array read at once and indexed: any order, repeats,
    runs of consecutive chunks, the ragged last chunk (96 windows, chunks of 8, plus a 3-window tail here)."""
    import zarr

    from goose.cache.reader import CacheReader, gather_windows

    reader = CacheReader(store)
    a = reader.group["topk_ids"]
    whole = a[:]
    rng = np.random.default_rng(0)
    cases = [np.array([5]), np.array([95, 0, 8, 7, 7]), np.arange(8, 40), rng.integers(0, 96, 50),
             np.array([], dtype=np.int64)]
    for idx in cases:
        assert np.array_equal(gather_windows(a, idx), whole[idx])
    ragged = zarr.create_array(store={}, shape=(19, 3), chunks=(8, 3), dtype="int32")
    ragged[:] = np.arange(57).reshape(19, 3)
    for idx in (np.array([18, 0, 16, 9]), np.arange(19)[::-1]):
        assert np.array_equal(gather_windows(ragged, idx), ragged[:][idx])


def test_loader_batches_are_the_planned_windows_read_directly(store):
    """Batches read in groups equal each planned batch read on its own from the whole arrays, for shuffled
    and stream plans, with and without workers, also resumed mid-group and over two ranks."""
    from goose.cache.reader import CacheReader

    fields = ["input_ids", "topk_ids", "topk_logprobs", "hidden/2"]
    whole = CacheReader(store).read(0, 96, fields)

    def make(streams, workers, rank, world):
        loader = CacheLoader(store, fields, batch_size=4, chunk_windows=8, seed=5, buffer_chunks=2,
                             num_workers=workers, streams=streams, rank=rank, world=world)
        loader.set_pool(np.arange(3, 90), 0)
        return loader

    def check(streams, workers, skip_to=0, rank=0, world=1):
        loader = make(streams, workers, rank, world)
        assert loader.group_batches() > 1  # the case under test: several batches per read
        plan = loader._plan()
        per = 4 // world
        if skip_to:  # resumed mid-group: a fresh loader from the first one's state
            for _ in range(skip_to):
                loader.next()
            state = loader.state_dict()
            loader.close()
            loader = make(streams, workers, rank, world)
            loader.load_state_dict(state)
        for i in range(skip_to, skip_to + 9):
            batch = loader.next()
            windows = plan[i][rank * per : (rank + 1) * per]
            for name in fields:
                assert np.array_equal(batch[name].numpy(), whole[name][windows].astype(batch[name].numpy().dtype)), name
        loader.close()

    for streams in (False, True):
        check(streams, 0)
        check(streams, 2)
        check(streams, 0, skip_to=3)
    check(False, 0, skip_to=1, rank=1, world=2)


def _small_store(path, tiny_teacher, corpus_file, **kw):
    from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
    from goose.pipeline.data import DataSpec

    cfg = CacheTeacherConfig(output=str(path), teacher=str(tiny_teacher), data=DataSpec(data_files=(str(corpus_file),)),
                             seq_len=32, max_tokens=320, top_k=8, chunk_windows=2, batch_size=2, progress=False,
                             dtype="fp32", device="cpu", hidden_layers="1,2", samples=4, **kw)
    run_cache_teacher(cfg)
    return str(path)


@pytest.mark.parametrize("encoding", [
    dict(topk_encoding="compact", hidden_dtype="int8"),
    dict(topk_encoding="fixed16", hidden_dtype="float16"),
    dict(topk_encoding="compact", hidden_dtype="int8", hidden_pca_rank=4),
])
def test_batches_decoded_in_torch_equal_the_hosts(tmp_path, tiny_teacher, corpus_file, encoding):
    """The device path (stored encodings through the loader, cache.device_codec.BatchDecoder after the copy) gives
    the host path's batch: same names, dtypes and values (bit for bit; PCA's matmul to float32 rounding)."""
    from goose.cache.device_codec import BatchDecoder, fields_to_read
    from goose.cache.reader import CacheReader

    url = _small_store(tmp_path / "s.zarr", tiny_teacher, corpus_file, **encoding)
    reader = CacheReader(url)
    spec = reader.spec
    fields = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "gold_nll", "entropy", "sample_ids",
              "sample_counts", "hidden/1", "hidden/2"]

    def loader(names, dequantize):
        lo = CacheLoader(url, names, batch_size=2, chunk_windows=spec.chunk_windows, seed=1, dequantize=dequantize)
        lo.set_pool(np.arange(spec.n_windows), 0)
        return lo

    host, device = loader(fields, True), loader(fields_to_read(spec, fields), False)
    decode = BatchDecoder(spec, fields, reader.pca_basis())
    for _ in range(spec.n_windows // 2):
        want, got = host.next(), decode(device.next())
        assert sorted(got) == sorted(want)
        for name in fields:
            assert got[name].dtype == want[name].dtype, name
            if name.startswith("hidden/") and spec.hidden_pca_rank:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
            else:  # exact (gold_nll holds a NaN at each window's last position)
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert any(raw.dtype == torch.int16 for raw in device.next().values())  # uint16 travelled at its width

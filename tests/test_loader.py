"""The training loader: plans cover the pool, are seeded, and resume at the exact next batch."""

from __future__ import annotations

import numpy as np
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

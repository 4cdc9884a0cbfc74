"""Batches of cached windows for training: seeded chunk-order shuffling, shuffling within a buffer of
chunks, worker processes, pinned memory, and a recorded position so a resumed run gets the exact next
batch.

An epoch's plan (which windows form batch i) is a pure function of (seed, epoch, pool), so the loader's
whole state is three numbers (plus the batches to skip): the plan is rebuilt on resume and iteration
restarts at `position`. A batch is named by its key (pool_id, epoch, index in the epoch's plan); the
trainer marks batches that gave non-finite losses as skipped so a rollback does not replay them.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...cache.device_codec import raw_tensors
from ...cache.reader import CacheReader
from ...errors import GooseError


def epoch_plan(pool: np.ndarray, chunk_windows: int, batch_size: int, seed: int, epoch: int,
               buffer_chunks: int = 4) -> list[np.ndarray]:
    """Batches (arrays of window indices) for one pass over `pool`.

    Chunks are visited in a seeded random order; windows of `buffer_chunks` consecutive chunks are
    shuffled together and cut into batches (leftovers carry over); the last partial batch is dropped so
    every step sees the same shapes. A batch thus touches at most ~buffer_chunks storage chunks.
    """
    rng = np.random.default_rng([seed, epoch])
    pool = np.asarray(pool, dtype=np.int64)
    chunk_of = pool // chunk_windows
    chunks = np.unique(chunk_of)
    rng.shuffle(chunks)
    members = {c: pool[chunk_of == c] for c in chunks}
    batches, carry = [], np.empty(0, dtype=np.int64)
    for i in range(0, len(chunks), buffer_chunks):
        buf = np.concatenate([carry] + [members[c] for c in chunks[i : i + buffer_chunks]])
        rng.shuffle(buf)
        n_full = len(buf) // batch_size
        batches += [buf[j * batch_size : (j + 1) * batch_size] for j in range(n_full)]
        carry = buf[n_full * batch_size :]
    return batches


def stream_plan(pool: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches for stateful training (truncated BPTT): the sorted pool is cut into `batch_size` contiguous
    lanes and batch j holds window j of every lane, so each batch row reads consecutive windows of one
    stream and the state after window j is the right start for window j + 1. One pass = len(pool) //
    batch_size batches (the remainder is dropped); the trainer starts every pass from a zero state."""
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    lane = len(pool) // batch_size
    starts = np.arange(batch_size) * lane
    return [pool[starts + j] for j in range(lane)]


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, a in arrays.items():
        if a.dtype in (np.uint16, np.uint32, np.int32):
            a = a.astype(np.int64)  # ids: torch has no uint16 arithmetic worth using
        elif a.dtype == np.uint8:
            a = a.astype(np.int16)
        out[name] = torch.from_numpy(np.ascontiguousarray(a))
    return out


class _PlanDataset(Dataset):
    """Item g = batches [g * group, (g + 1) * group) of a plan, read together: one read of the union of their
    windows per array, so each storage chunk they touch is decompressed once for the whole group instead of
    once per batch (a plan's consecutive batches come from the same few chunks). Opens its reader lazily so
    each worker process has its own."""

    def __init__(self, url: str, plan: list[np.ndarray], fields: list[str], group: int,
                 storage_options: dict | None = None, dequantize: bool = True):
        self.url, self.plan, self.fields, self.group, self.storage_options = url, plan, fields, group, storage_options
        self.dequantize = dequantize
        self.reader = None

    def __len__(self):
        return -(-len(self.plan) // self.group)

    def __getitem__(self, g):
        if self.reader is None:
            self.reader = CacheReader(self.url, storage_options=self.storage_options)
        batches = self.plan[g * self.group : (g + 1) * self.group]
        arrays = self.reader.read_indices(np.concatenate(batches), self.fields, dequantize=self.dequantize)
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        convert = to_tensors if self.dequantize else raw_tensors
        return [convert(dict(zip(arrays, parts))) for parts in zip(*(np.split(a, cuts) for a in arrays.values()))]


def _batches_of(groups, skip: int):
    """The batches of an iterator of groups, in order, leaving out the first `skip` (a resume mid-group)."""
    for group in groups:
        for batch in group:
            if skip:
                skip -= 1
                continue
            yield batch


class _ThreadPrefetch:
    """The next `depth` batches read on a background thread while the training step computes (the
    num_workers 0 path): zarr's decompression and the numpy copies release the GIL, so the store's reads
    overlap the step. Order is kept; an error surfaces at the batch it belongs to; `close` stops and joins
    the thread (a new plan starts a new one). The loader's position counts only batches handed out, so a checkpoint
    never includes one that was merely read ahead."""

    def __init__(self, iterator, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="goose-prefetch")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator) -> None:
        try:
            for batch in iterator:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", exc))

    def __next__(self):
        kind, item = self.q.get()
        if kind == "end":
            raise StopIteration
        if kind == "error":
            raise item
        return item

    def close(self) -> None:
        """Stop and join the thread: one left mid-read when the interpreter exits can abort the process
        ("terminate called without an active exception") after the run has finished."""
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=60)


class CacheLoader:
    """Endless iterator of training batches over a pool of windows, resumable to the exact batch."""

    def __init__(self, url: str, fields: list[str], *, batch_size: int, chunk_windows: int, seed: int = 0,
                 buffer_chunks: int = 4, num_workers: int = 0, pin_memory: bool = False, prefetch: int = 2,
                 streams: bool = False, rank: int = 0, world: int = 1, storage_options: dict | None = None,
                 dequantize: bool = True):
        # dequantize=False: batches hold the stored encodings (cache.device_codec.raw_tensors), for a
        # cache.device_codec.BatchDecoder on the training device; the host then only reads and decompresses
        self.url, self.fields, self.streams, self.dequantize = url, list(fields), streams, dequantize
        self.storage_options = storage_options or None  # fsspec options; travel to worker processes
        # data parallelism: `batch_size` is the global batch; rank r reads rows [r * b, (r + 1) * b) of every
        # global batch of the one seeded plan, so N ranks see exactly what one process would
        if batch_size % world:
            raise ValueError(f"the global batch_size {batch_size} does not split evenly over {world} ranks")
        self.rank, self.world = rank, world
        self.batch_size, self.chunk_windows, self.seed = batch_size, chunk_windows, seed
        self.buffer_chunks, self.num_workers, self.pin_memory, self.prefetch = (
            buffer_chunks, num_workers, pin_memory, prefetch)
        self.pool = None
        self.pool_id = 0  # bumps when the pool changes (curriculum stage), so plans differ per stage
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self.skip: set[tuple[int, int, int]] = set()  # batch keys never to hand out (they gave non-finite losses)
        self.last_key: tuple[int, int, int] | None = None  # key of the batch handed out last
        self._iter = None

    def set_pool(self, pool: np.ndarray, pool_id: int | None = None) -> None:
        self.pool = np.asarray(pool, dtype=np.int64)
        if pool_id is not None and pool_id != self.pool_id:
            self.pool_id, self.epoch, self.position = pool_id, 0, 0
        if len(self.pool) < self.batch_size:
            raise ValueError(f"only {len(self.pool)} windows for a batch of {self.batch_size}")
        self.close()

    def _plan(self) -> list[np.ndarray]:
        if self.streams:
            return stream_plan(self.pool, self.batch_size)
        return epoch_plan(self.pool, self.chunk_windows, self.batch_size, self.seed * 1000 + self.pool_id,
                          self.epoch, self.buffer_chunks)

    def group_batches(self) -> int:
        """Batches read together (`_PlanDataset`): about one shuffle buffer's worth of windows (for streams,
        where batch j is window j of every lane, that many consecutive windows per lane), never less than one
        batch, so a group's memory is bounded by the buffer whatever the batch size. Read-ahead (`prefetch`
        with workers: each worker's queue) counts groups."""
        per = self.batch_size // self.world
        return max(1, self.buffer_chunks * self.chunk_windows // per)

    def _start(self):
        per = self.batch_size // self.world
        plan = [b[self.rank * per : (self.rank + 1) * per] for b in self._plan()]
        group = self.group_batches()
        first = self.position // group  # groups are cut from the epoch's start, so a resume reads the same ones
        kw = dict(batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch, persistent_workers=False)
        self.close()
        dataset = _PlanDataset(self.url, plan[first * group :], self.fields, group, self.storage_options,
                               self.dequantize)
        self._iter = _batches_of(iter(DataLoader(dataset, **kw)), self.position - first * group)
        if self.num_workers == 0 and self.prefetch > 0:
            self._iter = _ThreadPrefetch(self._iter, self.prefetch)

    def close(self) -> None:
        """Stops the read-ahead thread; the next batch restarts the plan at the same position."""
        if isinstance(self._iter, _ThreadPrefetch):
            self._iter.close()
        self._iter = None

    def _next_any(self) -> dict[str, torch.Tensor]:
        try:
            if self._iter is None:
                self._start()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch, self.position = self.epoch + 1, 0
                self._start()
                batch = next(self._iter)
        except GooseError as exc:  # a worker process re-raises with its whole traceback as the message
            raise GooseError(str(exc).strip().splitlines()[-1].removeprefix("goose.errors.GooseError: ")) from None
        self.last_key = (self.pool_id, self.epoch, self.position)
        self.position += 1
        return batch

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch, passing over skipped ones (keys name one epoch, so this always ends)."""
        while True:
            batch = self._next_any()
            if self.last_key not in self.skip:
                return batch

    def windows_of(self, key: tuple[int, int, int]) -> list[int]:
        """Window indices of the batch with this key (for error messages and logs)."""
        pool_id, epoch, index = key
        if pool_id != self.pool_id:
            return []
        saved = self.epoch
        self.epoch = epoch
        try:
            plan = self._plan()
        finally:
            self.epoch = saved
        return [int(w) for w in plan[index]] if index < len(plan) else []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "pool_id": self.pool_id,
                "skip": sorted(list(k) for k in self.skip)}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.position, self.pool_id = int(d["epoch"]), int(d["position"]), int(d["pool_id"])
        self.skip = {tuple(int(x) for x in k) for k in d.get("skip", [])}
        self.close()


def read_windows(url: str, indices: np.ndarray, fields: list[str], batch_size: int,
                 storage_options: dict | None = None):
    """Fixed batches of the given windows in order (validation)."""
    reader = CacheReader(url, storage_options=storage_options or None)
    for i in range(0, len(indices), batch_size):
        yield to_tensors(reader.read_indices(indices[i : i + batch_size], fields))

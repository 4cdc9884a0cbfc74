"""Stage one: run the teacher once over a corpus and write its targets into a Zarr v3 store.

Recipe: load teacher -> check arguments against it -> counting pass over the streamed data (number of
windows and their fingerprint; the packed windows go to a local spill file, not memory) -> open (create or
resume) the store -> read the windows back block by block; for each unfinished block: teacher forward in batches, targets (on CPU
at one torch thread on a second thread, overlapping the next batch's forward; at more, whole batches on two
worker threads; across blocks; see `compute_blocks`) -> a writer thread (bounded queue) compresses and writes each block while the next ones are
computed -> finalize.
Memory is flat in the corpus size. Batches never cross a block boundary and the windows are a deterministic
function of the data, so a resumed run computes exactly what an uninterrupted one does.

Several writers (docs/SCALING.md): under torchrun (WORLD_SIZE > 1) every rank computes a disjoint share
of the blocks into one store; rank 0 creates or resumes the store while the others wait, and finalizes
it after a barrier. With `--shard I/N`, independent jobs (a SLURM array) each compute the blocks b with
b mod N == I into the same store and leave it unfinished; `goose cache finalize STORE` completes it.
Every block is computed exactly as one process computes it, so the stores are identical.
"""

from __future__ import annotations

import collections
import datetime
import errno
import hashlib
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from ... import __version__
from ...cache.schema import (
    COMPACT_LOGPROB_STEP,
    COMPACT_TAIL_KEEPBITS,
    TOPK_ENCODINGS,
    StoreSpec,
    compression_level_problem,
    fit_pca,
    hidden_channel_scale_name,
    hidden_name,
    hidden_scale_name,
    tail_temperature_problem,
)
from ...cache import device_codec
from ...cache.integrity import StoreFiles
from ...cache.lock import StoreLock, check_unlocked
from ...cache.stats import store_nbytes
from ...cache.writer import CacheWriter
from ...errors import GooseError
from ...ranks import Ranks
from .config import CacheTeacherConfig
from ..data import WindowSpill, count_windows, fingerprint_update, open_texts
from ..devices import resolve_device
from ..teacher import Teacher, load_teacher, resolve_hidden_layers
from . import targets as stage_one_targets
from .targets import NonFiniteLogits, quantize_int8, teacher_targets


# The per-token targets' arithmetic, per path, in the store's provenance: a path's revision is bumped whenever
# a change can move one of its stored values by a rounding step (kernels, summation order, which of tied ids
# the top-k keeps), so a resume never mixes blocks computed two ways. compiled 2: one exp per logit, the
# two-level top-k; compiled 3: the top-k in C (`native_topk.py`), tied ids in ascending id order; compiled 4:
# the rows finished by the eager path's own formulas (`targets.finish_rows`: the head divided by T, where it
# was multiplied by 1 / T). eager 2: unchanged since.
TARGETS_REVISION = {"eager": 2, "compiled": 4}

# tokens x vocabulary above which the compiled reductions repay their compilation: they save 3.6-4.9 ns per
# logit (measured on one thread: 40 us/token at V = 8192, 181 at 50257) and compiling costs 4 s (inductor's
# disk cache warm) to 20 s (cold), so they repay it by 2^33 logits even cold (a million tokens at V = 8192,
# 170k at V = 50257)
COMPILE_TARGETS_MIN_LOGITS = 1 << 33


def use_compiled_targets(cfg: CacheTeacherConfig, device: torch.device, vocab: int, tokens: int) -> bool:
    """Whether a store of `tokens` tokens computes its targets with the compiled kernels (CPU only: on a GPU
    the eager reductions already take a few percent of the forward)."""
    if device.type != "cpu":
        return False
    if cfg.compile_targets is not None:
        return cfg.compile_targets
    return tokens * vocab >= COMPILE_TARGETS_MIN_LOGITS


def _check_args(cfg: CacheTeacherConfig) -> None:
    """Every check that needs no teacher and no data, so bad input fails in a second and leaves no store."""
    if cfg.storage_options is not None and not isinstance(cfg.storage_options, dict):
        raise GooseError(f"--storage-options must be a JSON object (e.g. '{{\"anon\": true}}'), "
                         f"got a JSON {type(cfg.storage_options).__name__}")
    if cfg.seq_len < 2:
        raise GooseError("--seq-len must be at least 2")
    if cfg.top_k < 1:
        raise GooseError("--top-k must be at least 1")
    if cfg.batch_size < 1 or cfg.chunk_windows < 1 or cfg.shard_chunks < 1:
        raise GooseError("--batch-size, --chunk-windows and --shard-chunks must be at least 1")
    problem = tail_temperature_problem(cfg.tail_temperatures)
    if problem:
        raise GooseError(f"--tail-temperatures: {problem}")
    if not 0 <= cfg.samples <= 65535:
        raise GooseError("--samples must be between 0 and 65535")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.seq_len:
        raise GooseError(f"--max-tokens must be at least one window of --seq-len {cfg.seq_len} tokens, "
                         f"got {cfg.max_tokens}")
    if cfg.hidden_dtype not in ("float16", "int8"):
        raise GooseError("--hidden-dtype must be float16 or int8")
    problem = compression_level_problem(cfg.compression, cfg.compression_level)
    if problem:
        raise GooseError(problem)
    if cfg.topk_encoding not in TOPK_ENCODINGS:
        raise GooseError(f"--topk-encoding must be one of {', '.join(TOPK_ENCODINGS)}, got {cfg.topk_encoding!r}")
    if cfg.logprob_step is not None and not 0 < cfg.logprob_step <= 1:
        raise GooseError(f"--logprob-step must be in (0, 1] nats, got {cfg.logprob_step}")
    if cfg.hidden_pca_rank < 0:
        raise GooseError("--hidden-pca-rank must be at least 0")
    if cfg.hidden_pca_rank and not cfg.hidden_layers:
        raise GooseError("--hidden-pca-rank needs --hidden-layers")
    if cfg.hidden_pca_rank and (cfg.shard is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise GooseError("--hidden-pca-rank is fitted on the first block before any other is written, so it "
                         "needs one process: run without --shard and without torchrun")
    if cfg.shard is not None and not 0 <= cfg.shard[0] < cfg.shard[1]:
        raise GooseError(f"--shard I/N needs 0 <= I < N, got {cfg.shard[0]}/{cfg.shard[1]}")


def _check_against_teacher(cfg: CacheTeacherConfig, teacher: Teacher) -> tuple[int, ...]:
    ctx = teacher.max_positions
    if ctx is not None and cfg.seq_len > ctx:
        raise GooseError(f"--seq-len {cfg.seq_len} is above the teacher's context of {ctx} tokens")
    if cfg.top_k > teacher.vocab_size:
        raise GooseError(f"--top-k {cfg.top_k} is above the teacher's vocabulary of {teacher.vocab_size}")
    if cfg.hidden_pca_rank > teacher.hidden_size:
        raise GooseError(f"--hidden-pca-rank {cfg.hidden_pca_rank} is above the teacher's hidden size "
                         f"{teacher.hidden_size}")
    return resolve_hidden_layers(cfg.hidden_layers, teacher.n_layers)


def _encoding_spec(cfg: CacheTeacherConfig) -> dict:
    """The StoreSpec fields of the top-k encoding: compact's defaults, and --logprob-step when given."""
    out = {}
    if cfg.topk_encoding == "compact":
        out = {"logprob_step": COMPACT_LOGPROB_STEP, "tail_keepbits": COMPACT_TAIL_KEEPBITS}
    if cfg.logprob_step:
        out["logprob_step"] = float(cfg.logprob_step)
    return out


def encode_hidden(h: torch.Tensor, layer: int, spec: StoreSpec, pca: dict | None) -> dict[str, torch.Tensor]:
    """One layer's states (B, L, d) as the schema stores them: projected on the PCA basis when the store has
    one (coordinates (B, L, r) = (h - mean) @ basis^T), then float16, or int8 with its scales."""
    if spec.hidden_pca_rank:
        mean, basis = (torch.as_tensor(x, device=h.device) for x in pca[layer])
        h = (h.float() - mean) @ basis.t()
    if spec.hidden_dtype == "int8":
        q, token, channel = quantize_int8(h)
        return {hidden_name(layer): q, hidden_scale_name(layer): token, hidden_channel_scale_name(layer): channel}
    return {hidden_name(layer): h.to(torch.float16)}


@torch.inference_mode()
def _batch_targets(logits, hidden: dict, ids: torch.Tensor, first: int, spec: StoreSpec,
                   cfg: CacheTeacherConfig, pca: dict | None, raw: bool, threads: int = 1,
                   compiled: bool = False) -> dict[str, np.ndarray]:
    """One batch's arrays from its logits and hidden states (window `first` is the batch's first).

    logits: the (B, L, V) tensor, or a callable that computes it (the LM head, run here on the targets
    thread rather than in the forward)."""
    if callable(logits):
        logits = logits()
    seeds = [cfg.seed * 1_000_003 + first + i for i in range(len(ids))]
    try:
        targets = _targets(logits, ids, compiled, top_k=spec.top_k, tail_temperatures=spec.tail_temperatures,
                           samples=spec.samples, sample_seeds=seeds, threads=threads)
    except NonFiniteLogits:
        raise GooseError(f"the teacher produced non-finite logits in windows {first}..{first + len(ids) - 1}; "
                         f"try --dtype fp32") from None
    targets["input_ids"] = ids
    if spec.topk_encoding == "compact" and encode_topk_on_device(logits.device):
        targets["topk_ids"], targets["topk_logprobs"] = device_codec.encode_topk(
            targets["topk_ids"], targets["topk_logprobs"], spec.logprob_step)
    for layer, h in hidden.items():
        if raw:
            targets[hidden_name(layer)] = h.float()
        else:
            targets.update(encode_hidden(h, layer, spec, pca))
    return {name: t.cpu().numpy() for name, t in targets.items()}


def encode_topk_on_device(device: torch.device) -> bool:
    """The compact top-k encoded where the targets are (cache.device_codec.encode_topk) rather than by the
    host's writer: on CUDA, where the host bounds stage one. The stored bytes are the same either way."""
    return device.type == "cuda"


_COMPILE_FAILED: list[Exception] = []  # set once inductor has failed in this process: eager from then on


def kernels_available(tail_temperatures, vocab: int, top_k: int) -> bool:
    """Build (once per process and shape) the compiled kernels; False, with one warning, if inductor cannot
    (no C++ compiler, ...): the run then uses the eager reference from then on."""
    if _COMPILE_FAILED:
        return False
    try:
        stage_one_targets.compiled_reductions(tail_temperatures, vocab, top_k)
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raised, the eager ops still work
        _COMPILE_FAILED.append(exc)
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(f"compiled teacher targets failed ({type(exc).__name__}: {first}); using eager ops "
                      f"(--no-compile-targets skips the attempt)", stacklevel=2)
        return False
    return True


def _targets(logits, ids, compiled: bool, **kw) -> dict[str, torch.Tensor]:
    """teacher_targets with the compiled kernels where asked and buildable (`kernels_available`); an error
    while running them is the run's error, as it would be with eager ops."""
    if compiled and kernels_available(kw["tail_temperatures"], logits.shape[-1], kw["top_k"]):
        return teacher_targets(logits, ids, compiled=True, **kw)
    return teacher_targets(logits, ids, **kw)


SCHEDULES = ("in_order", "targets_thread", "batch_workers")


def default_schedule(device: torch.device, cpu_threads: int) -> str:
    """compute_blocks's schedule where the caller names none: on a GPU everything in order on the device (the
    reductions take a few percent there); on CPU at one torch thread the targets on a second thread; at more,
    whole batches on two workers."""
    if device.type != "cpu":
        return "in_order"
    return "targets_thread" if cpu_threads == 1 else "batch_workers"


def compute_blocks(
    teacher: Teacher, blocks, spec: StoreSpec, cfg: CacheTeacherConfig, pca: dict | None = None,
    schedule: str | None = None, compiled: bool = False,
):
    """Teacher targets for each (block, windows, loss_mask or None) of `blocks`, in batches of
    cfg.batch_size: yields (block, the schema's arrays for it, the PCA basis fitted on it or None).

    Every reduction runs on the teacher's device; only the per-token results (k ids and log-probs, T tail
    masses, two scalars, the hidden states asked for) are copied to the host. A store with hidden-state PCA
    and no basis yet (`pca` None) fits one on the first block's raw float32 states, encodes that block with
    it and yields it with the block, to be stored; every later block is encoded with it.

    schedule (default: `default_schedule`); the arrays are the same under every one:
    - in_order: each batch's forward, then its targets (their slices shared out among the torch threads).
    - targets_thread (CPU, one torch thread): a batch's targets are computed on a second thread (itself at
      one torch thread) while the next batch's forward runs, so the vocabulary-wide reductions (top-k, the
      tail sums at every temperature, entropy) cost wall time only where they outlast a forward. Where the
      teacher's LM head splits off exactly (`Teacher.body_and_head`: GPT-2), the head's matmul moves to that
      thread too: the forward stops at the final-norm states, so the two threads' work is closer to even
      (the head is ~35 % of enwiki-tiny's forward, ~25 % of GPT-2 small's).
    - batch_workers (CPU, two or more torch threads): two worker threads, each at half the torch threads
      (rounded down: equal counts keep the two workers' rounding equal), take whole batches (forward and
      targets) in turn. A forward at two threads loses 5.5 % to its synchronisation against two at one
      thread each (enwiki-tiny on 2 cores: 6.76 s vs 6.39 s), and the in-order reductions that follow it
      paid their own synchronisation too; a targets thread beside a two-thread forward only competes with
      it (on 2 cores: 1.37x the bare forward against 1.19x in order, enwiki-tiny; docs/BENCHMARKS.md).
    The arrays depend on the forward's torch thread count (a matmul can round differently at one and two
    threads), not on the schedule: tested equal at one thread per forward, so batch_workers at two torch
    threads writes what a one-thread run writes. At most two batches' logits are alive; the overlapping
    schedules run across block boundaries (a block's last targets overlap the next block's first forward),
    except after a block that a PCA basis is fitted on.

    compiled: the reductions run as the compiled kernels (`teacher_targets(compiled=True)`, equal to the
    eager ones to fp32 rounding), falling back to eager ops, once and with a warning, if inductor fails.
    """
    names = [name for name in spec.arrays() if name != "loss_mask"]  # (the mask is the data's)
    cpu_threads = torch.get_num_threads() if teacher.device.type == "cpu" else 1
    schedule = schedule or default_schedule(teacher.device, cpu_threads)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "in_order" and teacher.device.type != "cpu":
        raise ValueError(f"schedule {schedule!r} is for a CPU teacher (on {teacher.device.type} everything runs in order)")
    in_flight = {"in_order": 0, "targets_thread": 1, "batch_workers": 2}[schedule]
    worker_threads = max(1, cpu_threads // 2) if schedule == "batch_workers" else 1
    # (a new thread's torch thread count is the process default, not what the caller may have set)
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="goose-targets",
                              initializer=torch.set_num_threads, initargs=(worker_threads,)) if in_flight else None
    split = teacher.body_and_head() if schedule == "targets_thread" else None
    pending: collections.deque = collections.deque()  # (a batch's future, its block's entry in `open_blocks`)
    open_blocks: list[dict] = []  # blocks with batches in flight, oldest first

    def collect(arrays: dict[str, np.ndarray], entry: dict):
        for name in entry["parts"]:
            entry["parts"][name].append(arrays[name])
        entry["left"] -= 1

    def collect_oldest():
        """Wait for the oldest batch in flight and collect it (oldest first: blocks come out in order)."""
        future, entry = pending.popleft()
        collect(future.result(), entry)

    def finished():
        """Pop the oldest open blocks whose every batch is collected, as (block, arrays, basis or None)."""
        nonlocal pca
        done = []
        while open_blocks and open_blocks[0]["left"] == 0:
            entry = open_blocks.pop(0)
            data = {name: np.concatenate(chunks) for name, chunks in entry["parts"].items()}
            basis = None
            if entry["raw"]:  # the first block of a PCA store: fit the basis on it, encode it with it
                pca, data = fit_block_pca(data, spec)
                basis = pca
            if entry["mask"] is not None:
                data["loss_mask"] = entry["mask"]
            done.append((entry["block"], data, basis))
        return done

    def forward(ids: torch.Tensor):
        """(the final-norm states' LM head as a callable, or the logits; the hidden states asked for)"""
        with torch.inference_mode():
            out = (split[0] if split else teacher.model)(
                input_ids=ids, output_hidden_states=bool(spec.hidden_layers), use_cache=False)
        hidden = {layer: out.hidden_states[layer] for layer in spec.hidden_layers}
        return (partial(split[1], out.last_hidden_state) if split else out.logits), hidden

    def batch_job(ids, first, pca, raw):  # batch_workers: one whole batch on a worker thread
        logits, hidden = forward(ids)
        return _batch_targets(logits, hidden, ids, first, spec, cfg, pca, raw, threads=worker_threads,
                              compiled=compiled)

    def warm_up(barrier: threading.Barrier | None = None):
        # One small forward before the first batch, its output discarded: a process's very first forward can
        # differ from every later one at rounding level (the tiny GPT-2 test teacher: 2 fresh processes in 6;
        # a warm-up of 4 tokens fixed 8 in 8), which would make a store's first block depend on whether the
        # run that computed it was a resume. With batch workers each worker thread warms up (the barrier
        # hands one warm-up to each).
        if barrier is not None:
            barrier.wait()
        warm = torch.full((1, min(spec.seq_len, 8)), teacher.tokenizer.eos_token_id or 0, dtype=torch.long,
                          device=teacher.device)
        logits, _ = forward(warm)
        if callable(logits):
            with torch.inference_mode():
                logits()

    barrier = threading.Barrier(in_flight) if schedule == "batch_workers" else None
    try:
        if barrier is not None:
            for job in [pool.submit(warm_up, barrier) for _ in range(in_flight)]:
                job.result()
        else:
            warm_up()
        for block, windows, mask in blocks:
            raw = bool(spec.hidden_pca_rank) and pca is None
            keep = [n for n in names if not n.startswith(("hidden_scale/", "hidden_channel_scale/"))] if raw else names
            n_batches = -(-len(windows) // cfg.batch_size)
            entry = {"block": block, "parts": {name: [] for name in keep}, "left": n_batches, "raw": raw,
                     "mask": mask}
            open_blocks.append(entry)
            first_window = spec.block_range(block)[0]
            for b0 in range(0, len(windows), cfg.batch_size):
                ids = torch.from_numpy(np.ascontiguousarray(windows[b0 : b0 + cfg.batch_size], dtype=np.int64))
                ids = ids.to(teacher.device)
                if schedule == "batch_workers":
                    while len(pending) >= in_flight:
                        collect_oldest()
                    # the next batch is queued before finished blocks go to the caller (who writes them), so
                    # no worker waits on that (a PCA block's batches all run raw, and it drains below)
                    pending.append((pool.submit(batch_job, ids, first_window + b0, pca, raw), entry))
                    yield from finished()
                    continue
                logits, hidden = forward(ids)
                args = (logits, hidden, ids, first_window + b0, spec, cfg, pca, raw)
                if pending:  # the previous batch's targets, computed while this forward ran
                    collect_oldest()
                    yield from finished()
                if pool is None:
                    collect(_batch_targets(*args, threads=cpu_threads, compiled=compiled), entry)
                else:
                    pending.append((pool.submit(_batch_targets, *args, compiled=compiled), entry))
                del args, hidden, logits
            while raw and pending:  # the basis must exist before the next block's targets
                collect_oldest()
            yield from finished()
        while pending:
            collect_oldest()
        yield from finished()
    finally:
        if barrier is not None:
            barrier.abort()  # a worker whose partner never came (a failed warm-up) stops waiting
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if teacher.device.type == "cpu":
            # a worker thread's torch.set_num_threads (here and in `teacher_targets`) also sets the count that
            # threads started later begin with: put back the caller's
            torch.set_num_threads(cpu_threads)


def fit_block_pca(data: dict[str, np.ndarray], spec: StoreSpec) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit each layer's PCA basis on one block's raw hidden states (compute_blocks without a basis) and encode
    them with it: (basis, the block's arrays as the schema stores them)."""
    pca = {layer: fit_pca(data[hidden_name(layer)], spec.hidden_pca_rank) for layer in spec.hidden_layers}
    data = dict(data)
    for layer in spec.hidden_layers:
        h = torch.from_numpy(data.pop(hidden_name(layer)))
        data.update({name: t.numpy() for name, t in encode_hidden(h, layer, spec, pca).items()})
    return pca, data


class BlockWriterPool:
    """Writes computed blocks on `threads` background threads, so encoding, compression and Zarr writes
    overlap the next blocks' teacher forward instead of following it.

    One writer thread does ~0.1M tokens/s at GPT-2's shapes (bench/bench_store_io.py); a GPU computes the
    targets of 1-2M, so on CUDA several threads write blocks at once (numpy's sorts and the codecs release
    the GIL). Blocks are independent (each block's data, progress byte and checksum row are chunks of their
    own), and `writer.write_block` marks a block done only after its data and checksums are written, so a
    crash leaves every block either whole and marked or unmarked, whichever finished first: resume redoes
    exactly the unmarked ones, as with one thread. A bounded queue (`maxsize` blocks waiting, one more
    being written per thread) keeps memory flat however far the forward runs ahead. The first exception in
    any thread stops them all (no block is started after it) and is raised, as itself, in the main thread
    by the next `put` or by `close`: a failed write always fails the command.
    """

    def __init__(self, writer: CacheWriter, maxsize: int = 2, threads: int = 1, on_written=None):
        self._writer = writer
        self._on_written = on_written  # called with each block after it is written (its errors stop the pool)
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"goose-block-writer-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            try:
                self._writer.write_block(*item)
                if self._on_written is not None:
                    self._on_written(item[0])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
                if self._error is None:
                    self._error = exc
                self._stop.set()
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, block: int, data: dict[str, np.ndarray]) -> None:
        while True:
            self._raise_if_failed()
            if not all(t.is_alive() for t in self._threads):
                self._raise_if_failed()
                raise RuntimeError("a block writer thread stopped")
            try:
                self._queue.put((block, data), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every queued block to be written; raise a writer's error if there was one."""
        self._finish()
        self._raise_if_failed()

    def abort(self) -> None:
        """The main thread failed: finish the blocks being written, drop the queued ones, stop."""
        self._stop.set()
        self._finish()

    def _finish(self) -> None:
        for _ in self._threads:  # one end marker per thread, behind every queued block
            while any(t.is_alive() for t in self._threads):
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
        for thread in self._threads:
            thread.join()


class DiskSpaceCheck:
    """Once the first block this process writes is on disk, project what the store's unfinished blocks will
    take from that block's stored bytes and refuse to go on (GooseError; finished blocks kept) if the disk
    cannot hold it: at GPT-2's shapes a store with three int8 hidden layers takes ~2.4 KB/token
    (docs/BENCHMARKS.md), so a run that would fill the disk stops after one block, not after hours. Local
    stores only (an object store has no free-space figure)."""

    def __init__(self, writer: CacheWriter, url: str, spec: StoreSpec, unfinished: list[int],
                 storage_options: dict | None = None):
        self.writer, self.url, self.spec, self.unfinished = writer, url, spec, list(unfinished)
        files = StoreFiles(url, storage_options)  # the store's own notion of a local path
        self.local, self.root = files.local, files.root
        self.checked = False

    def __call__(self, block: int) -> None:
        if self.checked or not self.local:
            return
        self.checked = True
        import shutil

        start, stop = self.spec.block_range(block)
        per_window = self.writer.block_nbytes[block] / (stop - start)
        left = sum(np.subtract(*self.spec.block_range(b)[::-1]) for b in self.unfinished if b != block) * per_window
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.root)) or ".").free
        if left > free:
            raise GooseError(
                f"store {self.url} will not fit: its {len(self.unfinished) - 1} unfinished blocks need about "
                f"{left / 1e9:,.1f} GB more ({per_window / self.spec.seq_len:,.0f} bytes/token, measured on block "
                f"{block}) and that disk has {free / 1e9:,.1f} GB free; the finished blocks are kept: free space, "
                f"or cache fewer tokens (--max-tokens), fewer hidden layers or --hidden-pca-rank, then rerun")


def writer_threads(cfg_threads: int, device: torch.device) -> int:
    """`--writer-threads` 0 (auto): one on CPU, where the forward needs the cores; on CUDA half the host's
    cores, at most 8 (the forward needs one, the targets' own kernels run on the GPU)."""
    if cfg_threads > 0:
        return cfg_threads
    if device.type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def iter_blocks(windows, spec: StoreSpec, blocks: list[int], fingerprint: str):
    """(block, its windows, their loss mask or None) for each of `blocks` (ascending), from the stream of
    (windows, loss_mask or None) batches that `WindowSpill.batches` yields, holding one block at a time.
    Windows of other blocks (done, or another shard's) are read past, not kept. When the whole stream is
    read, its count and fingerprint must be the counting pass's."""
    wanted = set(blocks)
    last = max(blocks, default=-1)
    digest = hashlib.sha256()
    seen, block, buf, mbuf = 0, 0, [], []
    for batch, mask in windows:
        fingerprint_update(digest, batch, mask)
        while len(batch):
            if block >= spec.n_blocks:  # more windows than counted
                seen += len(batch)
                break
            take = min(len(batch), spec.block_range(block)[1] - seen)
            if block in wanted:
                buf.append(batch[:take])
                if mask is not None:
                    mbuf.append(mask[:take])
            batch, seen = batch[take:], seen + take
            if mask is not None:
                mask = mask[take:]
            if seen == spec.block_range(block)[1]:
                if block in wanted:
                    yield block, np.concatenate(buf), np.concatenate(mbuf) if mbuf else None
                buf, mbuf, block = [], [], block + 1
                if last < block < spec.n_blocks:
                    return  # nothing more to compute here: the rest of the data need not be read
    if seen != spec.n_windows or digest.hexdigest()[:16] != fingerprint:
        raise GooseError(f"the windows read back are not the counted ones ({seen} windows now, {spec.n_windows} "
                         f"when counted): blocks written from them are in the store; delete it and rerun")


def _write_problem(exc: OSError) -> str:
    return "disk full" if exc.errno == errno.ENOSPC else f"cannot write ({exc.strerror or exc})"


def _open_writer(cfg: CacheTeacherConfig, spec: StoreSpec, provenance: dict, teacher: Teacher,
                 ranks: Ranks) -> CacheWriter:
    """One process: create or resume the store. Under torchrun rank 0 does that alone (and may restart or
    count a resume, as one process would) while the others wait, then they open it as shared writers.
    Shard jobs are shared writers from the start: the store they create already holds the teacher
    embedding and tokenizer, so `goose cache finalize` needs no teacher."""
    shared = cfg.shard is not None
    once = None
    if shared:
        once = {"teacher_embedding": teacher.embedding_matrix(), "tokenizer_files": teacher.tokenizer_files()}

    def open_(shared_now: bool) -> CacheWriter:
        try:
            return CacheWriter.open(cfg.output, spec, provenance, package_version=__version__,
                                    storage_options=cfg.storage_options, shared=shared_now, once=once)
        except OSError as exc:
            raise GooseError(f"{_write_problem(exc)} while creating store {cfg.output}; free space (or fix the "
                             f"cause) and rerun the same command") from None

    if ranks.world == 1:
        return open_(shared)
    writer, problem = None, None
    if ranks.rank == 0:
        try:
            writer = open_(shared)
        except GooseError as exc:
            problem = str(exc)
    problem = ranks.broadcast(problem)
    if problem:
        raise GooseError(problem if ranks.rank == 0 else f"rank 0 could not open the store: {problem}")
    return writer or open_(True)


def my_blocks(todo: list[int], shard: tuple[int, int] | None, ranks: Ranks) -> list[int]:
    """This process's share: the shard's blocks (b mod N == I), dealt round-robin over the ranks."""
    index, count = shard or (0, 1)
    return [b for b in todo if b % count == index][ranks.rank :: ranks.world]


def run_cache_teacher(cfg: CacheTeacherConfig) -> dict:
    """Build (or finish) the store described by cfg; returns a summary dict (of this rank's work, with the
    ranks' total in tokens_computed, under torchrun)."""
    _check_args(cfg)
    ranks = Ranks.join(resolve_device(cfg.device).type, timeout=datetime.timedelta(hours=6))
    try:
        with _writer_lock(cfg, ranks):
            return _run(cfg, ranks)
    finally:
        ranks.close()


def _writer_lock(cfg: CacheTeacherConfig, ranks: Ranks) -> StoreLock:
    """Before the teacher loads: a single-writer run (one process, or rank 0 for all ranks under torchrun)
    takes the store's writer lock, so a second run on the same --output cannot wipe a store this one is
    creating; a `--shard` job takes none (the jobs write concurrently) but refuses while a single writer
    holds it. Local stores only (cache/lock.py)."""
    lock, problem = StoreLock(None), None
    if ranks.rank == 0:
        try:
            if cfg.shard is None:
                lock = StoreLock.acquire(cfg.output, cfg.storage_options)
            else:
                check_unlocked(cfg.output, cfg.storage_options)
        except GooseError as exc:
            problem = str(exc)
    problem = ranks.broadcast(problem)
    if problem:
        raise GooseError(problem if ranks.rank == 0 else f"rank 0 could not lock the store: {problem}")
    return lock


def _run(cfg: CacheTeacherConfig, ranks: Ranks) -> dict:
    teacher = load_teacher(cfg.teacher, revision=cfg.revision, dtype=cfg.dtype, device=str(ranks.device(resolve_device(cfg.device))))
    layers = _check_against_teacher(cfg, teacher)
    # counting pass: the number of windows and their fingerprint, streamed, so the store's shape and identity
    # are known before it is opened; the windows go to a local spill file (not memory) that the teacher pass
    # reads back block by block, so the data is tokenised once
    texts = open_texts(cfg.data)
    pack = dict(text_column=cfg.data.text_column, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens)
    with WindowSpill(cfg.seq_len, max(len(teacher.tokenizer), teacher.vocab_size), cfg.data.masked) as spill:
        n_windows, fingerprint = count_windows(texts, teacher.tokenizer, response_column=cfg.data.response_column,
                                               spill=spill, **pack)
        return _cache_windows(cfg, ranks, teacher, layers, spill, n_windows, fingerprint)


def _cache_windows(cfg: CacheTeacherConfig, ranks: Ranks, teacher: Teacher, layers, spill: WindowSpill,
                   n_windows: int, fingerprint: str) -> dict:
    """Create or resume the store of these windows and compute this process's blocks of it."""
    spec = StoreSpec(
        n_windows=n_windows, seq_len=cfg.seq_len, vocab_size=teacher.vocab_size, top_k=cfg.top_k,
        tail_temperatures=tuple(float(t) for t in cfg.tail_temperatures), hidden_layers=layers,
        hidden_size=teacher.hidden_size, hidden_dtype=cfg.hidden_dtype, samples=cfg.samples,
        chunk_windows=cfg.chunk_windows, shard_chunks=cfg.shard_chunks, compression=cfg.compression,
        compression_level=cfg.compression_level, topk_encoding=cfg.topk_encoding,
        hidden_pca_rank=cfg.hidden_pca_rank if layers else 0, loss_mask=cfg.data.masked,
        **_encoding_spec(cfg),
    )
    # built before the store opens, so its provenance says which kernels really compute it (a compiler that
    # fails falls back to eager ops here, not after blocks were labelled compiled)
    compiled_choice = (use_compiled_targets(cfg, teacher.device, teacher.vocab_size, spec.n_tokens)
                       and kernels_available(spec.tail_temperatures, teacher.vocab_size, spec.top_k))
    targets_path = "compiled" if compiled_choice else "eager"
    provenance = {
        **teacher.provenance(),
        "n_layers": teacher.n_layers,
        "dataset": cfg.data.describe(),
        "max_tokens": cfg.max_tokens,
        "data_fingerprint": fingerprint,
        "seed": cfg.seed,
        # the batch (and the device, in teacher.provenance) changes the float rounding of the forward pass,
        # so a resume with another one would mix blocks that an uninterrupted run would not write
        "batch_size": cfg.batch_size,
        # so do the reductions' kernels (decided by the whole store's size, so a resumed or sharded store gets
        # the same ones as an uninterrupted run) and their arithmetic's revision: a resume with other ones
        # (--compile-targets flipped, or a goose whose kernels round differently) is refused
        "targets": f"{targets_path} r{TARGETS_REVISION[targets_path]}",
    }
    writer = _open_writer(cfg, spec, provenance, teacher, ranks)
    # every rank deals from rank 0's list, read before any rank writes
    all_todo = ranks.broadcast(writer.blocks_todo())
    todo = my_blocks(all_todo, cfg.shard, ranks)
    already_complete = writer.complete
    tokens_todo = sum(np.subtract(*spec.block_range(b)[::-1]) for b in todo) * spec.seq_len
    t0 = time.perf_counter()
    desc = "cache-teacher" + (f" shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else "")
    desc += f" (rank 0 of {ranks.world})" if ranks.world > 1 else ""
    bar = tqdm(total=int(tokens_todo), unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True,
               disable=not cfg.progress or not todo or ranks.rank > 0)
    compiled = bool(todo) and compiled_choice
    try:
        # Blocks are written in a background thread while the next ones are computed (a bounded queue);
        # the windows are read back from the counting pass's spill block by block as the loop reaches them
        if todo:
            threads = writer_threads(cfg.writer_threads, teacher.device)
            space = DiskSpaceCheck(writer, cfg.output, spec, all_todo, cfg.storage_options)
            background = BlockWriterPool(writer, maxsize=2, threads=threads, on_written=space)
            try:
                pca = writer.pca_basis() if spec.hidden_pca_rank and 0 not in todo else None
                if spec.hidden_pca_rank and 0 not in todo and pca is None:
                    raise GooseError(f"store {cfg.output} has block 0 done but no PCA basis; delete it and rerun")
                blocks = iter_blocks(spill.batches(), spec, todo, fingerprint)
                for block, data, basis in compute_blocks(teacher, blocks, spec, cfg, pca, compiled=compiled):
                    if basis is not None:  # block 0 of a PCA store, first: its basis is stored before it
                        writer.write_pca_basis(basis)
                    background.put(block, data)
                    start, stop = spec.block_range(block)
                    bar.update((stop - start) * spec.seq_len)
            except BaseException:
                background.abort()
                raise
            background.close()
        bar.close()
        tokens_computed = ranks.total(int(tokens_todo))  # waits for every rank's share
        if not already_complete and cfg.shard is None and ranks.rank == 0:
            writer.finalize(teacher.embedding_matrix(), teacher.tokenizer_files())
    except OSError as exc:
        bar.close()
        # blocks already marked done are whole and kept; the one being written is not marked, and the
        # store is not marked complete, so a rerun of the same command continues from here
        done = spec.n_blocks - len(writer.blocks_todo())
        raise GooseError(f"{_write_problem(exc)} while writing store {cfg.output}: {done} of {spec.n_blocks} blocks are done "
                         f"and kept; free space (or fix the cause) and rerun the same command to continue") from None
    elapsed = time.perf_counter() - t0
    nbytes = store_nbytes(cfg.output, cfg.storage_options) if ranks.rank == 0 else 0
    return {
        "output": cfg.output,
        "windows": spec.n_windows,
        "tokens": spec.n_tokens,
        "tokens_computed": tokens_computed,
        "blocks_resumed_from": spec.n_blocks - len(all_todo),
        "already_complete": already_complete,
        "rank": ranks.rank,
        "ranks": ranks.world,
        "shard": cfg.shard,
        "blocks_computed": len(todo),
        "blocks_left": len(writer.blocks_todo()) if cfg.shard else 0,
        "bytes_on_disk": nbytes,
        "bytes_per_token": nbytes / spec.n_tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens_computed / elapsed if elapsed > 0 else float("nan"),
        "targets_compiled": compiled and not _COMPILE_FAILED,
        "spec": asdict(spec),
    }

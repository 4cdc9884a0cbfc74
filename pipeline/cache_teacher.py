"""Stage one: run the teacher once over a corpus and write its targets into a Zarr v3 store.

Recipe: load teacher -> check arguments against it -> load, tokenise and pack the data -> open (create or
resume) the store -> for each unfinished block: teacher forward in batches, targets, write -> finalize.
Batches never cross a block boundary, so a resumed run computes exactly what an uninterrupted one does.

Several writers (docs/SCALING.md): under torchrun (WORLD_SIZE > 1) every rank computes a disjoint share
of the blocks into one store; rank 0 creates or resumes the store while the others wait, and finalizes
it after a barrier. With `--shard I/N`, independent jobs (a SLURM array) each compute the blocks b with
b mod N == I into the same store and leave it unfinished; `goose cache finalize STORE` completes it.
Every block is computed exactly as one process computes it, so the stores are identical.
"""

from __future__ import annotations

import datetime
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..cache.schema import (
    StoreSpec,
    compression_level_problem,
    hidden_channel_scale_name,
    hidden_name,
    hidden_scale_name,
    tail_temperature_problem,
)
from ..cache.lock import StoreLock, check_unlocked
from ..cache.stats import store_nbytes
from ..cache.writer import CacheWriter
from ..errors import GooseError
from .data import DataSpec, load_texts, tokenize_and_pack, windows_fingerprint
from .teacher import Teacher, load_teacher, quantize_int8, resolve_device, resolve_hidden_layers, teacher_targets


@dataclass
class CacheTeacherConfig:
    output: str
    teacher: str = "gpt2"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    data: DataSpec = field(default_factory=DataSpec)
    seq_len: int = 1024
    max_tokens: int | None = None
    top_k: int = 64
    tail_temperatures: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
    samples: int = 0
    seed: int = 0
    hidden_layers: str | None = None
    hidden_dtype: str = "float16"
    chunk_windows: int = 16
    shard_chunks: int = 1
    compression: str = "zstd"
    compression_level: int = 3
    storage_options: dict | None = None
    progress: bool = True
    shard: tuple[int, int] | None = None  # (I, N): compute only blocks b with b % N == I; do not finalize


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N), with 0 <= I < N."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise GooseError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise GooseError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


@dataclass
class Ranks:
    """This process's place among torchrun's ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def join(cls, device_type: str) -> "Ranks":
        """Join torchrun's process group when WORLD_SIZE > 1: nccl on CUDA, gloo on CPU."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ranks.local_rank)
        if not dist.is_initialized():
            try:  # long timeout: after its share a rank waits at the barrier for the slowest one
                dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
            except (RuntimeError, ValueError) as exc:
                raise GooseError(f"cannot join the torchrun process group ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from None
        return ranks

    def device(self, device: str) -> str:
        """cuda (or auto on a CUDA machine) means this rank's own GPU, cuda:LOCAL_RANK."""
        if self.world > 1 and device in ("auto", "cuda") and resolve_device(device).type == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def broadcast(self, obj):
        """Rank 0's obj on every rank (also a barrier)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, value: int) -> int:
        """Sum over ranks (also a barrier)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return sum(values)

    def close(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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
    if cfg.shard is not None and not 0 <= cfg.shard[0] < cfg.shard[1]:
        raise GooseError(f"--shard I/N needs 0 <= I < N, got {cfg.shard[0]}/{cfg.shard[1]}")


def _check_against_teacher(cfg: CacheTeacherConfig, teacher: Teacher) -> tuple[int, ...]:
    ctx = teacher.max_positions
    if ctx is not None and cfg.seq_len > ctx:
        raise GooseError(f"--seq-len {cfg.seq_len} is above the teacher's context of {ctx} tokens")
    if cfg.top_k > teacher.vocab_size:
        raise GooseError(f"--top-k {cfg.top_k} is above the teacher's vocabulary of {teacher.vocab_size}")
    return resolve_hidden_layers(cfg.hidden_layers, teacher.n_layers)


def compute_block(
    teacher: Teacher, windows: np.ndarray, first_window: int, spec: StoreSpec, cfg: CacheTeacherConfig
) -> dict[str, np.ndarray]:
    """Teacher targets for consecutive windows, in batches of cfg.batch_size, as the schema's arrays."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in spec.arrays()}
    for b0 in range(0, len(windows), cfg.batch_size):
        ids = torch.from_numpy(windows[b0 : b0 + cfg.batch_size]).to(teacher.device)
        with torch.inference_mode():
            out = teacher.model(input_ids=ids, output_hidden_states=bool(spec.hidden_layers), use_cache=False)
            seeds = [cfg.seed * 1_000_003 + first_window + b0 + i for i in range(len(ids))]
            targets = teacher_targets(
                out.logits, ids, top_k=spec.top_k, tail_temperatures=spec.tail_temperatures,
                samples=spec.samples, sample_seeds=seeds,
            )
            if not torch.isfinite(out.logits).all():
                raise GooseError(f"the teacher produced non-finite logits in windows {first_window + b0}.."
                                 f"{first_window + b0 + len(ids) - 1}; try --dtype fp32")
            targets["input_ids"] = ids
            for layer in spec.hidden_layers:
                h = out.hidden_states[layer]
                if spec.hidden_dtype == "int8":
                    (targets[hidden_name(layer)], targets[hidden_scale_name(layer)],
                     targets[hidden_channel_scale_name(layer)]) = quantize_int8(h)
                else:
                    targets[hidden_name(layer)] = h.to(torch.float16)
        for name in parts:
            parts[name].append(targets[name].cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


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
    ranks = Ranks.join(resolve_device(cfg.device).type)
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
    teacher = load_teacher(cfg.teacher, revision=cfg.revision, dtype=cfg.dtype, device=ranks.device(cfg.device))
    layers = _check_against_teacher(cfg, teacher)
    ds = load_texts(cfg.data)
    windows = tokenize_and_pack(
        ds, teacher.tokenizer, text_column=cfg.data.text_column, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens
    )
    spec = StoreSpec(
        n_windows=len(windows), seq_len=cfg.seq_len, vocab_size=teacher.vocab_size, top_k=cfg.top_k,
        tail_temperatures=tuple(float(t) for t in cfg.tail_temperatures), hidden_layers=layers,
        hidden_size=teacher.hidden_size, hidden_dtype=cfg.hidden_dtype, samples=cfg.samples,
        chunk_windows=cfg.chunk_windows, shard_chunks=cfg.shard_chunks, compression=cfg.compression,
        compression_level=cfg.compression_level,
    )
    provenance = {
        **teacher.provenance(),
        "n_layers": teacher.n_layers,
        "dataset": cfg.data.describe(),
        "max_tokens": cfg.max_tokens,
        "data_fingerprint": windows_fingerprint(windows),
        "seed": cfg.seed,
        # the batch (and the device, in teacher.provenance) changes the float rounding of the forward pass,
        # so a resume with another one would mix blocks that an uninterrupted run would not write
        "batch_size": cfg.batch_size,
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
    try:
        # One block is written in the background while the next is computed; at most one write in flight.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for block in todo:
                start, stop = spec.block_range(block)
                data = compute_block(teacher, windows[start:stop], start, spec, cfg)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write_block, block, data)
                bar.update((stop - start) * spec.seq_len)
            if pending is not None:
                pending.result()
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
        "spec": asdict(spec),
    }

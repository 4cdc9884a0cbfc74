"""Stage two's recipe: train the spiking student by streaming a teacher cache. The teacher is never loaded.

It only orchestrates components that stand alone: open the store read-only and check it against the run
config (checks) -> build the student, its distillation heads and loss terms (objective), the optimisers
(optim) and the parallel wrapping (distributed) -> resume if asked (checkpoint) -> loop: batches from the
loader, the objective, the guarded optimiser step, logging (loggers), health checks (monitor), validation
(validation), curriculum stages (curriculum), atomic checkpoints and the best model (checkpoint, run_folder)
-> final checkpoint, summary. docs/ARCHITECTURE.md says where each kind of change goes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ... import __version__
from ...cache.device_codec import BatchDecoder, fields_to_read
from ...cache.reader import CacheReader
from ...errors import GooseError, RunFailed
from ...ranks import Ranks
from ...student.model import Student, StudentConfig, config_for_store, detach_state
from .checkpoint import (check_identity, checkpoints, latest_checkpoint, load_checkpoint, recorded_student, rng_state,
                         run_identity, save_checkpoint, set_rng_state)
from .checks import check_store, split_windows
from .config import TrainConfig, dump_config
from .curriculum import curriculum_from_store
from .distributed import (full_model_state, full_optimizer_state, load_full_model_state,
                          load_full_optimizer_state, parallelize)
from .loader import CacheLoader
from .loggers import Loggers, open_run_loggers, start_profiler
from .monitor import EventLog, HealthMonitor
from .objective import Distiller, Objective, alignment_pairs
from .optim import GuardedStep, build_optimizers, lr_factor
from .run_folder import RunLock, progress_postfix, run_files, truncate_jsonl, write_best
from .validation import validate_model
from ..devices import resolve_device


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, echo=print):
        self.cfg, self.progress, self.echo = cfg, progress, echo
        self._open(resume)
        self._build_student(resume)
        self._build_data()
        self._claim_run_folder(resume)

    # ---- building ------------------------------------------------------------------------------
    def _open(self, resume: bool) -> None:
        """The store, the run folder, the device and the ranks; the seed; the training and validation windows."""
        cfg = self.cfg
        self.reader = CacheReader(cfg.cache, storage_options=cfg.storage_options or None)
        self.val_reader = (CacheReader(cfg.val_cache, storage_options=cfg.storage_options or None)
                           if cfg.val_cache else None)
        check_store(cfg, self.reader, self.val_reader)
        self.run = Path(cfg.out)
        if not resume and latest_checkpoint(self.run) is not None:
            raise GooseError(f"run folder {self.run} already has checkpoints; pass --resume or choose a new --out")
        if resume and latest_checkpoint(self.run) is None:
            raise GooseError(f"--resume: no checkpoint in {self.run}")
        if cfg.nan_patience < 1 or cfg.max_rollbacks < 0:
            raise GooseError("nan_patience must be >= 1 and max_rollbacks >= 0")
        try:
            self.run.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GooseError(f"cannot create run folder {self.run}: {exc.strerror}") from None
        self.device = resolve_device(cfg.device)
        self.dist = Ranks.join(self.device.type)  # torchrun: one rank per device, rank 0 writes
        self.device = self.dist.device(self.device)
        if cfg.batch_size % self.dist.world:
            raise GooseError(f"batch_size is the global batch: {cfg.batch_size} does not split over "
                             f"{self.dist.world} ranks")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train_windows, self.val_url, self.val_spec, self.val_windows = split_windows(
            cfg, self.reader, self.val_reader)
        if len(self.train_windows) < cfg.batch_size:
            raise GooseError(f"only {len(self.train_windows)} training windows for a batch of {cfg.batch_size}")

    def _build_student(self, resume: bool) -> None:
        """The student, its distillation heads and loss terms, the parallel wrapping and the optimisers."""
        cfg, spec = self.cfg, self.reader.spec
        try:
            scfg = config_for_store(cfg.model.preset, spec.vocab_size, **cfg.model.overrides)
            # resume: the student the run started with (config.yaml records it resolved), so a model default
            # changed since (token_gain's did) does not change the model under its checkpoints; a changed
            # preset or override is still refused by the identity check
            self.recorded_student = recorded = recorded_student(self.run) if resume else None
            if recorded is not None:  # sized to this store (another store is the identity check's to refuse)
                scfg = StudentConfig.from_dict({**recorded, "vocab_size": spec.vocab_size})
        except (TypeError, ValueError) as exc:
            raise GooseError(f"bad model config: {exc}") from None
        self.model = Student(scfg).to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if cfg.model.init_embedding_from_teacher:
            self.model.init_embedding_from(torch.from_numpy(self.reader.teacher_embedding().astype(np.float32)))
            self.model.to(self.device)
        self.n_teacher_layers = int(self.reader.provenance.get("n_layers", 0))
        self.pairs = alignment_pairs(cfg, scfg.n_layer, self.n_teacher_layers, spec.hidden_layers)
        self.distiller = Distiller(cfg, self.pairs, scfg.d_model, spec.hidden_size).to(self.device)
        self.objective = Objective(cfg, spec, self.distiller, self.model.ln_out, self.n_teacher_layers)
        self.by_name = cfg.parallel == "fsdp"  # optimizer state by parameter name (resumes under any world size)
        self.state_modules = nn.ModuleDict({"model": self.model, "distiller": self.distiller})
        self.forward, self.replicated, self.fsdp = parallelize(self.model, cfg, self.dist, self.device)
        self.opt, self.t_opt = build_optimizers(cfg, self.model, self.distiller, self.replicated, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.guarded_step = GuardedStep(cfg, self.opt, self.t_opt, torch.amp.GradScaler(
            self.device.type, enabled=cfg.amp == "fp16"), self.dist, self.distiller, self.replicated, self.fsdp)
        # the resolved student too: a changed model default must not resume into a different model
        self.identity = {**run_identity(cfg, self.reader), "student": scfg.to_dict()}

    def _build_data(self) -> None:
        """The fields the loss terms read, the curriculum and the loader. On CUDA the loader hands over the
        stored encodings and they are decoded on the GPU (cache/device_codec.py): at GPT-2's shapes decoding
        is most of the host's reading time, and int8 hidden states cross the bus at a quarter of float32's
        bytes. On CPU the host decodes."""
        cfg, spec = self.cfg, self.reader.spec
        self.fields = self.objective.fields()
        self.curriculum = curriculum_from_store(cfg.curriculum, self.reader, self.train_windows) \
            if cfg.curriculum.enabled else None
        on_device = self.device.type == "cuda"
        self.decode = BatchDecoder(spec, self.fields, self.reader.pca_basis()) if on_device else None
        self.loader = CacheLoader(cfg.cache, fields_to_read(spec, self.fields) if on_device else self.fields,
                                  batch_size=cfg.batch_size, chunk_windows=spec.chunk_windows,
                                  seed=cfg.seed, buffer_chunks=cfg.buffer_chunks, num_workers=cfg.num_workers,
                                  pin_memory=on_device, streams=cfg.carry_state, dequantize=not on_device,
                                  rank=self.dist.rank, world=self.dist.world, storage_options=cfg.storage_options)
        self.loader.set_pool(self.curriculum.pool() if self.curriculum else self.train_windows, 0)

    def _claim_run_folder(self, resume: bool) -> None:
        """Counters and health checks; the run folder's lock, the resumed state, config.yaml."""
        cfg = self.cfg
        self.step, self.lr_scale, self.rewarm_from = 0, 1.0, None
        self.bad_steps = self.skipped_steps = self.rollbacks = 0
        self.best_val = float("inf")
        self.elapsed_before = 0.0  # training seconds of earlier processes of this run (resume)
        main = self.dist.is_main
        self.events = EventLog(self.run / "events.jsonl" if main else None,
                               echo=self._warn if main else (lambda line: None))
        self.monitor = HealthMonitor(cfg.monitor, self.events, grad_clip=cfg.optim.grad_clip,
                                     t_bounds=(cfg.temperature.t_min, cfg.temperature.t_max)
                                     if cfg.temperature.mode == "ctkd" else None)
        self.carry = None  # carry_state: the model state after the previous window of every row (detached)
        self.stop_signal = None
        self.failed_batches: list[dict] = []  # non-finite steps since the last rollback: step, batch key, windows
        self.lock = RunLock(self.run)  # before anything is written to the run folder
        if main:
            self.lock.acquire()
        try:
            if resume:
                path, d = self._newest_readable()
                check_identity(d.get("identity"), self.identity, path, self.recorded_student)
                self._load(path, payload=d)
        except BaseException:
            self.lock.release()
            raise
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes its first checkpoint
        if main:
            dump_config(cfg, self.run / "config.yaml", {
                "store_fingerprint": self.reader.provenance.get("data_fingerprint"),
                "store_teacher": self.reader.provenance.get("teacher"),
                "store_config_hash": self.reader.provenance.get("config_hash"),
                "student": self.identity["student"], "align_pairs": [list(p) for p in self.pairs],
                "train_windows": int(len(self.train_windows)), "val_windows": int(len(self.val_windows)),
                "goose_version": __version__, "world_size": self.dist.world,
            })

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler (disabled otherwise); the guarded step owns it."""
        return self.guarded_step.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.guarded_step.scaler = scaler

    def _warn(self, line: str) -> None:
        (tqdm.write if self.progress else self.echo)(line)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    _next_carry = None

    def _stage_values(self) -> dict:
        c = self.cfg
        if self.curriculum is None:
            return {"temperature": None, "kd_weight": c.loss.kd_weight, "ce_weight": c.loss.ce_weight, "stage": 0}
        return self.curriculum.values(self.step)

    def _note_failed_batch(self) -> None:
        key = self.loader.last_key
        self.failed_batches = self.failed_batches[-999:] + [
            {"step": self.step, "batch": list(key), "windows": self.loader.windows_of(key)}]

    # ---- one step ------------------------------------------------------------------------------
    def compute_losses(self, batch: dict, stage: dict, progress: float) -> dict:
        """Every loss part for one micro-batch; `total` is what is minimised."""
        c = self.cfg
        state = None
        if c.carry_state and self.loader.position > 1:  # position 1: the first batch of a pass starts from zero
            state = self.carry
        with self._autocast():
            out = self.forward(batch["input_ids"], state, output_hidden_states=bool(self.pairs))
        if c.carry_state:
            self._next_carry = detach_state(out.state)  # truncated BPTT: the next window starts here
        T = self.distiller.temperature(progress, stage["temperature"]).to(self.device)
        return self.objective(out, batch, T, stage, self.step, self.device)

    def next_batch(self) -> dict:
        """The loader's next batch on the training device, decoded there when it travelled encoded (CUDA)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.loader.next().items()}
        return self.decode(batch) if self.decode is not None else batch

    def _set_lr(self) -> float:
        f = lr_factor(self.cfg, self.step, self.rewarm_from) * self.lr_scale
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        if self.t_opt is not None:
            self.t_opt.param_groups[0]["lr"] = self.cfg.temperature.lr * f
        return self.cfg.optim.lr * f

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.t_opt is not None:
            self.t_opt.zero_grad(set_to_none=True)

    def _accumulate(self, stage: dict, progress: float) -> tuple[dict, bool]:
        """Forward and backward over `accumulation` micro-batches: (mean loss parts, every loss finite)."""
        c = self.cfg
        sums: dict[str, float] = {}
        for micro in range(c.optim.accumulation):
            batch = self.next_batch()
            # DDP: gradients are all-reduced in the last micro-batch's backward only. FSDP2 reduce-scatters
            # every micro-batch into the sharded .grad: holding the sync back would keep full unsharded
            # gradients on every rank between micro-batches, and a skipped step would leave them behind
            last = micro == c.optim.accumulation - 1
            sync = (self.forward.no_sync() if self.dist.active and not self.fsdp and not last
                    else contextlib.nullcontext())
            with sync:
                parts = self.compute_losses(batch, stage, progress)
                # every rank skips together (a rank leaving out a backward would hang the all-reduce)
                loss_finite = self.dist.all_true(bool(torch.isfinite(parts["total"])), self.device)
                if loss_finite:
                    self.scaler.scale(parts["total"] / c.optim.accumulation).backward()
            if not loss_finite:
                self.carry = None  # never start the next windows from a state that produced a non-finite loss
                self._note_failed_batch()
                return sums, False
            if c.carry_state:
                self.carry = self._next_carry
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach()) / c.optim.accumulation
        return sums, True

    def train_step(self) -> dict:
        """One optimiser step over `accumulation` micro-batches; a non-finite loss or gradient skips it."""
        c = self.cfg
        progress = self.step / c.steps
        stage = self._stage_values()
        anneal = c.spike_anneal_steps or round(c.spike_anneal_fraction * c.steps)
        if anneal > 0:  # the mix is a function of the step alone: resume stays exact
            self.model.set_spike_mix(min(1.0, self.step / anneal))
        lr = self._set_lr()
        self.model.train()
        self._zero_grad()
        sums, loss_finite = self._accumulate(stage, progress)
        if sums and self.dist.active:  # logged losses are global-batch means, as in one process
            keys = sorted(sums)
            means = self.dist.mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
            sums = dict(zip(keys, means.tolist()))
        grad_norm, finite, overflow = self.guarded_step(loss_finite)
        if finite:
            self.bad_steps = 0
        elif overflow:
            self._zero_grad()
            self.skipped_steps += 1
            self.events.emit(self.step, "amp_overflow", f"fp16 gradient overflow: step skipped, loss scale lowered "
                             f"to {self.scaler.get_scale():g}", warn=False)
        else:
            self._zero_grad()
            self.bad_steps += 1
            self.skipped_steps += 1
            if loss_finite:  # the loss was finite: blame this step's batch for the gradients
                self._note_failed_batch()
            self.events.emit(self.step, "nonfinite_step", f"non-finite loss or gradient: step skipped "
                             f"({self.bad_steps} in a row)")
        self.step += 1
        m = {"step": self.step, "lr": lr, "grad_norm": grad_norm, "stage": stage["stage"],
             "kd_weight": stage["kd_weight"], "ce_weight": stage["ce_weight"], "skipped": not finite}
        if sums:
            m.update({("loss" if k == "total" else k): v for k, v in sums.items()})
            m.update(self.objective.logged(sums))
        if self.distiller.temperature.learnable:  # m["temperature"] is the T the KD loss used this step
            m["grl_lambda"] = self.distiller.temperature.grl_lambda(progress)
        if self.scaler.is_enabled():
            m["grad_scale"] = float(self.scaler.get_scale())
        return m

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> dict:
        """Perplexity, KL to the teacher at T=1 and top-1 agreement on the fixed validation windows. Under
        torchrun rank 0 validates once and every rank gets its result (the curriculum decides on it); under
        FSDP every rank runs the same windows, since each forward gathers the weights from all ranks."""
        out = None
        if self.dist.is_main or self.fsdp:
            val, summaries = validate_model(self.model, self.val_url, self.val_spec, self.val_windows,
                                            self.cfg.batch_size, self.device, self._autocast,
                                            self.cfg.storage_options)
            if self.dist.is_main:
                self.monitor.on_spikes(self.step, summaries)
            out = {"step": self.step, **val}
        return self.dist.broadcast(out)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _payload(self) -> dict:
        return {
            "step": self.step, "distiller": self.distiller.state_dict(),
            # FSDP: the unsharded weights (as one process writes them) and the optimizer state by parameter name
            "model": full_model_state(self.model) if self.fsdp else self.model.state_dict(),
            "optimizer": full_optimizer_state(self.state_modules, self.opt) if self.by_name else self.opt.state_dict(),
            # each rank carries the state of its own rows: rank 0 saves all of them
            "carry": self.carry if not self.dist.active else self.dist.gather(self.carry), "world_size": self.dist.world,
            "temperature_optimizer": self.t_opt.state_dict() if self.t_opt is not None else None,
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "loader": self.loader.state_dict(),
            "curriculum": self.curriculum.state_dict() if self.curriculum else None,
            "lr_scale": self.lr_scale, "rewarm_from": self.rewarm_from, "best_val": self.best_val,
            "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
            "elapsed_s": self.elapsed_before + time.perf_counter() - getattr(self, "_start_time", time.perf_counter()),
            "monitor_counts": dict(self.events.counts), "monitor": self.monitor.state_dict(),
            "bad_steps": self.bad_steps, "failed_batches": self.failed_batches, "identity": self.identity,
            "goose_version": __version__,
        }

    def provenance(self) -> dict:
        """Where a saved student came from: enough for eval to find the tokenizer and the teacher."""
        p = self.reader.provenance
        return {"store": self.reader.url, "teacher": p.get("teacher"), "revision": p.get("revision"),
                "tokenizer_hash": p.get("tokenizer_hash"), "seq_len": self.reader.seq_len, "step": self.step,
                "goose_version": __version__}

    def checkpoint(self) -> Path:
        payload = self._payload()  # on every rank: it gathers the carried states
        path = self.run / "checkpoints" / f"step_{self.step:07d}"
        if self.dist.is_main:
            path = save_checkpoint(self.run, self.step, payload, self.cfg.keep_checkpoints)
        self.dist.barrier()  # a rollback on any rank finds it
        return path

    def _newest_readable(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, with its payload. One that does not (truncated) is moved aside to
        checkpoints/.broken-step_N with a warning, so neither pruning nor a later rollback picks it again;
        with none left readable, the last error is raised."""
        found = checkpoints(self.run)
        for i, path in enumerate(reversed(found)):
            try:
                # FSDP: to host memory; each rank keeps only its shard of what it then loads
                return path, load_checkpoint(path, "cpu" if self.fsdp else self.device)
            except GooseError as exc:
                if i == len(found) - 1:
                    raise
                if self.dist.is_main:
                    os.replace(path, path.parent / f".broken-{path.name}")
                self._warn(f"warning: {exc}; moved it to .broken-{path.name} and fell back to the previous checkpoint")
        return None

    def _load(self, path: Path, *, keep_lr_scale: bool = False, payload: dict | None = None) -> None:
        d = payload if payload is not None else load_checkpoint(path, "cpu" if self.fsdp else self.device)
        self.distiller.load_state_dict(d["distiller"])
        if self.fsdp:
            load_full_model_state(self.model, d["model"])
        else:
            self.model.load_state_dict(d["model"])
        if self.by_name:
            load_full_optimizer_state(self.state_modules, self.opt, d["optimizer"])
        else:
            self.opt.load_state_dict(d["optimizer"])
        saved_world = int(d.get("world_size", 1))
        carry = d.get("carry")
        if saved_world != self.dist.world:
            if self.dist.is_main:
                self._warn(f"warning: checkpoint {path.name} was written by {saved_world} ranks, this run has "
                           f"{self.dist.world}: the same global batches continue, per-rank state is restarted")
            carry = None
        elif self.dist.active:
            carry = carry[self.dist.rank]
        # FSDP loads checkpoints to host memory; the carried states belong on the training device
        self.carry = tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, carry)
        if self.t_opt is not None:
            self.t_opt.load_state_dict(d["temperature_optimizer"])
        self.scaler.load_state_dict(d["scaler"])
        set_rng_state(d["rng"])
        self.step = int(d["step"])
        if self.curriculum is not None and d["curriculum"] is not None:
            self.curriculum.load_state_dict(d["curriculum"])
            self.loader.set_pool(self.curriculum.pool())
        self.loader.load_state_dict(d["loader"])
        if not keep_lr_scale:
            self.lr_scale = float(d["lr_scale"])
        self.rewarm_from, self.best_val = d["rewarm_from"], float(d["best_val"])
        self.skipped_steps, self.rollbacks = int(d["skipped_steps"]), int(d["rollbacks"])
        self.elapsed_before = float(d.get("elapsed_s", 0.0))
        self.events.counts.update({k: v for k, v in d.get("monitor_counts", {}).items() if k not in self.events.counts})
        self.monitor.load_state_dict(d["monitor"])
        self.bad_steps = int(d["bad_steps"])
        self.failed_batches = list(d["failed_batches"])

    def rollback(self) -> None:
        """Back to the last good checkpoint with a lower learning rate, never to replay the batches that
        failed (they are marked as skipped in the loader, and logged). After `max_rollbacks` rollbacks the
        run stops with exit status 1, naming the steps and windows."""
        failed = self.failed_batches
        where = "; ".join(f"step {f['step']} windows {f['windows'][:8]}{'...' if len(f['windows']) > 8 else ''}"
                          for f in failed[-self.cfg.nan_patience:])
        newest = self._newest_readable() if latest_checkpoint(self.run) is not None else None
        path = newest[0] if newest else None
        if path is None or self.rollbacks >= self.cfg.max_rollbacks:
            why = (f"after {self.rollbacks} rollbacks (max_rollbacks {self.cfg.max_rollbacks})" if path is not None
                   else "and no checkpoint to roll back to")
            self.events.emit(self.step, "diverged", f"{self.bad_steps} non-finite steps in a row {why}: {where}",
                             warn=False, failed=failed)
            raise RunFailed(f"training stopped: {self.bad_steps} non-finite steps in a row {why} ({where}); "
                            f"check those windows of the store (goose cache verify) or lower optim.lr")
        lowered = self.lr_scale * self.cfg.rollback_lr_factor
        skipped, rollbacks, elapsed = self.skipped_steps, self.rollbacks + 1, self.elapsed_before
        skip = self.loader.skip | {tuple(f["batch"]) for f in failed}
        self._load(path, keep_lr_scale=True, payload=newest[1])
        self.loader.skip = skip
        self.elapsed_before = elapsed
        self.lr_scale, self.skipped_steps, self.rollbacks, self.bad_steps = lowered, skipped, rollbacks, 0
        self.failed_batches = []
        self.events.emit(self.step, "rollback", f"{self.cfg.nan_patience} non-finite steps in a row: rolled back to "
                         f"{path.name}, learning-rate scale now {lowered:g}; skipping the failed batches ({where})",
                         lr_scale=lowered, skipped_batches=failed)

    def save_best(self, val: dict) -> None:
        model = self.model
        if self.fsdp:  # every rank gathers; rank 0 writes an unsharded copy
            state = full_model_state(self.model)
            if not self.dist.is_main:
                return
            model = Student(self.model.cfg)
            model.load_state_dict(state)
        write_best(self.run, model, val, self.provenance(), self.reader)

    # ---- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):  # noqa: ARG002
        self.stop_signal = signum

    def fit(self) -> dict:
        c = self.cfg
        if self.dist.is_main:
            truncate_jsonl(self.run / "metrics.jsonl", self.step)
            truncate_jsonl(self.run / "events.jsonl", self.step)
        self.loggers = Loggers([])
        if self.dist.is_main:  # rank 0 logs for the run: metrics.jsonl, TensorBoard and any tracker (`loggers`)
            try:
                self.loggers = open_run_loggers(c, self.run, self.step, self._warn)
            except BaseException:
                self.lock.release()  # a tracker that cannot start (not installed, no server) stops the run cleanly
                raise
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        profiler = start_profiler(c.profile_steps, self.run, self.device)
        bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress or not self.dist.is_main, dynamic_ncols=True)
        self._start_time = start_time = time.perf_counter()
        self._since_log = (start_time, 0)  # (time of the last train row, tokens since)
        tokens_per_step = c.batch_size * c.optim.accumulation * self.reader.seq_len
        last_val, interrupted = None, False
        try:
            if self.dist.all_true(latest_checkpoint(self.run) is None, self.device):
                self.checkpoint()  # step 0: a rollback target even if the first steps go non-finite
            while self.step < c.steps:
                m = self.train_step()
                if profiler is not None:
                    profiler.step()
                if self.bad_steps >= c.nan_patience:
                    self.rollback()
                    continue
                last_val = self._after_step(m, tokens_per_step, bar) or last_val
                bar.update(1)
                # torchrun signals every rank, but not at the same step: stop together at the first one
                if self.dist.any_true(self.stop_signal is not None, self.device):
                    self.stop_signal = self.stop_signal or signal.SIGTERM
                    self.checkpoint()
                    self.events.emit(self.step, "interrupted", f"signal {self.stop_signal}: checkpoint written, "
                                     "resume with --resume", warn=True)
                    interrupted = True
                    break
        finally:
            self.lock.release()
            self.loader.close()  # stops its read-ahead thread
            bar.close()
            if profiler is not None:
                profiler.stop()
            for s, h in previous.items():
                signal.signal(s, h)
            self.loggers.close()
        return {
            "run": str(self.run), "steps": self.step, "interrupted": interrupted,
            "signal": self.stop_signal, "seconds": time.perf_counter() - start_time,
            "tokens": self.step * tokens_per_step, "best_val_ppl": math.exp(self.best_val) if self.best_val < 1e9 else None,
            "last_val": last_val, "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
            "events": self.monitor.summary(), "parameters": self.model.parameter_report(),
            "val_windows": int(len(self.val_windows)), "seq_len": int(self.val_spec.seq_len),
            "rank": self.dist.rank, "world_size": self.dist.world, "loggers": self.loggers.names,
            "outputs": run_files(self.run),
        }

    def _after_step(self, m: dict, tokens_per_step: int, bar) -> dict | None:
        """Health checks, the train row, validation, curriculum stages and checkpoints after one step;
        returns the validation row when one ran."""
        c = self.cfg
        t_last, tok_last = self._since_log
        tok_last += tokens_per_step
        self.monitor.on_step(self.step, m)
        if self.step % c.log_every == 0 or self.step == c.steps:
            now = time.perf_counter()
            m["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
            m["tokens"] = self.step * tokens_per_step
            m["elapsed_s"] = self.elapsed_before + now - self._start_time
            t_last, tok_last = now, 0
            self._log(m)
            bar.set_postfix(progress_postfix(m), refresh=False)
        self._since_log = (t_last, tok_last)
        val = None
        if self.step % c.val_every == 0 or self.step == c.steps:
            val = self._validate_and_log()
            if self.curriculum is not None and self.curriculum.maybe_advance(self.step, c.steps, val["val_loss"]):
                self._stage_changed()
        elif self.curriculum is not None and self.curriculum.maybe_advance(self.step, c.steps):
            self._stage_changed()
        if self.step % c.ckpt_every == 0 or self.step == c.steps:
            self.checkpoint()
        return val

    def _stage_changed(self) -> None:
        self.loader.set_pool(self.curriculum.pool(), self.curriculum.stage)
        if self.cfg.optim.rewarm_steps_at_stage > 0:
            self.rewarm_from = self.step
        v = self.curriculum.values(self.step + self.cfg.curriculum.transition_steps)
        self.events.emit(self.step, "stage", f"curriculum stage {self.curriculum.stage + 1}/{self.cfg.curriculum.buckets}: "
                         f"{len(self.curriculum.pool())} windows, T -> {v['temperature']:g}, KD weight -> "
                         f"{v['kd_weight']:g}", warn=False, stage=self.curriculum.stage,
                         windows=int(len(self.curriculum.pool())))

    def _validate_and_log(self) -> dict:
        val = self.validate()
        if val["val_loss"] < self.best_val:
            self.best_val = val["val_loss"]
            if self.dist.is_main or self.fsdp:
                self.save_best(val)
        val["best_val_ppl"] = math.exp(self.best_val)
        self._log(val | {"kind": "val"})
        return val

    def _log(self, m: dict) -> None:
        """One metrics row to every logger (metrics.jsonl, TensorBoard, trackers); rank 0 only."""
        if not self.dist.is_main:
            return
        self.loggers.log_metrics(m, self.step)


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, echo=print) -> dict:
    try:
        trainer = Trainer(cfg, resume=resume, progress=progress, echo=echo)
        return trainer.fit()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

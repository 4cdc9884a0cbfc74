"""Stage two: train the spiking student by streaming a teacher cache. The teacher is never loaded.

Recipe: open the store read-only -> check it against the run config -> build student, distillation
heads (temperature, projectors), optimiser and schedules -> resume if asked -> loop: batches from the
loader, losses (KD + CE + alignment + rate), guarded optimiser step, logging, health checks, validation,
curriculum stages, atomic checkpoints -> final checkpoint, summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ... import __version__
from ...cache.device_codec import BatchDecoder, fields_to_read
from ...cache.reader import CacheReader
from ...locks import ProcessLock
from ...errors import GooseError, RunFailed
from ...student.model import Student, StudentConfig, config_for_store, detach_state
from .config import TrainConfig, dump_config
from .curriculum import Curriculum, difficulty_order
from .distributed import (DistEnv, clip_grad_norm, full_model_state, full_optimizer_state, load_full_model_state,
                          load_full_optimizer_state, shard_student)
from .loggers import Loggers, open_loggers
from .loader import CacheLoader, read_windows
from .losses import build_kd_loss, ce_loss, layer_map, student_bucket_logprobs, teacher_bucket_logprobs
from .monitor import EventLog, HealthMonitor
from .objective import Distiller, Objective, align_teacher_layers
from ..stage_one.teacher import resolve_device

CKPT_FILE = "state.pt"
LOCK_FILE = ".lock"

# Config keys a resumed run may change: they steer how long it runs, what it logs and where, never what
# it computes. Anything else differing from the checkpoint's config is refused on --resume.
RESUMABLE_KEYS = {"out", "steps", "log_every", "val_every", "ckpt_every", "keep_checkpoints", "tensorboard", "loggers",
                  "profile_steps", "device", "num_workers", "cache", "val_cache", "nan_patience", "max_rollbacks",
                  "rollback_lr_factor", "monitor", "storage_options"}


# ---------------------------------------------------------------------------------------------
# Pieces


def lr_factor(cfg: TrainConfig, step: int, rewarm_from: int | None) -> float:
    """Linear warm-up, cosine decay to min_lr_ratio; optional short re-warm-up after a stage change."""
    o = cfg.optim
    if step < o.warmup_steps:
        f = (step + 1) / o.warmup_steps
    else:
        progress = (step - o.warmup_steps) / max(cfg.steps - o.warmup_steps, 1)
        f = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if rewarm_from is not None and o.rewarm_steps_at_stage > 0 and step - rewarm_from < o.rewarm_steps_at_stage:
        f *= (step - rewarm_from + 1) / o.rewarm_steps_at_stage
    return f


def param_groups(cfg: TrainConfig, model: Student, distiller: Distiller, replicated=()) -> list[dict]:
    """Weight decay on large matrices only; none on norms, biases, mixes, spike parameters. The CTKD
    temperature is not here: it has its own SGD optimiser (`temperature_optimizer`). `replicated`: under
    FSDP the parameters left unsharded, in a group of their own (one foreach step cannot mix them with
    sharded ones)."""
    decay, no_decay, spikes = [], [], []
    apart = {id(p) for p in replicated}
    own_spike_lr = cfg.optim.spike_lr_mult != 1.0  # a group of their own only then: old checkpoints resume
    for name, p in model.named_parameters():
        if id(p) in apart:
            continue
        if own_spike_lr and ".spikes." in name:  # every site, the head's included (head_spike.spikes.head)
            spikes.append(p)
            continue
        big = p.ndim == 2 and ".spikes." not in name and not name.endswith("r_k")
        (decay if big else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if spikes:
        groups.append({"params": spikes, "weight_decay": 0.0, "name": "spikes",
                       "lr": cfg.optim.lr * cfg.optim.spike_lr_mult})
    if replicated:  # under FSDP: the spike parameters (left unsharded)
        groups.append({"params": list(replicated), "weight_decay": 0.0, "name": "replicated",
                       "lr": cfg.optim.lr * cfg.optim.spike_lr_mult})
    if len(distiller.projectors):
        groups.append({"params": list(distiller.projectors.parameters()), "weight_decay": cfg.optim.weight_decay,
                       "name": "projectors"})
    for g in groups:
        g["base_lr"] = g.get("lr", cfg.optim.lr)
    return groups


def temperature_optimizer(cfg: TrainConfig, distiller: Distiller) -> torch.optim.Optimizer | None:
    """Plain SGD with momentum for CTKD's theta, as in the reference (zhengli97/CTKD). Under Adam the step
    is normalised by the gradient's running magnitude, so the reversal strength lambda cancels out (lambda
    1.0 and 0.001 gave the same temperature trajectory); under SGD lambda scales every step."""
    if not distiller.temperature.learnable:
        return None
    return torch.optim.SGD([distiller.temperature.theta], lr=cfg.temperature.lr, momentum=cfg.temperature.momentum)


def check_store(cfg: TrainConfig, reader: CacheReader, val_reader: CacheReader | None) -> None:
    """Mismatches between the store and the run config fail here, before any training."""
    spec = reader.spec
    kd = build_kd_loss(cfg)  # an unknown name or option is refused here
    if kd is not None:
        kd.check(cfg, spec, reader.url)
    if cfg.temperature.mode == "stage" and not cfg.curriculum.enabled:
        raise GooseError("temperature.mode=stage needs curriculum.enabled=true")
    if cfg.loss.align_weight > 0 and not spec.hidden_layers:
        raise GooseError(f"alignment needs teacher hidden states but store {reader.url} has none (--hidden-layers)")
    if val_reader is not None:
        if val_reader.vocab_size != spec.vocab_size or \
                val_reader.provenance.get("tokenizer_hash") != reader.provenance.get("tokenizer_hash"):
            raise GooseError("--val-cache was made with another tokenizer or vocabulary than the training store")
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.optim.accumulation < 1:
        raise GooseError("steps, batch_size and optim.accumulation must be >= 1")
    if cfg.carry_state and cfg.curriculum.enabled:
        raise GooseError("carry_state needs consecutive windows; the POCL curriculum reorders them (use one)")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise GooseError(f"amp must be none, bf16 or fp16, got {cfg.amp!r}")


def split_windows(cfg: TrainConfig, reader: CacheReader, val_reader: CacheReader | None):
    """(training windows, validation store URL, its spec, fixed validation windows) for a run config."""
    spec = reader.spec
    if val_reader is not None:
        return (np.arange(spec.n_windows), val_reader.url, val_reader.spec,
                np.arange(min(cfg.val_windows, val_reader.spec.n_windows)))
    n_val = max(1, int(round(cfg.val_fraction * spec.n_windows)))
    if n_val >= spec.n_windows:
        raise GooseError(f"store has {spec.n_windows} windows: too few to hold out {n_val} for validation")
    val = np.arange(spec.n_windows - n_val, spec.n_windows)[: cfg.val_windows]
    return np.arange(spec.n_windows - n_val), reader.url, spec, val


@torch.no_grad()
def validate_model(model: Student, url: str, spec, windows: np.ndarray, batch_size: int, device,
                   autocast=contextlib.nullcontext, storage_options: dict | None = None) -> tuple[dict, dict]:
    """Perplexity, teacher perplexity on the same windows, KL to the teacher at T=1, top-1 agreement and
    spike statistics over fixed windows of a store. Returns (metrics, per-site SpikeStats).

    Always of the fully ternary model, also while the trainer anneals spikes in: that is the model best/,
    `goose eval` and export hold (a saved model loads fully ternary), so a mid-anneal validation neither
    flatters the curve with continuous activations nor picks a best/ that scores worse once loaded. The
    training mix is restored afterwards, so training and resume are unchanged."""
    sites = list(model.spike_modules().values())
    training_mix = [site.mix for site in sites]
    for site in sites:
        site.mix = 1.0
    try:
        return _validate_ternary(model, url, spec, windows, batch_size, device, autocast, storage_options)
    finally:
        for site, mix in zip(sites, training_mix):
            site.mix = mix


def _validate_ternary(model, url, spec, windows, batch_size, device, autocast, storage_options):
    model.eval()
    fields = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "gold_nll"]
    if getattr(spec, "loss_mask", False):  # masked data: every metric over the positions whose prediction counts
        fields.append("loss_mask")
    nll_sum = kl_sum = agree = teacher_nll = 0.0
    n_tok = n_kd = 0
    stats_all: dict = {}
    for batch in read_windows(url, windows, fields, batch_size, storage_options):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(batch["input_ids"], collect_stats=True)
        logits = out.logits.float()
        ids = batch["input_ids"]
        log_p = teacher_bucket_logprobs(batch["topk_logprobs"], batch["tail_logmass"], spec.tail_temperatures, 1.0)
        log_q = student_bucket_logprobs(logits, batch["topk_ids"], 1.0)
        if "loss_mask" in batch:
            m = batch["loss_mask"].double()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).long(),
                                  reduction="none").view(ids.shape[0], -1)
            nll_sum += float((nll.double() * m[:, :-1]).sum())
            teacher_nll += float((batch["gold_nll"][:, :-1].double() * m[:, :-1]).sum())
            n_tok += int(m[:, :-1].sum())
            kl_sum += float(((log_p.exp() * (log_p - log_q)).sum(-1).double() * m).sum())
            agree += float(((logits.argmax(-1) == batch["topk_ids"][..., 0]).double() * m).sum())
            n_kd += int(m.sum())
        else:
            n = ids[:, 1:].numel()
            nll_sum += float(ce_loss(logits, ids)) * n
            teacher_nll += float(batch["gold_nll"][:, :-1].double().sum())
            n_tok += n
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
            agree += float((logits.argmax(-1) == batch["topk_ids"][..., 0]).sum())
            n_kd += ids.numel()
        for key, st in out.spike_stats.items():
            if key in stats_all:
                stats_all[key].merge(st)
            else:
                stats_all[key] = st
    summaries = {k: s.summary() for k, s in stats_all.items()}
    energy = model.energy_report(stats_all)
    rates = [s["firing_rate"] for s in summaries.values() if s]
    if n_tok == 0 or n_kd == 0:
        raise GooseError("the validation windows hold no position whose loss counts (their loss_mask is all "
                         "zero): validate on more windows (val_windows, val_fraction) or another --val-cache")
    return {
        "val_loss": nll_sum / n_tok, "val_ppl": math.exp(nll_sum / n_tok),
        "teacher_ppl": math.exp(teacher_nll / n_tok), "val_kl": kl_sum / n_kd, "val_top1_agree": agree / n_kd,
        "spike_rate": float(np.mean(rates)) if rates else None,
        "zero_fraction": 1 - float(np.mean(rates)) if rates else None,
        "dead_fraction_max": max((s["dead_fraction"] for s in summaries.values() if s), default=None),
        "saturated_fraction_max": max((s["saturated_fraction"] for s in summaries.values() if s), default=None),
        "energy_ratio_vs_dense": energy["energy_ratio_vs_dense"],
        "spike_sites": {k: {"rate": s["firing_rate"], "dead": s["dead_fraction"], "sat": s["saturated_fraction"]}
                        for k, s in summaries.items() if s},
    }, summaries


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, payload: dict, keep: int) -> Path:
    """Write checkpoints/step_N atomically: a temp folder, fsync, then rename. Keeps the newest `keep`."""
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:07d}"
    tmp = ckdir / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with open(tmp / CKPT_FILE, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:120]
        kept = [p.name for p in checkpoints(run)]
        raise GooseError(f"cannot write checkpoint {final} ({why}; is the disk full?); finished checkpoints are "
                         f"kept: {', '.join(kept) or 'none'}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckdir.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a crash mid-write leaves only a .tmp folder, never listed)."""
    return [p for p in sorted((run / "checkpoints").glob("step_*")) if (p / CKPT_FILE).exists()]


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint's payload. weights_only=True: unpickling runs no code from the file, only tensors and
    plain containers are rebuilt (a crafted state.pt is refused, not executed)."""
    try:
        return torch.load(path / CKPT_FILE, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, refused global, bad pickle: all one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first if len(first) <= 240 else first[:237] + "..."
        raise GooseError(f"cannot load checkpoint {path / CKPT_FILE}: {first}") from None


class RunLock:
    """One training process per run folder: RUN/.lock, goose's one process lock (`locks.py`), so a run held
    on another host (a cluster sharing the filesystem) is refused too, never judged stale by a pid that
    means nothing here. A lock whose process is gone on this host is stale (a killed run) and taken over."""

    def __init__(self, run: Path):
        self.path = run / LOCK_FILE
        self.lock = None

    def acquire(self) -> None:
        where = self.path.parent
        self.lock = ProcessLock.acquire(str(self.path), lambda who: (
            f"run folder {where} is in use by another training ({who}); wait for it or choose another --out "
            f"(if that run is gone, delete {self.path})"), reentrant=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def run_identity(cfg: TrainConfig, reader: CacheReader) -> dict:
    """What a checkpoint must agree with to be resumed: the config minus RESUMABLE_KEYS, and the store by
    content (its fingerprint), not by path, so a moved store still resumes."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_KEYS}
    p = reader.provenance
    return {"config": config, "store": {"data_fingerprint": p.get("data_fingerprint"),
                                        "config_hash": p.get("config_hash")}}


def _normalised_student(student: dict) -> dict:
    """A recorded student config as this version resolves it: fields added since at what they meant then
    (StudentConfig.from_dict), so an older record compares equal to the same model."""
    try:
        return StudentConfig.from_dict(student).to_dict()
    except (TypeError, ValueError):
        return student


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with every key it lacks, at any depth, taken from `defaults`."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict) and v:
            out[k] = _with_defaults(out[k], v)
    return out


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop lines logged after `step` (they belong to the part of a crashed run that is being redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True, echo=print):
        self.cfg, self.progress, self.echo = cfg, progress, echo
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
        self.dist = DistEnv.from_env(self.device.type)  # torchrun: one rank per device, rank 0 writes
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.batch_size % self.dist.world:
            raise GooseError(f"batch_size is the global batch: {cfg.batch_size} does not split over "
                             f"{self.dist.world} ranks")
        self._seed(cfg.seed)
        spec = self.reader.spec

        # windows: training pool and validation subset
        self.train_windows, self.val_url, self.val_spec, self.val_windows = split_windows(
            cfg, self.reader, self.val_reader)
        if len(self.train_windows) < cfg.batch_size:
            raise GooseError(f"only {len(self.train_windows)} training windows for a batch of {cfg.batch_size}")

        # model and distillation heads
        try:
            scfg = config_for_store(cfg.model.preset, spec.vocab_size, **cfg.model.overrides)
            # resume: the student the run started with (config.yaml records it resolved), so a model default
            # changed since (token_gain's did) does not change the model under its checkpoints; a changed
            # preset or override is still refused by the identity check
            self.recorded_student = recorded = self._recorded_student() if resume else None
            if recorded is not None:  # sized to this store (another store is the identity check's to refuse)
                scfg = StudentConfig.from_dict({**recorded, "vocab_size": spec.vocab_size})
        except (TypeError, ValueError) as exc:
            raise GooseError(f"bad model config: {exc}") from None
        self.model = Student(scfg).to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if cfg.model.init_embedding_from_teacher:
            self.model.init_embedding_from(torch.from_numpy(self.reader.teacher_embedding().astype(np.float32)))
            self.model.to(self.device)
        self.pairs = []
        self.n_teacher_layers = int(self.reader.provenance.get("n_layers", 0))
        if cfg.loss.align_weight > 0:
            a = cfg.loss.align
            try:
                self.pairs = layer_map(a.layer_map, scfg.n_layer, int(self.reader.provenance.get("n_layers", 0)),
                                       spec.hidden_layers, a.pairs, a.last_k)
            except ValueError as exc:
                raise GooseError(str(exc)) from None
            missing = sorted(set(align_teacher_layers(cfg, self.pairs)) - set(spec.hidden_layers))
            if missing or not self.pairs:
                raise GooseError(f"alignment needs teacher layers {missing or '(none mapped)'} but the store has "
                                 f"{list(spec.hidden_layers)}")
            if any(not 0 <= s <= scfg.n_layer for s, _ in self.pairs):
                raise GooseError(f"alignment pairs {self.pairs} name student layers outside 0..{scfg.n_layer}")
        self.distiller = Distiller(cfg, self.pairs, scfg.d_model, spec.hidden_size).to(self.device)
        self.fsdp = self.dist.active and cfg.parallel == "fsdp"
        self.replicated: list = []
        # parallel: fsdp keeps its optimizer state by parameter name (and the spike parameters in a group of
        # their own) in one process too, so its checkpoints resume under any world size, one rank included
        self.by_name = cfg.parallel == "fsdp"
        self.state_modules = nn.ModuleDict({"model": self.model, "distiller": self.distiller})
        if self.fsdp:  # before compile and before the optimizer: both must see the sharded parameters
            self.replicated = shard_student(self.model, self.device.type, self.dist.world)
        elif self.by_name:
            self.replicated = [p for name, p in self.model.named_parameters() if ".spikes." in name]
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if self.dist.active and not self.fsdp:
            # running spike statistics are all-reduced inside the model (global-batch statistics), so the
            # buffers agree on every rank without DDP broadcasting them
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(param_groups(cfg, self.model, self.distiller, self.replicated), lr=cfg.optim.lr,
                                     betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                     **({"fused": True} if fused else {"foreach": True}))
        self.t_opt = temperature_optimizer(cfg, self.distiller)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

        # data
        self.objective = Objective(cfg, spec, self.distiller, self.model.ln_out, self.n_teacher_layers)
        self.fields = self.objective.fields()
        self.curriculum = None
        if cfg.curriculum.enabled:
            # per-window means, read chunk by chunk (never the whole per-token arrays at once)
            nll, ent = np.empty(spec.n_windows), np.empty(spec.n_windows)
            for start, part in self.reader.iter_chunks(["gold_nll", "entropy"]):
                stop = start + len(part["gold_nll"])
                nll[start:stop] = np.nanmean(part["gold_nll"], axis=1)
                ent[start:stop] = part["entropy"].astype(np.float32).mean(axis=1)
            order = difficulty_order(nll[self.train_windows], ent[self.train_windows])
            self.curriculum = Curriculum(cfg.curriculum, self.train_windows[order])
        # On CUDA the loader hands over the stored encodings and they are decoded on the GPU (cache/device_codec.py):
        # at GPT-2's shapes decoding is most of the host's reading time, and int8 hidden states cross the bus
        # at a quarter of float32's bytes. On CPU the host decodes, as it always has.
        on_device = self.device.type == "cuda"
        self.decode = BatchDecoder(spec, self.fields, self.reader.pca_basis()) if on_device else None
        self.loader = CacheLoader(cfg.cache, fields_to_read(spec, self.fields) if on_device else self.fields,
                                  batch_size=cfg.batch_size, chunk_windows=spec.chunk_windows,
                                  seed=cfg.seed, buffer_chunks=cfg.buffer_chunks, num_workers=cfg.num_workers,
                                  pin_memory=on_device, streams=cfg.carry_state, dequantize=not on_device,
                                  rank=self.dist.rank, world=self.dist.world, storage_options=cfg.storage_options)
        self.loader.set_pool(self.curriculum.pool() if self.curriculum else self.train_windows, 0)

        # bookkeeping
        self.step = 0
        self.lr_scale = 1.0
        self.rewarm_from = None
        self.bad_steps = 0
        self.skipped_steps = 0
        self.rollbacks = 0
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
        # the resolved student too: a changed model default must not resume into a different model
        self.identity = {**run_identity(cfg, self.reader), "student": scfg.to_dict()}
        self.failed_batches: list[dict] = []  # non-finite steps since the last rollback: step, batch key, windows
        self.lock = RunLock(self.run)  # before anything is written to the run folder
        if main:
            self.lock.acquire()
        try:
            if resume:
                self._resume()
        except BaseException:
            self.lock.release()
            raise
        self.dist.barrier()  # every rank has checked the folder before rank 0 writes its first checkpoint
        if not main:
            return
        dump_config(cfg, self.run / "config.yaml", {
            "store_fingerprint": self.reader.provenance.get("data_fingerprint"),
            "store_teacher": self.reader.provenance.get("teacher"),
            "store_config_hash": self.reader.provenance.get("config_hash"),
            "student": scfg.to_dict(), "align_pairs": [list(p) for p in self.pairs],
            "train_windows": int(len(self.train_windows)), "val_windows": int(len(self.val_windows)),
            "goose_version": __version__, "world_size": self.dist.world,
        })

    # ---- helpers -------------------------------------------------------------------------------
    def _warn(self, line: str) -> None:
        (tqdm.write if self.progress else self.echo)(line)

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

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

    # ---- one step ------------------------------------------------------------------------------
    def compute_losses(self, batch: dict, stage: dict, progress: float) -> dict:
        """Every loss part for one micro-batch; `total` is what is minimised."""
        c = self.cfg
        ids = batch["input_ids"]
        state = None
        if c.carry_state and self.loader.position > 1:  # position 1: the first batch of a pass starts from zero
            state = self.carry
        with self._autocast():
            out = self.forward(ids, state, output_hidden_states=bool(self.pairs))
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
        sums: dict[str, float] = {}
        finite = True
        overflow = False  # fp16: gradients overflowed at the current loss scale (the scaler's business)
        unscaled = False
        for micro in range(c.optim.accumulation):
            batch = self.next_batch()
            # DDP: gradients are all-reduced in the last micro-batch's backward only
            last = micro == c.optim.accumulation - 1
            # FSDP2 reduce-scatters every micro-batch into the sharded .grad: holding the sync back would keep
            # full unsharded gradients on every rank between micro-batches (FSDP's memory saving gone), and a
            # skipped step would leave them behind for the next one
            sync = (self.forward.no_sync() if self.dist.active and not self.fsdp and not last
                    else contextlib.nullcontext())
            with sync:
                parts = self.compute_losses(batch, stage, progress)
                # every rank skips together (a rank leaving out a backward would hang the all-reduce)
                loss_finite = self.dist.all_true(bool(torch.isfinite(parts["total"])), self.device)
                if loss_finite:
                    self.scaler.scale(parts["total"] / c.optim.accumulation).backward()
            if not loss_finite:
                finite = False
                self.carry = None  # never start the next windows from a state that produced a non-finite loss
                key = self.loader.last_key
                self.failed_batches = self.failed_batches[-999:] + [
                    {"step": self.step, "batch": list(key), "windows": self.loader.windows_of(key)}]
                break
            if c.carry_state:
                self.carry = self._next_carry
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach()) / c.optim.accumulation
        if sums and self.dist.active:  # logged losses are global-batch means, as in one process
            keys = sorted(sums)
            means = self.dist.mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
            sums = dict(zip(keys, means.tolist()))
        grad_norm = float("nan")
        t_live = False
        if finite:
            # outside the DDP module: CTKD theta, projectors (and under FSDP the replicated spike parameters)
            self.dist.sync_grads([*self.distiller.parameters(), *self.replicated])
            self.scaler.unscale_(self.opt)
            unscaled = True
            t_live = self.t_opt is not None and self.distiller.temperature.theta.grad is not None
            if t_live:
                self.scaler.unscale_(self.t_opt)
            params = [p for g in self.opt.param_groups for p in g["params"]]
            max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
            if self.fsdp:  # sharded student and replicated distiller: one global norm over both
                from torch.distributed.tensor import DTensor

                sharded = [p for p in params if isinstance(p, DTensor)]  # the same parameters as below
                grad_norm = clip_grad_norm([sharded, [p for p in params if not isinstance(p, DTensor)]], max_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            grads_finite = math.isfinite(grad_norm) and (
                not t_live or bool(torch.isfinite(self.distiller.temperature.theta.grad).all()))
            # A finite loss with non-finite gradients under fp16 is an ordinary loss-scale overflow while the
            # scale is still large: the scaler skips the step and lowers the scale; no rollback for it. Once
            # the scale is below monitor.scaler_min the gradients are non-finite on their own.
            overflow = not grads_finite and self.scaler.is_enabled() and \
                self.scaler.get_scale() >= c.monitor.scaler_min
            finite = grads_finite
        if finite or overflow:
            self.scaler.step(self.opt)  # skips the update itself when it found inf/NaN gradients
            if t_live:
                self.scaler.step(self.t_opt)
        if unscaled:
            self.scaler.update()  # only after unscale_: it needs the inf checks that unscale_ records
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
            if unscaled:  # the loss was finite: blame this step's batch for the gradients
                key = self.loader.last_key
                self.failed_batches = self.failed_batches[-999:] + [
                    {"step": self.step, "batch": list(key), "windows": self.loader.windows_of(key)}]
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
            "scaler": self.scaler.state_dict(), "rng": _rng_state(),
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

    def _resume(self) -> None:
        """Load the newest readable checkpoint after checking that it belongs to this config and store."""
        path, d = self._newest_readable()
        self._check_identity(d, path)
        self._load(path, payload=d)

    def _check_identity(self, d: dict, path: Path) -> None:
        saved = d.get("identity")
        if saved is None:
            raise GooseError(f"checkpoint {path} predates run identity checks; it cannot be resumed safely")
        # a config key added after the checkpoint was written (at any depth, as loss.kd_options) counts as
        # its default: old runs still resume
        defaults = {k: v for k, v in TrainConfig().to_dict().items() if k not in RESUMABLE_KEYS}
        saved = {**saved, "config": _with_defaults(saved.get("config", {}), defaults)}
        if "student" not in saved:  # checkpoints before the student was part of the identity: its config.yaml
            recorded = self.recorded_student
            saved["student"] = recorded if recorded is not None else self.identity["student"]
        else:  # fields added to the student config since count as their defaults (from_dict's rules)
            saved["student"] = _normalised_student(saved["student"])
        changed = _differences(saved, self.identity)
        if changed:
            shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
            raise GooseError(f"--resume with a config or store that differs from the checkpoint in {shown}; "
                             f"only {', '.join(sorted(RESUMABLE_KEYS))} may change (use a new --out otherwise)")

    def _recorded_student(self) -> dict | None:
        """The resolved student config this run's config.yaml recorded when it started (None if absent)."""
        try:
            d = yaml.safe_load((self.run / "config.yaml").read_text())
            student = d["_resolved"]["student"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
        return _normalised_student(student) if isinstance(student, dict) else None

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
        _set_rng_state(d["rng"])
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
        tmp = self.run / ".best-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(val, indent=2, default=float))
            (tmp / "goose.json").write_text(json.dumps(self.provenance(), indent=2))
            self.reader.save_tokenizer(tmp)  # the student folder is self-contained: eval/generate need nothing else
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GooseError(f"cannot write {self.run / 'best'} ({exc.strerror or exc}; is the disk full?); the "
                             f"previous best model and the checkpoints are kept") from None
        best = self.run / "best"
        old = self.run / ".best-old"
        if best.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)

    # ---- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):  # noqa: ARG002
        self.stop_signal = signum

    def fit(self) -> dict:
        c = self.cfg
        metrics_path = self.run / "metrics.jsonl"
        if self.dist.is_main:
            _truncate_jsonl(metrics_path, self.step)
            _truncate_jsonl(self.run / "events.jsonl", self.step)
        self.loggers = Loggers([])
        if self.dist.is_main:  # rank 0 logs for the run: metrics.jsonl, TensorBoard and any tracker (`loggers`)
            try:
                config = (yaml.safe_load((self.run / "config.yaml").read_text())
                          if (self.run / "config.yaml").is_file() else c.to_dict())
                self.loggers = open_loggers(c.loggers, self.run, config, step=self.step, tensorboard=c.tensorboard,
                                            warn=self._warn)
                self.loggers.log_config(config)
            except BaseException:
                self.loggers.close()
                self.lock.release()  # a tracker that cannot start (not installed, no server) stops the run cleanly
                raise
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        profiler = None
        if c.profile_steps > 0:
            from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            profiler = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=c.profile_steps, repeat=1),
                               on_trace_ready=tensorboard_trace_handler(str(self.run / "profile")))
            profiler.start()
        bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", disable=not self.progress or not self.dist.is_main,
                   dynamic_ncols=True)
        t_last, tok_last, start_time = time.perf_counter(), 0, time.perf_counter()
        self._start_time = start_time
        tokens_per_step = c.batch_size * c.optim.accumulation * self.reader.seq_len
        last_val = None
        interrupted = False
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
                tok_last += tokens_per_step
                self.monitor.on_step(self.step, m)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    now = time.perf_counter()
                    m["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
                    m["tokens"] = self.step * tokens_per_step
                    m["elapsed_s"] = self.elapsed_before + now - start_time
                    t_last, tok_last = now, 0
                    self._log(m)
                    bar.set_postfix(progress_postfix(m), refresh=False)
                if self.step % c.val_every == 0 or self.step == c.steps:
                    last_val = self._validate_and_log()
                    if self.curriculum is not None and self.curriculum.maybe_advance(self.step, c.steps, last_val["val_loss"]):
                        self._stage_changed()
                elif self.curriculum is not None and self.curriculum.maybe_advance(self.step, c.steps):
                    self._stage_changed()
                if self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self.checkpoint()
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


def progress_postfix(m: dict) -> dict:
    """The progress bar's fields for a train row: the loss, and T only while a KD loss uses it (a CE-only
    run, or a stage with KD weight 0, has no temperature to show)."""
    out = {"loss": f"{m.get('loss', float('nan')):.3f}"}
    if m.get("temperature") is not None and (m.get("kd_weight") or 0) > 0:
        out["T"] = f"{m['temperature']:.2f}"
    return out


def run_files(run: Path) -> dict[str, str]:
    """The run's outputs that exist now, by role: best (best/, written at the first validation), metrics,
    events (written only when something happened), tensorboard, trackers, checkpoints. A final summary
    names only these, so it never points at a file an early interrupt or a quiet run did not write."""
    roles = {"best": "best", "metrics": "metrics.jsonl", "events": "events.jsonl", "tensorboard": "tb",
             "trackers": "trackers", "checkpoints": "checkpoints"}
    out = {}
    for role, name in roles.items():
        path = run / name
        if (path / "config.json").is_file() if role == "best" else path.exists():
            out[role] = str(path)
    return out


def summary_files_line(files: dict[str, str]) -> str:
    """'  best model: RUN/best   metrics: RUN/metrics.jsonl ...' over the files that exist (run_files; the
    `outputs` of run_train's result), for the end-of-run summary."""
    labels = (("best", "best model"), ("metrics", "metrics"), ("events", "events"), ("tensorboard", "TensorBoard"))
    parts = [f"{label}: {files[role]}" for role, label in labels if role in files]
    if "best" not in files:
        parts.insert(0, "no best model yet (no validation ran)")
    return "  " + "   ".join(parts)


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, echo=print) -> dict:
    try:
        trainer = Trainer(cfg, resume=resume, progress=progress, echo=echo)
        return trainer.fit()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

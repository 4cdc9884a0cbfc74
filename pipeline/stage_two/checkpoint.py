"""Checkpoints of a run: written atomically, listed, loaded without running code, and checked against the run
that resumes them (its identity: the config minus what may change on resume, the store by content, the
resolved student)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from ...cache.reader import CacheReader
from ...errors import GooseError
from ...student.model import StudentConfig
from .config import TrainConfig


CKPT_FILE = "state.pt"


# Config keys a resumed run may change: they steer how long it runs, what it logs and where, never what
# it computes. Anything else differing from the checkpoint's config is refused on --resume.
RESUMABLE_KEYS = {"out", "steps", "log_every", "val_every", "ckpt_every", "keep_checkpoints", "tensorboard", "loggers",
                  "profile_steps", "device", "num_workers", "cache", "val_cache", "nan_patience", "max_rollbacks",
                  "rollback_lr_factor", "monitor", "storage_options"}


def rng_state() -> dict:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
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


def run_identity(cfg: TrainConfig, reader: CacheReader) -> dict:
    """What a checkpoint must agree with to be resumed: the config minus RESUMABLE_KEYS, and the store by
    content (its fingerprint), not by path, so a moved store still resumes."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_KEYS}
    p = reader.provenance
    return {"config": config, "store": {"data_fingerprint": p.get("data_fingerprint"),
                                        "config_hash": p.get("config_hash")}}


def normalised_student(student: dict) -> dict:
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


def recorded_student(run: Path) -> dict | None:
    """The resolved student config a run's config.yaml recorded when it started (None if absent)."""
    try:
        d = yaml.safe_load((run / "config.yaml").read_text())
        student = d["_resolved"]["student"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return normalised_student(student) if isinstance(student, dict) else None


def check_identity(saved: dict | None, identity: dict, path: Path, recorded: dict | None) -> None:
    """Refuse to resume checkpoint `path` (its recorded identity `saved`) into a run whose identity differs
    in anything but RESUMABLE_KEYS. `recorded`: the student the run folder's config.yaml recorded, for
    checkpoints from before the student was part of the identity."""
    if saved is None:
        raise GooseError(f"checkpoint {path} predates run identity checks; it cannot be resumed safely")
    # a config key added after the checkpoint was written (at any depth, as loss.kd_options) counts as
    # its default: old runs still resume
    defaults = {k: v for k, v in TrainConfig().to_dict().items() if k not in RESUMABLE_KEYS}
    saved = {**saved, "config": _with_defaults(saved.get("config", {}), defaults)}
    if "student" not in saved:  # checkpoints before the student was part of the identity: its config.yaml
        saved["student"] = recorded if recorded is not None else identity["student"]
    else:  # fields added to the student config since count as their defaults (from_dict's rules)
        saved["student"] = normalised_student(saved["student"])
    changed = _differences(saved, identity)
    if changed:
        shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
        raise GooseError(f"--resume with a config or store that differs from the checkpoint in {shown}; "
                         f"only {', '.join(sorted(RESUMABLE_KEYS))} may change (use a new --out otherwise)")

"""A run config against its store, before any training: the mismatches that fail, and the windows the run
trains and validates on."""

from __future__ import annotations

import numpy as np

from ...cache.reader import CacheReader
from ...errors import GooseError
from .config import TrainConfig
from .losses import build_kd_loss


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
    held_out = held_out_windows(spec.n_windows, cfg.val_fraction)
    if len(held_out) >= spec.n_windows:
        raise GooseError(f"store has {spec.n_windows} windows: too few to hold out {len(held_out)} for validation")
    return np.arange(held_out[0]), reader.url, spec, held_out[: cfg.val_windows]


def held_out_windows(n_windows: int, fraction: float = TrainConfig.val_fraction) -> np.ndarray:
    """The windows a store holds out for validation when no --val-cache is given: its last `fraction`
    (at least one), never trained on. `eval --cache` scores the same ones."""
    n_val = max(1, int(round(fraction * n_windows)))
    return np.arange(n_windows - n_val, n_windows)

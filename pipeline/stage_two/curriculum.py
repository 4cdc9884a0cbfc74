"""POCL (arXiv 2506.05695): a progressive, difficulty-ordered curriculum over the cached windows.

Difficulty per window from two cached teacher signals (mean gold NLL and mean entropy), each ranked,
fused by reciprocal-rank fusion s = 1/(60 + r1) + 1/(60 + r2); easiest first. N cumulative buckets
("baby steps"): stage s trains on the easiest (s + 1) / N of the windows, never on an easy subset alone
(the original project's failure). Each stage has its own KD temperature and KD weight; a stage ends at a
fraction of the steps or on a validation plateau, and T and the weights move linearly to the new stage's
values over `transition_steps`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np

RRF_K = 60


@dataclass
class CurriculumConfig:
    enabled: bool = False
    buckets: int = 4
    temperatures: list = field(default_factory=lambda: [1.0, 1.33, 1.67, 2.0])
    kd_weights: list = field(default_factory=lambda: [0.7, 0.8, 0.9, 1.0])
    ce_weights: list | None = None  # default: 1 - kd weight
    stage_ends: list | None = None  # fractions of the steps; default: equal stages
    advance_on_plateau: bool = False  # also move on when validation has not improved for `patience` evals
    patience: int = 2
    transition_steps: int = 50

    def __post_init__(self):
        n = self.buckets
        if n < 1:
            raise ValueError("curriculum buckets must be >= 1")
        for name in ("temperatures", "kd_weights", "ce_weights", "stage_ends"):
            values = getattr(self, name)
            if values is not None and not all(_finite_number(v) for v in values):
                raise ValueError(f"curriculum {name} must be a list of finite numbers, got {values!r}")
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"curriculum temperatures must be > 0, got {self.temperatures!r}")
        for name in ("temperatures", "kd_weights"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"curriculum {name} needs {n} values (one per bucket)")
        if self.ce_weights is not None and len(self.ce_weights) != n:
            raise ValueError(f"curriculum ce_weights needs {n} values")
        if self.stage_ends is None:
            self.stage_ends = [(s + 1) / n for s in range(n)]
        if len(self.stage_ends) != n or sorted(self.stage_ends) != list(self.stage_ends):
            raise ValueError("curriculum stage_ends must be n increasing fractions")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ascending, ties broken by index (stable)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.int64)
    r[order] = np.arange(1, len(x) + 1)
    return r


def difficulty_order(mean_nll: np.ndarray, mean_entropy: np.ndarray) -> np.ndarray:
    """Window indices, easiest first, by reciprocal-rank fusion of the two signals (low = easy)."""
    score = 1.0 / (RRF_K + rank(mean_nll)) + 1.0 / (RRF_K + rank(mean_entropy))
    return np.argsort(-score, kind="stable")


def stage_pools(order: np.ndarray, buckets: int) -> list[np.ndarray]:
    """Cumulative pools: pool s = the easiest ceil((s + 1) / N * n) windows (sorted by index)."""
    n = len(order)
    return [np.sort(order[: max(1, int(np.ceil((s + 1) * n / buckets)))]) for s in range(buckets)]


class Curriculum:
    """Stage bookkeeping; its state is a small dict saved in checkpoints."""

    def __init__(self, cfg: CurriculumConfig, order: np.ndarray):
        self.cfg = cfg
        self.pools = stage_pools(order, cfg.buckets)
        self.stage = 0
        self.changed_at = 0  # step of the last stage change
        self.best_val = float("inf")
        self.bad_evals = 0

    def pool(self) -> np.ndarray:
        return self.pools[self.stage]

    def _targets(self, stage: int) -> tuple[float, float, float]:
        c = self.cfg
        kd = float(c.kd_weights[stage])
        ce = float(c.ce_weights[stage]) if c.ce_weights is not None else 1.0 - kd
        return float(c.temperatures[stage]), kd, ce

    def values(self, step: int) -> dict:
        """Temperature, KD and CE weight at `step`, blended from the previous stage during a transition."""
        t, kd, ce = self._targets(self.stage)
        if self.stage > 0 and self.cfg.transition_steps > 0:
            x = min((step - self.changed_at) / self.cfg.transition_steps, 1.0)
            t0, kd0, ce0 = self._targets(self.stage - 1)
            t, kd, ce = t0 + x * (t - t0), kd0 + x * (kd - kd0), ce0 + x * (ce - ce0)
        return {"temperature": t, "kd_weight": kd, "ce_weight": ce, "stage": self.stage}

    def maybe_advance(self, step: int, total_steps: int, val_loss: float | None = None) -> bool:
        """Advance at the stage's step fraction, or on a validation plateau if enabled. True if advanced."""
        if self.stage >= self.cfg.buckets - 1:
            return False
        due = step >= self.cfg.stage_ends[self.stage] * total_steps
        if val_loss is not None and self.cfg.advance_on_plateau:
            if val_loss < self.best_val - 1e-4:
                self.best_val, self.bad_evals = val_loss, 0
            else:
                self.bad_evals += 1
            due = due or self.bad_evals >= self.cfg.patience
        if due:
            self.stage += 1
            self.changed_at = step
            self.best_val, self.bad_evals = float("inf"), 0
        return due

    def state_dict(self) -> dict:
        return {"stage": self.stage, "changed_at": self.changed_at, "best_val": self.best_val,
                "bad_evals": self.bad_evals}

    def load_state_dict(self, d: dict) -> None:
        self.stage, self.changed_at = int(d["stage"]), int(d["changed_at"])
        self.best_val, self.bad_evals = float(d["best_val"]), int(d["bad_evals"])


def curriculum_from_store(cfg: CurriculumConfig, reader, train_windows: np.ndarray) -> Curriculum:
    """POCL over a store's training windows, easiest first by the teacher's per-window mean NLL and entropy
    (read chunk by chunk, never the whole per-token arrays at once)."""
    n = reader.spec.n_windows
    nll, ent = np.empty(n), np.empty(n)
    for start, part in reader.iter_chunks(["gold_nll", "entropy"]):
        stop = start + len(part["gold_nll"])
        nll[start:stop] = np.nanmean(part["gold_nll"], axis=1)
        ent[start:stop] = part["entropy"].astype(np.float32).mean(axis=1)
    order = difficulty_order(nll[train_windows], ent[train_windows])
    return Curriculum(cfg, train_windows[order])

"""KD temperature: fixed, scheduled (linear / cosine / step), stage-driven (POCL), or learned (CTKD).

CTKD (Li et al., arXiv 2211.16231): T = T_min + (T_max - T_min) * sigmoid(theta), bounded by
construction. Between theta and the loss sits a gradient-reversal layer: identity forward, gradient
times -lambda backward, so the temperature *raises* the KD loss (makes the task harder) while the
student lowers it. lambda follows a cosine curriculum 0 -> lambda_max over the first part of training.
Without reversal, descent drives T to whichever bound makes KL smallest (the original project's runaway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by -lam backward."""
    return _GradReverse.apply(x, lam)


@dataclass
class TemperatureConfig:
    mode: str = "fixed"  # fixed | linear | cosine | step | stage | ctkd
    value: float = 1.0  # fixed T; CTKD's initial T (the proxy sweep: T = 1 beat T = 2, evaluation is at T = 1)
    start: float = 2.0  # linear/cosine: T at step 0 ...
    end: float = 1.0  # ... and at the last step
    steps: list = field(default_factory=lambda: [[0.0, 2.0]])  # step: [[fraction, T], ...]
    t_min: float = 1.0  # CTKD bounds
    t_max: float = 4.0
    lambda_max: float = 1.0  # CTKD gradient-reversal strength after the warm-up
    lambda_warmup: float = 0.1  # fraction of training over which lambda rises (cosine) from 0
    lr: float = 1e-2  # CTKD's own learning rate (SGD, follows the run's LR schedule)
    momentum: float = 0.9  # CTKD's SGD momentum (the reference's)
    anchor_weight: float = 0.0  # optional L2 anchor lambda_reg * (T - anchor)^2
    anchor: float | None = None  # defaults to `value` (or the POCL stage temperature)

    def __post_init__(self):
        modes = ("fixed", "linear", "cosine", "step", "stage", "ctkd")
        if self.mode not in modes:
            raise ValueError(f"temperature mode must be one of {modes}, got {self.mode!r}")
        pairs_ok = isinstance(self.steps, list) and len(self.steps) > 0 and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
            for pair in self.steps)
        if not pairs_ok:
            raise ValueError(f"temperature.steps must be a list of [fraction, T] pairs of numbers, got {self.steps!r}")
        for name in ("value", "start", "end", "t_min", "t_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"temperature.{name} must be > 0, got {getattr(self, name)!r}")
        if any(t <= 0 for _, t in self.steps):
            raise ValueError(f"temperature.steps temperatures must be > 0, got {self.steps!r}")
        if self.mode == "ctkd" and not self.t_min < self.value < self.t_max:
            raise ValueError(f"CTKD initial T (temperature.value) {self.value} must lie strictly inside "
                             f"({self.t_min}, {self.t_max}): set temperature.value, e.g. 1.25")

    def range(self) -> tuple[float, float]:
        """The lowest and highest T this config can produce (checked against the store's temperatures)."""
        if self.mode == "ctkd":
            return self.t_min, self.t_max
        if self.mode in ("linear", "cosine"):
            return min(self.start, self.end), max(self.start, self.end)
        if self.mode == "step":
            ts = [float(t) for _, t in self.steps]
            return min(ts), max(ts)
        return self.value, self.value


class Temperature(nn.Module):
    """Gives the KD temperature for a step (a tensor; with CTKD it carries the reversed gradient)."""

    def __init__(self, cfg: TemperatureConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.mode == "ctkd":
            frac = (cfg.value - cfg.t_min) / (cfg.t_max - cfg.t_min)
            self.theta = nn.Parameter(torch.tensor(math.log(frac / (1 - frac))))

    @property
    def learnable(self) -> bool:
        return self.cfg.mode == "ctkd"

    def grl_lambda(self, progress: float) -> float:
        """Cosine ramp 0 -> lambda_max over the first `lambda_warmup` of training, then constant."""
        warm = max(self.cfg.lambda_warmup, 1e-9)
        x = min(progress / warm, 1.0)
        return self.cfg.lambda_max * 0.5 * (1 - math.cos(math.pi * x))

    def raw(self) -> torch.Tensor:
        """The learnable T without gradient reversal (for logging and the anchor)."""
        return self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.sigmoid(self.theta)

    def forward(self, progress: float, stage_t: float | None = None) -> torch.Tensor:
        """T at `progress` in [0, 1] of training. `stage_t` is the POCL stage temperature, if any."""
        c = self.cfg
        if c.mode == "ctkd":
            return grad_reverse(self.raw(), self.grl_lambda(progress))
        if c.mode == "stage":
            if stage_t is None:
                raise ValueError("temperature mode 'stage' needs the POCL curriculum")
            t = stage_t
        elif c.mode == "linear":
            t = c.start + (c.end - c.start) * progress
        elif c.mode == "cosine":
            t = c.end + 0.5 * (c.start - c.end) * (1 + math.cos(math.pi * progress))
        elif c.mode == "step":
            t = c.steps[0][1]
            for frac, value in c.steps:
                if progress >= frac:
                    t = value
        else:
            t = c.value
        return torch.tensor(float(t))

    def anchor_loss(self, stage_t: float | None = None) -> torch.Tensor | None:
        if not self.learnable or self.cfg.anchor_weight <= 0:
            return None
        target = self.cfg.anchor if self.cfg.anchor is not None else (stage_t or self.cfg.value)
        return self.cfg.anchor_weight * (self.raw() - target) ** 2

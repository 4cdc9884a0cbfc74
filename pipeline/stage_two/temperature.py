"""KD temperature: fixed, scheduled (linear / cosine / step), stage-driven (POCL), or learned (CTKD).

CTKD (Li et al., arXiv 2211.16231): T = T_min + (T_max - T_min) * sigmoid(theta), bounded by
construction. Between theta and the loss sits a gradient-reversal layer: identity forward, gradient
times -lambda backward, so the temperature *raises* the KD loss (makes the task harder) while the
student lowers it. lambda follows a cosine curriculum 0 -> lambda_max over the first part of training.
Without reversal, descent drives T to whichever bound makes KL smallest (the original project's runaway).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TemperatureConfig  # noqa: F401 - its home was here


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

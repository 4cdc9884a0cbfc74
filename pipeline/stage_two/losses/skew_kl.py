"""Skew KL KD (DistiLLM, Ko et al. 2024) over the top-k + tail buckets, at the run's temperature.

Skew forward KL: KL(p || alpha p + (1 - alpha) q); with `reverse: true` the skew reverse KL,
KL(q || alpha q + (1 - alpha) p). Mixing a share alpha of the first distribution into the second bounds the
log-ratio by -log alpha, so a student putting almost no mass where the teacher has some gives a bounded, not
an exploding, gradient (DistiLLM's default alpha 0.1). alpha 0 is plain KL. Over the buckets it is the skew KL
of the coarsened distributions (a lower bound of the full-vocabulary one, equal at k = V).
"""

from __future__ import annotations

import math

import torch

from ....errors import GooseError
from .buckets import kl_terms
from .registry import BucketKDLoss, register


def skew_kl(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token KL(a || alpha a + (1 - alpha) b) over the last axis, from log-probabilities."""
    if alpha == 0.0:
        return kl_terms(log_a, log_b)
    log_mix = torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))
    return kl_terms(log_a, log_mix)


@register
class SkewKLKD(BucketKDLoss):
    name = "skew_kl"
    options = {"alpha": 0.1, "reverse": False}
    metric = "skew_kl"

    def check_options(self):
        if not 0.0 <= float(self.opts["alpha"]) < 1.0:
            raise GooseError(f"loss.kd_options.alpha must be in [0, 1), got {self.opts['alpha']}")
        if not isinstance(self.opts["reverse"], bool):
            raise GooseError(f"loss.kd_options.reverse must be true or false, got {self.opts['reverse']!r}")

    def divergence(self, log_p, log_q):
        a, b = (log_q, log_p) if self.opts["reverse"] else (log_p, log_q)
        return skew_kl(a, b, float(self.opts["alpha"]))

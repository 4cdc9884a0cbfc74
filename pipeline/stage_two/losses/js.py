"""Jensen-Shannon KD over the top-k + tail buckets, at the run's temperature.

JS_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (beta 0.5: the symmetric
JS; DistillKit's and torchtune's `jsd`). Bounded by log 2 at beta 0.5, and between forward KL's mass-covering
and reverse KL's mode-seeking. Over the buckets it is the JS of the coarsened distributions, a lower bound of
the full-vocabulary JS (every f-divergence shrinks under merging outcomes), and equal to it at k = V.
"""

from __future__ import annotations

import math

import torch

from ....errors import GooseError
from .buckets import kl_terms
from .registry import BucketKDLoss, register


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token JS_beta over the last axis, from log-probabilities; the mixture in log space (logaddexp),
    so a bucket near zero on one side never underflows the mixture."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl_terms(log_p, log_m) + (1 - beta) * kl_terms(log_q, log_m)


@register
class JensenShannonKD(BucketKDLoss):
    name = "js"
    options = {"beta": 0.5}
    metric = "js"

    def check_options(self):
        if not 0.0 < float(self.opts["beta"]) < 1.0:
            raise GooseError(f"loss.kd_options.beta must be in (0, 1), got {self.opts['beta']}")

    def divergence(self, log_p, log_q):
        return js_divergence(log_p, log_q, float(self.opts["beta"]))

"""RS-KD: cross-entropy to the empirical distribution of the teacher's stored draws (T = 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buckets import masked_mean
from .registry import KDLoss, register


def rskd_loss(student_logits, sample_ids, sample_counts, mask=None) -> torch.Tensor:
    """RS-KD: cross-entropy to the empirical distribution of the stored teacher samples (T = 1).

    t_i = c_i / N over the sampled ids; its expected gradient equals full KD at the capture temperature.
    Reported as KL(t || q) = sum t (log t - log q), so it is 0 at a perfect match.
    """
    counts = sample_counts.float()
    t = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, sample_ids.long())
    log_t = torch.where(t > 0, t.clamp_min(1e-30).log(), torch.zeros_like(t))
    kl = (t * (log_t - log_q)).sum(-1)
    return masked_mean(kl, mask)


@register
class RSKD(KDLoss):
    """KL(t || q) to the draws' empirical distribution t: an unbiased estimate of full-vocabulary KD."""

    name = "rskd"
    fields = ("sample_ids", "sample_counts")
    temperature = False

    def __call__(self, student_logits, batch, temps, T, mask):
        return rskd_loss(student_logits, batch["sample_ids"], batch["sample_counts"], mask=mask)

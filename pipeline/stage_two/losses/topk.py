"""Top-k KD: KL over the teacher's top-k tokens plus one exact tail bucket, at the run's temperature."""

from __future__ import annotations

import torch

from .buckets import bucket_kd, kl_terms
from .registry import BucketKDLoss, register


def _forward_kl(log_p, log_q):
    return kl_terms(log_p, log_q)


def _reverse_kl(log_p, log_q):
    return kl_terms(log_q, log_p)


def kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temps, T, *, reverse: bool = False,
            mask=None) -> torch.Tensor:
    """T^2 * KL over k+1 buckets, mean over tokens. Forward KL(p||q) by default; reverse KL(q||p)."""
    batch = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "tail_logmass": tail_logmass}
    return bucket_kd(student_logits, batch, temps, T, _reverse_kl if reverse else _forward_kl, lambda t: t * t, mask)


@register
class TopKKD(BucketKDLoss):
    """KL(p || q) over the k + 1 buckets (KL(q || p) with loss.reverse_kl), times T^2."""

    name = "topk"
    takes_reverse_kl = True

    def divergence(self, log_p, log_q):
        return _reverse_kl(log_p, log_q) if self.reverse else _forward_kl(log_p, log_q)

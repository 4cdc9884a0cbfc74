"""Top-k KD: KL over the teacher's top-k tokens plus one exact tail bucket, at the run's temperature."""

from __future__ import annotations

import torch

from .buckets import bucket_logprobs, kl_terms, masked_mean
from .registry import KDLoss, register


def kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temps, T, *, reverse: bool = False,
            mask=None) -> torch.Tensor:
    """T^2 * KL over k+1 buckets, mean over tokens. Forward KL(p||q) by default; reverse KL(q||p)."""
    batch = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "tail_logmass": tail_logmass}
    log_p, log_q = bucket_logprobs(student_logits, batch, temps, T)
    kl = kl_terms(log_q, log_p) if reverse else kl_terms(log_p, log_q)
    T = torch.as_tensor(T, dtype=torch.float32, device=kl.device)
    return T * T * masked_mean(kl, mask)


@register
class TopKKD(KDLoss):
    """KL(p || q) over the k + 1 buckets (KL(q || p) with loss.reverse_kl), times T^2."""

    name = "topk"
    fields = ("topk_ids", "topk_logprobs", "tail_logmass")
    takes_reverse_kl = True

    def __call__(self, student_logits, batch, temps, T, mask):
        return kd_loss(student_logits, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"], temps, T,
                       reverse=self.reverse, mask=mask)

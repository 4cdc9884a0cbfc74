"""Top-k KD with the tail resolved by the stored RS-KD draws (T = 1)."""

from __future__ import annotations

import torch

from ....numerics import log1mexp
from .buckets import fp32_at_least, masked_mean, student_bucket_logprobs, teacher_bucket_logprobs
from .registry import KDLoss, register
from .topk import kd_loss


def topk_rskd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temps, sample_ids, sample_counts,
                   mask=None) -> torch.Tensor:
    """Top-k KD with the tail resolved by the stored samples (T = 1): exact where the store is exact, sampled
    where it only knows the tail's total.

    KL(p || q) splits exactly into the k + 1 bucket KL plus P_tail * KL(p(.|tail) || q(.|tail)) (the chain rule
    of KL). The first term is `kd_loss` at T = 1. In the second, p(.|tail) is replaced by the empirical
    distribution t of the RS-KD draws that fell outside the top-k, so its gradient is an unbiased estimate of
    the full-vocabulary KD gradient's tail part; the top-k + tail-bucket loss alone gives the student no
    direction inside a tail that holds a third of enwiki-tiny's mass. Tokens with no draw in the tail keep the
    bucket term only, and the tail term of the others is divided by the probability of at least one tail draw,
    1 - (1 - P_tail)^N, so the estimate stays unbiased. q(j|tail) = z_j - logsumexp over the non-top-k logits,
    taken from the bucket log-probabilities (log q_j - log Q_tail = z_j - z_top1 + log q_top1 - log Q_tail), so
    no second full-vocabulary pass runs.
    """
    if topk_ids.shape[-1] >= student_logits.shape[-1]:  # k = V: no tail to resolve
        return kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temps, 1.0, mask=mask)
    log_p = teacher_bucket_logprobs(topk_logprobs, tail_logmass, temps, 1.0)
    log_q = student_bucket_logprobs(student_logits, topk_ids, 1.0)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # the k + 1 bucket KL, as kd_loss at T = 1
    ids, topk = sample_ids.long(), topk_ids.long()
    # draws inside the top-k are already exact in the bucket term: count only the tail's (ids sorted per token)
    topk_sorted = topk.sort(-1).values
    at = torch.searchsorted(topk_sorted, ids).clamp_max(topk.shape[-1] - 1)
    in_head = topk_sorted.gather(-1, at) == ids
    counts = torch.where(in_head, 0.0, sample_counts.float())
    t = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # empirical p(.|tail); all 0 without tail draws
    z = fp32_at_least(student_logits)
    log_q_cond = z.gather(-1, ids) - z.gather(-1, topk[..., :1]) + log_q[..., :1] - log_q[..., -1:]
    log_t = torch.where(t > 0, t.clamp_min(1e-30).log(), torch.zeros_like(t))
    kl_tail = (t * (log_t - log_q_cond)).sum(-1)
    # a token whose N draws all fell in the head (probability (1 - P_tail)^N) has no tail term; dividing the
    # others' by the chance of a tail draw keeps the estimate unbiased (with a tiny tail: weight ~ 1/N per draw)
    log_tail = log_p[..., -1]
    n = sample_counts.float().sum(-1)
    hit = -torch.expm1(n * log1mexp(log_tail.clamp(max=-1e-30)))
    return masked_mean(kl + log_tail.exp() / hit.clamp_min(1e-30) * kl_tail, mask)


@register
class TopKRSKD(KDLoss):
    """The k + 1 bucket KL plus the tail's share of KL, estimated from the draws that fell in the tail."""

    name = "topk_rskd"
    fields = ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_counts")
    temperature = False

    def __call__(self, student_logits, batch, temps, T, mask):
        return topk_rskd_loss(student_logits, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"],
                              temps, batch["sample_ids"], batch["sample_counts"], mask=mask)

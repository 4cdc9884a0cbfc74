"""The math every KD loss shares: teacher and student log-probabilities over the top-k + tail buckets, and
the masked mean over tokens.

All reductions run in fp32 whatever the autocast dtype. Token masks are (B, T), bool or 0/1 integers: 1 where the token counts (a store's loss_mask).

KD over k + 1 buckets: the teacher's top-k tokens plus one tail bucket holding all other mass, for both
teacher and student (the "ghost bucket"; renormalising over the top-k alone makes the student
over-confident). The teacher tail is the stored tail log-mass (summed apart from the head at cache time);
the student tail is an fp32 masked logsumexp over the non-top-k logits, never log(1 - sum q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ....numerics import log1mexp


def _lagrange_weights(beta: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Weights of the Lagrange polynomial through every node `betas`, evaluated at `beta`."""
    weights = []
    for j in range(len(betas)):
        w = torch.ones((), dtype=torch.float32, device=betas.device)
        for m in range(len(betas)):
            if m != j:
                w = w * (beta - betas[m]) / (betas[j] - betas[m])
        weights.append(w)
    return torch.stack(weights)


def teacher_bucket_logprobs(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temps: tuple[float, ...],
                            T: torch.Tensor | float) -> torch.Tensor:
    """Teacher log-probabilities over (top-k, tail) at temperature T: (..., k + 1), fp32.

    The store keeps log p_i at T=1 for the top-k and the exact tail log-mass at each stored T_j. The head's
    inner distribution at any T is exact (softmax of log p_i / T); the tail/head split is exact at every
    stored T_j (the head mass is 1 - tail mass, as log1mexp of an fp32 log-mass, accurate at both ends).
    Between stored temperatures the tail's log-partition log sum_{tail} p_i^(1/T) is interpolated with the
    Lagrange polynomial in 1/T through every stored temperature (it is smooth and convex in 1/T). Measured
    on enwiki-tiny over held-out text at k = 64 with T in {1, 1.25, 1.5, 2, 3, 4}: median error 4e-5 nats,
    99th percentile 4.5e-4, worst token 1.3e-3 (near T = 1.05); callers keep T inside the stored range.
    """
    lp = topk_logprobs.float()
    tail_at = tail_logmass.float().clamp(-1e4, 0.0)  # -inf (k = V: no tail) would poison the arithmetic
    T = torch.as_tensor(T, dtype=torch.float32, device=lp.device)
    betas = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=lp.device)
    beta = 1.0 / T
    # tail log-partition at each stored T_j, in units of T=1 log-probabilities: log(tail/head) + log head
    head_at = torch.logsumexp(lp.unsqueeze(-1) * betas, dim=-2)  # (..., n_temps)
    tail_partition_at = tail_at - log1mexp(tail_at.clamp(max=-1e-30)) + head_at
    tail_partition = (tail_partition_at * _lagrange_weights(beta, betas)).sum(-1)
    head = lp * beta
    head_lse = torch.logsumexp(head, dim=-1)
    log_odds = tail_partition - head_lse  # log(tail mass / head mass) at T
    log_tail = -F.softplus(-log_odds)
    log_head_mass = -F.softplus(log_odds)
    return torch.cat([head - (head_lse - log_head_mass).unsqueeze(-1), log_tail.unsqueeze(-1)], dim=-1)


def fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def student_bucket_logprobs_reference(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                                      T: torch.Tensor | float) -> torch.Tensor:
    """Student log-probabilities over the teacher's top-k ids plus the tail, at T: (..., k + 1), fp32.
    The plain autograd version: the reference the fused `student_bucket_logprobs` is tested against."""
    z = fp32_at_least(student_logits)
    z = (z - z.amax(-1, keepdim=True).detach()) / T  # shift first: fp32 keeps 1e-5 absolute at GPT-2's -100
    total = torch.logsumexp(z, dim=-1, keepdim=True)
    ids = topk_ids.long()
    head = z.gather(-1, ids)
    tail_logits = z.scatter(-1, ids, float("-inf"))  # mask the top-k out, in fp32
    tail = torch.logsumexp(tail_logits, dim=-1, keepdim=True)
    return torch.cat([head, tail], dim=-1) - total


class _StudentBuckets(torch.autograd.Function):
    """The same function in a few full-vocabulary passes (one exp, one masked sum; one fused pass back)
    instead of autograd's dozen: the KD loss was 3x the cost of CE per step on CPU at V = 8192, and it keeps
    one (..., V) fp32 tensor for backward where autograd keeps ~5 (1.1 MB/token at V = 50257: 18 GB of a
    16 x 1,024 batch; docs/BENCHMARKS.md).

    Forward, with u = (z - max) / T: e = exp(u); S = sum e; zero e at the top-k ids in place -> S_tail = sum e
    (the tail summed on its own, never S - head). Backward, for upstream g over the k + 1 buckets and G = sum
    g: dL/du_j = g_tail e_j / S_tail - G e_j / S on tail ids, g_i - G p_i on top-k id i; dL/dz = dL/du / T.
    A temperature that learns (CTKD) gets du_j/dT = -u_j / T, so dL/dT = -(1/T) sum_j dL/du_j u_j
        = -(1/T) [ sum_i g_i u_i + g_tail U_tail / S_tail - G (U_tail + sum_i e^{u_i} u_i) / S ],
    with U_tail = sum over the tail of e_j u_j (= xlogy(e, e), one more pass, taken only then).
    """

    @staticmethod
    def forward(ctx, logits, ids, T):
        z = fp32_at_least(logits)
        m = z.amax(-1, keepdim=True)
        learn_t = isinstance(T, torch.Tensor)
        inv_t = 1.0 / (T.to(z.dtype) if learn_t else T)
        e = torch.sub(z, m).mul_(inv_t).exp_()
        S = e.sum(-1, keepdim=True)
        head = (z.gather(-1, ids) - m) * inv_t
        e.scatter_(-1, ids, 0.0)
        S_tail = e.sum(-1, keepdim=True)
        U_tail = torch.special.xlogy(e, e).sum(-1, keepdim=True) if learn_t else None
        log_S = S.log()
        out = torch.cat([head - log_S, S_tail.log() - log_S], dim=-1)
        ctx.save_for_backward(e, ids, S, S_tail, head, U_tail, inv_t if learn_t else None)
        ctx.inv_t, ctx.dtype, ctx.learn_t = inv_t, logits.dtype, learn_t
        ctx.t_dtype = T.dtype if learn_t else None
        return out

    @staticmethod
    def backward(ctx, grad):
        e, ids, S, S_tail, head, U_tail, inv_t_tensor = ctx.saved_tensors
        inv_t = inv_t_tensor if ctx.learn_t else ctx.inv_t
        g_head, g_tail = grad[..., :-1], grad[..., -1:]
        G = grad.sum(-1, keepdim=True)
        p_head = head.exp() / S
        d_t = None
        if ctx.learn_t:  # before e is overwritten below
            U_all = U_tail + (head.exp() * head).sum(-1, keepdim=True)
            du_u = (g_head * head).sum(-1, keepdim=True) + g_tail * U_tail / S_tail.clamp_min(1e-38) - G * U_all / S
            d_t = (-inv_t * du_u.sum()).reshape(()).to(ctx.t_dtype)
        # tail ids (e is zero at the top-k ids, so this pass leaves those at 0)
        dz = e.mul_(g_tail / S_tail.clamp_min(1e-38) - G / S)
        dz.scatter_add_(-1, ids, g_head - G * p_head)
        return (dz.mul_(inv_t)).to(ctx.dtype), None, d_t


def student_bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                            T: torch.Tensor | float) -> torch.Tensor:
    """Student log-probabilities over the teacher's top-k ids plus the tail, at T: (..., k + 1), fp32.
    The tail is a masked sum in fp32, never log(1 - sum q). A tensor T that requires grad (CTKD) gets its
    gradient from the same fused function."""
    learn_t = isinstance(T, torch.Tensor) and T.requires_grad
    out = _StudentBuckets.apply(student_logits, topk_ids.long(), T.reshape(()) if learn_t else float(T))
    if bool((out[..., -1] < -60).any()):
        # the tail sits > 60 nats below the top: summed relative to the top it nears fp32 underflow, so take
        # the reference, which shifts the masked tail by its own maximum (rare: a student that has diverged)
        return student_bucket_logprobs_reference(student_logits, topk_ids, T)
    return out


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over tokens; with a mask (1: the token counts), sum(loss * mask) / sum(mask), and 0 (with a
    zero gradient) for a batch with no token that counts."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def bucket_logprobs(student_logits, batch: dict, temps, T) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the k + 1 buckets at T, fp32; with k = V the tail bucket is
    empty on both sides and left out."""
    log_p = teacher_bucket_logprobs(batch["topk_logprobs"], batch["tail_logmass"], temps, T)
    log_q = student_bucket_logprobs(student_logits, batch["topk_ids"], T)
    if batch["topk_ids"].shape[-1] >= student_logits.shape[-1]:
        log_p, log_q = log_p[..., :-1], log_q[..., :-1]
    return log_p, log_q


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per token over the last axis, from log-probabilities (0 where a is 0)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def bucket_kd(student_logits, batch: dict, temps, T, divergence, scale, mask=None) -> torch.Tensor:
    """scale(T) x the mean over tokens (the masked ones, with a mask) of `divergence(log_p, log_q)` between
    the teacher's and the student's k + 1 bucket distributions at T: every bucket KD loss is this."""
    log_p, log_q = bucket_logprobs(student_logits, batch, temps, T)
    T = torch.as_tensor(T, dtype=torch.float32, device=log_p.device)
    return scale(T) * masked_mean(divergence(log_p, log_q), mask)

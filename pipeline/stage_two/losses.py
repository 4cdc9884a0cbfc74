"""Distillation losses, each a small function with a brute-force reference in the tests.

All reductions run in fp32 whatever the autocast dtype. Token masks are (B, T), bool or 0/1 integers: 1 where the token counts (a store's loss_mask).

KD over k + 1 buckets: the teacher's top-k tokens plus one tail bucket holding all other mass, for both
teacher and student (the "ghost bucket"; renormalising over the top-k alone makes the student
over-confident). The teacher tail is the stored tail log-mass (summed apart from the head at cache time);
the student tail is an fp32 masked logsumexp over the non-top-k logits, never log(1 - sum q).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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
    tail_partition_at = tail_at - _log1mexp(tail_at.clamp(max=-1e-30)) + head_at
    tail_partition = (tail_partition_at * _lagrange_weights(beta, betas)).sum(-1)
    head = lp * beta
    head_lse = torch.logsumexp(head, dim=-1)
    log_odds = tail_partition - head_lse  # log(tail mass / head mass) at T
    log_tail = -F.softplus(-log_odds)
    log_head_mass = -F.softplus(log_odds)
    return torch.cat([head - (head_lse - log_head_mass).unsqueeze(-1), log_tail.unsqueeze(-1)], dim=-1)


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def student_bucket_logprobs_reference(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                                      T: torch.Tensor | float) -> torch.Tensor:
    """Student log-probabilities over the teacher's top-k ids plus the tail, at T: (..., k + 1), fp32.
    The plain autograd version: the reference the fused `student_bucket_logprobs` is tested against."""
    z = _fp32_at_least(student_logits)
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
        z = _fp32_at_least(logits)
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


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over tokens; with a mask (1: the token counts), sum(loss * mask) / sum(mask), and 0 (with a
    zero gradient) for a batch with no token that counts."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def kd_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temps, T, *, reverse: bool = False,
            mask=None) -> torch.Tensor:
    """T^2 * KL over k+1 buckets, mean over tokens. Forward KL(p||q) by default; reverse KL(q||p)."""
    log_p = teacher_bucket_logprobs(topk_logprobs, tail_logmass, temps, T)
    log_q = student_bucket_logprobs(student_logits, topk_ids, T)
    if topk_ids.shape[-1] >= student_logits.shape[-1]:  # k = V: the tail bucket is empty on both sides
        log_p, log_q = log_p[..., :-1], log_q[..., :-1]
    if reverse:
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    T = torch.as_tensor(T, dtype=torch.float32, device=kl.device)
    return T * T * _masked_mean(kl, mask)


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
    return _masked_mean(kl, mask)


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
    z = _fp32_at_least(student_logits)
    log_q_cond = z.gather(-1, ids) - z.gather(-1, topk[..., :1]) + log_q[..., :1] - log_q[..., -1:]
    log_t = torch.where(t > 0, t.clamp_min(1e-30).log(), torch.zeros_like(t))
    kl_tail = (t * (log_t - log_q_cond)).sum(-1)
    # a token whose N draws all fell in the head (probability (1 - P_tail)^N) has no tail term; dividing the
    # others' by the chance of a tail draw keeps the estimate unbiased (with a tiny tail: weight ~ 1/N per draw)
    log_tail = log_p[..., -1]
    n = sample_counts.float().sum(-1)
    hit = -torch.expm1(n * _log1mexp(log_tail.clamp(max=-1e-30)))
    return _masked_mean(kl + log_tail.exp() / hit.clamp_min(1e-30) * kl_tail, mask)


def ce_loss(student_logits, input_ids, mask=None) -> torch.Tensor:
    """Next-token cross-entropy inside each window (the last position has no target)."""
    logits = student_logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long(), reduction="none")
    nll = nll.view(input_ids.shape[0], -1)
    return _masked_mean(nll, None if mask is None else mask[:, :-1])


# ---- hidden-state alignment -----------------------------------------------------------------


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Under data parallelism, the mean over ranks (equal shares: the global batch's statistic)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def standardize_channels(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel standardisation over all tokens of the (global) batch (tames GPT-2's outlier channels).
    Two passes (mean, then mean square deviation) rather than E[x^2] - mean^2, which cancels badly on
    outlier channels."""
    flat = h.float().reshape(-1, h.shape[-1])
    mean = _mean_over_ranks(flat.mean(0))
    std = _mean_over_ranks((flat - mean).square().mean(0)).sqrt()
    return ((h.float() - mean) / (std + eps)).detach()


def mse_align(student_h, teacher_h, projector: nn.Module, mask=None) -> torch.Tensor:
    """MSE between projector(student) and the per-channel standardised teacher state (with a token mask
    (B, L): the mean over the masked tokens of the per-token mean square error)."""
    if mask is None:
        return F.mse_loss(projector(student_h.float()), standardize_channels(teacher_h))
    per_token = (projector(student_h.float()) - standardize_channels(teacher_h)).square().mean(-1)
    return _masked_mean(per_token, mask)


def cosine_align(student_h, teacher_h, projector: nn.Module | None, mask=None) -> torch.Tensor:
    """Mean over tokens (the masked ones, with a token mask) of 1 - cos(projector(student), standardised
    teacher)."""
    s = projector(student_h.float()) if projector is not None else student_h.float()
    return _masked_mean(1 - F.cosine_similarity(s, standardize_channels(teacher_h), dim=-1), mask)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between token matrices x (n, d1), y (n, d2): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x = x.float() - x.float().mean(0, keepdim=True)
    y = y.float() - y.float().mean(0, keepdim=True)
    cross = (y.t() @ x).pow(2).sum()
    return cross / ((x.t() @ x).norm() * (y.t() @ y).norm()).clamp_min(1e-12)


def cka_align(student_h, teacher_h, mask=None) -> torch.Tensor:
    """1 - linear CKA over all tokens of the batch (the masked ones, with a token mask: 0 when fewer than
    two); no projector needed."""
    d_s, d_t = student_h.shape[-1], teacher_h.shape[-1]
    x, y = student_h.reshape(-1, d_s), standardize_channels(teacher_h).reshape(-1, d_t)
    if mask is not None:
        keep = mask.reshape(-1) > 0
        if int(keep.sum()) < 2:
            return student_h.float().sum() * 0.0
        x, y = x[keep], y[keep]
    return 1 - linear_cka(x, y)


def layer_map(kind: str, n_student: int, n_teacher: int, available: tuple[int, ...],
              pairs: list[list[int]] | None = None, last_k: int = 1) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs; layer 0 = embeddings on both sides, i = after block i.

    uniform: teacher = round(i * L_t / L_s) for each student block i (TinyBERT); explicit: given pairs;
    last_k: the last k student blocks to the last k teacher layers. Only teacher layers in the store count.
    """
    if kind == "uniform":
        out = [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]
    elif kind == "explicit":
        out = [tuple(map(int, p)) for p in (pairs or [])]
    elif kind == "last_k":
        out = [(n_student - j, n_teacher - j) for j in range(last_k)][::-1]
    else:
        raise ValueError(f"unknown layer map {kind!r} (uniform, explicit, last_k)")
    if kind == "uniform":
        out = [(s, t) for s, t in out if t in available]
    return out

"""Hidden-state alignment: the student's residual stream against the teacher's stored hidden states."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....ranks import mean_over_ranks
from .buckets import masked_mean


def standardize_channels(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel standardisation over all tokens of the (global) batch (tames GPT-2's outlier channels).
    Two passes (mean, then mean square deviation) rather than E[x^2] - mean^2, which cancels badly on
    outlier channels."""
    flat = h.float().reshape(-1, h.shape[-1])
    mean = mean_over_ranks(flat.mean(0))
    std = mean_over_ranks((flat - mean).square().mean(0)).sqrt()
    return ((h.float() - mean) / (std + eps)).detach()


def mse_align(student_h, teacher_h, projector: nn.Module, mask=None) -> torch.Tensor:
    """MSE between projector(student) and the per-channel standardised teacher state (with a token mask
    (B, L): the mean over the masked tokens of the per-token mean square error)."""
    if mask is None:
        return F.mse_loss(projector(student_h.float()), standardize_channels(teacher_h))
    per_token = (projector(student_h.float()) - standardize_channels(teacher_h)).square().mean(-1)
    return masked_mean(per_token, mask)


def cosine_align(student_h, teacher_h, projector: nn.Module | None, mask=None) -> torch.Tensor:
    """Mean over tokens (the masked ones, with a token mask) of 1 - cos(projector(student), standardised
    teacher)."""
    s = projector(student_h.float()) if projector is not None else student_h.float()
    return masked_mean(1 - F.cosine_similarity(s, standardize_channels(teacher_h), dim=-1), mask)


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

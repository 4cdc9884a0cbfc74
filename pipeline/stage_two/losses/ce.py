"""Cross-entropy on the gold next token (the store's input ids)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buckets import masked_mean


def ce_loss(student_logits, input_ids, mask=None) -> torch.Tensor:
    """Next-token cross-entropy inside each window (the last position has no target)."""
    logits = student_logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long(), reduction="none")
    nll = nll.view(input_ids.shape[0], -1)
    return masked_mean(nll, None if mask is None else mask[:, :-1])

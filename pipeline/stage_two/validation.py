"""Validation of the student on fixed windows of a store: perplexity next to the teacher's, KL to the
teacher, top-1 agreement and spike statistics. `eval --cache` reports the same agreement figures through
`teacher_agreement`, on the same held-out windows (`checks.held_out_windows`)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import GooseError
from ...student.model import Student
from .loader import read_windows
from .losses import ce_loss, student_bucket_logprobs, teacher_bucket_logprobs


def teacher_agreement(logits: torch.Tensor, batch: dict, temps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (B, L): KL(teacher || student) over the k + 1 buckets at T = 1, and whether the student's
    top-1 is the teacher's."""
    log_p = teacher_bucket_logprobs(batch["topk_logprobs"], batch["tail_logmass"], temps, 1.0)
    log_q = student_bucket_logprobs(logits, batch["topk_ids"], 1.0)
    return (log_p.exp() * (log_p - log_q)).sum(-1), logits.argmax(-1) == batch["topk_ids"][..., 0]


@torch.no_grad()
def validate_model(model: Student, url: str, spec, windows: np.ndarray, batch_size: int, device,
                   autocast=contextlib.nullcontext, storage_options: dict | None = None) -> tuple[dict, dict]:
    """Perplexity, teacher perplexity on the same windows, KL to the teacher at T=1, top-1 agreement and
    spike statistics over fixed windows of a store. Returns (metrics, per-site SpikeStats).

    Always of the fully ternary model, also while the trainer anneals spikes in: that is the model best/,
    `goose eval` and export hold (a saved model loads fully ternary), so a mid-anneal validation neither
    flatters the curve with continuous activations nor picks a best/ that scores worse once loaded. The
    training mix is restored afterwards, so training and resume are unchanged."""
    sites = model.annealed_modules()  # spike sites and, with ternary_anneal, ternary matrices
    training_mix = [site.mix for site in sites]
    for site in sites:
        site.mix = 1.0
    try:
        return _validate_ternary(model, url, spec, windows, batch_size, device, autocast, storage_options)
    finally:
        for site, mix in zip(sites, training_mix):
            site.mix = mix


def _validate_ternary(model, url, spec, windows, batch_size, device, autocast, storage_options):
    model.eval()
    fields = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "gold_nll"]
    if getattr(spec, "loss_mask", False):  # masked data: every metric over the positions whose prediction counts
        fields.append("loss_mask")
    nll_sum = kl_sum = agree = teacher_nll = 0.0
    n_tok = n_kd = 0
    stats_all: dict = {}
    for batch in read_windows(url, windows, fields, batch_size, storage_options):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(batch["input_ids"], collect_stats=True)
        logits = out.logits.float()
        ids = batch["input_ids"]
        kl, agrees = teacher_agreement(logits, batch, spec.tail_temperatures)
        if "loss_mask" in batch:
            m = batch["loss_mask"].double()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).long(),
                                  reduction="none").view(ids.shape[0], -1)
            nll_sum += float((nll.double() * m[:, :-1]).sum())
            teacher_nll += float((batch["gold_nll"][:, :-1].double() * m[:, :-1]).sum())
            n_tok += int(m[:, :-1].sum())
            kl_sum += float((kl.double() * m).sum())
            agree += float((agrees.double() * m).sum())
            n_kd += int(m.sum())
        else:
            n = ids[:, 1:].numel()
            nll_sum += float(ce_loss(logits, ids)) * n
            teacher_nll += float(batch["gold_nll"][:, :-1].double().sum())
            n_tok += n
            kl_sum += float(kl.sum())
            agree += float(agrees.sum())
            n_kd += ids.numel()
        for key, st in out.spike_stats.items():
            if key in stats_all:
                stats_all[key].merge(st)
            else:
                stats_all[key] = st
    summaries = {k: s.summary() for k, s in stats_all.items()}
    energy = model.energy_report(stats_all)
    rates = [s["firing_rate"] for s in summaries.values() if s]
    if n_tok == 0 or n_kd == 0:
        raise GooseError("the validation windows hold no position whose loss counts (their loss_mask is all "
                         "zero): validate on more windows (val_windows, val_fraction) or another --val-cache")
    return {
        "val_loss": nll_sum / n_tok, "val_ppl": math.exp(nll_sum / n_tok),
        "teacher_ppl": math.exp(teacher_nll / n_tok), "val_kl": kl_sum / n_kd, "val_top1_agree": agree / n_kd,
        "spike_rate": float(np.mean(rates)) if rates else None,
        "zero_fraction": 1 - float(np.mean(rates)) if rates else None,
        "dead_fraction_max": max((s["dead_fraction"] for s in summaries.values() if s), default=None),
        "saturated_fraction_max": max((s["saturated_fraction"] for s in summaries.values() if s), default=None),
        "energy_ratio_vs_dense": energy["energy_ratio_vs_dense"],
        "spike_sites": {k: {"rate": s["firing_rate"], "dead": s["dead_fraction"], "sat": s["saturated_fraction"]}
                        for k, s in summaries.items() if s},
    }, summaries

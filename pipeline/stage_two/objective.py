"""What a run minimises: its loss terms, the store fields they read, their weights and what they log.

The terms, added in this order: KD (the registered loss `loss.kd` names, weighted by the stage's KD weight),
CE on the gold token (weighted by the stage's CE weight; computed without a graph, for the log, when that is
0), hidden-state alignment (ramped in by `align_weight_at`), the firing-rate penalty and CTKD's temperature
anchor. The recipe calls `Objective` and never branches on a loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ...cache.schema import hidden_name
from ...errors import GooseError
from ...student.spikes import firing_rate_loss
from .config import TrainConfig
from .losses import build_kd_loss, ce_loss, cka_align, cosine_align, layer_map, mse_align
from .temperature import Temperature


class Distiller(nn.Module):
    """The trainable parts of distillation that are not the student: temperature and projectors."""

    def __init__(self, cfg: TrainConfig, pairs: list[tuple[int, int]], d_student: int, d_teacher: int):
        super().__init__()
        self.temperature = Temperature(cfg.temperature)
        self.pairs = pairs
        needs_projector = cfg.loss.align.loss == "mse" or (cfg.loss.align.loss == "cosine" and d_student != d_teacher)
        self.projectors = nn.ModuleDict(
            {f"{s}_{t}": nn.Linear(d_student, d_teacher, bias=False) for s, t in pairs} if needs_projector else {}
        )


def align_spans(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(student, teacher, student base, teacher base) per pair: for feature deltas each student span
    h[s] - h[s_prev] is matched with the teacher span between the same two aligned points (the previous
    pair, or the embeddings for the first), not with a single teacher layer h[t] - h[t - 1]."""
    ordered = sorted(pairs)
    spans = [(s, t, *(ordered[i - 1] if i else (0, 0))) for i, (s, t) in enumerate(ordered)]
    return [span for span in spans if span[:2] != span[2:]]  # an explicit (0, 0) pair has no span


def align_teacher_layers(cfg: TrainConfig, pairs: list[tuple[int, int]]) -> list[int]:
    """The teacher layers alignment reads: the paired ones, and with feature deltas their spans' bases."""
    return sorted({t for _, t in pairs} | ({t0 for *_, t0 in align_spans(pairs)} if cfg.loss.align.feature_deltas
                                           else set()))


def align_loss(cfg: TrainConfig, distiller: Distiller, hidden: list, batch: dict, final_norm: nn.Module,
               n_teacher_layers: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Alignment over the layer pairs. The teacher's last hidden state is after its final norm (HF returns
    GPT-2's hidden_states[-1] after ln_f), so the student state paired with it goes through the student's
    final norm too: like is compared with like. With a loss mask (B, L), only the positions whose prediction
    counts are aligned (the teacher's per-channel standardisation still uses every token)."""

    def student_state(s: int, t: int) -> torch.Tensor:
        return final_norm(hidden[s]) if t == n_teacher_layers else hidden[s]

    losses = []
    deltas = cfg.loss.align.feature_deltas
    for s, t, s0, t0 in align_spans(distiller.pairs) if deltas else [(s, t, s, t) for s, t in distiller.pairs]:
        hs, ht = student_state(s, t), batch[hidden_name(t)]
        if deltas:
            hs, ht = hs - student_state(s0, t0), ht - batch[hidden_name(t0)]
        proj = distiller.projectors[f"{s}_{t}"] if f"{s}_{t}" in distiller.projectors else None
        kind = cfg.loss.align.loss
        if kind == "mse":
            losses.append(mse_align(hs, ht, proj, mask=mask))
        elif kind == "cosine":
            losses.append(cosine_align(hs, ht, proj, mask=mask))
        else:
            losses.append(cka_align(hs, ht, mask=mask))
    return torch.stack(losses).mean()


def align_weight_at(cfg: TrainConfig, step: int) -> float:
    a = cfg.loss.align
    if cfg.loss.align_weight <= 0 or step < a.warmup_steps:
        return 0.0
    return cfg.loss.align_weight * min(1.0, (step - a.warmup_steps + 1) / max(a.ramp_steps, 1))


class Objective:
    """A run's loss terms, built once from its config and store spec."""

    def __init__(self, cfg: TrainConfig, spec, distiller: Distiller, final_norm: nn.Module, n_teacher_layers: int):
        self.cfg, self.spec, self.distiller = cfg, spec, distiller
        self.final_norm, self.n_teacher_layers = final_norm, n_teacher_layers
        self.kd = build_kd_loss(cfg)

    def fields(self) -> list[str]:
        """The store fields the terms read, in the loader's order."""
        fields = ["input_ids"]
        if self.kd is not None:
            fields += [f for f in ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_counts")
                       if f in self.kd.fields]
            fields += [f for f in self.kd.fields if f not in fields]
        fields += [hidden_name(t) for t in align_teacher_layers(self.cfg, self.distiller.pairs)]
        if self.spec.loss_mask:  # masked (instruction) data: losses are means over the positions whose prediction counts
            fields.append("loss_mask")
        return fields

    def __call__(self, out, batch: dict, T: torch.Tensor, stage: dict, step: int, device) -> dict:
        """Every term for one micro-batch's forward `out`; `total` is what is minimised."""
        c = self.cfg
        logits = out.logits
        uses_t = self.kd is not None and self.kd.temperature
        parts = {"temperature": T} if uses_t else {}
        total = torch.zeros((), device=device)
        mask = batch.get("loss_mask")  # None (every position counts) unless the store has a loss mask
        if self.kd is not None:
            kd = self.kd(logits, batch, self.spec.tail_temperatures, T, mask)
            parts["kd"] = kd
            total = total + stage["kd_weight"] * kd
        with contextlib.nullcontext() if stage["ce_weight"] > 0 else torch.no_grad():  # logged even when unused
            ce = ce_loss(logits, batch["input_ids"], mask=mask)
        parts["ce"] = ce
        if stage["ce_weight"] > 0:
            total = total + stage["ce_weight"] * ce
        w_align = align_weight_at(c, step)
        if self.distiller.pairs:
            al = align_loss(c, self.distiller, out.hidden_states, batch, self.final_norm, self.n_teacher_layers,
                            mask=mask)
            parts["align"] = al
            total = total + w_align * al
        parts["align_weight"] = w_align
        if c.loss.firing_rate_weight > 0 and out.spike_rates:
            rate = firing_rate_loss(out.spike_rates, c.loss.firing_rate_target)
            parts["rate"] = rate
            total = total + c.loss.firing_rate_weight * rate
        anchor = self.distiller.temperature.anchor_loss(stage["temperature"])
        if anchor is not None:
            parts["t_anchor"] = anchor
            total = total + anchor
        parts["total"] = total
        return parts

    def logged(self, sums: dict) -> dict:
        """The KD loss's own metrics (its divergence without the temperature scale) from a step's mean parts."""
        if self.kd is None or "kd" not in sums:
            return {}
        return self.kd.logged(sums["kd"], sums.get("temperature", 1.0))


def alignment_pairs(cfg: TrainConfig, n_student: int, n_teacher: int, stored: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs alignment uses ([] without alignment); a map that needs a
    teacher layer the store lacks, or names a student layer outside the model, is refused."""
    if cfg.loss.align_weight <= 0:
        return []
    a = cfg.loss.align
    try:
        pairs = layer_map(a.layer_map, n_student, n_teacher, stored, a.pairs, a.last_k)
    except ValueError as exc:
        raise GooseError(str(exc)) from None
    missing = sorted(set(align_teacher_layers(cfg, pairs)) - set(stored))
    if missing or not pairs:
        raise GooseError(f"alignment needs teacher layers {missing or '(none mapped)'} but the store has {list(stored)}")
    if any(not 0 <= s <= n_student for s, _ in pairs):
        raise GooseError(f"alignment pairs {pairs} name student layers outside 0..{n_student}")
    return pairs

"""The optimisers and the learning-rate schedule of a run: AdamW over the student's parameter groups (and
the projectors), CTKD's temperature on its own SGD, and the warm-up + cosine schedule with a re-warm-up after
a curriculum stage change."""

from __future__ import annotations

import math

import torch

from ...student.model import Student
from .config import TrainConfig
from .distributed import clip_grad_norm
from .objective import Distiller


def lr_factor(cfg: TrainConfig, step: int, rewarm_from: int | None) -> float:
    """Linear warm-up, cosine decay to min_lr_ratio; optional short re-warm-up after a stage change."""
    o = cfg.optim
    if step < o.warmup_steps:
        f = (step + 1) / o.warmup_steps
    else:
        progress = (step - o.warmup_steps) / max(cfg.steps - o.warmup_steps, 1)
        f = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if rewarm_from is not None and o.rewarm_steps_at_stage > 0 and step - rewarm_from < o.rewarm_steps_at_stage:
        f *= (step - rewarm_from + 1) / o.rewarm_steps_at_stage
    return f


def param_groups(cfg: TrainConfig, model: Student, distiller: Distiller, replicated=()) -> list[dict]:
    """The student's own groups (`Student.param_groups`: weight decay on its large matrices only), then
    the replicated parameters and the alignment projectors. The CTKD temperature is not here: it has its
    own SGD optimiser (`temperature_optimizer`). `replicated`: under FSDP the parameters left unsharded, in
    a group of their own (one foreach step cannot mix them with sharded ones)."""
    own_spike_lr = cfg.optim.spike_lr_mult != 1.0  # a group of their own only then: old checkpoints resume
    groups = model.param_groups(cfg.optim.weight_decay, spike_lr=cfg.optim.lr * cfg.optim.spike_lr_mult
                                if own_spike_lr else None, exclude=replicated)
    if replicated:  # under FSDP: the spike parameters (left unsharded)
        groups.append({"params": list(replicated), "weight_decay": 0.0, "name": "replicated",
                       "lr": cfg.optim.lr * cfg.optim.spike_lr_mult})
    if len(distiller.projectors):
        groups.append({"params": list(distiller.projectors.parameters()), "weight_decay": cfg.optim.weight_decay,
                       "name": "projectors"})
    for g in groups:
        g["base_lr"] = g.get("lr", cfg.optim.lr)
    return groups


def temperature_optimizer(cfg: TrainConfig, distiller: Distiller) -> torch.optim.Optimizer | None:
    """Plain SGD with momentum for CTKD's theta, as in the reference (zhengli97/CTKD). Under Adam the step
    is normalised by the gradient's running magnitude, so the reversal strength lambda cancels out (lambda
    1.0 and 0.001 gave the same temperature trajectory); under SGD lambda scales every step."""
    if not distiller.temperature.learnable:
        return None
    return torch.optim.SGD([distiller.temperature.theta], lr=cfg.temperature.lr, momentum=cfg.temperature.momentum)


def build_optimizers(cfg: TrainConfig, model: Student, distiller: Distiller, replicated, device: torch.device):
    """(AdamW over `param_groups`, the temperature's SGD or None). Fused AdamW on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(cfg, model, distiller, replicated), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                            **({"fused": True} if fused else {"foreach": True}))
    return opt, temperature_optimizer(cfg, distiller)


class GuardedStep:
    """The optimiser step after a step's backward passes, guarded: gradients synchronised where DDP/FSDP do
    not (the distiller, replicated parameters), unscaled (fp16), clipped to one global norm, and applied
    only when finite. A finite loss with non-finite gradients under fp16 while the loss scale is still
    large is an ordinary overflow: the scaler skips the step and lowers the scale (no rollback for it).
    Returns (grad norm, gradients finite, fp16 overflow)."""

    def __init__(self, cfg: TrainConfig, opt, t_opt, scaler, dist, distiller: Distiller, replicated: list,
                 fsdp: bool):
        self.cfg, self.opt, self.t_opt, self.scaler, self.dist = cfg, opt, t_opt, scaler, dist
        self.distiller, self.replicated, self.fsdp = distiller, replicated, fsdp

    def __call__(self, loss_finite: bool) -> tuple[float, bool, bool]:
        c = self.cfg
        grad_norm, finite, overflow, unscaled, t_live = float("nan"), loss_finite, False, False, False
        if loss_finite:
            # outside the DDP module: CTKD theta, projectors (and under FSDP the replicated spike parameters)
            self.dist.sync_grads([*self.distiller.parameters(), *self.replicated])
            self.scaler.unscale_(self.opt)
            unscaled = True
            t_live = self.t_opt is not None and self.distiller.temperature.theta.grad is not None
            if t_live:
                self.scaler.unscale_(self.t_opt)
            params = [p for g in self.opt.param_groups for p in g["params"]]
            max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf")
            if self.fsdp:  # sharded student and replicated distiller: one global norm over both
                from torch.distributed.tensor import DTensor

                sharded = [p for p in params if isinstance(p, DTensor)]  # the same parameters as below
                grad_norm = clip_grad_norm([sharded, [p for p in params if not isinstance(p, DTensor)]], max_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = math.isfinite(grad_norm) and (
                not t_live or bool(torch.isfinite(self.distiller.temperature.theta.grad).all()))
            # once the scale is below monitor.scaler_min the gradients are non-finite on their own
            overflow = not finite and self.scaler.is_enabled() and self.scaler.get_scale() >= c.monitor.scaler_min
        if finite or overflow:
            self.scaler.step(self.opt)  # skips the update itself when it found inf/NaN gradients
            if t_live:
                self.scaler.step(self.t_opt)
        if unscaled:
            self.scaler.update()  # only after unscale_: it needs the inf checks that unscale_ records
        return grad_norm, finite, overflow

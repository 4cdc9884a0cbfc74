"""KD losses by name: the one interface every KD loss has, and the registry the config's `loss.kd` picks from.

A KD loss is a class in its own file in this package, decorated with `@register`. It says what it reads
from the store (`fields`), whether the run's temperature applies to it (`temperature`; else it is a T = 1
loss, as the RS-KD draws are), which options it takes under `loss.kd_options` (with their defaults), how
it checks itself against the store (`check`), how it is computed (`__call__`), and what it logs
(`logged`). The recipe has no per-loss branch: it builds the one `loss.kd` names and calls it. Every
module of this package is imported by the package, so a new loss is one file (and its test).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ....errors import GooseError
from .buckets import bucket_kd

KD_LOSSES: dict[str, type["KDLoss"]] = {}


def register(cls: type["KDLoss"]) -> type["KDLoss"]:
    if cls.name in KD_LOSSES or cls.name == "none":
        raise ValueError(f"a KD loss named {cls.name!r} is already registered")
    KD_LOSSES[cls.name] = cls
    return cls


class KDLoss:
    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # store fields it reads (the loader reads only what the losses need)
    temperature: ClassVar[bool] = True  # follows temperature.* (fixed, ctkd, stage); False: a T = 1 loss
    options: ClassVar[dict] = {}  # its `loss.kd_options` and their defaults
    metric: ClassVar[str] = "kl"  # the divergence it logs (per token, without the temperature scale)
    takes_reverse_kl: ClassVar[bool] = False  # honours loss.reverse_kl (elsewhere that flag is refused)

    def __init__(self, cfg):
        given = dict(cfg.loss.kd_options or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise GooseError(f"loss.kd_options {unknown} are not options of loss.kd={self.name} (its options: {known})")
        self.opts = {**self.options, **given}
        self.reverse = bool(cfg.loss.reverse_kl)
        self.check_options()

    def check_options(self) -> None:
        """Refuse option values the loss cannot take (a GooseError naming the option); run when it is built."""

    def check(self, cfg, spec, url: str) -> None:
        """Refuse, before training, a run config or store this loss cannot be computed from."""
        missing = [f for f in self.fields if f not in spec.arrays()]
        if missing and "sample_ids" in missing:
            raise GooseError(f"loss.kd={self.name} needs RS-KD samples but store {url} has none (cache with --samples)")
        if missing:
            raise GooseError(f"loss.kd={self.name} needs {missing} but store {url} has none")
        if not self.temperature and (cfg.temperature.mode != "fixed" or cfg.temperature.value != 1.0
                                     or cfg.loss.reverse_kl):
            # the draws are from the teacher at T = 1: another T (or a learned one) would be silently ignored
            raise GooseError(f"loss.kd={self.name} is forward KL at T = 1: it needs temperature.mode=fixed, "
                             f"temperature.value=1 and loss.reverse_kl=false")
        if cfg.loss.reverse_kl and not self.takes_reverse_kl:
            raise GooseError(f"loss.reverse_kl applies to loss.kd=topk only; loss.kd={self.name} would ignore it")
        if self.temperature:
            lo, hi = cfg.temperature.range()
            if cfg.curriculum.enabled and cfg.temperature.mode == "stage":
                lo, hi = min(cfg.curriculum.temperatures), max(cfg.curriculum.temperatures)
            t_lo, t_hi = min(spec.tail_temperatures), max(spec.tail_temperatures)
            if lo < t_lo - 1e-6 or hi > t_hi + 1e-6:
                raise GooseError(f"temperatures {lo:g}..{hi:g} leave the store's tail temperatures {t_lo:g}..{t_hi:g}; "
                                 f"recache with wider --tail-temperatures or narrow the temperature range")

    def __call__(self, student_logits: torch.Tensor, batch: dict, temps: tuple[float, ...], T,
                 mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, T: float) -> float:
        """The factor the loss carries on top of its divergence: Hinton's T^2 keeps a KL's gradient the same
        size at any T (it shrinks as 1/T^2). 1 for T = 1 losses."""
        return T * T if self.temperature else 1.0

    def logged(self, kd: float, T: float) -> dict:
        """Its metrics row entries, from the step's mean loss and the T it used."""
        return {self.metric: kd / self.scale(T)}


class BucketKDLoss(KDLoss):
    """A divergence between the teacher's and the student's k + 1 bucket distributions at T: a subclass
    gives only `divergence` (per token, from log-probabilities). Over the buckets it is the divergence of
    the coarsened distributions, a lower bound of the full-vocabulary one (any f-divergence shrinks when
    outcomes are merged), and equal to it at k = V."""

    fields = ("topk_ids", "topk_logprobs", "tail_logmass")

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, student_logits, batch, temps, T, mask):
        return bucket_kd(student_logits, batch, temps, T, self.divergence, self.scale, mask)


def kd_loss_names() -> list[str]:
    return sorted(KD_LOSSES) + ["none"]


def build_kd_loss(cfg) -> KDLoss | None:
    """The KD loss `loss.kd` names, with its options (None for `none`)."""
    if cfg.loss.kd == "none":
        if cfg.loss.kd_options:
            raise GooseError("loss.kd_options set but loss.kd is none")
        return None
    if cfg.loss.kd not in KD_LOSSES:
        names = kd_loss_names()
        raise GooseError(f"loss.kd must be {', '.join(names[:-1])} or {names[-1]}, got {cfg.loss.kd!r}")
    return KD_LOSSES[cfg.loss.kd](cfg)

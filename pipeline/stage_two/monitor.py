"""Training health: checks that run while training and write structured events plus a warning line.

Each check is a few lines over the step metrics; an event is {step, kind, message, ...values}. A kind
fires at most once per `cooldown_steps`. `summary()` counts events by kind for the end of the run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, deque
from pathlib import Path


class EventLog:
    """Appends events (JSON lines) to a file and echoes a one-line warning through `echo`."""

    def __init__(self, path: Path | None, echo=print):
        self.path, self.echo = path, echo
        self.counts: Counter = Counter()

    def emit(self, step: int, kind: str, message: str, *, warn: bool = True, **values) -> dict:
        event = {"step": step, "kind": kind, "message": message, **values}
        self.counts[kind] += 1
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=float) + "\n")
        if warn:
            self.echo(f"warning: step {step}: {message}")
        return event


class HealthMonitor:
    def __init__(self, cfg, events: EventLog, *, t_bounds: tuple[float, float] | None, grad_clip: float):
        self.cfg, self.events = cfg, events
        self.t_bounds, self.grad_clip = t_bounds, grad_clip
        self.first_losses: list[float] = []
        self.recent_losses: deque = deque(maxlen=10)
        self.grad_norms: deque = deque(maxlen=50)
        self.clipped: deque = deque(maxlen=cfg.clip_window)
        self.align: deque = deque(maxlen=2 * cfg.align_window)
        self.t_at_bound = 0
        self.last_fired: dict[str, int] = {}

    def _fire(self, step, kind, message, **values):
        last = self.last_fired.get(kind)
        if last is not None and step - last < self.cfg.cooldown_steps:
            return
        self.last_fired[kind] = step
        self.events.emit(step, kind, message, **values)

    def on_step(self, step: int, m: dict) -> None:
        c = self.cfg
        loss = m.get("loss")
        if loss is not None:
            if len(self.first_losses) < 10:
                self.first_losses.append(loss)
            self.recent_losses.append(loss)
            if step == c.loss_check_steps and len(self.first_losses) == 10:
                start, now = statistics.mean(self.first_losses), statistics.mean(self.recent_losses)
                if now >= start:
                    self._fire(step, "loss_not_dropping",
                               f"loss has not dropped over the first {step} steps ({start:.4f} -> {now:.4f})",
                               start=start, now=now)
        g = m.get("grad_norm")
        if g is not None and math.isfinite(g):  # a skipped step (fp16 overflow, non-finite) has its own event
            if len(self.grad_norms) >= 10 and g > c.grad_explode_factor * statistics.median(self.grad_norms):
                self._fire(step, "grad_explode", f"gradient norm {g:.3g} is {g / statistics.median(self.grad_norms):.1f}x "
                           "its running median", grad_norm=g)
            if g < c.grad_vanish:
                self._fire(step, "grad_vanish", f"gradient norm {g:.3g} has vanished", grad_norm=g)
            self.grad_norms.append(g)
            if self.grad_clip > 0:
                self.clipped.append(g > self.grad_clip)
                if len(self.clipped) == c.clip_window and sum(self.clipped) >= c.clip_fraction * c.clip_window:
                    self._fire(step, "clipping", f"gradient clipping fired on {sum(self.clipped)} of the last "
                               f"{c.clip_window} steps; if it persists past warm-up, lower optim.lr or raise optim.grad_clip",
                               fraction=sum(self.clipped) / c.clip_window)
        T = m.get("temperature")
        if T is not None and self.t_bounds is not None:
            lo, hi = self.t_bounds
            at = min(T - lo, hi - T) <= 0.01 * (hi - lo)
            self.t_at_bound = self.t_at_bound + 1 if at else 0
            if self.t_at_bound >= c.temperature_bound_steps:
                self._fire(step, "temperature_at_bound", f"temperature {T:.3f} has sat at a bound ({lo}, {hi}) "
                           f"for {self.t_at_bound} steps", temperature=T)
        kl = m.get("kl")
        if kl is not None and not (-1e-3 <= kl <= c.kl_max):
            self._fire(step, "kl_range", f"KD KL {kl:.4g} is outside [0, {c.kl_max}]", kl=kl)
        scale = m.get("grad_scale")
        if scale is not None and scale < c.scaler_min:
            self._fire(step, "scaler_collapse", f"GradScaler scale collapsed to {scale:.3g}", scale=scale)
        a = m.get("align")
        if a is not None and m.get("align_weight", 0) > 0:
            self.align.append(a)
            w = c.align_window
            if len(self.align) == 2 * w:
                before = statistics.mean(list(self.align)[:w])
                after = statistics.mean(list(self.align)[w:])
                if after > 1.1 * before:
                    self._fire(step, "align_rising", f"alignment loss is rising ({before:.4f} -> {after:.4f})",
                               before=before, after=after)

    def on_spikes(self, step: int, site_stats: dict) -> None:
        """site_stats: 'layer.site' -> SpikeStats summary dict (from a validation pass)."""
        c = self.cfg
        dead = {k: s["dead_fraction"] for k, s in site_stats.items() if s and s["dead_fraction"] > c.dead_max}
        sat = {k: s["saturated_fraction"] for k, s in site_stats.items() if s and s["saturated_fraction"] > c.saturated_max}
        if dead:
            worst = max(dead, key=dead.get)
            cause = ("its relu^2 input never crosses the threshold: FFN key rows whose pre-activation is negative "
                     "on every token (dead ReLUs); a lower learning rate or loss.firing_rate_weight > 0 keeps them"
                     if worst.endswith("cm_v") else
                     "the threshold sits above the channel's whole input range; loss.firing_rate_weight > 0 or a "
                     "lower spike.stats_alpha brings it back")
            self._fire(step, "dead_channels", f"{len(dead)} spike sites have > {c.dead_max:.0%} dead channels "
                       f"(worst {worst}: {dead[worst]:.0%}; {cause})", sites=dead)
        if sat:
            worst = max(sat, key=sat.get)
            self._fire(step, "saturated_channels", f"{len(sat)} spike sites have > {c.saturated_max:.0%} saturated "
                       f"channels (worst {worst}: {sat[worst]:.0%}; the input moved faster than the running scale "
                       f"the thresholds follow, or an offset the centring has not caught)", sites=sat)

    def summary(self) -> dict:
        return dict(self.events.counts)

    def state_dict(self) -> dict:
        """Everything the checks remember, so a resumed run warns exactly when the uninterrupted one would."""
        return {"first_losses": list(self.first_losses), "recent_losses": list(self.recent_losses),
                "grad_norms": list(self.grad_norms), "clipped": [bool(x) for x in self.clipped],
                "align": list(self.align), "t_at_bound": self.t_at_bound, "last_fired": dict(self.last_fired)}

    def load_state_dict(self, d: dict) -> None:
        self.first_losses = [float(x) for x in d["first_losses"]]
        for name in ("recent_losses", "grad_norms", "clipped", "align"):
            target = getattr(self, name)
            target.clear()
            target.extend(d[name])
        self.t_at_bound = int(d["t_at_bound"])
        self.last_fired = {str(k): int(v) for k, v in d["last_fired"].items()}

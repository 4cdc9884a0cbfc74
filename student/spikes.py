"""Ternary spikes {-a_neg, 0, +a_pos} with surrogate gradients, optional LIF dynamics, and their statistics.

A spike is built from two Heaviside steps, each with a surrogate gradient:

    s = a_pos * H(x - theta) - a_neg * H(-x - theta)

so autograd gives every parameter its gradient: the input and the threshold through the surrogate, the
amplitudes exactly (a_pos only on tokens that fire +, a_neg only on tokens that fire -, so the two are
never redundant with each other). Placed at the input of a linear layer, W s = W_pos s+ - W_neg s- is
additions and subtractions of columns of W only (skips where s = 0): the efficiency claim. The common
scale of (a_pos, a_neg) plays the same role as a norm gain before a linear layer.

LIF (optional): a membrane potential per channel carried across tokens (and across windows through the
model state), V_t = beta * V_{t-1} + I_t - s_{t-1} (reset by subtracting what was emitted, so the spike
train tracks its input: sigma-delta coding), s_t = spike(V_t). With `micro_steps` = T > 1 each token runs
T LIF steps on the same input and emits the mean spike (rate coding).

Residual steps (optional, per site, `steps` = K > 1): a token is coded as K ternary spikes, step k spiking
what steps < k left of the input, r_k = x - (s_1 + ... + s_{k-1}), each step with its own channel-wise
threshold, amplitudes and running scale (the residual is smaller than the input, and signed even when the
input is not). The output s_1 + ... + s_K has up to 3^K levels per channel, and the next linear layer does
K rounds of column additions (energy_report counts every step's events). Multi-timestep coding, as in
Spikformer's T steps, but each step refines the one before instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ranks import mean_over_ranks_, sum_over_ranks_

SURROGATES = ("ste", "sigmoid", "triangular", "superspike")


def surrogate_grad(z: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """dH/dz as the surrogate defines it (H = Heaviside), at z = input - threshold.

    ste:        (scale / 2) * 1{|z| <= 1 / scale}      boxcar straight-through, integrates to 1
    sigmoid:    scale * sig(scale z) * (1 - sig(scale z))   integrates to 1
    triangular: scale * max(0, 1 - scale |z|)           integrates to 1
    superspike: 1 / (1 + scale |z|)^2                   Zenke & Ganguli 2018
    """
    if kind == "ste":
        return (z.abs() <= 1.0 / scale).to(z.dtype) * (scale / 2)
    if kind == "sigmoid":
        sig = torch.sigmoid(scale * z)
        return scale * sig * (1 - sig)
    if kind == "triangular":
        return scale * (1 - scale * z.abs()).clamp_min(0)
    if kind == "superspike":
        return 1.0 / (1 + scale * z.abs()) ** 2
    raise ValueError(f"unknown surrogate {kind!r}; choose from {SURROGATES}")


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, kind: str, scale: float):
        ctx.save_for_backward(z)
        ctx.kind, ctx.scale = kind, scale
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (z,) = ctx.saved_tensors
        return grad_out * surrogate_grad(z, ctx.kind, ctx.scale), None, None


def heaviside(z: torch.Tensor, kind: str = "sigmoid", scale: float = 4.0) -> torch.Tensor:
    """H(z) = 1{z > 0} forward, the chosen surrogate backward."""
    return _Heaviside.apply(z, kind, scale)


@dataclass
class SpikeConfig:
    threshold: str = "learned"  # "learned" (channel-wise parameter) or "stats" (alpha * mean|x| per token)
    threshold_init: float = 0.5
    # threshold = stats_alpha * mean|x| at init (learned thresholds) or per token (stats). TWN uses 0.7; the
    # proxy sweep found 1.0 both sparser and better: 62 % zeros and store-val PPL 382 vs 49 % and 392
    stats_alpha: float = 1.0
    surrogate: str = "sigmoid"
    surrogate_scale: float = 4.0
    lif: bool = False
    lif_leak: float = 0.5  # beta at init
    learn_leak: bool = True
    detach_reset: bool = True  # no gradient through the reset path (SpikingJelly's default; stabler)
    micro_steps: int = 1  # rate coding: LIF steps per token
    binary: bool = False  # {0, +a} spikes at every site (SpikeGPT-style) instead of ternary
    center: bool = True  # spike x - mu (learned per-channel offset); W mu is a constant bias downstream
    # per-token gain (SpikeLM's elastic magnitude; BitNet's per-token activation scale): each token is
    # spiked as x / g with g its mean |x| over channels, and the spikes are scaled back by g, so one
    # threshold and amplitude per channel fit quiet and loud tokens alike. An integer G > 1 gives each of G
    # equal groups of channels its own gain per token (a shared block scale, as in the OCP microscaling
    # formats); true = 1, false / 0 = no gain. In hardware: thresholds times g before the comparison, and
    # W (g * s) = sum_j g_j (W_j s_j) after the additions, one partial sum per group and output, each scaled
    # once (energy_report counts both)
    token_gain: int = 0
    # the input's gradient: QAT's straight-through estimator, 1 inside the code's range [-a_neg, a_pos]
    # (times the scale) and 0 beyond it, instead of the surrogate's bump around the threshold (which gives
    # nothing to inputs far above it); thresholds still learn through the surrogate
    straight_through: bool = False

    def __post_init__(self):
        if self.threshold not in ("learned", "stats"):
            raise ValueError(f"spike threshold must be 'learned' or 'stats', got {self.threshold!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {self.surrogate!r}; choose from {SURROGATES}")
        if self.micro_steps < 1:
            raise ValueError("micro_steps must be >= 1")
        if self.micro_steps > 1 and not self.lif:
            raise ValueError("micro_steps > 1 (rate coding) needs lif=True: without a membrane every step is equal")
        if not 0 < self.lif_leak < 1:
            raise ValueError("lif_leak must be in (0, 1)")
        if not isinstance(self.token_gain, int) or self.token_gain < 0:  # bool is an int: true = 1 group
            raise ValueError(f"spike token_gain must be true/false or a number of channel groups >= 0, "
                             f"got {self.token_gain!r}")


def _mean_abs(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean |x| over the last dimension per group of equal consecutive channels: (..., 1) for one group,
    (..., G, 1) for G (apply it with `_by_group`; no (..., C) copy is made or saved for backward)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if groups == 1:
        return x.abs().mean(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.abs().unflatten(-1, (groups, -1)).mean(dim=-1, keepdim=True).clamp_min(1e-12)


def _by_group(op, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """op(x, gain) with each channel taking its group's gain, in x's dtype."""
    if gain.dim() == x.dim():  # one group
        return op(x, gain).to(x.dtype)
    return op(x.unflatten(-1, (gain.shape[-2], -1)), gain).flatten(-2).to(x.dtype)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _Annealed:
    """The annealing mix of a module that blends in from continuous values (a spike site, an annealed ternary
    matrix): 0 = continuous, 1 = fully ternary, set by the trainer. `mix_weight` is a tensor so a compiled
    model takes each step's value as an input instead of recompiling for it; `_annealing` is the Python
    flag the forward branches on."""

    def _init_mix(self) -> None:
        self.register_buffer("mix_weight", torch.ones(()), persistent=False)
        self.mix = 1.0

    @property
    def mix(self) -> float:
        return self._mix

    @mix.setter
    def mix(self, value: float) -> None:
        self._mix = float(value)
        self._annealing = self._mix < 1.0
        with torch.no_grad():
            self.mix_weight.fill_(self._mix)


class TernarySpike(_Annealed, nn.Module):
    """Channel-wise ternary spiking on the last dimension.

    signed=False drops the negative branch (for non-negative inputs such as relu^2, where it could never
    fire and its amplitude would never learn). Learned thresholds and amplitudes are initialised from the
    first training batch (LSQ-style): theta = stats_alpha * mean|x| per channel, amplitudes = the mean
    magnitude of what fires, so every site starts firing at a sensible rate whatever its input scale.
    `mix` < 1 blends in the continuous input (spike annealing: 0 -> 1 over training, 1 = fully ternary).

    Centering (signed sites, `center=True`): a channel whose values sit far from zero (a DC offset) would
    cross a symmetric threshold on every token (saturated: no sparsity, no information). The spike is
    taken of x - mu with a learned per-channel offset mu (initialised to the channel mean) and the output
    is s + mu; in the next matmul W (s + mu) = W s + W mu, and W mu is a constant bias computed once, so
    the per-token work is still additions of weight columns.
    """

    def __init__(self, channels: int, cfg: SpikeConfig, signed: bool = True, steps: int = 1):
        super().__init__()
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"spike steps must be a positive integer, got {steps!r}")
        if steps > 1 and cfg.lif:
            raise ValueError("residual spike steps > 1 need lif=False (LIF sites use micro_steps for more steps)")
        if cfg.token_gain and channels % cfg.token_gain:
            raise ValueError(f"spike token_gain groups ({int(cfg.token_gain)}) do not divide a spike site's "
                             f"{channels} channels")
        self.cfg = cfg
        self.channels = channels
        self.signed = signed
        self.steps = steps
        # the next step spikes what this one left: signed, uncentred (a residual has no DC offset to remove),
        # and in the units this step saw (after its token gain)
        self.residual = (TernarySpike(channels, dataclasses.replace(cfg, center=False, token_gain=0),
                                      signed=True, steps=steps - 1)
                         if steps > 1 else None)
        if cfg.threshold == "learned":
            self.threshold_raw = nn.Parameter(torch.full((channels,), _inv_softplus(cfg.threshold_init)))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_seen = False  # a Python mirror of `initialized` once it is True (see needs_init)
        # running mean |x| per channel: learned thresholds and amplitudes are relative to it, so they follow
        # the input when its scale drifts in training (otherwise a threshold set at init ends up far below
        # a grown input, the surrogate gradient vanishes, and the site fires on every token)
        self.register_buffer("scale", torch.ones(channels))
        self.scale_momentum = 0.05
        self.amp_pos = nn.Parameter(torch.ones(channels))
        if signed:
            self.amp_neg = nn.Parameter(torch.ones(channels))
        self.centered = cfg.center and signed
        if self.centered:
            self.offset = nn.Parameter(torch.zeros(channels))
        if cfg.lif:
            leak = torch.full((channels,), math.log(cfg.lif_leak / (1 - cfg.lif_leak)))
            if cfg.learn_leak:
                self.leak_raw = nn.Parameter(leak)
            else:
                self.register_buffer("leak_raw", leak)
        self._init_mix()

    # ---- pieces ------------------------------------------------------------------------------
    def threshold(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.threshold == "learned":
            return F.softplus(self.threshold_raw) * self.scale
        return self.cfg.stats_alpha * x.abs().mean(dim=-1, keepdim=True)  # gradient flows to x

    def reference_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The input scale thresholds are relative to: the running per-channel mean |x| (learned
        thresholds) or this token's mean |x| (stats thresholds), without gradient."""
        if self.cfg.threshold == "learned":
            return self.scale
        return _mean_abs(x.detach(), 1)

    def leak(self) -> torch.Tensor:
        return torch.sigmoid(self.leak_raw)

    def fire(self, x: torch.Tensor):
        """(value, positive indicator, negative indicator) of one spiking step; indicators carry grads."""
        theta = self.threshold(x)
        kind, width = self.cfg.surrogate, self.cfg.surrogate_scale
        # The surrogate is a function of the distance to the threshold *in units of the input scale*, so
        # its width follows the input as thresholds and amplitudes do: ds/dx is then the same at input
        # std 0.003 and 30 (a fixed-width surrogate gives ~0 gradient to a small input and a boxcar as wide
        # as the whole input to a large one). The 1/ref factor comes from autograd through the division.
        ref = self.reference_scale(x)
        xs = x.detach() if self.cfg.straight_through else x
        pos = heaviside((xs - theta) / ref, kind, width)
        if not self.signed:
            value, neg = self.amp_pos.abs() * self.scale * pos, torch.zeros_like(pos)
        else:
            neg = heaviside((-xs - theta) / ref, kind, width)
            value = (self.amp_pos.abs() * pos - self.amp_neg.abs() * neg) * self.scale
        if self.cfg.straight_through:  # + (clip(x) - clip(x)) in value: gradient 1 inside the code's range
            hi = (self.amp_pos.abs() * self.scale).detach()
            lo = -(self.amp_neg.abs() * self.scale).detach() if self.signed else torch.zeros_like(hi)
            clipped = torch.minimum(torch.maximum(x, lo), hi)
            value = value + (clipped - clipped.detach())
        return value, pos, neg

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Data-dependent init from a batch of inputs (B, T, C): offset = channel mean, scale = mean
        |x - offset|, threshold = stats_alpha * scale, amplitudes = mean magnitude of what fires."""
        flat = x.detach().to(self.scale.dtype).reshape(-1, x.shape[-1])
        if self.centered:
            self.offset.copy_(mean_over_ranks_(flat.mean(0)))
            flat = flat - self.offset
        if self.cfg.token_gain:
            flat = _by_group(torch.div, flat, self.gain(flat))
        self.scale.copy_(mean_over_ranks_(flat.abs().mean(0)).clamp_min(1e-6))
        if self.cfg.threshold == "learned":
            rel = torch.full_like(self.scale, self.cfg.stats_alpha)
            self.threshold_raw.copy_(rel + torch.log(-torch.expm1(-rel)))  # inverse softplus
        theta = self.threshold(flat)  # per channel (C,) or per token (N, 1)
        fallback = 2 * (theta if theta.dim() == 1 else theta.mean())  # a channel that never crossed
        above = flat > theta
        total, count = sum_over_ranks_((flat * above).sum(0)), sum_over_ranks_(above.sum(0).to(flat.dtype))
        self.amp_pos.copy_(torch.where(count > 0, total / count.clamp_min(1), fallback) / self.scale)
        if self.signed:
            below = flat < -theta
            total, count = sum_over_ranks_((-flat * below).sum(0)), sum_over_ranks_(below.sum(0).to(flat.dtype))
            self.amp_neg.copy_(torch.where(count > 0, total / count.clamp_min(1), fallback) / self.scale)
        self.initialized.fill_(True)
        self._initialized_seen = True

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        """A token's mean |x| over each of `token_gain` groups of channels, with gradient: (..., 1) for one
        group, else (..., G, 1) (`_by_group` applies it); at least fp32 (no 0/0 under fp16)."""
        return _mean_abs(x, int(self.cfg.token_gain))

    def needs_init(self) -> bool:
        """Whether the data-dependent init is still due. The buffer is read (a host sync) only until it is
        first seen True; after that a Python flag answers, which torch.compile guards on as a constant, so
        an initialised site costs a compiled model no graph break. Loading a state dict resets the flag."""
        if self._initialized_seen:
            return False
        if torch.compiler.is_compiling():  # the one read runs outside the graph: a quiet graph break, once
            return torch.compiler.disable(TernarySpike._read_initialized)(self)
        return self._read_initialized()

    def _read_initialized(self) -> bool:
        self._initialized_seen = bool(self.initialized)
        return not self._initialized_seen

    def _load_from_state_dict(self, *args, **kwargs):
        self._initialized_seen = False
        super()._load_from_state_dict(*args, **kwargs)

    def init_state(self, batch: int, device, dtype=torch.float32) -> dict:
        if not self.cfg.lif:
            return {}
        zeros = torch.zeros(batch, self.channels, device=device, dtype=dtype)
        return {"v": zeros, "s": zeros.clone()}

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: dict | None = None, stats: "SpikeStats | None" = None,
                update_scale: bool = True):
        """x: (B, T, C). Returns (spikes (B, T, C), new LIF state, mean firing indicator (differentiable)).
        With a token gain the running scale, thresholds and amplitudes are those of x / gain.

        In training the running scale moves toward this batch's mean |x - offset| *after* the batch is
        spiked (so a forward and its recomputation under activation checkpointing see the same scale;
        the recomputation passes update_scale=False)."""
        if self.training and self.needs_init():
            self.init_from(x)
        xc = x - self.offset if self.centered else x
        gain = self.gain(xc) if self.cfg.token_gain else None
        if gain is not None:
            xc = _by_group(torch.div, xc, gain)
        if not self.cfg.lif:
            s, rate = self._code(xc, stats, update_scale)
        else:
            s, state, pos, neg = self._lif(xc, state)
            self._track_scale(xc, update_scale)
            if stats is not None:
                stats.add(pos.detach(), neg.detach())
            rate = (pos + neg).mean()
        if gain is not None:
            s = _by_group(torch.mul, s, gain)
        if self.centered:
            s = s + self.offset
        if self._annealing:
            s = self.mix_weight * s + (1 - self.mix_weight) * x
        return s, state, rate

    def _code(self, x: torch.Tensor, stats: "SpikeStats | None", update_scale: bool):
        """This step's spikes of x plus the residual steps' spikes of what it left; the mean firing
        indicator over the steps. Each step's indicators go into `stats` (its rates are per step)."""
        s, pos, neg = self.fire(x)
        self._track_scale(x, update_scale)
        if stats is not None:
            stats.add(pos.detach(), neg.detach())
        rate = (pos + neg).mean()
        if self.residual is None:
            return s, rate
        # the residual's gradient reaches x directly, not through this step's surrogate as well: the
        # chain rule through both (s2'(1 - s1'), a product of bumps) made training diverge (proxy, cm_v)
        left = x - s.detach()
        if self.training and self.residual.needs_init():
            self.residual.init_from(left)
        s_rest, rate_rest = self.residual._code(left, stats, update_scale)
        return s + s_rest, (rate + (self.steps - 1) * rate_rest) / self.steps

    def _track_scale(self, xc: torch.Tensor, update_scale: bool) -> None:
        if self.training and update_scale:
            with torch.no_grad():  # a new tensor, not in place: autograd saved the old scale for backward
                batch_scale = mean_over_ranks_(xc.detach().float().abs().mean(dim=tuple(range(xc.dim() - 1))))
                batch_scale = batch_scale.clamp_min(1e-6)
                batch_scale = batch_scale.to(self.scale.dtype)
                self.scale = torch.lerp(self.scale, batch_scale, self.scale_momentum)

    def _lif(self, x: torch.Tensor, state: dict | None):
        B, T, C = x.shape
        if not state:
            state = self.init_state(B, x.device, x.dtype)
        v, s_prev = state["v"], state["s"]
        beta = self.leak()
        m = self.cfg.micro_steps
        outs, poss, negs = [], [], []
        for t in range(T):
            acc = acc_pos = acc_neg = 0
            for _ in range(m):
                reset = s_prev.detach() if self.cfg.detach_reset else s_prev
                v = beta * v + x[:, t] - reset
                s_prev, pos, neg = self.fire(v)
                acc, acc_pos, acc_neg = acc + s_prev, acc_pos + pos, acc_neg + neg
            outs.append(acc / m)
            poss.append(acc_pos / m)
            negs.append(acc_neg / m)
        return torch.stack(outs, 1), {"v": v, "s": s_prev}, torch.stack(poss, 1), torch.stack(negs, 1)


class SpikeStats:
    """Counts per channel for one spike site: firing, sign balance, dead and saturated channels."""

    def __init__(self):
        self.tokens = 0
        self.pos = None
        self.neg = None

    def add(self, pos: torch.Tensor, neg: torch.Tensor) -> None:
        flat_pos, flat_neg = pos.reshape(-1, pos.shape[-1]), neg.reshape(-1, neg.shape[-1])
        self.add_counts(flat_pos.sum(0).double(), flat_neg.sum(0).double(), flat_pos.shape[0])

    def merge(self, other: "SpikeStats") -> None:
        if other.tokens:
            self.add_counts(other.pos, other.neg, other.tokens)

    def add_counts(self, pos: torch.Tensor, neg: torch.Tensor, tokens: int) -> None:
        self.pos = pos.clone() if self.pos is None else self.pos + pos
        self.neg = neg.clone() if self.neg is None else self.neg + neg
        self.tokens += tokens

    def summary(self) -> dict:
        """firing_rate (fraction non-zero), zero_fraction, pos/neg fractions, balance (pos - neg) / fired,
        dead (channels that never fired) and saturated (fired on every token) fractions."""
        if not self.tokens:
            return {}
        fired = (self.pos + self.neg) / self.tokens
        total_pos, total_neg = float(self.pos.sum()), float(self.neg.sum())
        n = self.tokens * len(self.pos)
        return {
            "firing_rate": (total_pos + total_neg) / n,
            "zero_fraction": 1 - (total_pos + total_neg) / n,
            "pos_fraction": total_pos / n,
            "neg_fraction": total_neg / n,
            "balance": (total_pos - total_neg) / max(total_pos + total_neg, 1.0),
            "dead_fraction": float((fired == 0).double().mean()),
            "saturated_fraction": float((fired >= 1).double().mean()),
            "tokens": self.tokens,
        }


def firing_rate_loss(rates: list[torch.Tensor], target: float) -> torch.Tensor:
    """Mean over sites of (firing rate - target)^2; differentiable through the surrogates.

    rates: the per-site mean firing indicators a forward returns (`StudentOutput.spike_rates`).
    """
    if not rates:
        raise ValueError("no spike sites to regularise")
    return torch.stack([(rate - target) ** 2 for rate in rates]).mean()


class TernaryLinear(_Annealed, nn.Linear):
    """BitNet b1.58 weights: W_q = gamma * round(clip(W / gamma, -1, 1)), straight-through.

    gamma = mean|W| over the whole matrix (scale="tensor", BitNet's) or over each output row (scale="row": a
    row of small weights no longer rounds to all zeros; either way one multiply per output after the
    additions). `mix` < 1 (the student's `ternary_anneal`, set with the spikes' annealing) blends the
    continuous weights in, W = mix * W_q + (1 - mix) * W, so training starts from fp weights as it starts
    from continuous activations; the gradient reaches W unchanged at every mix."""

    SCALES = ("tensor", "row")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale: str = "tensor"):
        if scale not in self.SCALES:
            raise ValueError(f"ternary_scale must be one of {self.SCALES}, got {scale!r}")
        super().__init__(in_features, out_features, bias=bias)
        self.scale_mode = scale
        self._init_mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        codes, gamma = self.ternary_codes()
        quantised = w + (codes * gamma - w).detach()
        if self._annealing:
            quantised = self.mix_weight * quantised + (1 - self.mix_weight) * w
        return F.linear(x, quantised, self.bias)

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in {-1, 0, +1} in the weight's dtype, gamma: a scalar, or (out, 1) with row scales): the
        weights the forward uses (at mix 1) are codes * gamma."""
        w = self.weight.detach()
        if self.scale_mode == "row":
            gamma = w.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)
        else:
            gamma = w.abs().mean().clamp_min(1e-8)
        return (w / gamma).round().clamp(-1, 1), gamma

    def nonzero_fraction(self) -> float:
        """The fraction of weights whose code is not 0: the additions a spiked input costs per firing."""
        return float((self.ternary_codes()[0] != 0).float().mean())


class RowQuantizedEmbedding(nn.Embedding):
    """An embedding (and the head tied to it) held as `bits`-bit integer codes times one scale per row (per
    token), symmetric absmax: E_q[v] = s_v * round(E[v] / s_v), s_v = max|E[v]| / (2^(bits-1) - 1), with
    straight-through gradients. A row is a token: the lookup quantises only the rows it reads (the same
    numbers as quantising the whole matrix), the tied head multiplies each output once by its s_v."""

    BITS = (4, 8)

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int):
        if bits not in self.BITS:
            raise ValueError(f"embedding_bits must be one of {self.BITS} (or 0 for fp), got {bits!r}")
        super().__init__(num_embeddings, embedding_dim)
        self.bits = bits

    def row_codes(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes in the weight's dtype, scales (rows, 1)) of `rows` (default: the whole matrix)."""
        w = (self.weight if rows is None else rows).detach()
        qmax = 2 ** (self.bits - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        return (w / scale).round().clamp(-qmax, qmax), scale

    def _quantised(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale = self.row_codes(w)
        return w + (codes * scale - w).detach()

    def quantised_weight(self) -> torch.Tensor:
        """The whole matrix as the tied head uses it."""
        return self._quantised(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._quantised(F.embedding(ids, self.weight))

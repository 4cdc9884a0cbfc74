"""The goose student: an RWKV-7 ("Goose") language model whose large matmuls take ternary spikes.

Read top to bottom: config and presets, time-mix, channel-mix, block, model, then the things around the
model (teacher-embedding init, save/load, parameter report, energy estimate).

Execution forms (same weights): `mode="chunked"` (training: the delta-rule state update in chunks, see
wkv.py) and `mode="recurrent"` (one token at a time, O(1) state per layer). Both take and return a state,
so training can carry state across consecutive windows and generation can feed one token per call.

Spike sites (where ternary spikes replace a dense activation) are the rows of SPIKE_SITES: the site
modules, the width checks and the energy estimate all read that table, so a new site is one row plus the
call where it sits in the forward. The default puts spikes at the input of every large matrix multiply,
so each of those becomes additions/subtractions of weight columns with skips for zeros: tm_r, tm_k, tm_v
(receptance/key/value inputs), tm_out (output projection input), cm_k (FFN up-projection input) and cm_v
(FFN down-projection input, unsigned since relu^2 >= 0). The small low-rank paths (decay, in-context
rate, value residual, gate) and the LM head stay dense; "head" and "block_in" are optional sites for
ablations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spikes import RowQuantizedEmbedding, SpikeConfig, SpikeStats, TernaryLinear, TernarySpike
from . import wkv as _wkv
from .wkv import wkv_chunked, wkv_fla, wkv_recurrent



@dataclass(frozen=True)
class SpikeSite:
    """One place where ternary spikes can replace a dense activation."""

    name: str
    module: str  # what holds it: "att" (time-mix), "ffn" (channel-mix), "block" or "head"
    width: str  # the StudentConfig field that is the spiked activation's width
    feeds: tuple[str, str] | None  # (in, out) widths of the matmul it turns into additions; None: none
    default: bool = True  # spiked unless a config's spike_sites says otherwise
    unsigned: bool = False  # spiked {0, +a} by default: its input is never negative
    matrix: str | None = None  # the attribute of its module that is the matmul it feeds (energy_report)


SPIKE_SITES = (
    SpikeSite("block_in", "block", "d_model", None, default=False),  # ln1's output, before the token shift
    SpikeSite("tm_r", "att", "d_model", ("d_model", "d_model"), matrix="receptance"),
    SpikeSite("tm_k", "att", "d_model", ("d_model", "d_model"), matrix="key"),
    SpikeSite("tm_v", "att", "d_model", ("d_model", "d_model"), matrix="value"),
    SpikeSite("tm_out", "att", "d_model", ("d_model", "d_model"), matrix="output"),
    SpikeSite("cm_k", "ffn", "d_model", ("d_model", "d_ffn"), matrix="key"),
    SpikeSite("cm_v", "ffn", "d_ffn", ("d_ffn", "d_model"), unsigned=True, matrix="value"),  # relu^2 >= 0
    # the head's matrix is the output layer: `head`, or the embedding when they are tied
    SpikeSite("head", "head", "d_model", ("d_model", "vocab_size"), default=False, matrix="head"),
)
SITES = {site.name: site for site in SPIKE_SITES}
ALL_SITES = tuple(SITES)
DEFAULT_SITES = tuple(site.name for site in SPIKE_SITES if site.default)
UNSIGNED_SITES = tuple(site.name for site in SPIKE_SITES if site.unsigned)
# where the student's spikes differ from a bare SpikeConfig: four per-token gain groups per site (three
# seeds of KD on the proxy, 0.5M tokens: 0.6-2.1 % lower PPL than no gain, docs/BENCHMARKS.md). A spike
# dict (a config's model.overrides, a saved config.json) fills only the fields it leaves out from these.
# Not with LIF: a membrane carried across tokens in units of x / g would have to be rescaled by g_t / g_{t-1}
# in hardware (thresholds times g no longer suffice), so LIF sites default to no gain
STUDENT_SPIKE_DEFAULTS = {"token_gain": 4}


def _student_spike(d: dict) -> SpikeConfig:
    """A student's SpikeConfig from a (possibly partial) spike dict: its fields, then the student defaults."""
    defaults = {} if d.get("lif") else STUDENT_SPIKE_DEFAULTS
    return SpikeConfig(**{**defaults, **d})


MAC_PJ, AC_PJ = 4.6, 0.9  # energy per op at 45 nm (Horowitz 2014), the SNN literature's convention


@dataclass
class StudentConfig:
    vocab_size: int = 50257
    d_model: int = 512
    n_layer: int = 8
    head_size: int = 64
    ffn_mult: float = 4.0
    tie_embeddings: bool = True
    spike_sites: tuple[str, ...] = DEFAULT_SITES
    # sites spiked {0, +a} (no negative branch, no centring): relu^2 >= 0 at cm_v. A site left out of it
    # is signed and centred: for cm_v three levels {mu - a_neg, mu, mu + a_pos} instead of two
    unsigned_sites: tuple[str, ...] = UNSIGNED_SITES
    # residual spike steps per site, e.g. {"cm_v": 2}: the site codes each token as K ternary spikes, each
    # spiking what the steps before it left (up to 3^K levels; K rounds of additions downstream)
    site_steps: dict[str, int] = field(default_factory=dict)
    spike: SpikeConfig = field(default_factory=lambda: _student_spike({}))
    ternary_weights: bool = False  # BitNet b1.58 weights for the large matrices
    ternary_scale: str = "tensor"  # their scale: one per matrix ("tensor", BitNet's) or per output row ("row")
    # the ternary weights blend in from continuous ones with the spikes (spike annealing's mix), not from step 0
    ternary_anneal: bool = False
    # 8 or 4: the embedding (and the head tied to it) as per-row integer codes times a row scale, trained
    # straight-through, as the ternary path stores it (1/4 or 1/8 of its fp32 bytes); 0 = fp32
    embedding_bits: int = 0
    chunk_size: int = 16
    # time-mix kernels: "torch" (wkv_chunked / wkv_recurrent, any device), "fla" (flash-linear-attention's
    # Triton kernels, CUDA only), "auto" (fla on CUDA when installed, else torch). A runtime choice: a model
    # saved with "fla" still loads and runs where fla cannot (the torch kernels, with a warning)
    wkv_backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.spike, dict):
            self.spike = _student_spike(self.spike)
        self.spike_sites = tuple(self.spike_sites)
        self.unsigned_sites = tuple(self.unsigned_sites)
        self.site_steps = dict(self.site_steps or {})
        unknown = (set(self.spike_sites) | set(self.unsigned_sites) | set(self.site_steps)) - set(ALL_SITES)
        if unknown:
            raise ValueError(f"unknown spike sites {sorted(unknown)}; choose from {ALL_SITES}")
        for site, steps in self.site_steps.items():
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"site_steps[{site!r}] must be a positive integer, got {steps!r}")
            if steps > 1 and self.spike.lif:
                raise ValueError("site_steps > 1 needs spike.lif off (LIF sites use spike.micro_steps)")
        for name in ("vocab_size", "d_model", "n_layer", "head_size", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.embedding_bits not in (0, *RowQuantizedEmbedding.BITS):
            raise ValueError(f"embedding_bits must be 0 (fp32), 4 or 8, got {self.embedding_bits!r}")
        if self.ternary_scale not in TernaryLinear.SCALES:
            raise ValueError(f"ternary_scale must be one of {TernaryLinear.SCALES}, got {self.ternary_scale!r}")
        if self.wkv_backend not in ("auto", "torch", "fla"):
            raise ValueError(f"wkv_backend must be auto, torch or fla, got {self.wkv_backend!r}")
        if not self.ffn_mult > 0:
            raise ValueError(f"ffn_mult must be > 0, got {self.ffn_mult!r}")
        if self.d_model % self.head_size:
            raise ValueError(f"d_model {self.d_model} is not a multiple of head_size {self.head_size}")
        groups = int(self.spike.token_gain)
        widths = {self.site_width(site) for site in self.spike_sites}
        if groups and any(w % groups for w in widths):
            raise ValueError(f"spike token_gain's {groups} channel groups must divide every spiked width "
                             f"({', '.join(map(str, sorted(widths)))}: d_model and d_ffn)")

    @property
    def n_head(self) -> int:
        return self.d_model // self.head_size

    def site_width(self, site: str) -> int:
        """The width of the activation a spike site spikes (SPIKE_SITES)."""
        return getattr(self, SITES[site].width)

    @property
    def d_ffn(self) -> int:
        return int(round(self.d_model * self.ffn_mult / 32)) * 32 or 32

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spike_sites"] = list(self.spike_sites)
        d["unsigned_sites"] = list(self.unsigned_sites)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        """A saved config (config.json). One saved before a field existed gets what it meant then: a spike
        dict without token_gain had no gain (not today's default of four groups)."""
        d = dict(d)
        if isinstance(d.get("spike"), dict) and "token_gain" not in d["spike"]:
            d["spike"] = {**d["spike"], "token_gain": 0}
        return cls(**d)


PRESETS = {
    # tests: well under 1M parameters at its own small vocabulary
    "tiny": dict(vocab_size=512, d_model=64, n_layer=2, head_size=16),
    # the CPU proxy of GPT-2 small -> base (52.6M / 124M = 0.42x): 2.37M parameters = 0.44x the 5.39M of
    # shared/teachers/enwiki-tiny (GPT-2 architecture, 4 x 256, 8192-token vocabulary)
    "proxy": dict(vocab_size=8192, d_model=160, n_layer=3, head_size=32),
    # ~10M at the 8192-token vocabulary of shared/teachers/enwiki-tiny (twice that teacher's size)
    "small": dict(vocab_size=8192, d_model=320, n_layer=6, head_size=64),
    # ~50M at GPT-2's vocabulary with tied embeddings
    "base": dict(vocab_size=50257, d_model=512, n_layer=8, head_size=64),
}


def preset(name: str, **overrides) -> StudentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return StudentConfig(**{**PRESETS[name], **overrides})


def config_for_store(name: str, store_vocab_size: int, **overrides) -> StudentConfig:
    """A preset sized to a teacher cache's vocabulary (the store's `spec.vocab_size`)."""
    vocab_size = store_vocab_size
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ValueError(f"vocab_size {overrides['vocab_size']} is not the store's vocabulary of {vocab_size} (the "
                         f"student's logits are compared with the teacher's token by token): leave it out, the "
                         f"student is sized to its store")
    overrides.pop("vocab_size", None)
    return preset(name, vocab_size=vocab_size, **overrides)


# ---------------------------------------------------------------------------------------------
# Layers


def _lora_dim(c: int, factor: float, power: float = 0.5) -> int:
    return max(32, int(round(factor * c**power / 32) * 32))


def _ortho(shape, scale: float) -> torch.Tensor:
    x = torch.empty(shape)
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    nn.init.orthogonal_(x, gain=gain * scale)
    return x


def _linear(cfg: StudentConfig, n_in: int, n_out: int) -> nn.Linear:
    if cfg.ternary_weights:
        return TernaryLinear(n_in, n_out, bias=False, scale=cfg.ternary_scale)
    return nn.Linear(n_in, n_out, bias=False)


class SpikeSites(nn.Module):
    """The spike modules of one module (`SpikeSite.module`), by site name; a site that is off passes its
    input through."""

    def __init__(self, cfg: StudentConfig, module: str):
        super().__init__()
        self.spikes = nn.ModuleDict(
            {s.name: TernarySpike(cfg.site_width(s.name), cfg.spike, steps=cfg.site_steps.get(s.name, 1),
                                  signed=s.name not in cfg.unsigned_sites and not cfg.spike.binary)
             for s in SPIKE_SITES if s.module == module and s.name in cfg.spike_sites}
        )

    def forward(self, site: str, x: torch.Tensor, state: dict, ctx: dict) -> torch.Tensor:
        if site not in self.spikes:
            return x
        s, lif_state, rate = self.spikes[site](x, state.get(site), ctx["stats"].get(site),
                                               update_scale=ctx.get("update_scale", True))
        if lif_state is not None:  # only LIF sites carry a membrane across tokens
            state[site] = lif_state
        ctx["rates"].append(rate)
        return s


class TimeMix(nn.Module):
    """RWKV-7 time-mix (BlinkDL RWKV-v7 x070 initialisation)."""

    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        C, H, N, L = cfg.d_model, cfg.n_head, cfg.head_size, cfg.n_layer
        self.layer, self.n_head, self.head_size, self.chunk_size = layer, H, N, cfg.chunk_size
        self.wkv_backend = cfg.wkv_backend
        ratio_0_to_1 = layer / max(L - 1, 1)
        ratio_1_to_0 = 1.0 - layer / L
        ddd = (torch.arange(C) / C).view(1, 1, C)
        self.x_r = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))
        self.x_w = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_k = nn.Parameter(1.0 - (ddd ** (0.9 * ratio_1_to_0) + 0.4 * ratio_0_to_1))
        self.x_v = nn.Parameter(1.0 - (ddd ** (0.4 * ratio_1_to_0) + 0.6 * ratio_0_to_1))
        self.x_a = nn.Parameter(1.0 - ddd ** (0.9 * ratio_1_to_0))
        self.x_g = nn.Parameter(1.0 - ddd ** (0.2 * ratio_1_to_0))

        n = torch.arange(C) / max(C - 1, 1)
        decay_speed = -7 + 5 * n ** (0.85 + 1.0 * ratio_0_to_1**0.5)
        self.w0 = nn.Parameter(decay_speed.view(1, 1, C) + 0.5)  # + 0.5: offsets the softplus below
        d_w, d_a, d_v, d_g = _lora_dim(C, 1.8), _lora_dim(C, 1.8), _lora_dim(C, 1.3), _lora_dim(C, 0.6, 0.8)
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, d_w)), nn.Parameter(_ortho((d_w, C), 0.1))
        self.a0 = nn.Parameter(torch.zeros(1, 1, C))
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, d_a)), nn.Parameter(_ortho((d_a, C), 0.1))
        if layer > 0:  # value residual; layer 0 *is* the first values, so it has none (they'd get no gradient)
            self.v0 = nn.Parameter(torch.ones(1, 1, C))
            self.v1, self.v2 = nn.Parameter(torch.zeros(C, d_v)), nn.Parameter(_ortho((d_v, C), 0.1))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, d_g)), nn.Parameter(_ortho((d_g, C), 0.1))
        self.k_k = nn.Parameter(torch.full((1, 1, C), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))

        self.receptance, self.key = _linear(cfg, C, C), _linear(cfg, C, C)
        self.value, self.output = _linear(cfg, C, C), _linear(cfg, C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.receptance.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.key.weight.uniform_(-0.05 / C**0.5, 0.05 / C**0.5)
            self.value.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.output.weight.zero_()
        self.spikes = SpikeSites(cfg, "att")

    def forward(self, x, v_first, state: dict, ctx: dict):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = torch.cat([state["shift"].unsqueeze(1), x[:, :-1]], dim=1)  # token shift
        state["shift"] = x[:, -1]
        xx = prev - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g
        sp = state["spikes"]

        r = self.receptance(self.spikes("tm_r", xr, sp, ctx))
        k = self.key(self.spikes("tm_k", xk, sp, ctx))
        v = self.value(self.spikes("tm_v", xv, sp, ctx))
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # soft-clamped to < -0.5
        log_w = -torch.exp(w)  # log decay: decay = exp(-exp(w)) in (0.545, 1)
        if self.layer == 0:
            v_first = v
        else:  # value residual toward the first layer's values
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2  # output gate

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)  # removal key
        k = k * (1 + (a - 1) * self.k_a)
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        fla_here = _wkv.fla_runs_on(x)
        if self.wkv_backend == "fla" and not fla_here:  # shown once: the warnings module's default filter
            warnings.warn("wkv_backend 'fla' needs CUDA and flash-linear-attention (pip install "
                          "'goose-distill[cuda]'); using the torch kernels", stacklevel=2)
        if fla_here and self.wkv_backend in ("fla", "auto"):
            wkv, kw = wkv_fla, {"recurrent": ctx["mode"] == "recurrent"}
        elif ctx["mode"] == "chunked":
            wkv, kw = wkv_chunked, {"chunk_size": self.chunk_size}
        else:
            wkv, kw = wkv_recurrent, {}
        o, state["wkv"] = wkv(heads(r), heads(log_w), heads(k), heads(v), heads(-kk), heads(kk * a), state["wkv"], **kw)
        o = self.ln_x(o.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(-1, keepdim=True) * heads(v)  # current-token bonus
        o = o + bonus.view(B, T, C)
        return self.output(self.spikes("tm_out", o * g, sp, ctx)), v_first


class ChannelMix(nn.Module):
    """RWKV-7 channel-mix: token shift, W_v relu(W_k x)^2."""

    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        C = cfg.d_model
        ddd = (torch.arange(C) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - ddd ** ((1.0 - layer / cfg.n_layer) ** 4))
        self.key, self.value = _linear(cfg, C, cfg.d_ffn), _linear(cfg, cfg.d_ffn, C)
        with torch.no_grad():
            self.key.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
            self.value.weight.zero_()
        self.spikes = SpikeSites(cfg, "ffn")

    def forward(self, x, state: dict, ctx: dict):
        prev = torch.cat([state["shift"].unsqueeze(1), x[:, :-1]], dim=1)
        state["shift"] = x[:, -1]
        xk = x + (prev - x) * self.x_k
        sp = state["spikes"]
        k = torch.relu(self.key(self.spikes("cm_k", xk, sp, ctx))) ** 2
        return self.value(self.spikes("cm_v", k, sp, ctx))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, layer: int):
        super().__init__()
        C = cfg.d_model
        self.ln0 = nn.LayerNorm(C) if layer == 0 else None
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.att, self.ffn = TimeMix(cfg, layer), ChannelMix(cfg, layer)
        self.spikes = SpikeSites(cfg, "block")

    def forward(self, x, v_first, state: dict, ctx: dict):
        if self.ln0 is not None:
            x = self.ln0(x)
        h = self.spikes("block_in", self.ln1(x), state["spikes"], ctx)
        dx, v_first = self.att(h, v_first, state["att"], ctx)
        x = x + dx
        x = x + self.ffn(self.ln2(x), state["ffn"], ctx)
        return x, v_first


@dataclass
class StudentOutput:
    logits: torch.Tensor
    state: list
    hidden_states: list | None = None  # [embedding output, block 1 output, ..., block L output]
    spike_rates: list | None = None  # per site and layer: mean firing indicator (differentiable)
    spike_stats: dict | None = None  # "layer.site" -> SpikeStats (with collect_stats=True)


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        V, C = cfg.vocab_size, cfg.d_model
        self.emb = RowQuantizedEmbedding(V, C, cfg.embedding_bits) if cfg.embedding_bits else nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head_spike = SpikeSites(cfg, "head")
        self.head = None if cfg.tie_embeddings else nn.Linear(C, V, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (less memory, ~1.3x time)
        with torch.no_grad():
            if cfg.tie_embeddings:  # the embedding doubles as the output layer: GPT-2's scale
                nn.init.normal_(self.emb.weight, std=0.02)
            else:  # RWKV: tiny embedding (ln0 normalises it), orthogonal head
                nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
                gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
                nn.init.orthogonal_(self.head.weight, gain=gain)

    # ---- state -------------------------------------------------------------------------------
    def init_state(self, batch: int, device=None) -> list:
        device = device or self.emb.weight.device
        C, H, N = self.cfg.d_model, self.cfg.n_head, self.cfg.head_size
        zeros = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return [
            {"att": {"shift": zeros(batch, C), "wkv": zeros(batch, H, N, N), "spikes": {}},
             "ffn": {"shift": zeros(batch, C), "spikes": {}}, "spikes": {}}
            for _ in self.blocks
        ] + [{"spikes": {}}]  # the last entry holds the head site's LIF state

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids, state=None, *, mode: str = "chunked", output_hidden_states: bool = False,
                collect_stats: bool = False) -> StudentOutput:
        """input_ids (B, T) -> logits (B, T, V) and the state after the last token (not detached)."""
        if mode not in ("chunked", "recurrent"):
            raise ValueError(f"mode must be 'chunked' or 'recurrent', got {mode!r}")
        B = input_ids.shape[0]
        state = self.init_state(B, input_ids.device) if state is None else copy_state(state)
        stats = {} if collect_stats else None
        x = self.emb(input_ids)
        hidden = [x] if output_hidden_states else None
        v_first = None
        rates = []
        for i, (block, st) in enumerate(zip(self.blocks, state)):
            ctx = {"mode": mode, "rates": rates, "stats": _SiteStats(stats, i)}
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, v_first, state[i] = _checkpointed(block, x, v_first, st, ctx)
            else:
                x, v_first = block(x, v_first, st, ctx)
            if hidden is not None:
                hidden.append(x)
        ctx = {"mode": mode, "rates": rates, "stats": _SiteStats(stats, "head")}
        h = self.head_spike("head", self.ln_out(x), state[-1]["spikes"], ctx)
        if self.head is not None:
            logits = self.head(h)
        else:  # tied: the embedding matrix as the lookup uses it (quantised with embedding_bits)
            tied = self.emb.quantised_weight() if isinstance(self.emb, RowQuantizedEmbedding) else self.emb.weight
            logits = h @ tied.t()
        return StudentOutput(logits, state, hidden, rates, stats)

    def param_groups(self, weight_decay: float, *, spike_lr: float | None = None, exclude=()) -> list[dict]:
        """Optimizer groups, as nanoGPT's configure_optimizers: weight decay on the large matrices only, none
        on norms, biases, mixes and spike parameters. With `spike_lr` every site's spike parameters
        (thresholds, amplitudes, offsets, leaks; the head's included) get a group of their own at that
        learning rate. `exclude`: parameters another group holds (FSDP's replicated ones)."""
        decay, no_decay, spikes = [], [], []
        apart = {id(p) for p in exclude}
        for name, p in self.named_parameters():
            if id(p) in apart:
                continue
            if spike_lr is not None and ".spikes." in name:
                spikes.append(p)
                continue
            big = p.ndim == 2 and ".spikes." not in name and not name.endswith("r_k")
            (decay if big else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        if spikes:
            groups.append({"params": spikes, "weight_decay": 0.0, "name": "spikes", "lr": spike_lr})
        return groups

    def spike_modules(self) -> dict[str, TernarySpike]:
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, TernarySpike):
                out[name] = module
        return out

    def annealed_modules(self) -> list[nn.Module]:
        """What spike annealing blends in (each has a `mix`): every spike site, and with `ternary_anneal` every
        ternary matrix."""
        return [m for m in self.modules() if isinstance(m, TernarySpike)
                or (isinstance(m, TernaryLinear) and self.cfg.ternary_anneal)]

    def set_spike_mix(self, mix: float) -> None:
        """Spike annealing: 0 = continuous activations (and weights, with `ternary_anneal`), 1 = fully ternary."""
        for module in self.annealed_modules():
            module.mix = float(mix)

    # ---- around the model --------------------------------------------------------------------
    @torch.no_grad()
    def init_embedding_from(self, matrix: torch.Tensor) -> None:
        """Initialise the token embedding from a teacher's (V x d_t) matrix, PCA-projected to d_model."""
        emb = project_embedding(torch.as_tensor(matrix).float(), self.cfg.d_model)
        if emb.shape[0] != self.cfg.vocab_size:
            raise ValueError(f"teacher embedding has {emb.shape[0]} rows, student vocabulary is {self.cfg.vocab_size}")
        if self.cfg.tie_embeddings:  # keep GPT-2's output scale for the tied head
            emb = emb * (0.02 / emb.std().clamp_min(1e-8))
        self.emb.weight.copy_(emb)

    def save_pretrained(self, folder) -> None:
        """config.json and model.safetensors, each written to a temporary name and renamed into place."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "model.safetensors.tmp"
        save_model(self, str(tmp))
        os.replace(tmp, folder / "model.safetensors")
        tmp = folder / "config.json.tmp"
        tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        os.replace(tmp, folder / "config.json")

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "Student":
        """Load a saved student; a damaged config.json or model.safetensors is a GooseError naming the file."""
        from safetensors.torch import load_model

        from ..errors import GooseError

        folder = Path(folder)
        try:
            raw = json.loads((folder / "config.json").read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            cfg = StudentConfig.from_dict(raw)
            model = cls(cfg)
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise GooseError(f"cannot read the student config {folder / 'config.json'}: {_one_line(exc)}") from None
        try:
            load_model(model, str(folder / "model.safetensors"), device=str(device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, torch RuntimeError
            raise GooseError(f"cannot load the student weights {folder / 'model.safetensors'} (damaged, truncated "
                             f"or from another config): {_one_line(exc)}") from None
        return model.to(device)

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts by component: embedding, head, time-mix, channel-mix, spikes, norms."""
        out = {"embedding": 0, "head": 0, "time_mix": 0, "channel_mix": 0, "spikes": 0, "norms": 0}
        for name, p in self.named_parameters():
            if ".spikes." in name or name.startswith("head_spike"):
                key = "spikes"
            elif name.startswith("emb"):
                key = "embedding"
            elif name.startswith("head"):
                key = "head"
            elif ".att." in name and ".ln_x" not in name:
                key = "time_mix"
            elif ".ffn." in name:
                key = "channel_mix"
            else:
                key = "norms"
            out[key] += p.numel()
        out["total"] = sum(out.values())
        return out

    def _steps_per_token(self, site: str) -> int:
        return self.cfg.site_steps.get(site, 1) * (self.cfg.spike.micro_steps if self.cfg.spike.lif else 1)

    def _site_matrix(self, layer, site: SpikeSite) -> nn.Module:
        """The linear layer a spike site feeds (its row's `matrix`); the head's is the (tied) output layer."""
        if site.module == "head":
            return self.head if self.head is not None else self.emb
        return getattr(getattr(self.blocks[layer], site.module), site.matrix)

    def energy_report(self, stats: dict) -> dict:
        """Per-token op counts and energy (45 nm: MAC 4.6 pJ, AC 0.9 pJ) next to the dense equivalent.

        Each matmul is counted by what its operands are:
        - fp input x fp weights: in x out MACs;
        - ternary spikes x fp weights: one accumulate per *non-zero* input per output (rate x in x out ACs);
        - ternary spikes x ternary weights (`ternary_weights`): an addition only where both are non-zero
          (rate x nonzero-weight fraction x in x out ACs: a spike's value is its channel's amplitude, so the
          sum is of fp amplitudes, not of integers), plus one multiply per output by the weight scale;
        - fp input x ternary weights: nonzero-weight fraction x in x out ACs, plus the scale's out MACs.
        Full-precision parts are MACs: the low-rank paths (decay, in-context rate, value residual, gate),
        the delta-rule state update (decay, read, two writes, output read: 5 x H x N^2) and the per-token
        gains (2 x in + groups x out per spiked matmul). Elementwise work (norms, token shift, activations)
        is left out of both sides. Firing rates are per step: a site with K steps per token (residual steps,
        LIF micro-steps) costs K times its rate. `parts` gives each component's energy in pJ per token.
        """
        cfg = self.cfg
        H, N = cfg.n_head, cfg.head_size
        rate = {}
        for key, st in stats.items():
            summary = st.summary()
            if summary:
                rate[key] = summary["firing_rate"]
        parts = {"projections": 0.0, "head": 0.0, "low_rank": 0.0, "state": 0.0, "gains": 0.0, "weight_scales": 0.0}
        totals = {"macs": 0.0, "acs": 0.0, "dense": 0.0}

        def add(part: str, macs: float = 0.0, acs: float = 0.0) -> None:
            parts[part] += macs * MAC_PJ + acs * AC_PJ
            totals["macs"] += macs
            totals["acs"] += acs

        def matmul(part: str, layer, site: SpikeSite) -> None:
            n_in, n_out = (getattr(cfg, w) for w in site.feeds)
            ops = n_in * n_out
            totals["dense"] += ops
            key = f"{layer}.{site.name}"
            matrix = self._site_matrix(layer, site)
            weights = matrix.nonzero_fraction() if isinstance(matrix, TernaryLinear) else None
            fired = rate[key] * self._steps_per_token(site.name) if key in rate else None
            if fired is None and weights is None:
                add(part, macs=ops)
                return
            add(part, acs=ops * (1.0 if fired is None else fired) * (1.0 if weights is None else weights))
            if weights is not None:
                add("weight_scales", macs=n_out)
            if fired is not None and cfg.spike.token_gain:  # its mean, thresholds times it, each group's outputs
                add("gains", macs=2 * n_in + int(cfg.spike.token_gain) * n_out)

        for i in range(cfg.n_layer):
            att = self.blocks[i].att
            for site in SPIKE_SITES:
                if site.feeds is not None and site.module != "head":
                    matmul("projections", i, site)
            lora = sum(p.numel() for n, p in att.named_parameters(recurse=False)
                       if n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"))
            add("low_rank", macs=lora)
            add("state", macs=5 * H * N * N)
            totals["dense"] += lora + 5 * H * N * N
        matmul("head", "head", SITES["head"])  # the LM head, spiked or not
        energy = totals["macs"] * MAC_PJ + totals["acs"] * AC_PJ
        return {
            "macs_per_token": totals["macs"],
            "acs_per_token": totals["acs"],
            "energy_pj_per_token": energy,
            "dense_macs_per_token": totals["dense"],
            "dense_energy_pj_per_token": totals["dense"] * MAC_PJ,
            "energy_ratio_vs_dense": energy / (totals["dense"] * MAC_PJ),
            "parts_pj_per_token": parts,
        }


def _checkpointed(block, x, v_first, state, ctx):
    """One block under activation checkpointing. The block writes its new state into the dicts it is
    given, so each (re)computation gets fresh copies of the incoming state."""
    from torch.utils.checkpoint import checkpoint

    calls = [0]
    spikes = [m for m in block.modules() if isinstance(m, TernarySpike)]
    scales_at_forward = [m.scale for m in spikes]  # the forward replaces (not mutates) these in training

    def run(x, v_first):
        st = copy_state(state)
        if calls[0] == 0:
            calls[0] += 1
            return (*block(x, v_first, st, ctx), st)
        # the recomputation in backward: same spike scales as the forward, no new rates or scale updates
        current = [m.scale for m in spikes]
        for m, sc in zip(spikes, scales_at_forward):
            m.scale = sc
        try:
            out = block(x, v_first, st, {**ctx, "rates": [], "update_scale": False})
        finally:
            for m, sc in zip(spikes, current):
                m.scale = sc
        return (*out, st)

    return checkpoint(run, x, v_first, use_reentrant=False)


class _SiteStats:
    """Hands each spike site of one layer its SpikeStats (or None when not collecting)."""

    def __init__(self, stats: dict | None, layer):
        self.stats, self.layer = stats, layer

    def get(self, site: str):
        if self.stats is None:
            return None
        return self.stats.setdefault(f"{self.layer}.{site}", SpikeStats())


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


def copy_state(state: list) -> list:
    """A shallow structural copy, so a forward never mutates the caller's state dicts."""
    if isinstance(state, dict):
        return {k: copy_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [copy_state(v) for v in state]
    return state


def detach_state(state):
    """The same state cut from the graph (truncated BPTT across consecutive windows)."""
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [detach_state(v) for v in state]
    return state.detach()


def project_embedding(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """(V x d_t) -> (V x width): truncated PCA when narrower (centred, top principal directions), zero-padded
    extra columns with small noise when wider, unchanged when equal."""
    V, d = matrix.shape
    if width == d:
        return matrix.clone()
    if width > d:
        extra = torch.randn(V, width - d) * matrix.std() * 0.01
        return torch.cat([matrix, extra], dim=1)
    centred = matrix - matrix.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:width].t()

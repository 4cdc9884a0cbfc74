"""The ternary inference path: a trained student's spiked matmuls run over packed weights, reading only the
weight rows of inputs that fired (CPU).

`ternary_student(model)` returns a copy of a fully ternary student (`ternary_weights`, spike annealing done)
in which
- every ternary matrix is a `PackedTernaryLinear`: its codes 2 bits each, stored input-major, so a spike
  code of 0 skips that input's whole row, and a fired input's row is unpacked and accumulated into every
  output (`KERNELS`, C), then one multiply per output by the weight scale;
- a spiked (or `embedding_bits`-quantised) head is a `PackedHead`: the tied embedding (or untied head)
  stored transposed (d_model rows of vocabulary entries: fp32, int8 or packed int4 codes with a scale per
  token), so again only the fired inputs' rows are read; a tied model's lookup reads the same storage.
Everything else (norms, token shift, low-rank paths, the state update) is the training model's own code,
so the path computes the same function as `Student.forward` in eval, up to float summation order: the
spike sites emit s = g * a * code + mu, and W s = W (s - mu) + W mu, with W mu a bias computed once.

Each packed layer counts what it executed: the rows read (fired inputs) against the rows a dense matmul
reads, the row element updates and the additions of non-zero weights. `measured_ops(model)` sums them for
`goose eval` and the benchmark, beside `Student.energy_report`'s estimate. The kernels are one torch custom
op (`fired_rows_op`), so the packed student also runs under torch.compile (`goose generate --ternary
--compile`).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib

import torch
import torch.nn as nn

from ..errors import GooseError
from ..native import build_library
from .model import SPIKE_SITES, Student
from .spikes import RowQuantizedEmbedding, TernaryLinear

# ---- the kernels -------------------------------------------------------------------------------
# C source kept in this module (not a .c file beside it), so an exported folder's copy of this file, which
# transformers' loader copies on its own, still builds them (`native.build_library`)
KERNELS = r"""/* The ternary path's matmuls: out[m] = sum over the inputs i with x[m, i] != 0 of x[m, i] * W[i, :].
 *
 * W is stored input-major (row i holds input i's weight to every output), so an input that did not fire
 * (a spike code of 0) costs nothing: its row is never read. For each fired input the row is unpacked and
 * accumulated, x * (+1, 0 or -1) for ternary codes: a vector multiply-add by the code, which on this
 * CPU costs what an add does (a select-and-add, additions only, measured 1.4x slower at the head's width).
 *
 *   goose_ternary_rows: 2-bit codes, 4 to a byte: 00 = 0, 01 = +1, 10 = -1 (11 unused). A row of R bytes
 *                       covers 4R outputs (zero-padded): bits 2k and 2k+1 of byte q hold output k * R + q,
 *                       so unpacking is four contiguous passes of shifts and masks, vectorised.
 *   goose_int8_rows:    int8 codes, a row of R bytes, one output each (the head of an 8-bit embedding).
 *   goose_int4_rows:    signed 4-bit codes (-7..7), 2 to a byte: a row of R bytes covers 2R outputs, the
 *                       low nibble of byte q output q, the high nibble output R + q (a 4-bit embedding).
 *   goose_fp32_rows:    fp32 weights, a row of R floats (the fp head of a spiked embedding or head).
 *
 * out has M rows of out_width floats, all written (out_width = the padded row width: 4R, R, 2R, R).
 * row_nnz[i] is the number of non-zero weights in row i: *adds is increased by it for every fired row (the
 * additions that change an output). Each returns the fired inputs over the M rows (the rows of W read),
 * or -1 on bad arguments.
 */
#include <stdint.h>
#include <string.h>

#define GOOSE_ROWS_LOOP(WIDTH, BODY)                                                   \
    if (M < 0 || n_in < 0 || R < 0 || out_width != (WIDTH)) return -1;                \
    int64_t fired = 0, added = 0;                                                     \
    for (int64_t m = 0; m < M; m++) {                                                 \
        const float *xm = x + m * n_in;                                               \
        float *restrict o = out + m * out_width;                                      \
        memset(o, 0, sizeof(float) * out_width);                                      \
        for (int64_t i = 0; i < n_in; i++) {                                          \
            const float v = xm[i];                                                    \
            if (v == 0.0f) continue;                                                  \
            fired++;                                                                  \
            added += row_nnz[i];                                                      \
            BODY                                                                      \
        }                                                                             \
    }                                                                                 \
    *adds += added;                                                                   \
    return fired;

int64_t goose_ternary_rows(const float *x, int64_t M, int64_t n_in, const uint8_t *w, int64_t R,
                           const int64_t *row_nnz, float *out, int64_t out_width, int64_t *adds) {
    GOOSE_ROWS_LOOP(4 * R, {
        const uint8_t *restrict p = w + i * R;
        for (int k = 0; k < 4; k++) {
            float *restrict ok = o + k * R;
            for (int64_t q = 0; q < R; q++) {
                const int b = p[q] >> (2 * k);
                ok[q] += v * (float)((b & 1) - ((b >> 1) & 1));
            }
        }
    })
}

int64_t goose_int8_rows(const float *x, int64_t M, int64_t n_in, const int8_t *w, int64_t R,
                        const int64_t *row_nnz, float *out, int64_t out_width, int64_t *adds) {
    GOOSE_ROWS_LOOP(R, {
        const int8_t *restrict c = w + i * R;
        for (int64_t j = 0; j < R; j++) o[j] += v * (float)c[j];
    })
}

int64_t goose_int4_rows(const float *x, int64_t M, int64_t n_in, const uint8_t *w, int64_t R,
                        const int64_t *row_nnz, float *out, int64_t out_width, int64_t *adds) {
    GOOSE_ROWS_LOOP(2 * R, {
        const uint8_t *restrict p = w + i * R;
        float *restrict hi = o + R;
        for (int64_t q = 0; q < R; q++) o[q] += v * (float)(((p[q] & 15) ^ 8) - 8);
        for (int64_t q = 0; q < R; q++) hi[q] += v * (float)(((p[q] >> 4) ^ 8) - 8);
    })
}

int64_t goose_fp32_rows(const float *x, int64_t M, int64_t n_in, const float *w, int64_t R,
                        const int64_t *row_nnz, float *out, int64_t out_width, int64_t *adds) {
    GOOSE_ROWS_LOOP(R, {
        const float *restrict r = w + i * R;
        for (int64_t j = 0; j < R; j++) o[j] += v * r[j];
    })
}
"""

# name -> (kernel, weight dtype, outputs per stored element)
FORMATS = {"ternary2": ("goose_ternary_rows", torch.uint8, 4), "int8": ("goose_int8_rows", torch.int8, 1),
           "int4": ("goose_int4_rows", torch.uint8, 2), "fp32": ("goose_fp32_rows", torch.float32, 1)}
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
# the custom op's name carries the kernels' digest: goose and an exported folder of another goose version in
# one process each get their own op (a second definition of one name would silently replace the first)
KERNELS_DIGEST = hashlib.sha256(KERNELS.encode()).hexdigest()[:12]


def _declare(lib: ctypes.CDLL) -> None:
    for kernel, _, _ in FORMATS.values():
        fn = getattr(lib, kernel)
        fn.argtypes, fn.restype = _ARGS, ctypes.c_int64


def library() -> ctypes.CDLL:
    return build_library(f"goose_ternary_{KERNELS_DIGEST}", KERNELS, _declare)


# ---- the packed formats ---------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) codes in {-1, 0, +1} -> (n_in, R) uint8, R = ceil(n_out / 4): row i holds input i's
    codes for every output, 2 bits each (00 = 0, 01 = +1, 10 = -1); bits 2k, 2k+1 of byte q are output
    k * R + q (the layout the kernels unpack in four contiguous passes)."""
    n_out, n_in = codes.shape
    R = -(-n_out // 4)
    rows = torch.zeros(n_in, 4 * R, dtype=torch.uint8)
    c = codes.t().to(torch.int8)
    rows[:, :n_out] = torch.where(c == 1, 1, torch.where(c == -1, 2, 0)).to(torch.uint8)
    rows = rows.view(n_in, 4, R)
    return (rows[:, 0] | (rows[:, 1] << 2) | (rows[:, 2] << 4) | (rows[:, 3] << 6)).contiguous()


def unpack_codes(packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """The inverse of pack_codes: (n_out, n_in) float codes (the slow, obviously correct reference)."""
    n_in, R = packed.shape
    planes = torch.stack([(packed >> (2 * k)) & 3 for k in range(4)], dim=1).reshape(n_in, 4 * R)[:, :n_out]
    return ((planes == 1).float() - (planes == 2).float()).t().contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) integer codes in -7..7 -> (n_in, R) uint8, R = ceil(n_out / 2): row i holds input i's
    codes, two's-complement nibbles, the low one of byte q output q, the high one output R + q."""
    n_out, n_in = codes.shape
    R = -(-n_out // 2)
    rows = torch.zeros(n_in, 2 * R, dtype=torch.uint8)
    rows[:, :n_out] = (codes.t().to(torch.int16) & 15).to(torch.uint8)
    return (rows[:, :R] | (rows[:, R:] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """The inverse of pack_int4: (n_out, n_in) float codes."""
    nibbles = torch.cat([packed & 15, packed >> 4], dim=1)[:, :n_out].to(torch.int16)
    return ((nibbles ^ 8) - 8).float().t().contiguous()


def fired_rows_matmul(x: torch.Tensor, weights: torch.Tensor, row_nnz: torch.Tensor, fmt: str):
    """x (M, n_in) fp32 times input-major `weights` stored in format `fmt` (FORMATS), reading only the rows of
    inputs that are non-zero: (out (M, padded width), rows read, additions done). The C kernel trusts its
    pointers, so every shape and dtype is checked here."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown packed format {fmt!r}; choose from {sorted(FORMATS)}")
    kernel, dtype, per_element = FORMATS[fmt]
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"fired_rows_matmul takes a 2-D fp32 CPU input, got {tuple(x.shape)} {x.dtype} {x.device}")
    M, n_in = x.shape
    if weights.dim() != 2 or weights.dtype != dtype or weights.shape[0] != n_in or not weights.is_contiguous():
        raise ValueError(f"{fmt} weights must be a contiguous {dtype} ({n_in}, R) tensor, got "
                         f"{tuple(weights.shape)} {weights.dtype}")
    if row_nnz.shape != (n_in,) or row_nnz.dtype != torch.int64 or not row_nnz.is_contiguous():
        raise ValueError(f"row_nnz must be a contiguous int64 ({n_in},) tensor")
    x = x.contiguous()
    R = weights.shape[1]
    out = torch.empty(M, per_element * R, dtype=torch.float32)
    adds = ctypes.c_int64(0)
    fired = getattr(library(), kernel)(x.data_ptr(), M, n_in, weights.data_ptr(), R, row_nnz.data_ptr(),
                                       out.data_ptr(), per_element * R, ctypes.addressof(adds))
    if fired < 0:
        raise RuntimeError(f"{kernel} rejected its arguments")
    return out, fired, adds.value


def _define_fired_rows_op():
    """fired_rows_matmul as a torch custom op, so torch.compile fuses the rest of a step around the C call
    (one opaque node, no graph break); (rows read, additions) come back as a tensor the layer adds to its
    counters."""

    @torch.library.custom_op(f"goose::fired_rows_{KERNELS_DIGEST}", mutates_args=())
    def fired_rows(x: torch.Tensor, weights: torch.Tensor, row_nnz: torch.Tensor,
                   fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, fired, adds = fired_rows_matmul(x, weights, row_nnz, fmt)
        return out, torch.tensor([fired, adds], dtype=torch.int64)

    @fired_rows.register_fake
    def _(x, weights, row_nnz, fmt):
        return x.new_empty(x.shape[0], FORMATS[fmt][2] * weights.shape[1]), torch.empty(2, dtype=torch.int64)

    return fired_rows


fired_rows_op = _define_fired_rows_op()


class _Counted(nn.Module):
    """A packed layer: its input-major weights in one of FORMATS, the non-zero count of each row, and the
    count of what it executed (buffers, so a compiled step updates them in place)."""

    def _init_packed(self, weights: torch.Tensor, fmt: str, row_nnz: torch.Tensor) -> None:
        self.fmt = fmt
        self.register_buffer("weights", weights)
        self.register_buffer("row_nnz", row_nnz.to(torch.int64).contiguous(), persistent=False)
        self.n_in, self.padded_width = weights.shape[0], FORMATS[fmt][2] * weights.shape[1]
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("executed", torch.zeros(2, dtype=torch.int64), persistent=False)  # rows, additions

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        out, counts = fired_rows_op(flat, self.weights, self.row_nnz, self.fmt)
        self.tokens += flat.shape[0]
        self.executed += counts
        return out

    def reset_counts(self) -> None:
        self.tokens.zero_()
        self.executed.zero_()


def _check_input(x: torch.Tensor) -> None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise RuntimeError(f"the ternary path runs in fp32 on the CPU, got {x.dtype} on {x.device}")


class PackedTernaryLinear(_Counted):
    """A TernaryLinear (no bias) as 2-bit codes: y = gamma * (codes @ (x - mu)) + gamma * (codes @ mu), where
    mu is the offset of the spike site feeding it (zero for an unspiked or uncentred input), so a spike code of
    0 is an exact zero and its row is skipped."""

    def __init__(self, linear: TernaryLinear, offset: torch.Tensor | None):
        super().__init__()
        codes, gamma = linear.ternary_codes()
        codes, gamma = codes.float(), gamma.float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_packed(pack_codes(codes), "ternary2", (codes != 0).sum(0))
        self.register_buffer("gamma", gamma.reshape(-1))  # one, or one per output row
        self.register_buffer("offset", None if offset is None else offset.detach().float().clone())
        self.register_buffer("bias", (codes @ self.offset) * self.gamma if offset is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        flat = x.reshape(-1, self.in_features)
        if self.offset is not None:
            flat = flat - self.offset
        y = self._matmul(flat)[:, :self.out_features] * self.gamma
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedHead(_Counted):
    """The output layer on the ternary path: logits = (h - mu) @ E^T + mu @ E^T, with E^T stored input-major
    (d_model rows of vocabulary entries) so only the fired inputs' rows are read; mu is the `head` site's
    offset (none when the head's input is not spiked or not centred). E is the tied embedding or the untied
    head's weight: fp32, or with `embedding_bits` (tied) the int8 / packed int4 codes the training model
    rounds it to, times one scale per token (per output). A tied model's token lookup reads the same
    storage (`PackedLookup`): one copy of the matrix."""

    def __init__(self, source: nn.Module, offset: torch.Tensor | None):
        super().__init__()
        V, C = source.weight.shape
        self.vocab_size = V
        if isinstance(source, RowQuantizedEmbedding):
            codes, scale = source.row_codes()
            self.bits = source.bits
            weights = codes.t().contiguous().to(torch.int8) if source.bits == 8 else pack_int4(codes)
            self._init_packed(weights, "int8" if source.bits == 8 else "int4", (codes != 0).sum(0))
            self.register_buffer("scale", scale.float().reshape(-1))
            dense = codes.float() * scale.float()  # for the bias only
        else:
            self.bits = 32
            dense = source.weight.detach().float()
            self._init_packed(dense.t().contiguous(), "fp32", torch.full((C,), V))
            self.register_buffer("scale", None)
        self.register_buffer("offset", None if offset is None else offset.detach().float().clone())
        self.register_buffer("bias", None if offset is None else self.offset @ dense.t())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _check_input(h)
        flat = h.reshape(-1, self.n_in)
        if self.offset is not None:
            flat = flat - self.offset
        out = self._matmul(flat)[:, :self.vocab_size]
        if self.scale is not None:
            out = out * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*h.shape[:-1], self.vocab_size)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, C) embedding rows of the flat token ids, as the training model's lookup gives them."""
        if self.bits == 32:
            return self.weights[:, ids].t()
        if self.bits == 8:
            codes = self.weights[:, ids].float()
        else:
            R = self.weights.shape[1]
            byte = self.weights[:, ids % R].to(torch.int16)
            nibble = torch.where(ids >= R, byte >> 4, byte & 15)
            codes = ((nibble ^ 8) - 8).float()
        return codes.t() * self.scale[ids, None]


class PackedLookup(nn.Module):
    """A tied model's token lookup from the storage its PackedHead holds (one copy of the matrix)."""

    def __init__(self, head: PackedHead):
        super().__init__()
        self.head = [head]  # a list: not a second registration of the same buffers

    @property
    def weight(self) -> torch.Tensor:
        """The head's packed storage (not an fp (V, C) matrix): what the model reads its device from."""
        return self.head[0].weights

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].lookup(ids.reshape(-1)).reshape(*ids.shape, -1)


def _site_offset(model: Student, layer, site) -> torch.Tensor | None:
    module = model.head_spike if site.module == "head" else getattr(model.blocks[layer], site.module).spikes
    spike = module.spikes[site.name] if site.name in module.spikes else None
    if spike is None or not spike.centered:
        return None
    return spike.offset


def ternary_student(model: Student) -> Student:
    """A copy of `model` on the ternary path (see the module's docstring), in eval mode, on the CPU. Its
    kernels are built here, so a machine without a C compiler gets a one-line GooseError, not a failure in
    its first forward."""
    cfg = model.cfg
    if any(isinstance(m, _Counted) for m in model.modules()):
        raise GooseError("this student is on the ternary path already")
    if not cfg.ternary_weights:
        raise GooseError("the ternary path needs a student trained with ternary weights "
                         "(model.overrides={ternary_weights: true})")
    if any(m.mix != 1.0 for m in model.annealed_modules()):
        raise GooseError("the ternary path needs the fully ternary model (spike annealing finished, mix 1)")
    if model.emb.weight.device.type != "cpu":
        raise GooseError("the ternary path runs on the CPU (--device cpu)")
    try:
        library()
    except RuntimeError as exc:
        raise GooseError(f"the ternary path's C kernels cannot be built here: {exc}") from None
    packed = copy.deepcopy(model).float().eval()
    for layer in range(cfg.n_layer):
        for site in SPIKE_SITES:
            if site.feeds is None or site.module == "head":
                continue
            owner = getattr(packed.blocks[layer], site.module)
            linear = getattr(owner, site.matrix)
            setattr(owner, site.matrix, PackedTernaryLinear(linear, _site_offset(packed, layer, site)))
    head_offset = _site_offset(packed, "head", SPIKE_SITES[-1])
    if cfg.tie_embeddings and ("head" in cfg.spike_sites or cfg.embedding_bits):
        packed.head = PackedHead(packed.emb, head_offset)
        packed.emb = PackedLookup(packed.head)
    elif not cfg.tie_embeddings and "head" in cfg.spike_sites:  # an untied fp head behind spikes
        packed.head = PackedHead(packed.head, head_offset)
    return packed


def fp32_bytes(model: Student) -> int:
    """The model's parameters held in fp32: what the ternary path's bytes are compared with."""
    return sum(p.numel() * 4 for p in model.parameters())


def measured_ops(model: Student) -> dict:
    """The packed layers' executed work since they were built (or `reset_counts`), per token, for the ternary
    matrices and the head: weight rows read, rows a dense matmul reads, the fraction skipped (spike 0),
    row element updates done (rows read x padded row width, zero weights included) and additions done
    (the non-zero weights of the rows read: what `energy_report` estimates as accumulates)."""
    out = {}
    for part, kind in (("projections", PackedTernaryLinear), ("head", PackedHead)):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        tokens = int(layers[0].tokens) if layers else 0
        if not tokens:
            continue
        read = sum(int(m.executed[0]) for m in layers)
        dense = sum(int(m.tokens) * m.n_in for m in layers)
        out[part] = {"rows_read_per_token": read / tokens, "rows_dense_per_token": dense / tokens,
                     "rows_skipped_fraction": 1 - read / dense if dense else 0.0,
                     "updates_per_token": sum(int(m.executed[0]) * m.padded_width for m in layers) / tokens,
                     "additions_per_token": sum(int(m.executed[1]) for m in layers) / tokens}
    return out


def packed_bytes(model: Student) -> dict:
    """Bytes of the packed model: the 2-bit ternary matrices (with their scales and biases), the head's
    transposed embedding, and everything else (fp32 parameters and buffers), without double counting."""
    seen, parts = set(), {"ternary_matrices": 0, "embedding": 0, "other": 0}
    for module in model.modules():
        part = ("ternary_matrices" if isinstance(module, PackedTernaryLinear)
                else "embedding" if isinstance(module, (PackedHead, nn.Embedding)) else "other")
        held = [b for name, b in module.named_buffers(recurse=False)
                if name not in module._non_persistent_buffers_set]  # not the counters, row counts, flags
        for t in [*module.parameters(recurse=False), *held]:
            if id(t) in seen or t is None:
                continue
            seen.add(id(t))
            parts[part] += t.numel() * t.element_size()
    parts["total"] = sum(parts.values())
    return parts

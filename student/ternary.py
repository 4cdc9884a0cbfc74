"""The ternary inference path: a trained student's spiked matmuls run as additions of packed weights (CPU).

`ternary_student(model)` returns a copy of a fully ternary student (`ternary_weights`, spike annealing done)
in which
- every ternary matrix is a `PackedTernaryLinear`: its codes 2 bits each, stored input-major, so a spike
  code of 0 skips the whole row of the matrix and a fired input adds +-its value into the outputs its
  non-zero weights reach (`KERNELS`, C), then one multiply per output by the weight scale;
- a spiked (or `embedding_bits`-quantised) tied head is a `PackedHead`: the embedding stored transposed
  (d_model rows of vocabulary entries: fp32, int8 or packed int4 codes with a scale per token), so again
  only the fired inputs' rows are read; the token lookup reads the same storage.
Everything else (norms, token shift, low-rank paths, the state update) is the training model's own code,
so the path computes the same function as `Student.forward` in eval, up to float summation order: the
spike sites emit s = g * a * code + mu, and W s = W (s - mu) + W mu, with W mu a bias computed once.

Each packed layer counts what it executed: the rows read (fired inputs) against the rows a dense matmul
reads, and the row additions done. `measured_ops(model)` sums them for `goose eval` and the benchmark,
beside `Student.energy_report`'s estimate. The kernels are a torch custom op (`rows_op`), so the packed
student also runs under torch.compile (`goose generate --ternary --compile`).
"""

from __future__ import annotations

import copy
import ctypes

import torch
import torch.nn as nn

from ..errors import GooseError
from ..native import build_library
from .model import SPIKE_SITES, Student
from .spikes import RowQuantizedEmbedding, TernaryLinear

_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_void_p, ctypes.c_int64]


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("goose_ternary_rows", "goose_int8_rows", "goose_int4_rows", "goose_fp32_rows"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGS, ctypes.c_int64


def library() -> ctypes.CDLL:
    return build_library("goose_ternary", KERNELS, _declare)


# ---- the packed format ------------------------------------------------------------------------
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


def _rows(kernel: str, x: torch.Tensor, weights: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """(M, width) = x (M, n_in) times the input-major weights by `kernel`, and the rows read."""
    x = x.contiguous()
    M, n_in = x.shape
    out = torch.empty(M, width, dtype=torch.float32)
    row = weights.shape[1]
    fired = getattr(library(), kernel)(x.data_ptr(), M, n_in, n_in, weights.data_ptr(), row, out.data_ptr(), width)
    if fired < 0:
        raise RuntimeError(f"{kernel} rejected its arguments")
    return out, fired


def _define_rows_op():
    """_rows as a torch custom op, so torch.compile fuses the rest of a step around the C call (one opaque
    node, no graph break); the rows read come back as a tensor the layer adds to its counter."""
    try:
        @torch.library.custom_op("goose::rows", mutates_args=())
        def rows(x: torch.Tensor, weights: torch.Tensor, width: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
            out, fired = _rows(kernel, x, weights, width)
            return out, torch.tensor(fired, dtype=torch.int64)
    except RuntimeError:  # defined already: goose and an exported folder's copy in one process
        return torch.ops.goose.rows

    @rows.register_fake
    def _(x, weights, width, kernel):
        return x.new_empty(x.shape[0], width), torch.empty((), dtype=torch.int64)

    return rows


rows_op = _define_rows_op()


class _Counted(nn.Module):
    """A packed layer's count of what it executed (buffers, so a compiled step updates them in place)."""

    def _init_counts(self, n_in: int, width: int) -> None:
        self.n_in, self.width = n_in, width
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("rows_read", torch.zeros((), dtype=torch.int64), persistent=False)

    def _count(self, tokens: int, fired: torch.Tensor) -> None:
        self.tokens += tokens
        self.rows_read += fired

    def reset_counts(self) -> None:
        self.tokens.zero_()
        self.rows_read.zero_()


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
        self.register_buffer("packed", pack_codes(codes))
        self.register_buffer("gamma", gamma.reshape(-1))  # one, or one per output row
        self.register_buffer("offset", None if offset is None else offset.detach().float().clone())
        bias = (codes @ self.offset) * self.gamma if offset is not None else None
        self.register_buffer("bias", bias)
        self._init_counts(self.in_features, 4 * self.packed.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        flat = x.reshape(-1, self.in_features)
        if self.offset is not None:
            flat = flat - self.offset
        out, fired = rows_op(flat, self.packed, self.width, "goose_ternary_rows")
        self._count(flat.shape[0], fired)
        y = out[:, :self.out_features] * self.gamma
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedHead(_Counted):
    """The tied output layer on the ternary path: logits = (h - mu) @ E^T + mu @ E^T, with E^T stored input-major
    (d_model rows of vocabulary entries) so only the fired inputs' rows are read; mu is the `head` site's
    offset (none when the head's input is not spiked or not centred). E is fp32, or with `embedding_bits`
    the int8 / packed int4 codes the training model rounds it to, times one scale per token (per output).
    The token lookup reads the same storage (`ColumnEmbedding`): one copy of the matrix."""

    def __init__(self, emb: nn.Embedding, offset: torch.Tensor | None):
        super().__init__()
        V, C = emb.weight.shape
        self.vocab_size = V
        if isinstance(emb, RowQuantizedEmbedding):
            codes, scale = emb.row_codes()
            self.bits, self.kernel = emb.bits, ("goose_int8_rows" if emb.bits == 8 else "goose_int4_rows")
            weights = codes.t().contiguous().to(torch.int8) if emb.bits == 8 else pack_int4(codes)
            self.register_buffer("scale", scale.float().reshape(-1))
            dense = codes.float() * scale.float()  # for the bias only
        else:
            self.bits, self.kernel = 32, "goose_fp32_rows"
            weights = emb.weight.detach().float().t().contiguous()
            self.register_buffer("scale", None)
            dense = emb.weight.detach().float()
        self.register_buffer("weights", weights)  # (C, V), or (C, ceil(V / 2)) for int4
        self.register_buffer("offset", None if offset is None else offset.detach().float().clone())
        self.register_buffer("bias", None if offset is None else self.offset @ dense.t())
        self._init_counts(C, 2 * weights.shape[1] if self.bits == 4 else V)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _check_input(h)
        flat = h.reshape(-1, self.n_in)
        if self.offset is not None:
            flat = flat - self.offset
        out, fired = rows_op(flat, self.weights, self.width, self.kernel)
        self._count(flat.shape[0], fired)
        out = out[:, :self.vocab_size]
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


class ColumnEmbedding(nn.Module):
    """The token lookup from the storage the PackedHead holds (one copy of the matrix)."""

    def __init__(self, head: PackedHead):
        super().__init__()
        self.head = [head]  # a list: not a second registration of the same buffers

    @property
    def weight(self) -> torch.Tensor:  # where the model reads the embedding's device
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
    """A copy of `model` on the ternary path (see the module's docstring), in eval mode, on the CPU."""
    cfg = model.cfg
    if not cfg.ternary_weights:
        raise GooseError("the ternary path needs a student trained with ternary weights "
                         "(model.overrides={ternary_weights: true})")
    if any(m.mix != 1.0 for m in model.annealed_modules()):
        raise GooseError("the ternary path needs the fully ternary model (spike annealing finished, mix 1)")
    if model.emb.weight.device.type != "cpu":
        raise GooseError("the ternary path runs on the CPU (--device cpu)")
    packed = copy.deepcopy(model).float().eval()
    for layer in range(cfg.n_layer):
        for site in SPIKE_SITES:
            if site.feeds is None or site.module == "head":
                continue
            owner = getattr(packed.blocks[layer], site.module)
            linear = getattr(owner, site.matrix)
            setattr(owner, site.matrix, PackedTernaryLinear(linear, _site_offset(packed, layer, site)))
    if cfg.tie_embeddings and ("head" in cfg.spike_sites or cfg.embedding_bits):
        packed.head = PackedHead(packed.emb, _site_offset(packed, "head", SPIKE_SITES[-1]))
        packed.emb = ColumnEmbedding(packed.head)
    return packed


def measured_ops(model: Student) -> dict:
    """The packed layers' executed work since they were built (or `reset_counts`): per token, the weight rows
    read and skipped, and the row element updates done (rows read x row length), for the ternary matrices
    and the head."""
    out = {}
    for part, kind in (("projections", PackedTernaryLinear), ("head", PackedHead)):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        tokens = int(layers[0].tokens) if layers else 0
        if not tokens:
            continue
        read = sum(int(m.rows_read) for m in layers)
        dense = sum(int(m.tokens) * m.n_in for m in layers)
        out[part] = {"rows_read_per_token": read / tokens, "rows_dense_per_token": dense / tokens,
                     "rows_skipped_fraction": 1 - read / dense if dense else 0.0,
                     "updates_per_token": sum(int(m.rows_read) * m.width for m in layers) / tokens}
    return out


def packed_bytes(model: Student) -> dict:
    """Bytes of the packed model: the 2-bit ternary matrices (with their scales and biases), the head's
    transposed embedding, and everything else (fp32 parameters and buffers), without double counting."""
    seen, parts = set(), {"ternary_matrices": 0, "embedding": 0, "other": 0}
    for module in model.modules():
        part = ("ternary_matrices" if isinstance(module, PackedTernaryLinear)
                else "embedding" if isinstance(module, (PackedHead, nn.Embedding)) else "other")
        held = [b for name, b in module.named_buffers(recurse=False)
                if name not in module._non_persistent_buffers_set]  # not the counters and runtime flags
        for t in [*module.parameters(recurse=False), *held]:
            if id(t) in seen or t is None:
                continue
            seen.add(id(t))
            parts[part] += t.numel() * t.element_size()
    parts["total"] = sum(parts.values())
    return parts


# ---- the kernels -------------------------------------------------------------------------------
# C source kept in this module (not a .c file beside it), so an exported folder's copy of this file, which
# transformers' loader copies on its own, still builds them (`native.build_library`)
KERNELS = r"""/* The ternary path's matmuls: out[m] = sum over the inputs i with x[m, i] != 0 of x[m, i] * W[i, :].
 *
 * W is stored input-major (row i holds input i's weight to every output), so an input that did not fire
 * (a spike code of 0) costs nothing: its row is never read. The work per fired input is one row of
 * additions of +-x (ternary weights) or of x * w (fp weights): the column additions the spikes exist for.
 *
 *   goose_ternary_rows: 2-bit codes, 4 to a byte: 00 = 0, 01 = +1, 10 = -1 (11 unused). A row of R = row_bytes
 *                       bytes covers 4R outputs (zero-padded): bits 2k and 2k+1 of byte q hold output
 *                       k * R + q, so unpacking is four contiguous passes of shifts and masks, vectorised.
 *   goose_int8_rows:    int8 codes, a row of n_out bytes (the head of an 8-bit embedding; any int8).
 *   goose_int4_rows:    signed 4-bit codes (-7..7), 2 to a byte: a row of R = row_bytes bytes covers 2R
 *                       outputs, the low nibble of byte q output q, the high nibble output R + q (the head
 *                       of a 4-bit embedding).
 *   goose_fp32_rows:    fp32 weights, a row of n_out floats (the fp head of a spiked, tied embedding).
 *
 * out has M rows of out_stride floats; the first n_out (4 * row_bytes for 2-bit codes) are written. Each
 * returns the number of fired inputs over the M rows (the rows of W read), or -1 on bad arguments.
 */
#include <stdint.h>
#include <string.h>

int64_t goose_ternary_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const uint8_t *packed,
                           int64_t row_bytes, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || row_bytes < 0 || out_stride < 4 * row_bytes) return -1;
    const int64_t R = row_bytes;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * 4 * R);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const uint8_t *restrict p = packed + i * R;
            /* bits 2k, 2k+1 of byte q are output k * R + q: each pass is contiguous, so it vectorises */
            for (int k = 0; k < 4; k++) {
                float *restrict ok = o + k * R;
                for (int64_t q = 0; q < R; q++) {
                    const int b = p[q] >> (2 * k);
                    ok[q] += v * (float)((b & 1) - ((b >> 1) & 1));
                }
            }
        }
    }
    return fired;
}

int64_t goose_int8_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const int8_t *codes,
                        int64_t n_out, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || n_out < 0 || out_stride < n_out) return -1;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * n_out);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const int8_t *restrict c = codes + i * n_out;
            for (int64_t j = 0; j < n_out; j++) o[j] += v * (float)c[j];
        }
    }
    return fired;
}

int64_t goose_int4_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const uint8_t *packed,
                        int64_t row_bytes, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || row_bytes < 0 || out_stride < 2 * row_bytes) return -1;
    const int64_t R = row_bytes;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict lo = out + m * out_stride;
        float *restrict hi = lo + R;
        memset(lo, 0, sizeof(float) * 2 * R);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const uint8_t *restrict p = packed + i * R;
            for (int64_t q = 0; q < R; q++) lo[q] += v * (float)(((p[q] & 15) ^ 8) - 8);
            for (int64_t q = 0; q < R; q++) hi[q] += v * (float)(((p[q] >> 4) ^ 8) - 8);
        }
    }
    return fired;
}

int64_t goose_fp32_rows(const float *x, int64_t M, int64_t n_in, int64_t x_stride, const float *w,
                        int64_t n_out, float *out, int64_t out_stride) {
    if (M < 0 || n_in < 0 || n_out < 0 || out_stride < n_out) return -1;
    int64_t fired = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float *restrict o = out + m * out_stride;
        memset(o, 0, sizeof(float) * n_out);
        for (int64_t i = 0; i < n_in; i++) {
            const float v = xm[i];
            if (v == 0.0f) continue;
            fired++;
            const float *restrict r = w + i * n_out;
            for (int64_t j = 0; j < n_out; j++) o[j] += v * r[j];
        }
    }
    return fired;
}
"""

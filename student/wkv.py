"""The RWKV-7 state update (generalised delta rule) in two forms that must agree.

Per head, with a matrix state S (value dim x key dim) and row vectors per token:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T        o_t = S_t r_t

RWKV-7 uses a = -kappa_hat (normalised removal key) and b = kappa_hat * in-context learning rate, so
S_{t-1} a_t reads the old value stored under kappa_hat and b_t writes it back out (the "delta" step).

`wkv_recurrent` is the obvious token-by-token loop (the reference, and the O(1)-state inference form).
`wkv_chunked` is the training form: inside a chunk of C tokens everything is a few batched matmuls and
one unit-lower-triangular solve; only a (value x key) state crosses chunk boundaries. Decay enters only
as exp(Lambda_t - Lambda_s) with s <= t (a product of decays *between* two tokens, always in (0, 1]),
never as a division by a cumulative decay product, which underflows (see docs/STUDENT.md).

`wkv_fla` is the CUDA fast path: flash-linear-attention's RWKV-7 Triton kernels, held equal to
`wkv_recurrent` by tests/test_wkv_fla.py (the argument mapping, against fla's own reference recurrence) and
tests/test_fla_kernels.py (the kernels themselves: on CUDA, or on CPU under Triton's interpreter).

Shapes: r, log_w, k, v, a, b are (B, T, H, N); log_w = log(w) <= 0; state is (B, H, N, N) in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def wkv_recurrent(r, log_w, k, v, a, b, state):
    """Token-by-token reference. Returns outputs (B, T, H, N) and the final state (B, H, N, N)."""
    S = state.float()
    outs = []
    for t in range(r.shape[1]):
        w = log_w[:, t].float().exp()
        read = S @ a[:, t].float().unsqueeze(-1)  # (B, H, N, 1): what the removal key reads from the state
        S = S * w.unsqueeze(-2) + read @ b[:, t].float().unsqueeze(-2) + v[:, t].float().unsqueeze(-1) @ k[:, t].float().unsqueeze(-2)
        outs.append((S @ r[:, t].float().unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, dim=1), S


def _decay_pairs(L):
    """E[..., s, t, j] = exp(Lambda_t[j] - Lambda_s[j]) for s <= t, else 0: the (C x C x N) decay tensor.

    Laid out (s, t, j) so that x_t * E is already the left operand of a matmul batched over s.
    """
    C = L.shape[-2]
    upper = torch.ones(C, C, dtype=torch.bool, device=L.device).triu()  # s <= t
    return (L.unsqueeze(-3) - L.unsqueeze(-2)).masked_fill(~upper[..., None], float("-inf")).exp()


class _WithinChunk(torch.autograd.Function):
    """The within-chunk pair matrices Q (r against b and k) and M (a against b and k) of `wkv_chunked`.

        Q[t, s, :] = sum_j r_t[j] e^{Lambda_t[j] - Lambda_s[j]} (b_s[j], k_s[j])         s <= t
        M[t, s, :] = sum_j a_t[j] e^{Lambda_{t-1}[j] - Lambda_s[j]} (b_s[j], k_s[j])     s < t (row 0 is 0)

    Both go through the (C x C x N) tensor x_t * E[s, t]: one broadcast multiply and one matmul batched
    over s for both right-hand sides (several times faster on CPU than einsums). Plain autograd would save
    E and both products for backward, ~50x a (B, T, d) tensor; this saves only r, k, a, b, Lambda and
    rebuilds E in backward, where with P = x_t * E[s, t] and G = dQ:
        d(x * E) = G y^T,   dx = sum_s d(x * E) * E,   dy = P^T G,   d(Lambda_t - Lambda_s) = d(x * E) * P.
    """

    @staticmethod
    def forward(ctx, r, k, a, b, L):
        # fp32 throughout, under autocast too: the kernel's inputs are fp32 and backward rebuilds E in fp32
        with torch.autocast(r.device.type, enabled=False):
            E = _decay_pairs(L)  # (..., s, t, N)
            y = torch.stack([b, k], dim=-1)  # (..., s, N, 2)
            Q = (r.unsqueeze(-3) * E) @ y  # (..., s, t, 2)
            M = (a[..., 1:, :].unsqueeze(-3) * E[..., :-1, :]) @ y  # rows t = 1.. read E[s, t - 1]
        ctx.save_for_backward(r, k, a, b, L)
        return Q.transpose(-3, -2), F.pad(M.transpose(-3, -2), (0, 0, 0, 0, 1, 0))  # (..., t, s, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dQ, dM):
        r, k, a, b, L = ctx.saved_tensors
        dQ, dM = dQ.to(r.dtype), dM.to(r.dtype)  # autocast may hand back fp16 gradients
        E = _decay_pairs(L)
        y = torch.stack([b, k], dim=-1)

        def pairs_backward(x, E, G):  # G: (..., s, t, 2) -> dx (..., t, N), dy (..., s, N, 2), dexp (..., s, t, N)
            P = x.unsqueeze(-3) * E
            dP = G @ y.transpose(-1, -2)
            dx = (dP * E).sum(-3)
            dy = P.transpose(-1, -2) @ G
            return dx, dy, dP.mul_(P)

        dr, dy, dexp = pairs_backward(r, E, dQ.transpose(-3, -2))
        da, dy_m, dexp_m = pairs_backward(a[..., 1:, :], E[..., :-1, :], dM[..., 1:, :, :].transpose(-3, -2))
        dL = dexp.sum(-3) - dexp.sum(-2) - dexp_m.sum(-2)  # exponent Lambda_t - Lambda_s: +t, -s
        dL[..., :-1, :] += dexp_m.sum(-3)
        dy += dy_m
        return dr, dy[..., 1], F.pad(da, (0, 0, 1, 0)), dy[..., 0], dL


def wkv_chunked(r, log_w, k, v, a, b, state, chunk_size: int = 16):
    """Chunked parallel form; equal to `wkv_recurrent` up to float rounding.

    Within a chunk (local t = 1..C, Lambda_t = sum_{i<=t} log w_i, state S0 at the chunk start):
        u_t = S_{t-1} a_t = S0 (a_t * e^{Lambda_{t-1}}) + sum_{s<t} (M_ab[t,s] u_s + M_ak[t,s] v_s)
        o_t = S0 (r_t * e^{Lambda_t}) + sum_{s<=t} (Q_rb[t,s] u_s + Q_rk[t,s] v_s)
        S_C = S0 diag(e^{Lambda_C}) + sum_s u_s (b_s * e^{Lambda_C - Lambda_s})^T + v_s (k_s * e^{Lambda_C - Lambda_s})^T
    with M_xy[t,s] = sum_j x_t[j] y_s[j] e^{Lambda_{t-1}[j] - Lambda_s[j]} and Q likewise with Lambda_t.
    The u_s solve a unit-lower-triangular system; everything not touching S0 is batched over all chunks,
    leaving two small matmuls per chunk in the sequential pass. The (C x C x N) decay tensor behind M and Q
    lives only inside `_WithinChunk` (rebuilt in backward), so a call saves ~23x a (B, T, H*N) fp32 tensor
    for backward at C 16, N 64 (~73x when autograd kept it; bench/bench_wkv_memory.py).
    """
    B, T, H, N = r.shape
    C = chunk_size
    pad = (-T) % C
    args = [x.float() for x in (r, log_w, k, v, a, b)]
    if pad:  # padded tokens: no decay (log w = 0), no write, no removal -> state untouched
        args = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in args]
    n = (T + pad) // C
    # (B, T, H, N) -> (B, H, n, C, N)
    r, log_w, k, v, a, b = (x.view(B, n, C, H, N).permute(0, 3, 1, 2, 4).contiguous() for x in args)

    L = log_w.cumsum(dim=-2)  # Lambda_t, inclusive
    L_prev = torch.cat([torch.zeros_like(L[..., :1, :]), L[..., :-1, :]], dim=-2)  # Lambda_{t-1}
    Q, M = _WithinChunk.apply(r, k, a, b, L)  # (B, H, n, C, C, 2): against b in [..., 0], k in [..., 1]
    Q_rb, Q_rk = Q.unbind(-1)
    M_ab, M_ak = M.unbind(-1)
    A0 = a * L_prev.exp()  # a_t * e^{Lambda_{t-1}}
    R0 = r * L.exp()  # r_t * e^{Lambda_t}
    to_end = (L[..., -1:, :] - L).exp()  # e^{Lambda_C - Lambda_s}
    B_end, K_end = b * to_end, k * to_end

    eye = torch.eye(C, device=r.device, dtype=r.dtype)
    system = eye - M_ab  # unit lower triangular
    WA = torch.linalg.solve_triangular(system, A0, upper=False, unitriangular=True)  # u = WA S0^T + Uv
    Uv = torch.linalg.solve_triangular(system, M_ak @ v, upper=False, unitriangular=True)
    R_state = R0 + Q_rb @ WA  # o = R_state S0^T + O_local
    O_local = Q_rb @ Uv + Q_rk @ v
    T_state = torch.diag_embed(L[..., -1, :].exp()) + WA.transpose(-1, -2) @ B_end  # S_C = S0 T_state + D_state
    D_state = Uv.transpose(-1, -2) @ B_end + v.transpose(-1, -2) @ K_end

    S = state.float()
    outs = []
    # unbind once: indexing inside the loop would make autograd build a full-size zero gradient per chunk
    for O_c, R_c, T_c, D_c in zip(*(x.unbind(2) for x in (O_local, R_state, T_state, D_state))):
        outs.append(O_c + R_c @ S.transpose(-1, -2))
        S = S @ T_c + D_c
    out = torch.stack(outs, dim=2)  # (B, H, n, C, N)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]
    return out, S


# The time-mix soft-clamps log w to [-e^{-1/2}, 0), the range fla's own RWKV-7 layer promises its chunk
# kernel (`safe_gate`, `lower_bound`), which licenses its faster tensor-core path.
LOG_DECAY_MIN = -math.exp(-0.5)


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """flash-linear-attention imports (checked once: the time-mix asks on every forward)."""
    try:
        import fla.ops.rwkv7  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or installed without a working triton: use the torch kernels
        return False
    return True


def fla_runs_on(x: torch.Tensor) -> bool:
    """Whether fla's kernels take this tensor: CUDA with fla installed. The one place the time-mix and
    `wkv_fla` decide it (tests/test_fla_kernels.py widens it to CPU under Triton's interpreter)."""
    return x.is_cuda and fla_available()


def wkv_fla(r, log_w, k, v, a, b, state, recurrent: bool = False, kernels=None):
    """flash-linear-attention's RWKV-7 kernels: the same recurrence as `wkv_recurrent`, on CUDA.

    fla computes S'_t = diag(w_t) S'_{t-1} + b_t (a_t^T S'_{t-1}) + k_t v_t^T, o_t = S'_t^T r_t * scale with
    the state S' laid out (key x value): the transpose of goose's (value x key) S, with the same a and b
    (RWKV-7's -kk and kk * iclr) and w as the log decay. So the state is transposed in and out, and scale
    is 1 (fla's fused_recurrent defaults to 1/sqrt(K)). `kernels`: (chunk, fused_recurrent) with fla's
    signatures, default fla's own (tests pass fla's entry points with a reference recurrence inside, on
    CPU). The chunk kernel trains and runs prompts; the fused recurrent one single no-grad tokens.
    """
    if kernels is None:
        if not fla_runs_on(r):
            raise ValueError("wkv_backend 'fla' runs on CUDA only; use wkv_backend 'torch' (or 'auto') on CPU")
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
        kernels = (chunk_rwkv7, fused_recurrent_rwkv7)
    # one dtype for r, k, v, a, b (Triton's dots refuse mixed operands; under autocast the projections
    # come out bf16 while the normalised key and the rates stay fp32); the log decay and the state stay fp32
    dtype = torch.get_autocast_dtype(r.device.type) if torch.is_autocast_enabled(r.device.type) else torch.float32
    r, k, v, a, b = (x.to(dtype) for x in (r, k, v, a, b))
    kw = dict(r=r, w=log_w.float(), k=k, v=v, a=a, b=b, scale=1.0,
              initial_state=state.float().transpose(-1, -2).contiguous(), output_final_state=True)
    if recurrent and not torch.is_grad_enabled():
        o, S = kernels[1](**kw)
    else:  # the decay range licenses fla's faster tensor-core path (only the chunk kernel takes these)
        o, S = kernels[0](**kw, safe_gate=True, lower_bound=LOG_DECAY_MIN)
    return o.float(), S.float().transpose(-1, -2)

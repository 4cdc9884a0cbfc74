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

Shapes: r, log_w, k, v, a, b are (B, T, H, N); log_w = log(w) <= 0; state is (B, H, N, N) in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _pairwise2(x, E, y1, y2):
    """(sum_j x[t,j] E[t,s,j] y1[s,j], same with y2) -> two (..., t, s) tensors.

    One broadcast multiply (x * E) and one batched matmul over s for both right-hand sides: several
    times faster on CPU than two einsums, which each materialise the (t, s, j) product separately.
    """
    xE = (x.unsqueeze(-2) * E).transpose(-3, -2)  # (..., s, t, j)
    y = torch.stack([y1, y2], dim=-1)  # (..., s, j, 2)
    out = (xE @ y).transpose(-3, -2)  # (..., t, s, 2)
    return out[..., 0], out[..., 1]


def wkv_chunked(r, log_w, k, v, a, b, state, chunk_size: int = 16):
    """Chunked parallel form; equal to `wkv_recurrent` up to float rounding.

    Within a chunk (local t = 1..C, Lambda_t = sum_{i<=t} log w_i, state S0 at the chunk start):
        u_t = S_{t-1} a_t = S0 (a_t * e^{Lambda_{t-1}}) + sum_{s<t} (M_ab[t,s] u_s + M_ak[t,s] v_s)
        o_t = S0 (r_t * e^{Lambda_t}) + sum_{s<=t} (Q_rb[t,s] u_s + Q_rk[t,s] v_s)
        S_C = S0 diag(e^{Lambda_C}) + sum_s u_s (b_s * e^{Lambda_C - Lambda_s})^T + v_s (k_s * e^{Lambda_C - Lambda_s})^T
    with M_xy[t,s] = sum_j x_t[j] y_s[j] e^{Lambda_{t-1}[j] - Lambda_s[j]} and Q likewise with Lambda_t.
    The u_s solve a unit-lower-triangular system; everything not touching S0 is batched over all chunks,
    leaving two small matmuls per chunk in the sequential pass.
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
    incl = torch.ones(C, C, dtype=torch.bool, device=r.device).tril()
    diff = (L.unsqueeze(-2) - L.unsqueeze(-3)).masked_fill(~incl[..., None], float("-inf"))
    E = diff.exp()  # E[t, s] = exp(Lambda_t - Lambda_s) for s <= t, else 0

    Q_rb, Q_rk = _pairwise2(r, E, b, k)
    # M[t, s] uses E[t-1, s] (strictly lower): rows 1.. from a[1:] and E[:-1]; row 0 is zero
    M_ab, M_ak = (F.pad(m, (0, 0, 1, 0)) for m in _pairwise2(a[..., 1:, :], E[..., :-1, :, :], b, k))
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

"""The flash-linear-attention backend of the time-mix (`wkv_fla`) against goose's reference recurrence.

What runs on every machine is the part goose owns: the argument mapping (state layout key x value vs
value x key, the signs of a and b, the scale, the log decay), through fla's reference recurrence with the
exact signature of `chunk_dplr_delta_rule` (which `chunk_rwkv7` forwards to), transcribed from fla's test
suite; where fla is installed it is also checked against the reference fla ships. The Triton kernels
themselves are tests/test_fla_kernels.py (on CUDA, or on CPU under Triton's interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch

from goose.student.model import Student, preset
from goose.student.wkv import LOG_DECAY_MIN, fla_available, wkv_fla, wkv_recurrent


def fla_reference_recurrence(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, **_):
    """fla-org/flash-linear-attention tests/ops/test_dplr_delta.py `recurrent_dplr_delta_rule_ref` (MIT),
    the reference fla's own tests hold `chunk_dplr_delta_rule` to. Inputs (B, T, H, D); state (B, H, K, V)."""
    q, k, v, a, b, gk = (x.transpose(1, 2).float() for x in (q, k, v, a, b, gk))
    B, H, T, K, V = *q.shape, v.shape[-1]
    o = torch.zeros_like(v)
    S = torch.zeros(B, H, K, V) if initial_state is None else initial_state
    q = q * (K ** -0.5 if scale is None else scale)
    for i in range(T):
        v2 = (S.clone() * a[:, :, i][..., None]).sum(-2)  # first the matmul, then the decay
        S = S.clone() * gk[:, :, i].exp()[..., None]
        S = S + k[:, :, i].unsqueeze(-1) * v[:, :, i].unsqueeze(-2) + b[:, :, i].unsqueeze(-1) * v2.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i], S)
    return o.transpose(1, 2), (S if output_final_state else None)


def chunk_rwkv7_reference(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                          safe_gate=False, lower_bound=None):
    """`fla.ops.rwkv7.chunk_rwkv7`'s signature with its kernel replaced by the reference: chunk_rwkv7 forwards
    (q=r, k, v, a, b, gk=w) to chunk_dplr_delta_rule (fla/ops/rwkv7/chunk.py)."""
    return fla_reference_recurrence(q=r, k=k, v=v, a=a, b=b, gk=w, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state)


def fused_recurrent_rwkv7_reference(r, w, k, v, a, b, scale=None, initial_state=None, output_final_state=True,
                                    cu_seqlens=None):
    """`fla.ops.rwkv7.fused_recurrent_rwkv7`'s signature (fla 0.6.0: no other keywords) over the reference."""
    return fla_reference_recurrence(q=r, k=k, v=v, a=a, b=b, gk=w, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state)


REFERENCE_KERNELS = (chunk_rwkv7_reference, fused_recurrent_rwkv7_reference)


def rwkv7_inputs(B=2, T=37, H=3, N=8, seed=0):
    """Inputs shaped like the time-mix's: log decay in [-e^-1/2, 0), a = -kk, b = kk * iclr."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = LOG_DECAY_MIN * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g) * 0.3
    return r, log_w, k, v, -kk, kk * iclr, state


@pytest.mark.parametrize("recurrent", [False, True])
def test_fla_mapping_equals_the_reference_recurrence(recurrent):
    r, log_w, k, v, a, b, state = rwkv7_inputs(T=1 if recurrent else 37)
    o_ref, S_ref = wkv_recurrent(r, log_w, k, v, a, b, state)
    with torch.no_grad():  # the single-token kernel serves no-grad steps only
        o, S = wkv_fla(r, log_w, k, v, a, b, state, recurrent=recurrent, kernels=REFERENCE_KERNELS)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fla_available(), reason="flash-linear-attention not installed (pip install '.[cuda]')")
@pytest.mark.parametrize("recurrent", [False, True])
def test_fla_entry_points_take_the_mapping(monkeypatch, recurrent):
    """fla's real chunk_rwkv7 / fused_recurrent_rwkv7 (their signatures and their forwarding to the DPLR
    kernels), with only the Triton kernel underneath swapped for the reference so it runs on CPU."""
    import fla.ops.rwkv7.chunk as chunk_mod
    import fla.ops.rwkv7.fused_recurrent as recurrent_mod
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    monkeypatch.setattr(chunk_mod, "chunk_dplr_delta_rule", fla_reference_recurrence)
    monkeypatch.setattr(recurrent_mod, "fused_recurrent_dplr_delta_rule", fla_reference_recurrence)
    r, log_w, k, v, a, b, state = rwkv7_inputs(T=1 if recurrent else 37)
    o_ref, S_ref = wkv_recurrent(r, log_w, k, v, a, b, state)
    with torch.no_grad():
        o, S = wkv_fla(r, log_w, k, v, a, b, state, recurrent=recurrent, kernels=(chunk_rwkv7, fused_recurrent_rwkv7))
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)


def test_fla_mapping_would_catch_a_wrong_layout_or_sign():
    """The check above can fail: an untransposed state, a flipped a, or fla's default scale all differ."""
    r, log_w, k, v, a, b, state = rwkv7_inputs()
    o_ref, _ = wkv_recurrent(r, log_w, k, v, a, b, state)
    wrong = [
        fla_reference_recurrence(r, k, v, a, b, log_w, scale=1.0, initial_state=state.clone())[0],  # no transpose
        wkv_fla(r, log_w, k, v, -a, b, state, kernels=REFERENCE_KERNELS)[0],
        fla_reference_recurrence(r, k, v, a, b, log_w, scale=None, initial_state=state.transpose(-1, -2))[0],
    ]
    for o in wrong:
        assert (o - o_ref).abs().max() > 1e-2


@pytest.mark.skipif(not fla_available(), reason="flash-linear-attention not installed (pip install '.[cuda]')")
def test_transcribed_reference_equals_the_one_fla_ships():
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence  # pure PyTorch, head-first, q * K^-1/2

    r, log_w, k, v, a, b, state = rwkv7_inputs()
    o_ref, S_ref = fla_reference_recurrence(r, k, v, a, b, log_w, scale=1.0,
                                            initial_state=state.transpose(-1, -2).clone(), output_final_state=True)
    hf = lambda x: x.transpose(1, 2)  # noqa: E731
    o, S = dplr_recurrence(hf(r) * math.sqrt(r.shape[-1]), hf(k), hf(v), hf(a), hf(b), hf(log_w),
                           initial_state=state.transpose(-1, -2).clone())
    torch.testing.assert_close(hf(o), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)


def test_the_backend_is_chosen_by_config():
    with pytest.raises(ValueError, match="wkv_backend"):
        preset("tiny", wkv_backend="triton")
    # a student saved with "fla" still loads and runs where fla cannot: the torch kernels, with a warning
    torch.manual_seed(0)
    ref = Student(preset("tiny"))
    forced = Student(preset("tiny", wkv_backend="fla"))
    forced.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 512, (1, 20))
    with pytest.warns(UserWarning, match="using the torch kernels"):
        out = forced(idx).logits
    torch.testing.assert_close(out, ref(idx).logits)
    with pytest.raises(ValueError, match="CUDA only"):  # the kernel itself refuses CPU tensors clearly
        wkv_fla(*rwkv7_inputs())

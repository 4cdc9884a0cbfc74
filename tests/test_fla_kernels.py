"""fla's RWKV-7 Triton kernels themselves, through `wkv_fla`, against goose's step-by-step `wkv_recurrent`.

These run the real kernels wherever they can run: on CUDA, or on CPU tensors under Triton's interpreter
(tests/triton_interpreter.py says what the harness patches there and why), with their own command:

    TRITON_INTERPRET=1 python -m pytest tests/test_fla_kernels.py -s     # -s prints kernels and differences

Elsewhere (no triton, or triton without the interpreter on a machine without CUDA) they skip, saying which.
The argument mapping alone (state layout, signs, scale) is checked on every machine by tests/test_wkv_fla.py.
"""

from __future__ import annotations

import pytest
import torch

import goose.student.wkv as wkv_module
from goose.student.model import Student, preset
from goose.student.wkv import fla_available, wkv_fla, wkv_recurrent
from test_wkv_fla import rwkv7_inputs as mapping_inputs
from triton_interpreter import interpreting

if torch.cuda.is_available() and fla_available():
    DEVICE, MODE = "cuda", "CUDA"
elif interpreting() and fla_available():
    DEVICE, MODE = "cpu", "Triton interpreter"
else:
    why = ("flash-linear-attention/triton not installed (pip install '.[cuda]', or on CPU "
           "pip install --no-deps flash-linear-attention fla-core triton einops)" if not fla_available() else
           "no CUDA: run the kernels under Triton's interpreter with "
           "TRITON_INTERPRET=1 python -m pytest tests/test_fla_kernels.py")
    pytest.skip(why, allow_module_level=True)

# Differences are measured against each tensor's own scale (max |reference|). The path goose runs
# (safe_gate with the decay's lower bound: fla's tensor-core scheme) inverts each chunk's (I - A_ab) in
# fp16 (`prepare_wy_repr_fwd_kernel_safe`), ~1e-5 of the scale with fp32 inputs; fla's exact path (no
# safe_gate) is ~2e-7 under the interpreter, which computes in fp32 numpy. The fp16 inverse enters
# backward twice (the WY factors and their gradient), so gradients get a wider bound: measured 1.7e-4 at
# worst (a time-mix's x_a through two layers), 3.5e-7 on the exact path. On CUDA, Triton's fp32 dots
# default to TF32 (10-bit mantissa).
REL = 5e-5 if DEVICE == "cpu" else 2e-3
GRAD_REL = 3e-4 if DEVICE == "cpu" else 5e-3
EXACT_REL = 1e-6 if DEVICE == "cpu" else 2e-3


def check(what, named_pairs, rel=REL):
    """Assert every (name, fla, reference) pair within rel of the reference's scale; print the worst."""
    ratios = {name: (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for name, a, b in named_pairs}
    worst = max(ratios, key=ratios.get)
    print(f"\n[{MODE}] {what}: max |fla - reference| / max |reference| = {ratios[worst]:.1e} ({worst})")
    bad = {name: f"{r:.1e}" for name, r in ratios.items() if r > rel}
    assert not bad, f"{what}: beyond {rel:g} of scale: {bad}"


@pytest.fixture(scope="module", autouse=True)
def kernels_on_this_device():
    launched = []
    if DEVICE == "cpu":
        import triton_interpreter
        from triton.runtime import interpreter

        triton_interpreter.enable()
        run = interpreter.InterpretedFunction.run

        def logged_run(self, *args, **kwargs):
            launched.append(self.fn.__name__)
            return run(self, *args, **kwargs)

        interpreter.InterpretedFunction.run = logged_run
    yield launched
    if DEVICE == "cpu":
        interpreter.InterpretedFunction.run = run
        print(f"\n[{MODE}] Triton kernels launched: {', '.join(sorted(set(launched)))}")


@pytest.fixture
def fla_here(monkeypatch):
    """The time-mix and wkv_fla take CPU tensors too when the interpreter runs the kernels."""
    if DEVICE == "cpu":
        monkeypatch.setattr(wkv_module, "fla_runs_on", lambda x: fla_available())


def rwkv7_inputs(B=2, T=37, H=2, N=16, seed=0):
    """tests/test_wkv_fla.py's time-mix-shaped inputs (and carried state), on this device, requiring grad."""
    return [x.to(DEVICE).requires_grad_() for x in mapping_inputs(B=B, T=T, H=H, N=N, seed=seed)]


def loss_of(o, S, seed=1):
    """A random linear functional of outputs and final state: every gradient entry is exercised."""
    g = torch.Generator().manual_seed(seed)
    go, gs = torch.randn(o.shape, generator=g).to(o.device), torch.randn(S.shape, generator=g).to(S.device)
    return (o * go).sum() + (S * gs).sum()


NAMES = ("r", "log_w", "k", "v", "a", "b", "state")


@pytest.mark.parametrize("T,N", [(32, 16), (37, 16), (21, 64)])  # a chunk multiple, a ragged tail, head 64
def test_chunk_kernel_equals_the_recurrence_forward_backward_and_state(fla_here, T, N):
    inputs = rwkv7_inputs(T=T, N=N)
    o_ref, S_ref = wkv_recurrent(*inputs)
    g_ref = torch.autograd.grad(loss_of(o_ref, S_ref), inputs)
    o, S = wkv_fla(*inputs)
    g = torch.autograd.grad(loss_of(o, S), inputs)
    check(f"chunk_rwkv7 T={T} N={N} forward", [("output", o, o_ref), ("state", S, S_ref)])
    check(f"chunk_rwkv7 T={T} N={N} backward", [(f"d{n}", a, b) for n, a, b in zip(NAMES, g, g_ref)], GRAD_REL)


def test_fla_exact_chunk_path_equals_the_recurrence(fla_here):
    """fla's chunk kernel without the tensor-core licence (fp32 WY inverse): the gap above is that fp16
    inverse alone; the mapping and the rest of the kernels are exact to fp32 rounding."""
    from fla.ops.rwkv7 import chunk_rwkv7

    inputs = rwkv7_inputs(T=37)
    o_ref, S_ref = wkv_recurrent(*inputs)
    g_ref = torch.autograd.grad(loss_of(o_ref, S_ref), inputs)

    def exact(**kw):
        kw.pop("safe_gate"), kw.pop("lower_bound")
        return chunk_rwkv7(**kw)

    o, S = wkv_fla(*inputs, kernels=(exact, None))
    g = torch.autograd.grad(loss_of(o, S), inputs)
    check("chunk_rwkv7 exact path (no safe_gate) T=37", [("output", o, o_ref), ("state", S, S_ref)]
          + [(f"d{n}", a, b) for n, a, b in zip(NAMES, g, g_ref)], rel=EXACT_REL)


def test_state_carried_across_chunk_calls_equals_one_pass(fla_here):
    """Two calls (20 then 17 tokens, neither a chunk multiple) with the state handed on equal one pass,
    forward and backward (the gradient flows through the carried state into the first call)."""
    inputs = rwkv7_inputs(T=37)
    o_ref, S_ref = wkv_recurrent(*inputs)
    g_ref = torch.autograd.grad(loss_of(o_ref, S_ref), inputs)
    first = [x[:, :20] for x in inputs[:6]]
    second = [x[:, 20:] for x in inputs[:6]]
    o1, S1 = wkv_fla(*first, inputs[6])
    o2, S2 = wkv_fla(*second, S1)
    o = torch.cat([o1, o2], dim=1)
    g = torch.autograd.grad(loss_of(o, S2), inputs)
    check("chunk_rwkv7 20 + 17 tokens, state carried", [("output", o, o_ref), ("state", S2, S_ref)])
    check("chunk_rwkv7 20 + 17 tokens, state carried, backward",
          [(f"d{n}", a, b) for n, a, b in zip(NAMES, g, g_ref)], GRAD_REL)


def test_fused_recurrent_kernel_steps_tokens_with_the_state(fla_here):
    """Generation's path: single no-grad tokens through fused_recurrent_rwkv7, the state carried 6 steps."""
    inputs = [x.detach() for x in rwkv7_inputs(T=6)]
    o_ref, S_ref = wkv_recurrent(*inputs)
    S, outs = inputs[6], []
    with torch.no_grad():
        for t in range(6):
            o, S = wkv_fla(*(x[:, t:t + 1] for x in inputs[:6]), S, recurrent=True)
            outs.append(o)
    o = torch.cat(outs, dim=1)
    check("fused_recurrent_rwkv7 6 single tokens", [("output", o, o_ref), ("state", S, S_ref)], rel=EXACT_REL)


def students_on_both_backends(**overrides):
    """The same weights on fla's kernels and on goose's PyTorch kernels. Spikes off: a rounding difference
    at a threshold would flip a spike and swamp the comparison; the spike code is the same on both."""
    torch.manual_seed(0)
    ref = Student(preset("tiny", spike_sites=(), wkv_backend="torch", **overrides)).to(DEVICE)
    fast = Student(preset("tiny", spike_sites=(), wkv_backend="fla", **overrides)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the output projections start at zero: make every layer matter to the logits
        for model in (ref, fast):
            for name, p in model.named_parameters():
                if p.abs().max() == 0 and p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return fast, ref, torch.randint(0, ref.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_student_forward_backward_on_fla_equals_torch_kernels(fla_here):
    fast, ref, idx = students_on_both_backends()
    out_fast, out_ref = fast(idx).logits, ref(idx).logits
    loss_of(out_fast, out_fast[:, :1]).backward()
    loss_of(out_ref, out_ref[:, :1]).backward()
    grads = [(p.grad, q.grad) for p, q in zip(fast.parameters(), ref.parameters()) if q.grad is not None]
    assert len(grads) == sum(1 for _ in ref.parameters())  # every parameter got a gradient on both
    check("student (tiny, 2 layers) logits", [("logits", out_fast, out_ref)])
    check("student (tiny, 2 layers) parameter gradients",
          [(name, a, b) for (name, _), (a, b) in zip(ref.named_parameters(), grads)], GRAD_REL)


def test_student_generates_the_same_tokens_on_both_backends(fla_here):
    """The recurrent form (prompt through the chunk kernel, then single tokens through the fused one)."""
    fast, ref, idx = students_on_both_backends()
    with torch.no_grad():
        state_fast = fast(idx[:, :24], mode="chunked").state
        state_ref = ref(idx[:, :24], mode="chunked").state
        for t in range(24, 28):
            a = fast(idx[:, t:t + 1], state=state_fast, mode="recurrent")
            b = ref(idx[:, t:t + 1], state=state_ref, mode="recurrent")
            state_fast, state_ref = a.state, b.state
            check(f"student recurrent step {t} logits", [("logits", a.logits, b.logits)])


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 Triton dots: the interpreter runs fp32 numpy")
def test_student_on_fla_trains_under_bf16_autocast(fla_here):
    """Under autocast the projections come out bf16 and the rates fp32: wkv_fla hands fla one dtype."""
    fast, ref, idx = students_on_both_backends()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fast(idx).logits.float(), ref(idx).logits.float()
        a.square().mean().backward()
    assert (a - b).abs().max() < 5e-2 * b.abs().max()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fast.parameters())

"""torch.compile of the student: one graph with no breaks, and the same numbers as eager.

The whole-model compile is what makes the student's training step and its recurrent generation competitive
with a dense GPT-2 on CPU (bench/bench_student_vs_dense.py); a graph break per spike site (a host read of a
buffer on every forward) would split it into dozens of graphs. The compiled-equals-eager checks build real
inductor kernels (about a minute on 2 cores) and are marked slow."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from goose.pipeline.generate import generate
from goose.student.model import Student, preset
from goose.student.spikes import TernarySpike

from test_student import random_student


def test_spike_init_flag_mirrors_the_buffer_and_load_resets_it():
    site = TernarySpike(8, preset("tiny").spike)
    site.train()
    assert site.needs_init()
    site(torch.randn(2, 5, 8))
    assert not site.needs_init() and bool(site.initialized)
    fresh = TernarySpike(8, preset("tiny").spike)
    site.load_state_dict(fresh.state_dict())  # an uninitialised state: the flag must not stay True
    assert site.needs_init()
    fresh.load_state_dict(TernarySpike(8, preset("tiny").spike).state_dict())
    initialised = TernarySpike(8, preset("tiny").spike).train()
    initialised(torch.randn(2, 5, 8))
    fresh.load_state_dict(initialised.state_dict())
    assert not fresh.needs_init()
    before = fresh.amp_pos.detach().clone()
    fresh.train()(torch.randn(2, 5, 8) * 50)  # no second data-dependent init after a load
    assert torch.equal(fresh.amp_pos.detach(), before)


@pytest.mark.parametrize("mode, site_steps", [("chunked", {}), ("recurrent", {}), ("chunked", {"cm_v": 2})])
def test_initialised_student_traces_as_one_graph(mode, site_steps):
    torch._dynamo.reset()
    model = random_student(site_steps=site_steps)
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16 if mode == "chunked" else 1))
    explained = torch._dynamo.explain(model)(ids, mode=mode)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    torch._dynamo.reset()
    eager, compiled = random_student(seed=3), random_student(seed=3)
    eager.train(), compiled.train()
    ids = torch.randint(0, eager.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for model, forward in ((eager, eager), (compiled, torch.compile(compiled))):
        out = forward(ids[:, :-1], output_hidden_states=True)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-3, atol=1e-5), name
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers()):  # running spike scales moved alike
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_compiled_generation_equals_eager():
    torch._dynamo.reset()
    model = random_student(seed=4)
    prompt = [5, 17, 300, 2, 44]
    eager = generate(model, prompt, max_new_tokens=12, temperature=0)
    compiled = generate(model, prompt, max_new_tokens=12, temperature=0, compile=True)
    assert compiled["new_tokens"] == eager["new_tokens"]
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] is None


def test_spike_annealing_does_not_recompile_per_step():
    """The trainer moves the spike mix every step while annealing; a compiled model must take it as data."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = random_student()  # eval mode: no running-scale updates, so the outputs compare exactly
    counter = CompileCounter()
    forward = torch.compile(model, backend=counter)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    outs = []
    for mix in (0.2, 0.5, 0.9):
        model.set_spike_mix(mix)
        outs.append(forward(ids).logits)
    assert counter.frame_count == 1
    model.set_spike_mix(0.5)
    assert torch.allclose(model(ids).logits, outs[1], atol=1e-5)  # the compiled graph used each step's mix


def _packed_student():
    from goose.student.ternary import ternary_student
    from test_ternary_path import trained_like

    return trained_like(), ternary_student(trained_like())


def test_ternary_path_step_is_one_graph():
    """The ternary path's kernels are a torch custom op: dynamo traces the packed recurrent step with no
    graph break (a ctypes call in the forward would break it at every matrix)."""
    _, packed = _packed_student()
    tok = torch.tensor([[3]])
    explained = torch._dynamo.explain(packed)(tok, packed.init_state(1), mode="recurrent")
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.slow
def test_compiled_ternary_path_generates_the_eager_tokens():
    """`generate --ternary --compile`: the compiled packed step gives the model's greedy tokens, and its
    executed-row counters still count (buffers updated inside the graph)."""
    from goose.student.ternary import measured_ops

    model, packed = _packed_student()
    kw = dict(max_new_tokens=12, temperature=0.0)
    want = generate(model, [1, 2, 3], **kw)["new_tokens"]
    assert generate(packed, [1, 2, 3], compile=True, **kw)["new_tokens"] == want
    assert measured_ops(packed)["projections"]["rows_read_per_token"] > 0

"""The spiking student against references: step-by-step recurrence, whole-vs-halves, formulas, hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from goose.student.model import (
    PRESETS,
    Student,
    StudentConfig,
    config_for_store,
    detach_state,
    preset,
    project_embedding,
)
from goose.student.spikes import (
    SpikeConfig,
    SpikeStats,
    TernaryLinear,
    TernarySpike,
    firing_rate_loss,
    heaviside,
    surrogate_grad,
)
from goose.student.wkv import _WithinChunk, wkv_chunked, wkv_recurrent


def wkv_inputs(B, T, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = -F.softplus(-rn(B, T, H, N) * 2) - 0.5
    kk = F.normalize(rn(B, T, H, N), dim=-1)
    rate = torch.sigmoid(rn(B, T, H, N))
    return rn(B, T, H, N), -w.exp(), rn(B, T, H, N) * 0.5, rn(B, T, H, N), -kk, kk * rate


def random_student(seed=0, **overrides) -> Student:
    """A tiny student whose zero-initialised weights (RWKV init) are made random, so every path is live."""
    torch.manual_seed(seed)
    model = Student(preset("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    model.train()
    model(torch.randint(0, model.cfg.vocab_size, (2, 16)))  # data-dependent spike init
    return model.eval()


@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("chunk", [16, 5])
def test_wkv_chunked_equals_recurrence(T, chunk):
    args = wkv_inputs(2, T, 3, 8, seed=T)
    s0 = torch.randn(2, 3, 8, 8)
    o_ref, s_ref = wkv_recurrent(*args, s0)
    o, s = wkv_chunked(*args, s0, chunk_size=chunk)
    assert (o - o_ref).abs().max() <= 1e-4 and (s - s_ref).abs().max() <= 1e-4


def test_wkv_state_survives_strong_decay_for_long_sequences():
    # the original project's cumsum(kv / decay^t) * decay^t form made the state exactly 0 after ~18 tokens
    r, log_w, k, v, a, b = wkv_inputs(1, 200, 1, 4)
    log_w = torch.full_like(log_w, -0.6)  # decay 0.55, the strongest RWKV-7 allows
    o, _ = wkv_chunked(r, log_w, k, v, a, b, torch.zeros(1, 1, 4, 4))
    o_ref, _ = wkv_recurrent(r, log_w, k, v, a, b, torch.zeros(1, 1, 4, 4))
    assert torch.isfinite(o).all() and o[:, -20:].abs().min() > 0
    assert (o - o_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("T, chunk", [(7, 5), (64, 16), (100, 16)])
def test_wkv_chunked_gradients_equal_recurrence(T, chunk):
    # both kernels compute in fp32; the hand-written backward inside is checked in float64 below
    leaves = [x.requires_grad_() for x in wkv_inputs(2, T, 3, 8, seed=T)]
    s0 = torch.randn(2, 3, 8, 8, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    w_o, w_s = torch.randn(2, T, 3, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    grads = []
    for wkv in (wkv_recurrent, lambda *x: wkv_chunked(*x, chunk_size=chunk)):
        o, s = wkv(*leaves, s0)
        grads.append(torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), [*leaves, s0]))
    for name, ref, got in zip(["r", "log_w", "k", "v", "a", "b", "state"], *grads):
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), name  # seen: 4e-7


def test_within_chunk_backward_matches_finite_differences_in_float64():
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 2, 6, 5)  # (B, H, n, C, N)
    r, k, a, b = (torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    L = (-0.6 * torch.rand(shape, generator=g, dtype=torch.float64)).cumsum(-2).requires_grad_()
    assert torch.autograd.gradcheck(_WithinChunk.apply, (r, k, a, b, L))


def test_wkv_chunked_saves_under_30x_its_input_for_backward():
    # the (C x C x N) decay tensor is rebuilt in backward, not kept: ~23x a (B, T, d) fp32 tensor at
    # chunk 16, head size 64 (~73x before); sizes of distinct storages, counted as autograd saves them
    B, T, H, N = 2, 128, 2, 64
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    args = [x.requires_grad_() for x in wkv_inputs(B, T, H, N)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wkv_chunked(*args, torch.zeros(B, H, N, N), chunk_size=16)
    assert sum(saved.values()) <= 30 * B * T * H * N * 4


def test_shapes_and_state():
    model = Student(preset("tiny"))
    ids = torch.randint(0, 512, (3, 10))
    out = model(ids, output_hidden_states=True, collect_stats=True)
    assert out.logits.shape == (3, 10, 512)
    assert len(out.hidden_states) == model.cfg.n_layer + 1 and out.hidden_states[-1].shape == (3, 10, 64)
    assert out.state[0]["att"]["wkv"].shape == (3, 4, 16, 16)
    assert len(out.spike_rates) == model.cfg.n_layer * 6
    assert set(out.spike_stats) == {f"{i}.{s}" for i in range(2) for s in ("tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v")}


@pytest.fixture
def float64():
    """The two forms are the same function; in fp32 their rounding differs by ~1e-7, enough to flip a spike
    whose input sits that close to its threshold (seen: one flip in 300 LIF steps, 7e-4 on the logits).
    In float64 they agree to ~1e-9 (a few pieces run in fp32 on purpose, e.g. reduction scales)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("lif, sites", [(False, "default"), (True, "default"), (False, "dense"),
                                       (False, "token_gain"), (False, "signed_cm_v"), (False, "steps")])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_chunked_equals_token_by_token_recurrent(lif, sites, T, float64):
    # "default": the student's own spike defaults (a dict fills the rest: four gain groups without LIF);
    # "token_gain": one gain per token
    kw = ({"spike_sites": ()} if sites == "dense" else {"spike": SpikeConfig(token_gain=1)} if sites == "token_gain"
          else {"spike": {"lif": lif}})
    if sites == "signed_cm_v":
        kw["unsigned_sites"] = ()
    if sites == "steps":
        kw["site_steps"] = {"cm_v": 2, "tm_out": 3}
    # The forms agree to ~2e-9 in float64; a spike input that lands within that of its threshold flips one
    # spike (both forms are right) and shifts a few logits after it: the seed offset keeps clear of such a
    # tie (seed 300 with residual steps has one, at token 193)
    model = random_student(seed=T + 1, **kw)
    ids = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        whole = model(ids, mode="chunked").logits
        state, steps = None, []
        for t in range(T):
            out = model(ids[:, t : t + 1], state, mode="recurrent")
            state, steps = out.state, steps + [out.logits]
    assert (whole - torch.cat(steps, 1)).abs().max() <= 1e-7


@pytest.mark.parametrize("lif", [False, True])
def test_two_halves_with_carried_state_equal_the_whole(lif, float64):
    model = random_student(spike=SpikeConfig(lif=lif))
    ids = torch.randint(0, 512, (2, 150))
    with torch.no_grad():
        whole = model(ids)
        first = model(ids[:, :67])
        second = model(ids[:, 67:], first.state)
    assert (torch.cat([first.logits, second.logits], 1) - whole.logits).abs().max() <= 1e-7
    for a, b in zip(second.state[:-1], whole.state[:-1]):
        assert (a["att"]["wkv"] - b["att"]["wkv"]).abs().max() <= 1e-7
    # the caller's state is not mutated by a forward
    before = first.state[0]["att"]["shift"].clone()
    model(ids[:, :5], first.state)
    assert torch.equal(first.state[0]["att"]["shift"], before)


@pytest.mark.parametrize(
    "spike",
    [SpikeConfig(), SpikeConfig(lif=True), SpikeConfig(lif=True, micro_steps=2, surrogate="superspike"),
     SpikeConfig(threshold="stats", surrogate="triangular"), SpikeConfig(token_gain=4),
     SpikeConfig(threshold="stats", token_gain=4)],
    ids=["learned", "lif", "rate-coded", "stats", "gain-groups", "stats-gain-groups"],
)
def test_gradient_reaches_every_parameter(spike):
    sites = ("block_in", "tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head")
    model = random_student(spike=spike, spike_sites=sites, ternary_weights=True, tie_embeddings=False)
    model.train()
    ids = torch.randint(0, 512, (2, 24))
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    loss = loss + firing_rate_loss(out.spike_rates, 0.2)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert any("threshold_raw" in n for n in names) == (spike.threshold == "learned")
    assert any("leak_raw" in n for n in names) == spike.lif


def test_positive_and_negative_amplitudes_learn_separately():
    spike = TernarySpike(4, SpikeConfig())
    spike.eval()
    x = torch.tensor([[[2.0, 2.0, -2.0, 0.0]]])
    s, _, _ = spike(x)
    assert s.tolist() == [[[1.0, 1.0, -1.0, 0.0]]]
    s.sum().backward()
    # amp_pos moves only on channels that fired +, amp_neg only on channels that fired -
    assert spike.amp_pos.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert spike.amp_neg.grad.tolist() == [0.0, 0.0, -1.0, 0.0]
    assert (spike.threshold_raw.grad != 0).any()


@pytest.mark.parametrize("kind", ["ste", "sigmoid", "triangular", "superspike"])
def test_surrogate_gradient_matches_its_formula(kind):
    z = torch.linspace(-2, 2, 81, dtype=torch.float64, requires_grad=True)
    scale = 3.0
    heaviside(z, kind, scale).sum().backward()
    zd = z.detach()
    expected = {
        "ste": (zd.abs() <= 1 / scale).double() * scale / 2,
        "sigmoid": torch.func.grad(lambda u: torch.sigmoid(scale * u).sum())(zd),
        "triangular": torch.clamp(scale * (1 - scale * zd.abs()), min=0),
        "superspike": (1 + scale * zd.abs()) ** -2,
    }[kind]
    torch.testing.assert_close(z.grad, expected)
    assert torch.equal(heaviside(zd, kind, scale), (zd > 0).double())
    torch.testing.assert_close(surrogate_grad(zd, kind, scale), expected)


def test_spike_statistics_on_hand_built_input():
    spike = TernarySpike(4, SpikeConfig())
    spike.eval()
    with torch.no_grad():
        spike.threshold_raw.fill_(torch.log(torch.expm1(torch.tensor(0.5))).item())  # theta = 0.5
    # channel 0 never fires, 1 always fires +, 2 alternates + / -, 3 fires - on one token of four
    x = torch.tensor([[[0.1, 1.0, 1.0, 0.0], [0.2, 0.9, -1.0, 0.0], [0.0, 0.8, 1.0, -0.7], [-0.3, 0.7, -1.0, 0.2]]])
    stats = SpikeStats()
    spike(x, stats=stats)
    s = stats.summary()
    assert s["tokens"] == 4
    assert s["firing_rate"] == pytest.approx(9 / 16) and s["zero_fraction"] == pytest.approx(7 / 16)
    assert s["pos_fraction"] == pytest.approx(6 / 16) and s["neg_fraction"] == pytest.approx(3 / 16)
    assert s["balance"] == pytest.approx((6 - 3) / 9)
    assert s["dead_fraction"] == pytest.approx(1 / 4) and s["saturated_fraction"] == pytest.approx(2 / 4)


def test_lif_membrane_by_hand():
    cfg = SpikeConfig(lif=True, lif_leak=0.5, learn_leak=False)
    spike = TernarySpike(1, cfg)
    spike.eval()
    with torch.no_grad():
        spike.threshold_raw.fill_(torch.log(torch.expm1(torch.tensor(1.0))).item())  # theta = 1
    x = torch.tensor([[[0.6], [0.6], [0.6], [-2.0]]])
    s, state, _ = spike(x)
    # v: 0.6 -> 0.9 -> 1.05 (fires +1) -> 0.525 - 2 - 1 = -2.475 (fires -1)
    assert s.flatten().tolist() == [0.0, 0.0, 1.0, -1.0]
    assert state["v"].item() == pytest.approx(-2.475)
    # continuing from the carried membrane equals running the whole sequence
    s1, st1, _ = spike(x[:, :2])
    s2, st2, _ = spike(x[:, 2:], st1)
    assert torch.cat([s1, s2], 1).flatten().tolist() == s.flatten().tolist()
    with pytest.raises(ValueError, match="needs lif=True"):
        SpikeConfig(micro_steps=3)


def test_rate_coding_and_annealing():
    spike = TernarySpike(2, SpikeConfig(lif=True, micro_steps=4, lif_leak=0.9))
    spike.eval()
    x = torch.full((1, 5, 2), 0.4)
    s, _, _ = spike(x)
    assert torch.allclose(s * 4, (s * 4).round())  # mean of 4 ternary steps
    spike.mix = 0.0
    assert torch.equal(spike(x)[0], x)  # fully continuous
    spike.mix = 0.5
    plain = TernarySpike(2, SpikeConfig(lif=True, micro_steps=4, lif_leak=0.9))
    plain.load_state_dict(spike.state_dict())
    plain.eval()
    torch.testing.assert_close(spike(x)[0], 0.5 * x + 0.5 * plain(x)[0])


def test_ternary_weights_take_three_values():
    layer = TernaryLinear(8, 4, bias=False)
    x = torch.eye(8)
    w_eff = layer(x).t()  # columns of the effective weight
    gamma = layer.weight.abs().mean()
    assert set((w_eff / gamma).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(w_eff, (layer.weight / gamma).round().clamp(-1, 1) * gamma)


def test_ternary_row_scales_take_three_values_per_row():
    """ternary_scale="row": each output row is its own mean|W_row| times {-1, 0, +1}, and a row of small
    weights keeps its codes (one matrix-wide scale would round it to all zeros)."""
    layer = TernaryLinear(8, 4, bias=False, scale="row")
    with torch.no_grad():
        layer.weight[0] *= 1e-3  # far below the matrix's mean |W|
    w_eff = layer(torch.eye(8)).t()
    gamma = layer.weight.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(w_eff, (layer.weight / gamma).round().clamp(-1, 1) * gamma)
    assert (w_eff[0] != 0).any()
    matrix_wide = TernaryLinear(8, 4, bias=False)
    matrix_wide.load_state_dict(layer.state_dict())
    assert (matrix_wide(torch.eye(8)).t()[0] == 0).all()
    with pytest.raises(ValueError, match="ternary_scale"):
        preset("tiny", ternary_weights=True, ternary_scale="channel")


def test_ternary_anneal_blends_continuous_weights_with_the_spikes():
    """ternary_anneal: set_spike_mix(m) makes every ternary matrix m * W_q + (1 - m) * W, and the gradient
    reaches W as through a plain linear layer (straight-through at every mix); without it the weights are
    ternary from the first step."""
    model = Student(preset("tiny", n_layer=1, ternary_weights=True, ternary_anneal=True))
    layer = model.blocks[0].att.key
    assert layer in model.annealed_modules()
    model.set_spike_mix(0.25)
    x = torch.randn(3, 64, requires_grad=True)
    codes, gamma = layer.ternary_codes()
    torch.testing.assert_close(layer(x), x @ (0.25 * codes * gamma + 0.75 * layer.weight).t())
    layer(x).square().sum().backward()
    w_eff = (0.25 * codes * gamma + 0.75 * layer.weight).detach().requires_grad_()
    (x.detach() @ w_eff.t()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_eff.grad)
    fixed = Student(preset("tiny", n_layer=1, ternary_weights=True))
    fixed.set_spike_mix(0.25)
    assert fixed.blocks[0].att.key.mix == 1.0 and fixed.blocks[0].att.key not in fixed.annealed_modules()


@pytest.mark.parametrize("bits", [8, 4])
def test_row_quantised_embedding_is_codes_times_a_scale_per_token(bits):
    """embedding_bits: each row of the tied matrix is s_v * round(E_v / s_v) with s_v = max|E_v| / (2^(b-1) - 1);
    the lookup gives the same rows the tied head multiplies by, and the gradient is straight-through."""
    model = Student(preset("tiny", embedding_bits=bits))
    emb = model.emb
    qmax = 2 ** (bits - 1) - 1
    w = emb.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / qmax
    want = (w / scale).round().clamp(-qmax, qmax) * scale
    torch.testing.assert_close(emb.quantised_weight(), want)
    assert len(torch.unique(emb.quantised_weight()[3])) <= 2 * qmax + 1
    ids = torch.tensor([[3, 9, 3]])
    torch.testing.assert_close(emb(ids)[0], want[[3, 9, 3]])
    h = torch.randn(1, 3, 64)
    with torch.no_grad():  # the tied head multiplies by the same quantised rows (the head site is off by default)
        out = model.eval()(ids, output_hidden_states=True)
        torch.testing.assert_close(out.logits, model.ln_out(out.hidden_states[-1]) @ want.t())
    (h @ emb.quantised_weight().t()).sum().backward()
    torch.testing.assert_close(emb.weight.grad, h.reshape(-1, 64).sum(0).expand(512, 64))
    with pytest.raises(ValueError, match="embedding_bits"):
        preset("tiny", embedding_bits=2)


def test_save_and_load_round_trip(tmp_path):
    model = random_student(spike=SpikeConfig(lif=True))
    model.save_pretrained(tmp_path / "m")
    loaded = Student.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert all(bool(m.initialized) for m in loaded.spike_modules().values())


def test_a_few_steps_lower_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = Student(preset("tiny"))
    model.train()
    ids = torch.randint(0, 512, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_embedding_from_teacher_by_pca():
    torch.manual_seed(0)
    teacher = torch.randn(512, 6) @ torch.randn(6, 96) + 0.01 * torch.randn(512, 96)  # rank ~6 in 96 dims
    proj = project_embedding(teacher, 8)
    centred = teacher - teacher.mean(0)
    # PCA keeps the Gram matrix of the centred embedding (rank 6 <= 8 components)
    torch.testing.assert_close(proj @ proj.t(), centred @ centred.t(), atol=0.05, rtol=0.01)
    wide = project_embedding(teacher[:, :4], 10)
    assert wide.shape == (512, 10) and torch.equal(wide[:, :4], teacher[:, :4])
    model = Student(preset("tiny", d_model=64))
    model.init_embedding_from(teacher)
    e = model.emb.weight.detach()
    assert e.std().item() == pytest.approx(0.02, rel=1e-3)
    cos = F.cosine_similarity(e[:50, None], e[None, :50], dim=-1)
    cos_ref = F.cosine_similarity(centred[:50, None], centred[None, :50], dim=-1)
    assert (cos - cos_ref).abs().max() < 0.05


def test_presets_and_sizing():
    counts = {name: Student(preset(name)).parameter_report() for name in PRESETS}
    assert counts["tiny"]["total"] < 1_000_000
    assert 8e6 < counts["small"]["total"] < 12e6
    assert 2.2e6 < counts["proxy"]["total"] < 2.7e6  # 0.4-0.5x enwiki-tiny's 5.39M, GPT-2 small -> base's 0.42x
    assert 45e6 < counts["base"]["total"] < 55e6
    for report in counts.values():
        assert report["total"] == sum(v for k, v in report.items() if k != "total")
        assert report["spikes"] > 0 and report["head"] == 0
    cfg = config_for_store("tiny", 8192)
    assert cfg.vocab_size == 8192 and isinstance(cfg, StudentConfig)
    with pytest.raises(ValueError, match="unknown spike sites"):
        preset("tiny", spike_sites=("tm_q",))


def test_energy_estimate():
    dense = random_student(spike_sites=())
    model = random_student()
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        out = model(ids, collect_stats=True)
        dense_out = dense(ids, collect_stats=True)
    assert dense.energy_report(dense_out.spike_stats)["energy_ratio_vs_dense"] == pytest.approx(1.0)
    e = model.energy_report(out.spike_stats)
    cfg = model.cfg
    C, Fd = cfg.d_model, cfg.d_ffn
    acs = 0.0
    for i in range(cfg.n_layer):
        for site, ops in (("tm_r", C * C), ("tm_k", C * C), ("tm_v", C * C), ("tm_out", C * C),
                          ("cm_k", C * Fd), ("cm_v", Fd * C)):
            acs += out.spike_stats[f"{i}.{site}"].summary()["firing_rate"] * ops
    assert e["acs_per_token"] == pytest.approx(acs)
    assert e["energy_pj_per_token"] == pytest.approx(e["macs_per_token"] * 4.6 + acs * 0.9)
    assert e["energy_ratio_vs_dense"] < 1.0
    # a per-token gain costs 2 x in + out multiplies per spiked matmul per token (its mean, the thresholds
    # times it, the outputs times it), the head included when it is spiked
    sites = (*model.cfg.spike_sites, "head")
    gained = random_student(spike_sites=sites, spike=SpikeConfig(token_gain=True))
    plain = random_student(spike_sites=sites, spike=SpikeConfig())  # no gain (the student's default has four)
    stats = plain(ids, collect_stats=True).spike_stats
    extra = cfg.n_layer * (4 * 3 * C + (2 * C + Fd) + (2 * Fd + C)) + 2 * C + cfg.vocab_size
    assert gained.energy_report(stats)["macs_per_token"] - plain.energy_report(stats)["macs_per_token"] == \
        pytest.approx(extra)
    # with G gain groups each output sums G partial sums, each scaled once: G x out multiplies
    grouped = random_student(spike_sites=sites, spike=SpikeConfig(token_gain=4))
    extra = cfg.n_layer * (4 * (2 * C + 4 * C) + (2 * C + 4 * Fd) + (2 * Fd + 4 * C)) + 2 * C + 4 * cfg.vocab_size
    assert grouped.energy_report(stats)["macs_per_token"] - plain.energy_report(stats)["macs_per_token"] == \
        pytest.approx(extra)


def test_detach_state_cuts_the_graph():
    model = random_student()
    model.train()
    out = model(torch.randint(0, 512, (1, 8)))
    cut = detach_state(out.state)
    assert out.state[0]["att"]["wkv"].requires_grad and not cut[0]["att"]["wkv"].requires_grad


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = random_student(spike=SpikeConfig(lif=True))
        model.train()
        model.gradient_checkpointing = ckpt
        ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
        out = model(ids)
        loss = F.cross_entropy(out.logits.reshape(-1, 512), ids.reshape(-1)) + firing_rate_loss(out.spike_rates, 0.2)
        loss.backward()
        assert len(out.spike_rates) == 12
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_binary_spikes_are_non_negative_and_every_parameter_learns():
    model = random_student(spike=SpikeConfig(binary=True))
    model.train()
    ids = torch.randint(0, 512, (2, 16))
    seen = []
    hook = lambda mod, inp, out: seen.append(out[0].detach())  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in model.spike_modules().values()]
    out = model(ids)
    for h in handles:
        h.remove()
    assert seen and all((s >= 0).all() for s in seen)
    assert not any("amp_neg" in n for n, _ in model.named_parameters())
    F.cross_entropy(out.logits.reshape(-1, 512), ids.reshape(-1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_centering_keeps_a_channel_with_an_offset_from_saturating():
    x = 3.0 + 0.5 * torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(0))
    rates = {}
    for center in (False, True):
        spike = TernarySpike(8, SpikeConfig(center=center, stats_alpha=0.7))  # threshold 0.7 x mean|x|: 2.1
        spike.train()
        spike(x)  # data-dependent init
        spike.eval()
        stats = SpikeStats()
        out, _, _ = spike(x, stats=stats)
        rates[center] = stats.summary()
        if center:
            assert (out.mean((0, 1)) - x.mean((0, 1))).abs().max() < 0.3  # s + mu tracks the input
    assert rates[False]["firing_rate"] > 0.9  # the offset alone crosses the threshold almost always
    assert rates[True]["firing_rate"] < 0.8 and rates[True]["saturated_fraction"] == 0.0


def test_thresholds_follow_the_input_scale_during_training():
    # the failure this prevents: a threshold set while the input was small stays tiny after the input grows,
    # the surrogate gradient vanishes, and the site fires on every token (seen at tm_out in real runs)
    g = torch.Generator().manual_seed(0)
    spike = TernarySpike(16, SpikeConfig())
    spike.train()
    spike(0.01 * torch.randn(4, 32, 16, generator=g))  # init on a small input
    for _ in range(100):  # the input grows 100x; the running scale follows it
        spike(torch.randn(4, 32, 16, generator=g))
    spike.eval()
    stats = SpikeStats()
    spike(torch.randn(4, 32, 16, generator=g), stats=stats)
    assert 0.3 < stats.summary()["firing_rate"] < 0.8 and stats.summary()["saturated_fraction"] == 0.0
    assert (spike.scale - 0.8).abs().max() < 0.15  # ~ E|N(0,1)| = 0.80


def test_token_gain_fits_loud_and_quiet_tokens():
    """Gaussian tokens at loudness 0.1x..10x. Without the gain a channel's one threshold sits above every
    quiet token (they never fire: relative error 1) and its one amplitude is too small for loud ones; with
    it every token is coded as well as a unit one (~0.45, the ternary code's error on a Gaussian), and the
    gain carries gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.logspace(-1, 1, 64).view(1, 64, 1) * torch.randn(4, 64, 16, generator=g)
    quiet, loud, spikes = {}, {}, {}
    for gain in (False, True):
        spike = TernarySpike(16, SpikeConfig(token_gain=gain, center=False))
        spike.train()
        spike(x)  # data-dependent init
        spike.eval()
        with torch.no_grad():
            out, _, _ = spike(x)
        rel = (out - x).norm(dim=-1) / x.norm(dim=-1)
        quiet[gain], loud[gain], spikes[gain] = rel[:, :16].median(), rel[:, -16:].median(), spike
    assert quiet[False] > 0.99 and quiet[True] < 0.5
    assert loud[True] < 0.5 < loud[False]
    xg = x.clone().requires_grad_()
    out, _, _ = spikes[True](xg)
    (out * torch.linspace(-1, 1, 16)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("centered", [False, True])
def test_grouped_token_gain_equals_spiking_each_group_at_its_own_gain(centered):
    """token_gain = G: every token's channels fall in G equal groups, each spiked at its own mean |x - mu|
    and scaled back by it. Reference: the same thresholds and amplitudes in a site without a gain, fed each
    (token, group) slice divided by a gain computed in a Python loop, its output multiplied back."""
    g = torch.Generator().manual_seed(0)
    loud = torch.tensor([0.1, 1.0, 10.0, 0.5]).repeat_interleave(6)  # four groups of six, 100x apart
    x = loud * torch.randn(2, 8, 24, generator=g) + 0.3
    cfg = SpikeConfig(token_gain=4, center=centered)
    site = TernarySpike(24, cfg)
    site.train()
    site(x)  # data-dependent init, per group-normalised input
    site.eval()
    plain = TernarySpike(24, SpikeConfig(center=centered))
    plain.load_state_dict(site.state_dict())
    plain.eval()
    xg = x.clone().requires_grad_()
    out, _, _ = site(xg)
    xc = x - site.offset.detach() if centered else x
    gains = torch.empty_like(x)
    for b in range(2):
        for t in range(8):
            for j in range(4):
                gains[b, t, 6 * j:6 * (j + 1)] = xc[b, t, 6 * j:6 * (j + 1)].abs().mean()
    ref, _, _ = plain((xc / gains + (site.offset.detach() if centered else 0)))
    ref = (ref - site.offset.detach()) * gains + site.offset.detach() if centered else ref * gains
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    fired = (out.detach() - (site.offset.detach() if centered else 0)) != 0
    assert 0.2 < fired[..., :6].float().mean() < 0.8 and 0.2 < fired[..., 12:18].float().mean() < 0.8  # quiet and loud groups both fire
    out.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_the_student_defaults_to_four_gain_groups_and_saved_configs_keep_theirs():
    assert preset("proxy").spike.token_gain == 4
    assert preset("proxy", spike={"surrogate": "ste"}).spike.token_gain == 4  # an override dict keeps the default
    assert preset("proxy", spike={"lif": True}).spike.token_gain == 0  # not with LIF (a carried membrane)
    assert preset("proxy", spike={"lif": True, "token_gain": 4}).spike.token_gain == 4
    assert preset("proxy", spike={"token_gain": False}).spike.token_gain == 0
    saved = preset("proxy", spike={"token_gain": True}).to_dict()
    assert StudentConfig.from_dict(saved).spike.token_gain == 1  # saved before groups: true = one gain
    del saved["spike"]["token_gain"]
    assert StudentConfig.from_dict(saved).spike.token_gain == 0  # saved before token_gain existed: none


def test_token_gain_groups_must_divide_every_site():
    with pytest.raises(ValueError, match="do not divide"):
        TernarySpike(10, SpikeConfig(token_gain=4))
    with pytest.raises(ValueError, match="number of channel groups"):
        SpikeConfig(token_gain=-1)
    assert TernarySpike(10, SpikeConfig(token_gain=True)).gain(torch.ones(3, 10)).shape == (3, 1)  # true = 1 group
    assert TernarySpike(12, SpikeConfig(token_gain=4)).gain(torch.ones(3, 12)).shape == (3, 4, 1)  # no (3, 12) copy
    with pytest.raises(ValueError, match="must divide every spiked width"):  # the model config says so
        preset("tiny", spike={"token_gain": 3})
    assert preset("tiny", spike={"token_gain": 3}, spike_sites=()).spike.token_gain == 3  # nothing spiked: no width


def test_unsigned_sites_choose_which_sites_lose_the_negative_branch():
    default = random_student()
    signed = random_student(unsigned_sites=())
    site = lambda m: m.blocks[0].ffn.spikes.spikes["cm_v"]  # noqa: E731
    assert not site(default).signed and not site(default).centered
    assert site(signed).signed and site(signed).centered
    assert StudentConfig.from_dict(signed.cfg.to_dict()).unsigned_sites == ()
    with pytest.raises(ValueError, match="unknown spike sites"):
        StudentConfig(unsigned_sites=("cm_x",))


def test_straight_through_input_gradient_is_one_inside_the_code_range():
    g = torch.Generator().manual_seed(0)
    x0 = 2 * torch.randn(2, 32, 6, generator=g, dtype=torch.float64)
    spike = TernarySpike(6, SpikeConfig(straight_through=True, center=False)).double()
    spike.train()
    spike(x0)
    spike.eval()
    x = x0.clone().requires_grad_()
    s, _, _ = spike(x)
    s.sum().backward()
    hi = spike.amp_pos.abs() * spike.scale
    lo = -spike.amp_neg.abs() * spike.scale
    inside = (x0 > lo) & (x0 < hi)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x.grad, inside.double())  # 1 inside [-a_neg, a_pos], 0 beyond
    assert spike.threshold_raw.grad.abs().sum() > 0  # thresholds still learn through the surrogate
    assert set(s.detach().unique().tolist()) <= {0.0, *hi.tolist(), *lo.tolist()}  # the forward is the code


@pytest.mark.parametrize("kind", ["ste", "sigmoid", "triangular", "superspike"])
@pytest.mark.parametrize("site", ["signed_learned", "unsigned_learned", "signed_stats", "lif", "token_gain",
                                  "straight_through"])
def test_surrogate_gradient_is_scale_invariant(kind, site):
    # multiply a site's input and its scale by 100: the spikes scale by 100 and ds/dx must not change
    # (before the fix the surrogate was evaluated at x - theta with a fixed width: mean ds/dx 0.007 at input
    # std 0.003, 0.52 at 0.3, and only 9% of tokens got any gradient at std 30)
    cfg = SpikeConfig(surrogate=kind, threshold="stats" if site == "signed_stats" else "learned",
                      lif=site == "lif", token_gain=site == "token_gain",
                      straight_through=site == "straight_through")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)
    grads = {}
    for factor in (0.003, 0.3, 30.0):
        spike = TernarySpike(6, cfg, signed=site != "unsigned_learned").double()
        x0 = base.abs() if site == "unsigned_learned" else base
        spike.train()
        spike(x0.clone())  # data-dependent init at unit scale, so every factor starts from the same parameters
        spike.eval()
        with torch.no_grad():
            if site != "token_gain":  # with a token gain the scale is that of x / gain: unitless
                spike.scale.mul_(factor)
            if spike.centered:
                spike.offset.mul_(factor)
        x = (x0 * factor).requires_grad_()
        s, _, _ = spike(x)
        (s * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum().backward()
        grads[factor] = (x.grad.clone(), spike.amp_pos.grad / factor)
    assert grads[0.3][0].abs().sum() > 0
    for factor in (0.003, 30.0):
        torch.testing.assert_close(grads[factor][0], grads[0.3][0], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(grads[factor][1], grads[0.3][1], rtol=1e-5, atol=1e-12)


def test_residual_steps_spike_what_the_steps_before_left():
    """K steps at a site: step k spikes x - (s_1 + ... + s_{k-1}) with its own thresholds and amplitudes
    (checked against the steps applied by hand), every step's parameters learn, the code gets finer with
    K, and each step's indicators count in the site's statistics."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 32, 48)) ** 2  # cm_v's input: relu^2, unsigned
    errors = []
    for steps in (1, 2, 3):
        site = TernarySpike(48, SpikeConfig(), signed=False, steps=steps).train()
        site(x)  # data-dependent init of every step, each on what the steps before it left
        site.eval()
        stats = SpikeStats()
        s, _, rate = site(x, stats=stats)
        by_hand, left, module, indicators = 0, x, site, []
        while module is not None:
            step, pos, neg = module.fire(left)
            by_hand, left, module = by_hand + step, left - step, module.residual
            indicators.append((pos + neg).mean())
        torch.testing.assert_close(s, by_hand, rtol=1e-6, atol=1e-6)  # only the order of the sums differs
        assert float(rate) == pytest.approx(float(torch.stack(indicators).mean()))
        assert stats.tokens == steps * 4 * 32
        assert all(len(torch.unique(s[..., c])) <= 3**steps for c in range(48))
        errors.append(float(((s - x) ** 2).mean() / (x**2).mean()))
    assert errors[0] > 1.5 * errors[1] > 1.5 * 1.2 * errors[2]  # measured 0.42, 0.18, 0.11
    model = random_student(site_steps={"cm_v": 2}).train()
    ids = torch.randint(0, 512, (2, 24))
    out = model(ids)
    F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    residual = [(n, p) for n, p in model.named_parameters() if ".cm_v.residual." in n]
    assert {n.rsplit(".", 1)[1] for n, _ in residual} == {"threshold_raw", "amp_pos", "amp_neg"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in residual)
    assert StudentConfig.from_dict(model.cfg.to_dict()).site_steps == {"cm_v": 2}
    for bad in ({"cm_x": 2}, {"cm_v": 0}, {"cm_v": 1.5}, {"cm_v": True}):
        with pytest.raises(ValueError):
            StudentConfig(site_steps=bad)
    with pytest.raises(ValueError, match="lif"):
        StudentConfig(site_steps={"cm_v": 2}, spike=SpikeConfig(lif=True))


def test_energy_counts_every_step_of_a_site():
    """Firing rates are per step: K residual steps or K LIF micro-steps cost K rounds of additions."""
    ids = torch.randint(0, 512, (2, 32))
    plain = random_student()
    stats = plain(ids, collect_stats=True).spike_stats
    cfg = plain.cfg
    cm_v_acs = sum(stats[f"{i}.cm_v"].summary()["firing_rate"] for i in range(cfg.n_layer)) * cfg.d_ffn * cfg.d_model
    stepped = random_student(site_steps={"cm_v": 3})
    assert stepped.energy_report(stats)["acs_per_token"] - plain.energy_report(stats)["acs_per_token"] == \
        pytest.approx(2 * cm_v_acs)
    lif1, lif4 = random_student(spike=SpikeConfig(lif=True)), random_student(spike=SpikeConfig(lif=True, micro_steps=4))
    assert lif4.energy_report(stats)["acs_per_token"] == pytest.approx(4 * lif1.energy_report(stats)["acs_per_token"])


def test_a_residual_steps_gradient_reaches_the_input_directly():
    """d(s_1 + s_2(x - s_1))/dx is taken as s_1'(x) + s_2'(r): the residual's surrogate passes its gradient
    straight to the input, not also through s_1's surrogate (that product of bumps diverged in training)."""
    torch.manual_seed(1)
    x0 = torch.relu(torch.randn(2, 16, 24)) ** 2
    site = TernarySpike(24, SpikeConfig(), signed=False, steps=2).train()
    site(x0)
    site.eval()
    x = x0.clone().requires_grad_()
    s, _, _ = site(x)
    g = torch.randn_like(s)
    (s * g).sum().backward()
    x1 = x0.clone().requires_grad_()
    first = site.fire(x1)[0]
    r = (x0 - first.detach()).requires_grad_()
    second = site.residual.fire(r)[0]
    (first * g).sum().backward()
    (second * g).sum().backward()
    torch.testing.assert_close(x.grad, x1.grad + r.grad)


def test_the_spike_site_table_builds_every_site_at_its_width():
    """Each SPIKE_SITES row is a spike module in the module it names, at its width, signed as it says, and
    every site that feeds a matmul is counted by the energy estimate: rate x in x out ACs of the matmul
    its row names (block_in feeds none: LayerNorm's output goes through the token shift first)."""
    from goose.student.model import SPIKE_SITES

    model = random_student(spike_sites=tuple(s.name for s in SPIKE_SITES), spike=SpikeConfig())
    cfg = model.cfg
    where = {"att": "blocks.0.att.spikes.spikes.", "ffn": "blocks.0.ffn.spikes.spikes.",
             "block": "blocks.0.spikes.spikes.", "head": "head_spike.spikes."}
    modules = model.spike_modules()
    assert len(modules) == cfg.n_layer * (len(SPIKE_SITES) - 1) + 1
    for site in SPIKE_SITES:
        spike = modules[where[site.module] + site.name]
        assert spike.channels == getattr(cfg, site.width) == cfg.site_width(site.name)
        assert spike.signed == (not site.unsigned)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        stats = model(ids, collect_stats=True).spike_stats
    rates = {k: s.summary()["firing_rate"] for k, s in stats.items()}
    want = sum(rates[f"{i}.{s.name}"] * getattr(cfg, s.feeds[0]) * getattr(cfg, s.feeds[1])
               for i in range(cfg.n_layer) for s in SPIKE_SITES if s.feeds and s.module != "head")
    want += rates["head.head"] * cfg.d_model * cfg.vocab_size
    assert model.energy_report(stats)["acs_per_token"] == pytest.approx(want)


def _ternary_layer_by_hand(token_gain: int):
    """One fully ternary tiny layer (d_model 64, d_ffn 256, 4 heads of 16, low-rank width 32, vocabulary 512,
    tied head), every matmul site and the head spiked, weights whose codes are half zeros (cm_k: a quarter)."""
    from goose.student.spikes import SpikeStats, TernaryLinear

    sites = ("tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head")
    model = Student(preset("tiny", n_layer=1, ternary_weights=True, spike_sites=sites,
                           spike=SpikeConfig(token_gain=token_gain)))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, TernaryLinear):
                keep = 0.75 if name.endswith("ffn.key") else 0.5  # nonzero codes: w = +-c there, 0 elsewhere
                w = torch.zeros_like(module.weight).flatten()
                n = int(keep * w.numel())
                w[:n] = torch.tensor([0.3, -0.3]).repeat(n // 2)
                module.weight.copy_(w.view_as(module.weight))
    rates = {"0.tm_r": 0.25, "0.tm_k": 0.25, "0.tm_v": 0.25, "0.tm_out": 0.25, "0.cm_k": 0.25, "0.cm_v": 0.5,
             "head.head": 0.1}
    stats = {}
    for key, r in rates.items():
        width = 256 if key == "0.cm_v" else 64
        stats[key] = SpikeStats()
        stats[key].add_counts(torch.full((width,), r * 10.0, dtype=torch.float64), torch.zeros(width, dtype=torch.float64), 10)
    return model, stats


def test_energy_of_one_fully_ternary_layer_counted_by_hand():
    """Every operation of one ternary layer, counted by hand. ACs (spike x ternary weight: both non-zero):
    tm_r/k/v/out 4 x 0.25 x 0.5 x 64 x 64 = 2048; cm_k 0.25 x 0.75 x 64 x 256 = 3072; cm_v 0.5 x 0.5 x 256 x 64
    = 4096; the tied fp head, spiked: 0.1 x 64 x 512 = 3276.8. MACs: low-rank w1 w2 a1 a2 g1 g2 (layer 0 has no
    value residual) 6 x 64 x 32 = 12288; state 5 x 4 x 16^2 = 5120; weight scales, one per output of each
    ternary matrix: 4 x 64 + 256 + 64 = 576. Dense twin: 4 x 4096 + 2 x 16384 + 12288 + 5120 + 64 x 512 = 99328."""
    model, stats = _ternary_layer_by_hand(token_gain=0)
    e = model.energy_report(stats)
    assert e["acs_per_token"] == pytest.approx(2048 + 3072 + 4096 + 3276.8)
    assert e["macs_per_token"] == pytest.approx(12288 + 5120 + 576)
    assert e["dense_macs_per_token"] == pytest.approx(99328)
    assert e["energy_pj_per_token"] == pytest.approx(17984 * 4.6 + 12492.8 * 0.9)
    assert e["energy_ratio_vs_dense"] == pytest.approx((17984 * 4.6 + 12492.8 * 0.9) / (99328 * 4.6))
    parts = e["parts_pj_per_token"]
    assert parts == pytest.approx({"projections": 9216 * 0.9, "head": 3276.8 * 0.9, "low_rank": 12288 * 4.6,
                                   "state": 5120 * 4.6, "gains": 0.0, "weight_scales": 576 * 4.6})
    assert sum(parts.values()) == pytest.approx(e["energy_pj_per_token"])
    # four gain groups: 2 x in + 4 x out multiplies per spiked matmul: tm 4 x (128 + 256), cm_k 128 + 1024,
    # cm_v 512 + 256, head 128 + 2048
    gained, stats = _ternary_layer_by_hand(token_gain=4)
    assert gained.energy_report(stats)["parts_pj_per_token"]["gains"] == pytest.approx((1536 + 1152 + 768 + 2176) * 4.6)
    # the fp-weight twin: the same spikes add every weight (no zero codes, no scales)
    fp = Student(preset("tiny", n_layer=1, spike_sites=model.cfg.spike_sites, spike=SpikeConfig(token_gain=0)))
    assert fp.energy_report(stats)["acs_per_token"] == pytest.approx(4 * 0.25 * 4096 + 0.25 * 16384 + 0.5 * 16384 + 3276.8)

"""Losses, temperature and curriculum against brute-force references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goose.pipeline.stage_two.curriculum import Curriculum, CurriculumConfig, difficulty_order, rank, stage_pools
from goose.pipeline.stage_two.losses import (
    ce_loss,
    cka_align,
    cosine_align,
    kd_loss,
    layer_map,
    linear_cka,
    mse_align,
    rskd_loss,
    standardize_channels,
    topk_rskd_loss,
    teacher_bucket_logprobs,
)
from goose.pipeline.stage_one.native_topk import topk_rows_native
from goose.pipeline.stage_one.targets import NonFiniteLogits, _powers_of, exp_power_plan, teacher_targets, topk_rows
from goose.pipeline.stage_two.temperature import Temperature, TemperatureConfig, grad_reverse
# the stored targets and the float64 bucket reference, shared with the KD losses' own tests
from kd_reference import TEMPS, bucket_probs, check_against_brute_force, kl, stored_targets, teacher_case


def bucket_kl_reference(zt, zs, ti, T, reverse=False):
    pb, qb = bucket_probs(zt, ti, T), bucket_probs(zs, ti, T)
    a, b = (qb, pb) if reverse else (pb, qb)
    return T * T * (a * (a.log() - b.log())).sum(-1).mean()


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("reverse", [False, True])
def test_kd_equals_bucket_kl_at_stored_temperatures(T, reverse):
    zt, zs, ti, lp, tail = teacher_case()
    got = kd_loss(zs, ti, lp, tail, TEMPS, T, reverse=reverse)
    torch.testing.assert_close(got.double(), bucket_kl_reference(zt, zs, ti, T, reverse), rtol=1e-4, atol=1e-6)


def test_the_registered_topk_loss_equals_brute_force():
    """loss.kd=topk as the trainer builds it (TopKKD), not only the kd_loss function; reverse KL too."""
    check_against_brute_force("topk", {}, kl, scale=lambda T: T * T)
    check_against_brute_force("topk", {}, lambda p, q: kl(q, p), scale=lambda T: T * T,
                              config=("loss.reverse_kl=true",))


def gpt2_scale_case(offset, tail_masses, V=50257, k=64, seed=0):
    """Teacher logits at GPT-2's scale (about `offset`) whose top-k leaves exactly the given tail masses at
    T=1, one token per mass."""
    g = torch.Generator().manual_seed(seed)
    n = len(tail_masses)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    head = torch.randn(n, k, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    # tail logits below every head logit; shift the head so that the tail keeps the asked-for mass
    tail_lse = torch.logsumexp(z[:, k:], -1)
    want = torch.tensor(tail_masses, dtype=torch.float64)
    head_lse = torch.logsumexp(head, -1)
    shift = tail_lse - head_lse + torch.log1p(-want) - torch.log(want)
    z[:, :k] = head + shift.unsqueeze(-1)
    z = z + offset
    return z.float().unsqueeze(0)  # (1, n, V): what a real teacher hands over, fp32


@pytest.mark.parametrize("offset", [-80.0, -100.0, 0.0])
def test_tail_bucket_is_exact_at_gpt2_logit_scale(offset):
    masses = [0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    z = gpt2_scale_case(offset, masses)
    ti, lp, tail = stored_targets(z, 64)
    for T in TEMPS:
        ref = bucket_probs(z, ti, T)[..., -1].log()
        got = teacher_bucket_logprobs(lp, tail, TEMPS, T)[..., -1].double()
        err = (got - ref).abs().max().item()
        assert err < 1e-3, f"tail log-mass off by {err:.2e} nats at T={T}"
    # a student equal to the teacher scores zero KL at every stored temperature, to fp32 arithmetic (the
    # T^2-scaled loss reaches ~2e-6 at T = 4 from fp32 rounding in the loss itself, not from the store)
    for T in TEMPS:
        assert abs(float(kd_loss(z, ti, lp, tail, TEMPS, T))) / (T * T) < 1e-6


@pytest.mark.parametrize("T", [1.1, 1.4, 1.75, 2.5, 3.5])
def test_kd_between_stored_temperatures_is_close(T):
    zt, zs, ti, lp, tail = teacher_case(V=2000, k=64)
    ref = bucket_kl_reference(zt, zs, ti, T)
    assert abs(float(kd_loss(zs, ti, lp, tail, TEMPS, T)) - float(ref)) / float(ref) < 2e-3
    tail_err = (teacher_bucket_logprobs(lp, tail, TEMPS, T)[..., -1].double() - bucket_probs(zt, ti, T)[..., -1].log())
    assert tail_err.abs().max() < 2e-3


def test_kd_with_k_equal_vocabulary_is_full_kl():
    zt, zs, _, _, _ = teacher_case(V=40)
    ti, lp, tail = stored_targets(zt, 40)
    for T in (1.0, 2.0):
        full = (torch.softmax(zt / T, -1) * (torch.log_softmax(zt / T, -1) - torch.log_softmax(zs / T, -1))).sum(-1)
        torch.testing.assert_close(kd_loss(zs, ti, lp, tail, TEMPS, T), T * T * full.mean(), rtol=2e-3, atol=1e-5)


def test_kd_gradients_are_finite_for_peaked_bf16_logits():
    # DistillKit issue 45: log(1 - sum q) in bf16 gives NaN gradients when the top-k holds ~all the mass
    zt, _, ti, lp, tail = teacher_case()
    zs = torch.full((2, 6, 300), -30.0)
    zs.scatter_(-1, ti[..., :1], 30.0)
    zs = zs.bfloat16().requires_grad_()
    loss = kd_loss(zs, ti, lp, tail, TEMPS, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad.float()).all()


def test_kd_mask_and_temperature_gradient():
    zt, zs, ti, lp, tail = teacher_case()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    masked = kd_loss(zs, ti, lp, tail, TEMPS, 2.0, mask=mask)
    only = kd_loss(zs[:1, :3], ti[:1, :3], lp[:1, :3], tail[:1, :3], TEMPS, 2.0)
    torch.testing.assert_close(masked, only)
    T = torch.tensor(1.7, requires_grad=True)
    kd_loss(zs, ti, lp, tail, TEMPS, T).backward()
    assert torch.isfinite(T.grad) and T.grad != 0


def test_rskd_matches_dense_reference():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 4, 50, generator=g)
    ids = torch.tensor([[3, 7, 9, 0]]).expand(2, 4, 4).contiguous()
    counts = torch.tensor([[5, 3, 2, 0]]).expand(2, 4, 4).contiguous()
    t = torch.zeros(2, 4, 50).scatter_add(-1, ids, counts.float()) / 10
    log_q = torch.log_softmax(zs, -1)
    ref = (t * (torch.where(t > 0, t, torch.ones_like(t)).log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(rskd_loss(zs, ids, counts.to(torch.int16)), ref)


def _topk_rskd_case(V=60, k=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    zt, zs = torch.randn(2, 5, V, generator=g) * 3 - 80, torch.randn(2, 5, V, generator=g) * 2
    t = teacher_targets(zt, torch.zeros(2, 5, dtype=torch.long), top_k=k, tail_temperatures=TEMPS)
    return zt, zs, t["topk_ids"].clone(), t["topk_logprobs"].clone(), t["tail_logmass"].clone()


def test_topk_rskd_with_the_exact_tail_is_full_vocabulary_kl():
    """Draws whose tail counts are exactly proportional to p(.|tail) make the loss the full-vocabulary KL at
    T = 1, value and gradient; draws of top-k ids (however many) must change nothing."""
    V = 60
    zt, zs, ti, lp, tail = _topk_rskd_case(V)
    p = torch.softmax(zt.double(), -1)
    head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ti, True)
    counts = torch.where(head, torch.rand(p.shape, dtype=torch.float64) * 1e6, p / (p * ~head).sum(-1, True) * 1e6)
    ids = torch.arange(V).expand(2, 5, V).contiguous()  # every id drawn, ascending as the store keeps them
    zs1, zs2 = zs.clone().requires_grad_(), zs.double().clone().requires_grad_()
    loss = topk_rskd_loss(zs1, ti, lp, tail, TEMPS, ids, counts.float())
    ref = (p * (p.log() - torch.log_softmax(zs2, -1))).sum(-1).mean()
    loss.backward(), ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs1.grad.double(), zs2.grad, rtol=1e-4, atol=1e-7)


def test_topk_rskd_without_tail_draws_is_bucket_kd_and_is_unbiased():
    V, k = 60, 8
    zt, zs, ti, lp, tail = _topk_rskd_case(V, k)
    only_head = topk_rskd_loss(zs, ti, lp, tail, TEMPS, ti.sort(-1).values, torch.full(ti.shape, 3))
    torch.testing.assert_close(only_head, kd_loss(zs, ti, lp, tail, TEMPS, 1.0))
    # real multinomial draws (32 a token; some tokens' tails hold < 1 %): the mean gradient over many draw sets
    # converges to the full-vocabulary KL's gradient, far below the bucket loss's own distance from it
    from goose.pipeline.stage_one.targets import draw_samples
    zs = zs.clone().requires_grad_()
    grads = []
    for seed in range(1600):
        ids, counts = draw_samples(zt, 32, seeds=[seed, seed + 10000])
        zs.grad = None
        topk_rskd_loss(zs, ti, lp, tail, TEMPS, ids, counts).backward()
        grads.append(zs.grad.clone())
    p = torch.softmax(zt.double(), -1)
    full = (torch.softmax(zs.detach().double(), -1) - p) / (2 * 5)  # d KL(p||q) / dz, mean over 10 tokens
    mean = torch.stack(grads).double().mean(0)
    bucket_only = torch.autograd.grad(kd_loss(zs, ti, lp, tail, TEMPS, 1.0), zs)[0].double()
    err, err_bucket = (mean - full).abs().sum(), (bucket_only - full).abs().sum()
    # measured 0.04 x; without the 1 / P(a tail draw) weight the estimate is biased and stays at 0.11 x
    assert err < 0.07 * err_bucket, (err, err_bucket)


def test_ce_loss_is_next_token_cross_entropy():
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(ce_loss(logits, ids), ref)


def test_alignment_losses():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(linear_cka(x, 3 * x @ q)) == pytest.approx(1.0, abs=1e-5)  # rotation and scale invariant
    y = torch.randn(64, 5, generator=g)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = (yc.t() @ xc).pow(2).sum() / ((xc.t() @ xc).norm() * (yc.t() @ yc).norm())
    torch.testing.assert_close(linear_cka(x, y), ref)
    hs, ht = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 12, generator=g) * 50 + 7
    ht_n = standardize_channels(ht)
    flat = ht_n.reshape(-1, 12)
    assert flat.mean(0).abs().max() < 1e-4 and (flat.std(0, unbiased=False) - 1).abs().max() < 1e-3
    proj = torch.nn.Linear(8, 12, bias=False)
    torch.testing.assert_close(mse_align(hs, ht, proj), F.mse_loss(proj(hs), ht_n))
    cos_ref = (1 - F.cosine_similarity(proj(hs), ht_n, dim=-1)).mean()
    torch.testing.assert_close(cosine_align(hs, ht, proj), cos_ref)
    assert 0 <= float(cka_align(hs, ht)) <= 1


def test_layer_maps():
    assert layer_map("uniform", 4, 12, tuple(range(13))) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert layer_map("uniform", 4, 12, (6, 12)) == [(2, 6), (4, 12)]
    assert layer_map("last_k", 6, 12, (), last_k=2) == [(5, 11), (6, 12)]
    assert layer_map("explicit", 6, 12, (), pairs=[[2, 4], [6, 12]]) == [(2, 4), (6, 12)]


def test_gradient_reversal_raises_the_kd_loss():
    zt, zs, ti, lp, tail = teacher_case()
    temp = Temperature(TemperatureConfig(mode="ctkd", value=2.0, t_min=1.0, t_max=4.0, lambda_max=1.0,
                                         lambda_warmup=0.1))
    opt = torch.optim.SGD(temp.parameters(), lr=0.5)
    before = float(kd_loss(zs, ti, lp, tail, TEMPS, temp.raw().detach()))
    for _ in range(5):
        opt.zero_grad()
        kd_loss(zs, ti, lp, tail, TEMPS, temp(progress=0.5)).backward()  # lambda = 1 after the warm-up
        opt.step()
    after = float(kd_loss(zs, ti, lp, tail, TEMPS, temp.raw().detach()))
    assert after > before  # the student minimises KD; the temperature, through the GRL, maximises it
    assert 1.0 < float(temp.raw().detach()) < 4.0
    # without reversal, plain descent lowers the loss instead
    plain = Temperature(TemperatureConfig(mode="ctkd", value=2.0))
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    opt.zero_grad()
    kd_loss(zs, ti, lp, tail, TEMPS, plain.raw()).backward()
    opt.step()
    assert float(kd_loss(zs, ti, lp, tail, TEMPS, plain.raw().detach())) < before
    # lambda: 0 at the start, cosine ramp, lambda_max after the warm-up
    assert temp.grl_lambda(0.0) == 0.0 and temp.grl_lambda(0.05) == pytest.approx(0.5) and temp.grl_lambda(0.7) == 1.0
    x = torch.tensor(3.0, requires_grad=True)
    grad_reverse(x, 0.25).backward()
    assert float(x.grad) == -0.25


def test_temperature_schedules():
    lin = Temperature(TemperatureConfig(mode="linear", start=4.0, end=1.0))
    assert float(lin(0.0)) == 4.0 and float(lin(0.5)) == 2.5 and float(lin(1.0)) == 1.0
    cos = Temperature(TemperatureConfig(mode="cosine", start=3.0, end=1.0))
    assert float(cos(0.0)) == pytest.approx(3.0) and float(cos(0.5)) == pytest.approx(2.0)
    step = Temperature(TemperatureConfig(mode="step", steps=[[0.0, 4.0], [0.4, 2.5], [0.7, 1.5]]))
    assert [float(step(p)) for p in (0.1, 0.5, 0.9)] == [4.0, 2.5, 1.5]
    assert TemperatureConfig(mode="step", steps=[[0.0, 4.0], [0.4, 2.5]]).range() == (2.5, 4.0)
    with pytest.raises(ValueError):
        TemperatureConfig(mode="ctkd", value=5.0, t_max=4.0)


def test_pocl_order_buckets_and_stages():
    nll = np.array([5.0, 1.0, 3.0, 4.0, 2.0, 6.0])
    ent = np.array([5.0, 2.0, 1.0, 4.0, 3.0, 6.0])
    assert rank(nll).tolist() == [5, 1, 3, 4, 2, 6]
    order = difficulty_order(nll, ent)
    # RRF scores: windows 1, 2, 4 share the best ranks; 5 is hardest on both
    assert order[-1] == 5 and order[-2] == 0 and set(order[:3]) == {1, 2, 4}
    pools = stage_pools(order, 3)
    assert [len(p) for p in pools] == [2, 4, 6]
    assert all(set(pools[i]) <= set(pools[i + 1]) for i in range(2)) and set(pools[-1]) == set(range(6))
    cur = Curriculum(CurriculumConfig(enabled=True, buckets=3, temperatures=[1.0, 1.5, 2.0],
                                      kd_weights=[0.7, 0.85, 1.0], transition_steps=10), order)
    assert cur.values(0) == {"temperature": 1.0, "kd_weight": 0.7, "ce_weight": pytest.approx(0.3), "stage": 0}
    assert not cur.maybe_advance(32, 100) and cur.maybe_advance(34, 100) and cur.stage == 1
    mid = cur.values(39)  # halfway through the smooth transition
    assert mid["temperature"] == pytest.approx(1.25) and mid["kd_weight"] == pytest.approx(0.775)
    assert cur.values(44)["temperature"] == pytest.approx(1.5)
    plateau = Curriculum(CurriculumConfig(enabled=True, buckets=2, temperatures=[1, 2], kd_weights=[1, 1],
                                          advance_on_plateau=True, patience=2), order)
    assert not plateau.maybe_advance(1, 100, 5.0) and not plateau.maybe_advance(2, 100, 5.1)
    assert plateau.maybe_advance(3, 100, 5.2) and plateau.stage == 1


def test_alignment_pairs_like_with_like():
    from goose.pipeline.stage_two.config import TrainConfig
    from goose.pipeline.stage_two.objective import Distiller, align_loss, align_spans

    # the teacher's last stored state is after its final norm: the student's paired state goes through its own
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 5, 8, generator=g) * 3 + 1 for _ in range(3)]  # student: emb, block 1, block 2
    batch = {f"hidden/{t}": torch.randn(2, 5, 6, generator=g) for t in (0, 2, 4)}
    norm = torch.nn.LayerNorm(8)
    cfg = TrainConfig()
    distiller = Distiller(cfg, [(1, 2), (2, 4)], 8, 6)
    p12, p24 = distiller.projectors["1_2"], distiller.projectors["2_4"]
    want = (mse_align(hidden[1], batch["hidden/2"], p12) + mse_align(norm(hidden[2]), batch["hidden/4"], p24)) / 2
    torch.testing.assert_close(align_loss(cfg, distiller, hidden, batch, norm, n_teacher_layers=4), want)
    # feature deltas: each student span against the teacher span between the same aligned points
    assert align_spans([(2, 4), (1, 2)]) == [(1, 2, 0, 0), (2, 4, 1, 2)]
    cfg.loss.align.feature_deltas = True
    want = (mse_align(hidden[1] - hidden[0], batch["hidden/2"] - batch["hidden/0"], p12)
            + mse_align(norm(hidden[2]) - hidden[1], batch["hidden/4"] - batch["hidden/2"], p24)) / 2
    torch.testing.assert_close(align_loss(cfg, distiller, hidden, batch, norm, n_teacher_layers=4), want)


@pytest.mark.parametrize("T", [1.0, 1.7])
def test_fused_student_buckets_equal_the_reference(T):
    from goose.pipeline.stage_two.losses import student_bucket_logprobs, student_bucket_logprobs_reference

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 5, 300, generator=g, dtype=torch.float64) * 4 - 80).requires_grad_()
    ids = torch.randn(2, 5, 300, generator=g).topk(16, -1).indices
    up = torch.randn(2, 5, 17, generator=g, dtype=torch.float64)
    fast = student_bucket_logprobs(z, ids, T)
    ref = student_bucket_logprobs_reference(z, ids, T)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    (gf,) = torch.autograd.grad((fast * up).sum(), z)
    (gr,) = torch.autograd.grad((ref * up).sum(), z)
    torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-12)
    # bf16 logits: finite, and the gradient comes back in bf16
    zb = z.detach().bfloat16().requires_grad_()
    student_bucket_logprobs(zb, ids, T).sum().backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()
    # a temperature that learns (CTKD) takes the fused path too: its gradient against plain autograd's
    t = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    fast = student_bucket_logprobs(z, ids, t)
    assert type(fast.grad_fn).__name__ == "_StudentBucketsBackward"
    torch.testing.assert_close(fast, student_bucket_logprobs_reference(z, ids, t), rtol=1e-10, atol=1e-10)
    gf = torch.autograd.grad((fast * up).sum(), (z, t))
    gr = torch.autograd.grad((student_bucket_logprobs_reference(z, ids, t) * up).sum(), (z, t))
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the trainer's dtypes: fp32 logits (or bf16), a 1-element fp32 temperature; the gradient keeps T's shape
    t32 = torch.tensor([T], requires_grad=True)
    for logits in (z.detach().float(), z.detach().bfloat16()):
        (d_fast,) = torch.autograd.grad((student_bucket_logprobs(logits, ids, t32) * up.float()).sum(), t32)
        (d_ref,) = torch.autograd.grad((student_bucket_logprobs_reference(logits, ids, t32) * up.float()).sum(), t32)
        assert d_fast.shape == t32.shape and d_fast.dtype == torch.float32
        torch.testing.assert_close(d_fast, d_ref, rtol=1e-4, atol=1e-4)


def test_tail_far_below_the_top_stays_exact():
    # every non-top-k logit 150 nats under the top: summed relative to the top, the tail underflows fp32
    z = torch.full((1, 2, 500), -150.0)
    z[..., :64] = torch.linspace(0.0, -20.0, 64)
    z[0, 1, 70] = -140.0
    ti, lp, tail = stored_targets(z, 64)
    for j, T in enumerate(TEMPS):
        ref = bucket_probs(z, ti, T)[..., -1].log()
        torch.testing.assert_close(tail[..., j].double(), ref, atol=1e-4, rtol=1e-5)
    for T in (1.1, 1.4, 2.5):  # between stored temperatures the interpolation stays near the truth
        got = teacher_bucket_logprobs(lp, tail, TEMPS, T)[..., -1].double()
        assert (got - bucket_probs(z, ti, T)[..., -1].log()).abs().max() < 0.05 * 150 / T
    # the student side too: a student whose tail is that far down keeps a finite tail bucket
    from goose.pipeline.stage_two.losses import student_bucket_logprobs, student_bucket_logprobs_reference

    zs = z.clone().requires_grad_()
    out = student_bucket_logprobs(zs, ti, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, student_bucket_logprobs_reference(z, ti, 1.0))


def test_teacher_targets_shared_among_threads_equal_one_thread():
    """threads > 1 spreads the row slices over worker threads; every output is bit-identical to one thread,
    including a part that ends in a short slice and the rows whose tail is recomputed for precision."""
    torch.manual_seed(0)
    V = 8192  # 32 rows per slice on CPU: 3 x 50 = 150 rows is 4 full slices and a short one
    z = torch.randn(3, 50, V) * 4
    z[1, 7, 64:] = -200.0  # a tail far below the top (the exact recompute path)
    z[1, 7, :64] = torch.linspace(0.0, -5.0, 64)
    ids = torch.randint(0, V, (3, 50))
    one = teacher_targets(z, ids, top_k=64, tail_temperatures=TEMPS)
    before = torch.get_num_threads()
    for threads in (2, 3):
        many = teacher_targets(z, ids, top_k=64, tail_temperatures=TEMPS, threads=threads)
        for name in one:
            torch.testing.assert_close(many[name], one[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.get_num_threads() == before  # the workers set their own thread count, not the caller's


def _targets_reference_fp64(z: torch.Tensor, ids: torch.Tensor, topk_ids: torch.Tensor, temps=TEMPS) -> dict:
    """Brute force over the whole vocabulary in float64, given which ids are the top-k."""
    z = z.double()
    head = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, topk_ids, True)
    out = {"tail_logmass": torch.stack([torch.logsumexp((z / t).masked_fill(head, float("-inf")), -1)
                                        - torch.logsumexp(z / t, -1) for t in temps], -1)}
    logp = torch.log_softmax(z, -1)
    out["topk_logprobs"] = logp.gather(-1, topk_ids)
    out["entropy"] = -(logp.exp() * logp).sum(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out["gold_nll"] = torch.cat([nll, torch.full_like(nll[:, :1], float("nan"))], 1)
    return out


def _hard_logits(V: int, seed: int = 0) -> torch.Tensor:
    """GPT-2-scale logits (around -80) with the cases a value mask could get wrong: a tie across the k-th
    value (one copy in the top-k, one in the tail), a row of 100 equal maxima, a row whose tail sits 200 nats
    down (the exact recompute path), and an all-equal row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 40, V, generator=g) * 3 - 80
    row = z[0, 3]
    order = row.argsort(descending=True)
    row[order[64]] = row[order[63]]  # the 64th and 65th largest equal
    z[0, 5, :100] = z[0, 5].max() + 1.0
    z[1, 7, 64:] = -280.0
    z[1, 7, :64] = torch.linspace(-80.0, -85.0, 64)
    z[1, 9] = -80.0
    return z


@pytest.mark.parametrize("V", [8192, 8200, 50257])
def test_topk_rows_equals_torch_topk(V):
    """The grouped top-k (two levels at V = 50257: the 3,142 group maxima searched the same way) gives
    torch.topk's values, sorted, at ids that hold them, with the k largest packed into as few strided groups
    as possible, into the remainder columns, and tied across the k-th value."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, V, generator=g) * 3 - 80
    width = V // 16
    z[1, torch.arange(16) * width] = -10.0 - torch.arange(16.0)  # one group holds 16 of the top 64
    z[1, torch.arange(16) * width + 1] = -30.0 - torch.arange(16.0)
    z[2, 16 * width :] = -5.0  # the remainder columns (V 8200, 50257) on top
    z[3, :200] = -20.0  # 200 equal values across the k-th
    z[4, 100:164] = -1.0 - torch.arange(64.0)  # the top 64 in consecutive ids (64 different groups)
    z[5] = -80.0  # all equal
    ref = torch.topk(z, 64, dim=-1, sorted=True).values
    vals, idx = topk_rows(z, 64)
    assert torch.equal(vals, ref)
    assert torch.equal(z.gather(-1, idx), vals)
    assert all(len(set(row.tolist())) == 64 for row in idx)


@pytest.mark.parametrize("V", [100, 1000, 8192, 8200, 50257])
def test_native_topk_equals_a_stable_sort(V):
    """The C top-k (`native_topk.py`): the k largest of every row in (value desc, id asc) order, exactly the
    first k of a stable descending sort, on the same adversarial rows as the grouped top-k above plus
    infinities; small rows (every id a candidate) and k from 1 to V; a NaN row still gets k ids in range
    (the caller rejects it)."""
    g = torch.Generator().manual_seed(V)
    z = torch.randn(10, V, generator=g) * 3 - 80
    width = V // 16
    z[1, torch.arange(16) * width] = -10.0 - torch.arange(16.0)  # one group holds 16 of the top 64
    z[2, 16 * width :] = -5.0  # the remainder columns on top
    z[3, :200] = -20.0  # 200 equal values across the k-th
    z[4, ::7] = z[4].max()  # many equal maxima
    z[5] = -80.0  # all equal
    z[6, 10] = float("inf")
    z[7] = float("-inf")
    z[8, 3::5] = float("-inf")
    z[9, 3] = float("nan")
    for k in sorted({1, 64, V // 2, V} & set(range(1, V + 1))):
        stats = {}
        vals, ids = topk_rows_native(z[:9], k, stats)
        groups = V // 16 + V % 16
        # rows without NaN take the grouped path wherever they have 2k groups (the whole-row path would still
        # be right, and so would hide a grouped path that loses candidates)
        assert stats["whole_rows"] == (0 if groups >= 2 * k else 9), (k, stats)
        vals, ids = topk_rows_native(z, k)
        ref = torch.sort(z[:9], dim=-1, descending=True, stable=True)
        assert torch.equal(vals[:9], ref.values[:, :k]), k
        assert torch.equal(ids[:9], ref.indices[:, :k]), k
        assert ids[9].min() >= 0 and ids[9].max() < V and len(set(ids[9].tolist())) == k
    # a strided view (a slice of a wider tensor's rows) is read in place
    wide = torch.randn(4, V + 7, generator=g)
    vals, ids = topk_rows_native(wide[:, 3 : 3 + V], 16)
    assert torch.equal(vals, torch.topk(wide[:, 3 : 3 + V], 16).values)
    with pytest.raises(ValueError, match="k must be"):
        topk_rows_native(z, V + 1)
    with pytest.raises(ValueError, match="2-D float32"):
        topk_rows_native(z.double(), 4)


def test_native_topk_is_memory_safe(tmp_path):
    """tests/topk_asan.c: the C top-k on 1,000 random shapes and rows (ties, +-inf, NaN, k up to V, V up to
    70,000) equals qsort, built with AddressSanitizer and UBSan (any out-of-bounds access aborts it), on the
    AVX-512 path where the machine has it and on the portable one; and every row without NaN that has 2k
    groups takes the grouped path (the whole-row fallback would hide a grouped path that loses candidates)."""
    import subprocess

    from goose import native
    from goose.pipeline.stage_one import native_topk

    cc = native.compiler()
    harness = Path(__file__).with_name("topk_asan.c")
    for flags in (["-march=native"], ["-march=native", "-mno-avx512f"]):
        exe = tmp_path / "topk_asan"
        build = subprocess.run([*cc, "-O1", "-g", *flags, "-fsanitize=address,undefined", "-fno-sanitize-recover",
                                f'-DGOOSE_TOPK_SOURCE="{native_topk.SOURCE}"', "-o", str(exe), str(harness), "-lm"],
                               capture_output=True, text=True)
        if build.returncode != 0:
            pytest.skip(f"the compiler cannot build with sanitizers here: {build.stderr.strip()[:200]}")
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "1000 trials equal to qsort" in run.stdout


def test_exp_power_plan():
    """The default grid is one exp per logit: 1 / T_j = n_j / 60."""
    assert exp_power_plan(TEMPS) == (60, [60, 48, 40, 30, 20, 15])
    assert exp_power_plan((1.0, 2.0)) == (2, [2, 1])
    assert exp_power_plan((1.1, 1.25)) == (55, [50, 44])
    # 1 / 1.33 = 100 / 133: no base with every power <= 64, so one exp per temperature (the fallback)
    assert exp_power_plan((1.0, 1.33)) is None
    u = torch.rand(1000, dtype=torch.float64)
    powers = _powers_of(u, [60, 48, 40, 30, 20, 15, 7])
    for n in (60, 48, 40, 30, 20, 15, 7):
        torch.testing.assert_close(powers[n], u**n, rtol=1e-12, atol=0)


def _check_compiled_targets(V: int, temps=TEMPS) -> None:
    z = _hard_logits(V)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    eager = teacher_targets(z, ids, top_k=64, tail_temperatures=temps)
    compiled = teacher_targets(z, ids, top_k=64, tail_temperatures=temps, compiled=True)
    # the C top-k: the first k of a stable descending sort (ties in ascending id order); torch.topk's order
    # among ties is its own, so the eager ids hold the same values
    flat = z.reshape(-1, V)
    stable = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, :64].view(2, 40, 64)
    assert torch.equal(compiled["topk_ids"], stable)
    assert torch.equal(z.gather(-1, eager["topk_ids"]), z.gather(-1, compiled["topk_ids"]))
    ref = _targets_reference_fp64(z, ids, compiled["topk_ids"], temps)
    for name, r in ref.items():
        for got in (compiled[name], eager[name]):
            torch.testing.assert_close(got.double(), r, rtol=1e-5, atol=2e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    # the tie across the k-th value: the copy outside the top-k is in the tail (a value mask z < v_k alone
    # would leave it out of both)
    assert (compiled["tail_logmass"][0, 3] - eager["tail_logmass"][0, 3]).abs().max() < 1e-5
    # shared among worker threads: bit-identical to one thread (the last slice of each part padded)
    two = teacher_targets(z, ids, top_k=64, tail_temperatures=temps, compiled=True, threads=2)
    for name in compiled:
        torch.testing.assert_close(two[name], compiled[name], rtol=0, atol=0, equal_nan=True, msg=name)
    # a NaN or infinite logit anywhere fails as on the eager path, naming its rows
    for bad in (float("nan"), float("inf"), float("-inf")):
        zb = z.clone()
        zb[1, 4, 300] = bad
        with pytest.raises(NonFiniteLogits) as err:
            teacher_targets(zb, ids, top_k=64, tail_temperatures=temps, compiled=True)
        assert err.value.rows == [40 + 4]


def test_compiled_teacher_targets_equal_the_full_vocabulary_reference():
    """The compiled kernels against float64 brute force and the eager path, at enwiki-tiny's vocabulary
    (80 rows: two full slices of 32 and a padded one)."""
    _check_compiled_targets(8192)


def test_compiled_teacher_targets_without_a_power_plan():
    """A grid with no common exp base (1.33) takes one exp per temperature, squares where T and 2T are both
    stored: the same reference."""
    _check_compiled_targets(8192, temps=(1.0, 1.33, 2.0, 2.66))


def test_compiled_teacher_targets_at_gpt2_vocabulary():
    """The same at V = 50257 (16 x 3141 + 1: the top-k's remainder column; 16-row slices)."""
    _check_compiled_targets(50257)

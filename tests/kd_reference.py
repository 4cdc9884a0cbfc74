"""Brute-force references for the KD losses over the top-k + tail buckets (imported by their tests).

The store's targets come from full teacher logits through the real writer-side code (`stored_targets`), and
every reference is computed in float64 from the full logits of both sides: the buckets as sums of full
softmax probabilities, never through the code under test.
"""

from __future__ import annotations

import torch

from goose.cache.schema import StoreSpec, decode_logprobs, encode_logprobs
from goose.pipeline.stage_one.targets import teacher_targets
from goose.pipeline.stage_two.config import load_config
from goose.pipeline.stage_two.losses import build_kd_loss

TEMPS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def stored_targets(zt, k, temps=TEMPS):
    """What the store keeps for teacher logits zt, through the real writer-side code and the store dtypes."""
    ids = torch.zeros(zt.shape[:-1], dtype=torch.long)
    t = teacher_targets(zt.float(), ids, top_k=k, tail_temperatures=temps)
    step = StoreSpec(1, 1, 1, 1, (1.0,)).logprob_step  # the default a new store gets
    lp = torch.from_numpy(decode_logprobs(encode_logprobs(t["topk_logprobs"].numpy(), step), step))
    return t["topk_ids"].clone(), lp, t["tail_logmass"].clone()  # out of inference mode, as the loader's are


def teacher_case(V=300, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(2, 6, V, generator=g) * 3
    zs = torch.randn(2, 6, V, generator=g) * 2
    ti, lp, tail = stored_targets(zt, k)
    return zt, zs, ti, lp, tail


def bucket_probs(z, ti, T):
    """Brute force in float64 from full logits: k + 1 buckets, tail = summed probability of every other token."""
    p = torch.softmax(z.double() / T, -1)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ti, False)
    return torch.cat([p.gather(-1, ti), (p * outside).sum(-1, keepdim=True)], -1)


def kd_loss_named(name: str, *, config: tuple = (), **options):
    """The registered loss as the trainer builds it from a run config (`config`: more key=value overrides)."""
    return build_kd_loss(load_config(None, [f"loss.kd={name}", f"loss.kd_options={options}", *config]))


def check_against_brute_force(name: str, options: dict, divergence, scale, config: tuple = ()):
    """A bucket KD loss against `divergence(p, q)` (per token, float64 probabilities over the last axis) on
    the buckets of full logits, times `scale(T)`: at stored temperatures, masked, at k = V (where the buckets
    are the full vocabulary), and its gradient against autograd through the float64 reference. Also: merging
    the tail into one bucket never raises the divergence above the full-vocabulary one."""
    loss = kd_loss_named(name, config=config, **options)
    zt, zs, ti, lp, tail = teacher_case()
    batch = {"topk_ids": ti, "topk_logprobs": lp, "tail_logmass": tail}
    mask = (torch.arange(12).reshape(2, 6) % 3 != 0).long()
    for T in (1.0, 2.0):
        want_tok = divergence(bucket_probs(zt, ti, T), bucket_probs(zs, ti, T))
        got = loss(zs, batch, TEMPS, T, None)
        torch.testing.assert_close(got.double(), scale(T) * want_tok.mean(), rtol=2e-4, atol=1e-6)
        got_m = loss(zs, batch, TEMPS, T, mask)
        want_m = (want_tok * mask).sum() / mask.sum()
        torch.testing.assert_close(got_m.double(), scale(T) * want_m, rtol=2e-4, atol=1e-6)
        full = divergence(torch.softmax(zt.double() / T, -1), torch.softmax(zs.double() / T, -1))
        assert bool((want_tok <= full + 1e-12).all())  # the buckets' divergence is a lower bound
    # gradient w.r.t. the student's logits, through the float64 reference
    zs_ref = zs.double().requires_grad_()
    (scale(1.5) * (divergence(bucket_probs(zt, ti, 1.5), bucket_probs(zs_ref, ti, 1.5)) * mask).sum()
     / mask.sum()).backward()
    zs_got = zs.clone().requires_grad_()
    loss(zs_got, batch, TEMPS, 1.5, mask).backward()
    torch.testing.assert_close(zs_got.grad.double(), zs_ref.grad, rtol=2e-3, atol=2e-6)
    # k = V: no tail bucket, the full-vocabulary divergence
    V = 40
    zt, zs, ti, lp, tail = teacher_case(V=V, k=V)
    batch = {"topk_ids": ti, "topk_logprobs": lp, "tail_logmass": tail}
    want = divergence(torch.softmax(zt.double(), -1), torch.softmax(zs.double(), -1)).mean()
    torch.testing.assert_close(loss(zs, batch, TEMPS, 1.0, None).double(), want, rtol=2e-4, atol=1e-6)


def kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)

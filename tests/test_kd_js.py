"""Jensen-Shannon KD (loss.kd=js) against the brute-force reference."""

import pytest

from goose.errors import GooseError
from kd_reference import check_against_brute_force, kd_loss_named, kl


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_js_equals_brute_force(beta):
    def js(p, q):
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    check_against_brute_force("js", {"beta": beta}, js, scale=lambda T: T * T)


def test_js_is_symmetric_at_half_and_bounded_by_log_2():
    import math

    import torch

    from kd_reference import TEMPS, teacher_case

    zt, zs, ti, lp, tail = teacher_case()
    loss = kd_loss_named("js")
    batch = {"topk_ids": ti, "topk_logprobs": lp, "tail_logmass": tail}
    assert 0 < float(loss(zs, batch, TEMPS, 1.0, None)) <= math.log(2)
    assert float(loss(zt, batch, TEMPS, 1.0, None)) < 1e-4  # the teacher itself (up to the store's rounding)
    assert torch.isfinite(loss(zs * 40, batch, TEMPS, 1.0, None))


def test_js_refuses_a_bad_beta_and_unknown_options():
    from goose.pipeline.stage_two.config import load_config
    from goose.cache.schema import StoreSpec

    spec = StoreSpec(4, 8, 16, 100, (1.0, 2.0))
    with pytest.raises(GooseError, match="beta must be in"):
        kd_loss_named("js", beta=1.0)
    kd_loss_named("js", beta=0.3).check(load_config(None, ["loss.kd=js"]), spec, "store")  # a store it can use
    with pytest.raises(GooseError, match=r"not options of loss.kd=js \(its options: beta\)"):
        kd_loss_named("js", alpha=0.1)

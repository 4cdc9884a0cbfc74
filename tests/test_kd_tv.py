"""Total-variation KD (loss.kd=tv) against the brute-force reference."""

from kd_reference import check_against_brute_force


def test_tv_equals_brute_force():
    check_against_brute_force("tv", {}, lambda p, q: 0.5 * (p - q).abs().sum(-1), scale=lambda T: T)

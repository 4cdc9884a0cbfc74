"""Skew KL KD (loss.kd=skew_kl, DistiLLM) against the brute-force reference."""

import pytest

from kd_reference import check_against_brute_force, kl


@pytest.mark.parametrize("alpha", [0.1, 0.0, 0.5])
@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kl_equals_brute_force(alpha, reverse):
    def skew(p, q):
        a, b = (q, p) if reverse else (p, q)
        return kl(a, alpha * a + (1 - alpha) * b)

    check_against_brute_force("skew_kl", {"alpha": alpha, "reverse": reverse}, skew, scale=lambda T: T * T)

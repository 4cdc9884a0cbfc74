"""Total-variation KD over the top-k + tail buckets, at the run's temperature.

TV(p, q) = 1/2 sum |p_i - q_i|, in [0, 1]: a true distance, insensitive to the log-ratio on tiny
probabilities that makes KL chase the tail. Over the buckets it is the TV of the coarsened distributions (a
lower bound of the full-vocabulary TV, equal at k = V). Its gradient shrinks as 1/T (a KL's as 1/T^2), so the
loss carries T rather than T^2.
"""

from __future__ import annotations


from .registry import BucketKDLoss, register


@register
class TotalVariationKD(BucketKDLoss):
    name = "tv"
    metric = "tv"

    def scale(self, T):
        return T

    def divergence(self, log_p, log_q):
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)

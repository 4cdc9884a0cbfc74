"""The numerics goose computes in more than one place, written once.

`log1mexp(x) = log(1 - exp(x))` for x <= 0 (a log-probability's complement: the head mass from a tail
log-mass, the chance of at least one tail draw). Neither log(1 - exp(x)) nor log1p(-exp(x)) is accurate
everywhere: the first loses everything near x = 0, the second near x = -inf; the switch at -log 2 keeps both
ends exact (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"). One formula for torch tensors and
numpy arrays, so the store's writer, its GPU decoder and the losses agree bit for bit.
"""

from __future__ import annotations

import numpy as np

LOG_HALF = -0.6931  # the switch point, -log 2 (to 4 digits: the stores written so far used this one)


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate at both ends; torch tensor in, torch tensor out (numpy likewise)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.where(x > LOG_HALF, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))
    import torch

    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

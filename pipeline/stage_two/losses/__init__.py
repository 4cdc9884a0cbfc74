"""Stage two's losses, each a small function with a brute-force reference in the tests.

`buckets`: the top-k + tail math every KD loss shares; one file per KD loss (`topk`, `rskd`, `topk_rskd`,
`js`, `tv`, `skew_kl`, ...), registered by name in `registry` (the config's `loss.kd`); `ce`; `align`.
Every module here is imported with the package, so a KD loss added as a file is registered by that alone.
"""

import importlib
import pkgutil

from .align import cka_align, cosine_align, layer_map, linear_cka, mse_align, standardize_channels
from .buckets import (bucket_logprobs, kl_terms, masked_mean, student_bucket_logprobs,
                      student_bucket_logprobs_reference, teacher_bucket_logprobs)
from .ce import ce_loss
from .registry import KD_LOSSES, KDLoss, build_kd_loss, kd_loss_names, register
from .rskd import rskd_loss
from .topk import kd_loss
from .topk_rskd import topk_rskd_loss

__all__ = ["KDLoss", "KD_LOSSES", "bucket_logprobs", "build_kd_loss", "ce_loss", "cka_align", "cosine_align",
           "kd_loss", "kd_loss_names", "kl_terms", "layer_map", "linear_cka", "masked_mean", "mse_align", "register",
           "rskd_loss", "standardize_channels", "student_bucket_logprobs", "student_bucket_logprobs_reference",
           "teacher_bucket_logprobs", "topk_rskd_loss"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

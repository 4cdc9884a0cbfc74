"""Stage one's row-wise top-k as a small C kernel (`topk.c`), for the compiled CPU reductions.

torch.topk on CPU sorts (value, id) pairs per row with a NaN-aware comparator whose branches mispredict on
every new row: two thirds of the reductions' time at V = 8192 and half at V = 50257, even on the group maxima
and candidates of `teacher.topk_rows`. `topk.c` finds the k-th largest strided group maximum (among the few
hundred above a cheap bound), ranks the ~k logits of the groups that reach it, and returns torch.topk's
values, equal values in ascending id order.

The kernel is compiled from the package's own source on the first call in a process (well under a second;
`native.build_library`: nothing built earlier or left on disk is ever loaded). Without a C compiler the
caller falls back to the eager reductions (`kernels_available`). ctypes releases the GIL for the call, so
worker threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ...native import build_library

SOURCE = Path(__file__).with_name("topk.c")


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.goose_topk_rows
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int


@functools.cache
def _source() -> str:
    return SOURCE.read_text()  # read once: library() is called for every slice of rows


def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use (`native.build_library`); raises RuntimeError (naming the
    compiler's first error) if it cannot be built."""
    return build_library("goose_topk", _source(), _declare)


def topk_rows_native(z: torch.Tensor, k: int, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest of each row of a 2-D float32 CPU tensor, sorted descending, ties in
    ascending id order: torch.topk's values (its order among ties is its own) for rows without NaN (NaN is
    taken as -inf here; the caller rejects such rows). stats: a dict whose "whole_rows" is increased by the
    rows that took the kernel's whole-row path (rows too small for its groups, or holding NaN)."""
    if z.dim() != 2 or z.dtype != torch.float32 or z.device.type != "cpu":
        raise ValueError("topk_rows_native takes a 2-D float32 CPU tensor")
    rows, vocab = z.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    if z.stride(-1) != 1:
        z = z.contiguous()
    vals = torch.empty(rows, k, dtype=torch.float32)
    ids = torch.empty(rows, k, dtype=torch.int64)
    status = library().goose_topk_rows(z.data_ptr(), rows, vocab, z.stride(0), k, vals.data_ptr(), ids.data_ptr())
    if status == -1:
        raise MemoryError("out of memory in the top-k kernel")
    if status < 0:
        raise RuntimeError(f"the top-k kernel failed ({status})")
    if stats is not None:
        stats["whole_rows"] = stats.get("whole_rows", 0) + status
    return vals, ids

"""Stage one's row-wise top-k as a small C kernel (`topk.c`), for the compiled CPU reductions.

torch.topk on CPU sorts (value, id) pairs per row with a NaN-aware comparator whose branches mispredict on
every new row: two thirds of the reductions' time at V = 8192 and half at V = 50257, even on the group maxima
and candidates of `teacher.topk_rows`. `topk.c` bounds the k-th value from the group maxima, ranks the few
hundred logits above the bound, and returns torch.topk's values, ties in ascending id order.

The kernel is compiled from the package's own source by the machine's C compiler on the first call in a
process (well under a second), into a private temporary folder that is removed once the library is loaded:
nothing built by an earlier process, or left on disk, is ever loaded. The compiler is the one torch.compile's
inductor needs as well; without one the caller falls back to the eager reductions (`kernels_available`).
ctypes releases the GIL for the call, so worker threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("topk.c")
_LIB: list[ctypes.CDLL] = []
_LOCK = threading.Lock()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises RuntimeError (with the compiler's first error line)
    if it cannot be built."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        cc = _compiler()
        with tempfile.TemporaryDirectory(prefix="goose-topk-") as folder:
            out = Path(folder) / "libgoose_topk.so"
            errors = ""
            # -march=native: the kernel runs where it is built; a compiler that refuses it builds for the baseline
            for flags in (["-march=native"], []):
                run = subprocess.run([cc, "-O3", *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
                                     capture_output=True, text=True)
                if run.returncode == 0:
                    break
                errors = run.stderr.strip()
            else:
                first = errors.splitlines()[0] if errors else f"{cc} exited {run.returncode}"
                raise RuntimeError(f"building {SOURCE.name} failed: {first}")
            lib = ctypes.CDLL(str(out))  # mapped: the file can go with the folder
        fn = lib.goose_topk_rows
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _LIB.append(lib)
        return lib


def topk_rows_native(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest of each row of a 2-D float32 CPU tensor, sorted descending, ties in
    ascending id order: torch.topk's values (its order among ties is unspecified)."""
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
    if status != 0:
        raise RuntimeError(f"the top-k kernel failed ({status})")
    return vals, ids

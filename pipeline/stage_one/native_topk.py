"""Stage one's row-wise top-k as a small C kernel (`topk.c`), for the compiled CPU reductions.

torch.topk on CPU sorts (value, id) pairs per row with a NaN-aware comparator whose branches mispredict on
every new row: two thirds of the reductions' time at V = 8192 and half at V = 50257, even on the group maxima
and candidates of `teacher.topk_rows`. `topk.c` finds the k-th largest strided group maximum (among the few
hundred above a cheap bound), ranks the ~k logits of the groups that reach it, and returns torch.topk's
values, equal values in ascending id order.

The kernel is compiled from the package's own source by the machine's C compiler on the first call in a
process (well under a second), into a private temporary folder that is removed once the library is loaded:
nothing built by an earlier process, or left on disk, is ever loaded. The compiler is the one torch.compile's
inductor needs as well; without one the caller falls back to the eager reductions (`kernels_available`).
ctypes releases the GIL for the call, so worker threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("topk.c")
_LIB: list[ctypes.CDLL] = []
_LOCK = threading.Lock()


def _compiler() -> list[str]:
    """The C compiler's command: $CC (which may carry arguments, e.g. "ccache gcc"), else cc, gcc or clang."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
        if cmd and shutil.which(cmd[0]):
            return cmd
        raise RuntimeError(f"the C compiler CC={os.environ['CC']!r} is not found")
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises RuntimeError (naming the compiler's first error)
    if it cannot be built."""
    if _LIB:  # built: no lock (this is called once per slice of rows, from every worker thread)
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        cc = _compiler()
        with tempfile.TemporaryDirectory(prefix="goose-topk-") as folder:
            out = Path(folder) / "libgoose_topk.so"
            errors = ""
            # -march=native: the kernel runs where it is built; a compiler that refuses it builds for the baseline
            for flags in (["-march=native"], []):
                try:
                    run = subprocess.run([*cc, "-O3", *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
                                         capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise RuntimeError(f"building {SOURCE.name} failed: {exc}") from None
                if run.returncode == 0:
                    break
                errors = run.stderr.strip()
            else:
                lines = errors.splitlines()
                first = next((line for line in lines if "error" in line), lines[0] if lines else
                             f"{' '.join(cc)} exited {run.returncode}")
                raise RuntimeError(f"building {SOURCE.name} failed: {first}")
            lib = ctypes.CDLL(str(out))  # mapped: the file can go with the folder
        fn = lib.goose_topk_rows
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _LIB.append(lib)
        return lib


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

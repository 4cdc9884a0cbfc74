"""goose's one way to build a C kernel: compiled from the package's own source on first use in a process.

The machine's C compiler ($CC, else cc, gcc or clang: the one torch.compile's inductor needs as well) builds
the source into a private temporary folder that is removed once the library is loaded, so nothing built by
an earlier process, or left on disk, is ever loaded. `-march=native` first (the kernel runs where it is
built), then the baseline for a compiler that refuses it. ctypes releases the GIL for each call.
Used by stage one's top-k (`pipeline/stage_one/topk.c`) and the student's ternary path (`student/ternary.py`).
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

_LIBRARIES: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def compiler() -> list[str]:
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


def build_library(name: str, source: str, declare=None) -> ctypes.CDLL:
    """The library `name` compiled from the C `source` text, built once per process; `declare(lib)` sets its
    functions' argtypes once, before any caller sees it. Raises RuntimeError naming the compiler's first
    error. Source as text, not a path: a module that carries its kernel (ternary.py in an exported folder,
    which transformers copies without its neighbours) builds it wherever it is imported from."""
    key = name
    lib = _LIBRARIES.get(key)
    if lib is not None:  # built: no lock (called from every worker thread)
        return lib
    with _LOCK:
        if key in _LIBRARIES:
            return _LIBRARIES[key]
        cc = compiler()
        with tempfile.TemporaryDirectory(prefix="goose-native-") as folder:
            src = Path(folder) / f"{name}.c"
            src.write_text(source)
            out = Path(folder) / f"lib{name}.so"
            errors = ""
            for flags in (["-march=native"], []):
                try:
                    run = subprocess.run([*cc, "-O3", *flags, "-shared", "-fPIC", "-o", str(out), str(src)],
                                         capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise RuntimeError(f"building {name}.c failed: {exc}") from None
                if run.returncode == 0:
                    break
                errors = run.stderr.strip()
            else:
                lines = errors.splitlines()
                first = next((line for line in lines if "error" in line), lines[0] if lines else
                             f"{' '.join(cc)} exited {run.returncode}")
                raise RuntimeError(f"building {name}.c failed: {first}")
            lib = ctypes.CDLL(str(out))  # mapped: the file can go with the folder
        if declare is not None:
            declare(lib)
        _LIBRARIES[key] = lib
        return lib

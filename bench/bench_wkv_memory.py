"""Memory saved for backward, and time, of the chunked time-mix kernel: this tree against a baseline revision.

    OMP_NUM_THREADS=1 python bench/bench_wkv_memory.py                 # baseline: the pre-recompute kernel
    OMP_NUM_THREADS=1 python bench/bench_wkv_memory.py --baseline HEAD --repeats 7

1. Bytes that one `wkv_chunked` call saves for backward (summed in a saved_tensors_hooks pack hook,
   de-duplicated by storage), as a multiple of one (B, T, d) fp32 tensor, at a quick and a realistic shape.
   This is what every layer keeps alive until its backward runs.
2. Time: forward + backward of the kernel alone, and one training step (forward, cross-entropy, backward)
   of a student preset whose layers call the kernel. Both variants alternate inside every repeat so they
   see the same background load; the median over repeats is reported, with new/old ratios.

The baseline kernel is `student/wkv.py` read from a git revision (default: the last commit before the
within-chunk products were recomputed in backward), loaded as a standalone module.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import types

import torch
import torch.nn.functional as F

import goose.student.model as model_mod
from goose.student import wkv as new

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "77d30e53de237b76d31a9648ca530d64d17ed2d4"  # wkv.py saving the (C x C x N) products for backward


def load_kernel(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:student/wkv.py"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"wkv_{rev[:8]}")
    exec(compile(src, f"{rev[:8]}:student/wkv.py", "exec"), mod.__dict__)
    return mod


def kernel_inputs(B, T, H, N, seed=0):
    """Inputs in the ranges the student produces (log decay in (-0.61, 0), unit removal key)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    log_w = -(-F.softplus(-rn(B, T, H, N) * 2) - 0.5).exp()
    kk = F.normalize(rn(B, T, H, N), dim=-1)
    xs = [rn(B, T, H, N), log_w, rn(B, T, H, N) * 0.5, rn(B, T, H, N), -kk, kk * torch.sigmoid(rn(B, T, H, N))]
    return [x.requires_grad_() for x in xs], torch.randn(B, H, N, N, generator=g)


def saved_bytes(fn, args, state) -> tuple[int, dict]:
    """Bytes of distinct storages saved for backward by fn(*args, state), and a per-shape breakdown."""
    seen, by_shape = {}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen[s.data_ptr()] = s.nbytes()
            key = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            by_shape[key] = by_shape.get(key, 0) + s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, state)
    del out
    return sum(seen.values()), by_shape


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the old student/wkv.py")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--shapes", default="2x256x2x64,4x1024x5x64", help="BxTxHxN,... for the memory multiple")
    ap.add_argument("--kernel-shape", default="4x256x5x64", help="BxTxHxN for the kernel timing")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats; 0 for the memory table only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="print saved bytes per tensor shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    old = load_kernel(args.baseline)
    variants = {"old": old.wkv_chunked, "new": new.wkv_chunked}
    print(f"baseline {args.baseline[:12]} vs working tree; chunk {args.chunk}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")

    print("\n1. saved for backward by one wkv_chunked call, as a multiple of one (B, T, d) fp32 tensor")
    for spec in args.shapes.split(","):
        B, T, H, N = map(int, spec.split("x"))
        unit = B * T * H * N * 4
        xs, s0 = kernel_inputs(B, T, H, N)
        row = {}
        for name, fn in variants.items():
            total, by_shape = saved_bytes(lambda *a: fn(*a, chunk_size=args.chunk), xs, s0)
            row[name] = total / unit
            if args.breakdown:
                for (shape, dtype), nb in sorted(by_shape.items(), key=lambda kv: -kv[1]):
                    print(f"     {name} {dtype:8s} {str(shape):28s} {nb / unit:7.2f}x")
        print(f"   B{B} T{T} H{H} N{N} (unit {unit / 2**20:.1f} MiB): old {row['old']:.1f}x  new {row['new']:.1f}x  "
              f"-> {row['old'] / row['new']:.1f}x less; preset base (8 layers, B16 T1024 d512): "
              f"old {row['old'] * 8 * 32 / 1024:.1f} GiB  new {row['new'] * 8 * 32 / 1024:.1f} GiB")

    if args.repeats < 1:
        return
    print(f"\n2. time, median of {args.repeats} alternating repeats (after one warm-up each)")
    B, T, H, N = map(int, args.kernel_shape.split("x"))
    xs, s0 = kernel_inputs(B, T, H, N, seed=1)

    def kernel_step(fn):
        for x in xs:
            x.grad = None
        o, s = fn(*xs, s0, chunk_size=args.chunk)
        (o.square().sum() + s.square().sum()).backward()

    cfg = model_mod.preset(args.preset, chunk_size=args.chunk)
    torch.manual_seed(0)
    model = model_mod.Student(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    model.train()
    model(ids[:, :16])  # data-dependent spike init

    def train_step(fn):
        model_mod.wkv_chunked = fn  # the model calls the kernel through its module global
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()

    times = {(what, name): [] for what in ("kernel", "train") for name in variants}
    try:
        for rep in range(args.repeats + 1):
            order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
            for what, step in (("kernel", kernel_step), ("train", train_step)):
                for name in order:
                    t = timed(lambda: step(variants[name]))
                    if rep:  # repeat 0 is the warm-up
                        times[(what, name)].append(t)
    finally:
        model_mod.wkv_chunked = new.wkv_chunked
    for what, label in (("kernel", f"kernel fwd+bwd B{B} T{T} H{H} N{N}"),
                        ("train", f"train step {args.preset} {args.batch}x{args.seq_len}")):
        o, n = (statistics.median(times[(what, v)]) for v in ("old", "new"))
        print(f"   {label}: old {o * 1e3:.0f} ms  new {n * 1e3:.0f} ms  new/old {n / o:.3f}  "
              f"(all old {[round(t * 1e3) for t in times[(what, 'old')]]}, "
              f"new {[round(t * 1e3) for t in times[(what, 'new')]]})")


if __name__ == "__main__":
    main()

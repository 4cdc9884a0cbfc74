"""The per-token reductions of stage one alone: `teacher_targets` eager vs compiled, side by side.

    python bench/bench_teacher_targets.py                      # V 8192 and 50257, torch's thread count
    OMP_NUM_THREADS=1 python bench/bench_teacher_targets.py --vocab 50257

Random logits at GPT-2's scale (around -80, std 3), 4,096 positions, k = 64, the default six tail
temperatures; the slices are shared among `torch.get_num_threads()` worker threads, as `cache-teacher`
does. Prints microseconds per token (median over alternating repeats, after one warm-up call each that
also compiles) and the eager/compiled ratio, plus the one-off compilation time of this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from goose.pipeline.stage_one.targets import teacher_targets

TEMPS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 50257])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    for vocab in args.vocab:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(1, args.positions, vocab, generator=g) * 3 - 80
        ids = torch.randint(0, vocab, (1, args.positions), generator=g)

        def run(compiled: bool) -> float:
            t0 = time.perf_counter()
            teacher_targets(logits, ids, top_k=args.top_k, tail_temperatures=TEMPS, threads=threads,
                            compiled=compiled)
            return time.perf_counter() - t0

        compile_s = run(True)  # the first compiled call builds the kernels
        run(False)
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for compiled in (False, True):
                times[compiled].append(run(compiled))
        us = {c: statistics.median(t) / args.positions * 1e6 for c, t in times.items()}
        print(f"V {vocab}, {threads} thread(s): eager {us[False]:.1f} us/token, compiled {us[True]:.1f} us/token, "
              f"eager / compiled {us[False] / us[True]:.2f}x (first compiled call, with compilation: {compile_s:.1f} s)")
        print(json.dumps({"bench": "teacher_targets", "figure": f"reductions eager / compiled, V {vocab}, "
                          f"{threads} thread(s)", "value": us[False] / us[True]}))


if __name__ == "__main__":
    main()

"""The store reader before and after a change, side by side in one run: `CacheLoader` from two checkouts of
goose over the same store, alternating, each run in its own process pinned to one core.

    git worktree add /tmp/before COMMIT && mkdir -p /tmp/before_pkg && ln -s /tmp/before /tmp/before_pkg/goose
    python bench/bench_reader_ab.py --cache STORE --before /tmp/before_pkg --repeats 3

"before" is the loader as it was (host decode only); "after" is this checkout, with the host decode
(`decode on`, the CPU path) and with the stored encodings handed over for the GPU (`decode off`, the CUDA
path; the decode itself then runs on the GPU and is not timed here). Field sets as bench/bench_store_io.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_store_io import fields_for  # the field sets of the shipped configs, as bench_store_io reads them


def cell(cache: str, fields: str, variant: str, batches: int) -> float:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numpy as np

    from goose.cache.reader import CacheReader
    from goose.pipeline.stage_two.loader import CacheLoader

    spec = CacheReader(cache).spec
    names = fields_for(fields, spec)
    kw = {}
    if variant == "after, decode off":
        from goose.cache.device_codec import fields_to_read

        names, kw = fields_to_read(spec, names), {"dequantize": False}
    loader = CacheLoader(cache, names, batch_size=16, chunk_windows=spec.chunk_windows, **kw)
    loader.set_pool(np.arange(spec.n_windows))
    t = time.perf_counter()
    for _ in range(batches):
        loader.next()
    seconds = time.perf_counter() - t
    loader.close()
    return batches * 16 * spec.seq_len / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--before", required=True, help="a folder holding the old checkout as `goose/`")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        fields, variant = json.loads(args.cell)
        print(cell(args.cache, fields, variant, args.batches))
        return
    variants = ["before", "after, decode on", "after, decode off"]
    results = {}
    for _ in range(args.repeats):  # alternate, so drift in the machine's speed hits every variant alike
        for fields in ("kd_rs", "kd", "align"):
            for variant in variants:
                env = dict(os.environ, OMP_NUM_THREADS="1")
                if variant == "before":
                    env["PYTHONPATH"] = args.before
                out = subprocess.run([sys.executable, __file__, "--cache", args.cache, "--before", args.before,
                                      "--batches", str(args.batches), "--cell", json.dumps([fields, variant])],
                                     capture_output=True, text=True, env=env, check=True)
                results.setdefault((fields, variant), []).append(float(out.stdout.strip().splitlines()[-1]))
    print(f"{args.cache}: CacheLoader, batches of 16 windows, num_workers 0, one core; tokens/s, median of "
          f"{args.repeats}")
    print(f"{'fields':8s}" + "".join(f"{v:>20s}" for v in variants) + f"{'after/before (CUDA)':>22s}")
    for fields in ("kd_rs", "kd", "align"):
        med = [statistics.median(results[(fields, v)]) for v in variants]
        print(f"{fields:8s}" + "".join(f"{m:20,.0f}" for m in med) + f"{med[2] / med[0]:21.1f}x")


if __name__ == "__main__":
    main()

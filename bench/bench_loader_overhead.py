"""P3: a `train-from-cache` step streaming its targets from the store, against the same step with the batches
already in memory (issue 11 target <= 1.10), side by side in one run.

    OMP_NUM_THREADS=1 python bench/bench_loader_overhead.py --cache runs/enwiki-tiny.zarr
    python bench/bench_loader_overhead.py --cache STORE --device cuda --set num_workers=4 --set model.preset=base

One Trainer (the real one: config, store, loader, KD loss, optimiser). Blocks of --block steps alternate
between the store-backed loader and a list of batches fetched from it beforehand, so both time the same
kind of batches with the same model; the ratio is median(streamed) / median(in memory) over the blocks.
Prints one JSON line (for bench/run_all.py) and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from goose.pipeline.stage_two.config import load_config
from goose.pipeline.stage_two.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a teacher store")
    ap.add_argument("--config", default="kd")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", type=int, default=4, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=6, help="timed blocks per side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as run:
        cfg = load_config(args.config, ["model.preset=proxy", "batch_size=16", "val_every=100000",
                                        "ckpt_every=100000", "loggers=[jsonl]", *args.overrides],
                          cache=args.cache, out=run, device=args.device, steps=10_000)
        trainer = Trainer(cfg, progress=False, echo=lambda *a, **k: None)
        streamed_next = trainer.loader.next

        def block(source) -> float:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.block):
                trainer.loader.next = source
                trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t) / args.block

        def read_ahead(depth: int) -> None:  # the loader's background read-ahead (0: read in the step)
            trainer.loader.prefetch = depth
            trainer.loader.close()  # the next batch restarts the plan at the same position

        block(streamed_next)  # warm-up: spike initialisation, allocator, first chunk reads
        streamed, unhidden, in_memory = [], [], []
        for _ in range(args.blocks):
            read_ahead(2)
            streamed.append(block(streamed_next))
            read_ahead(0)
            unhidden.append(block(streamed_next))
            read_ahead(2)
            batches = iter([streamed_next() for _ in range(args.block)])  # fetched outside the timing
            in_memory.append(block(lambda: next(batches)))
        trainer.loader.next = streamed_next
    ratio = statistics.median(streamed) / statistics.median(in_memory)
    row = {"bench": "loader_overhead", "figure": "P3: train-from-cache step / step with batches in memory",
           "value": ratio, "target": "<= 1.10", "streamed_s": statistics.median(streamed),
           "in_memory_s": statistics.median(in_memory),
           "no_read_ahead_ratio": statistics.median(unhidden) / statistics.median(in_memory), "config": args.config, "overrides": args.overrides,
           "threads": torch.get_num_threads()}
    print(json.dumps(row))
    print(f"step streamed {row['streamed_s']:.3f} s, in memory {row['in_memory_s']:.3f} s: ratio {ratio:.3f} "
          f"(without the loader's read-ahead thread: {row['no_read_ahead_ratio']:.3f}) "
          f"(median of {args.blocks} alternated blocks of {args.block} steps)")


if __name__ == "__main__":
    main()

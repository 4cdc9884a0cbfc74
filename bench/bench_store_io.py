"""Does the store keep up with a GPU? Stage one's writer and stage two's reader alone, in tokens/s per core.

    python bench/bench_store_io.py --cache runs/gpt2-random-64k.zarr          # a GPT-2-shaped store
    python bench/bench_store_io.py --cache STORE --workers 0,2,4 --batches 12 --json

Writer: the blocks of STORE are read back once (outside the timing) as `compute_blocks` hands them to the
writer (float top-k log-probabilities, int8 hidden states with their scales), then written into a fresh
store with the same spec by `CacheWriter.write_block` (encode, compress, write, checksum read-back), with
1 and with --writer-threads writer threads (`BlockWriterPool`, what cache-teacher runs).

Reader: `CacheLoader` (what train-from-cache runs) hands out batches of 16 x seq_len for the field sets of
the shipped configs: `kd_rs` (the RS-KD draws), `kd` (top-k + tail), `align` (`kd` plus every stored hidden
layer: `align` and `full`). `decode on` is the host path (CPU training: batches decoded
with numpy, float32); `decode off` is what train-from-cache runs on CUDA: the loader hands over the stored
encodings and `cache.decode.BatchDecoder` decodes them on the GPU, so the host only reads and decompresses.

Every cell runs in its own process pinned to --cores cores (`os.sched_setaffinity`), one after another,
so per-core rates are not disturbed by the other cells. Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

READER_FIELDS = {
    "kd_rs": ["input_ids", "sample_ids", "sample_counts"],
    "kd": ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass"],
}


def fields_for(name: str, spec) -> list[str]:
    from goose.cache.schema import hidden_name

    if name == "align":
        return READER_FIELDS["kd"] + [hidden_name(layer) for layer in spec.hidden_layers]
    return READER_FIELDS[name]


def writer_cell(cache: str, threads: int, repeats: int) -> dict:
    """Seconds to write every block of `cache` again (median over repeats), by `threads` writer threads."""
    import numpy as np

    from goose.cache.reader import CacheReader
    from goose.cache.schema import decode_topk
    from goose.cache.writer import CacheWriter
    from goose.pipeline.stage_one.cache_teacher import BlockWriterPool

    reader = CacheReader(cache)
    spec = reader.spec
    blocks = []
    for block in range(spec.n_blocks):
        start, stop = spec.block_range(block)
        data = reader.read(start, stop, list(spec.arrays()), dequantize=False)
        if spec.topk_encoding == "compact":  # back to what compute_blocks hands over: floats by probability
            data["topk_ids"], data["topk_logprobs"] = decode_topk(
                data["topk_ids"], data["topk_logprobs"],
                data["tail_logmass"][..., spec.tail_temperatures.index(1.0)], spec.logprob_step)
        blocks.append((block, data))
    times, encode = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(cache))) as tmp:
            writer = CacheWriter.open(os.path.join(tmp, "copy.zarr"), spec, {"bench": True}, package_version="bench")
            t = time.perf_counter()
            for _, data in blocks[:1]:
                writer._encode(data)
            encode.append((time.perf_counter() - t) * len(blocks))
            t = time.perf_counter()
            pool = BlockWriterPool(writer, threads=threads)
            for block, data in blocks:
                pool.put(block, data)
            pool.close()
            times.append(time.perf_counter() - t)
            assert not writer.blocks_todo()
            same = bool((writer._checksums[:] == reader.group["chunk_checksums"][:]).all())
    tokens = spec.n_tokens
    return {"tokens": tokens, "seconds": float(np.median(times)), "encode_seconds": float(np.median(encode)),
            "tokens_per_s": tokens / float(np.median(times)), "same_bytes_as_stage_one": same}


def reader_cell(cache: str, fields: str, workers: int, batches: int, decode: bool, batch_size: int) -> dict:
    from goose.cache.decode import fields_to_read
    from goose.cache.reader import CacheReader
    from goose.pipeline.stage_two.loader import CacheLoader

    spec = CacheReader(cache).spec
    names = fields_for(fields, spec) if decode else fields_to_read(spec, fields_for(fields, spec))
    loader = CacheLoader(cache, names, batch_size=batch_size, chunk_windows=spec.chunk_windows,
                         num_workers=workers, dequantize=decode)
    import numpy as np

    loader.set_pool(np.arange(spec.n_windows))
    loader.next()  # warm-up: worker start, first chunks
    t = time.perf_counter()
    nbytes = 0
    for _ in range(batches):
        batch = loader.next()
        nbytes += sum(v.numel() * v.element_size() for v in batch.values())
    seconds = time.perf_counter() - t
    loader.close()
    tokens = batches * batch_size * spec.seq_len
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "batch_mb": nbytes / batches / 2**20}


def run_cell(args, cell: dict) -> dict:
    """One measurement in a fresh process pinned to the first --cores cores."""
    cmd = [sys.executable, __file__, "--cache", args.cache, "--cell", json.dumps(cell), "--cores", str(args.cores)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.cores)})
    if out.returncode:
        raise SystemExit(f"cell {cell} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a finished teacher store (GPT-2-shaped: see docs/BENCHMARKS.md)")
    ap.add_argument("--workers", default="0,2,4", help="CacheLoader num_workers values")
    ap.add_argument("--fields", default="kd_rs,kd,align")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per reader cell")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--writer-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="writer repeats (median)")
    ap.add_argument("--cores", type=int, default=1, help="cores each cell is pinned to")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cell:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
        import torch

        torch.set_num_threads(args.cores)
        cell = json.loads(args.cell)
        if cell["kind"] == "writer":
            result = writer_cell(args.cache, cell["threads"], args.repeats)
        else:
            result = reader_cell(args.cache, cell["fields"], cell["workers"], args.batches, cell["decode"],
                                 args.batch_size)
        print(json.dumps({**cell, **result}))
        return

    rows = []
    for threads in sorted({1, args.writer_threads}):
        rows.append(run_cell(args, {"kind": "writer", "threads": threads}))
    for fields in args.fields.split(","):
        for decode in (True, False):
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(run_cell(args, {"kind": "reader", "fields": fields, "workers": workers, "decode": decode}))
    if args.json:
        print(json.dumps({"cache": args.cache, "cores": args.cores, "rows": rows}))
        return
    print(f"store {args.cache}, each cell pinned to {args.cores} core(s)")
    print(f"{'what':44s} {'tokens/s':>10s} {'per core':>10s}")
    for r in rows:
        if r["kind"] == "writer":
            what = f"writer, {r['threads']} thread(s) (encode {r['encode_seconds'] / r['seconds']:.0%})"
        else:
            what = (f"reader {r['fields']:6s} workers {r['workers']} decode {'on ' if r['decode'] else 'off'} "
                    f"({r['batch_mb']:.0f} MB/batch)")
        print(f"{what:44s} {r['tokens_per_s']:10,.0f} {r['tokens_per_s'] / args.cores:10,.0f}")


if __name__ == "__main__":
    main()

"""Does the store keep up with a GPU? Stage one's writer and stage two's reader alone, in tokens/s per core.

    python bench/bench_store_io.py --cache runs/gpt2-random-64k.zarr          # a GPT-2-shaped store
    python bench/bench_store_io.py --cache STORE --workers 0,2,4 --batches 12 --json

Writer: the blocks of STORE are read back once (outside the timing) as `compute_blocks` hands them to the
writer (float top-k log-probabilities, int8 hidden states with their scales), then written --copies times
over into a fresh store of the same shapes by `CacheWriter.write_block` (encode, compress, write, checksum
read-back), with 1 and with --writer-threads writer threads (`BlockWriterPool`, what cache-teacher runs);
the bytes written are checked equal to the source's, block for block. Each writer runs twice: given the
top-k as floats (the CPU path: the writer encodes it) and given it already encoded by
`cache.device_codec.encode_topk` (the CUDA path: stage one encodes it on the GPU, not timed here).

Reader: over that larger store (so the timed batches lie in one epoch and worker start-up is not timed),
`CacheLoader` (what train-from-cache runs) hands out batches of 16 x seq_len for the field sets of
the shipped configs: `kd_rs` (the RS-KD draws), `kd` (top-k + tail), `align` (`kd` plus every stored hidden
layer: `align` and `full`). `decode on` is the host path (CPU training: batches decoded
with numpy, float32); `decode off` is what train-from-cache runs on CUDA: the loader hands over the stored
encodings and `cache.device_codec.BatchDecoder` decodes them on the GPU, so the host only reads and decompresses.

Every cell runs in its own process pinned to --cores cores (`os.sched_setaffinity`), one after another,
so per-core rates are not disturbed by the other cells. Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def writer_cell(cache: str, threads: int, repeats: int, copies: int, keep: str | None, no_hidden: bool,
                device_encoded: bool = False) -> dict:
    """Seconds to write `copies` copies of every block of `cache` into a fresh store (median over repeats),
    by `threads` writer threads; the last store is finalized and kept at `keep` for the reader cells."""
    import shutil

    import numpy as np

    from goose.cache.reader import CacheReader
    from goose.cache.schema import decode_topk
    from goose.cache.writer import CacheWriter
    from goose.pipeline.stage_one.cache_teacher import BlockWriterPool

    reader = CacheReader(cache)
    source = reader.spec
    if source.n_windows % source.block_windows:
        raise SystemExit("the source store's last block is partial: use a store of whole blocks")
    blocks = []
    for block in range(source.n_blocks):
        start, stop = source.block_range(block)
        data = reader.read(start, stop, list(source.arrays()), dequantize=False)
        if source.topk_encoding == "compact":  # back to what compute_blocks hands over: floats by probability
            data["topk_ids"], data["topk_logprobs"] = decode_topk(
                data["topk_ids"], data["topk_logprobs"],
                data["tail_logmass"][..., source.tail_temperatures.index(1.0)], source.logprob_step)
        if device_encoded and source.topk_encoding == "compact":  # as on CUDA: encoded before the copy to the host
            import torch

            from goose.cache.device_codec import encode_topk

            gaps, rel = encode_topk(torch.from_numpy(data["topk_ids"]), torch.from_numpy(data["topk_logprobs"]),
                                    source.logprob_step)
            data["topk_ids"], data["topk_logprobs"] = gaps.numpy(), rel.numpy()
        blocks.append(data)
    spec = dataclasses.replace(source, n_windows=source.n_windows * copies)
    if no_hidden:  # the same store without its hidden states (what kd and kd_rs read)
        spec = dataclasses.replace(spec, hidden_layers=(), hidden_pca_rank=0)
        blocks = [{k: v for k, v in b.items() if k in spec.arrays()} for b in blocks]
    times, encode = [], []
    for r in range(repeats):
        url = keep if (keep and r == repeats - 1) else tempfile.mkdtemp(dir=os.path.dirname(keep or os.path.abspath(cache)))
        shutil.rmtree(url, ignore_errors=True)
        writer = CacheWriter.open(url, spec, {"bench": True}, package_version="bench")
        t = time.perf_counter()
        writer._encode(blocks[0])
        encode.append((time.perf_counter() - t) * spec.n_blocks)
        t = time.perf_counter()
        pool = BlockWriterPool(writer, maxsize=max(2, threads), threads=threads)
        for block in range(spec.n_blocks):
            pool.put(block, blocks[block % len(blocks)])
        pool.close()
        times.append(time.perf_counter() - t)
        assert not writer.blocks_todo()
        ref = reader.group["chunk_checksums"][:]
        kept = [i for i, name in enumerate(source.arrays()) if name in spec.arrays()]
        same = bool((writer._checksums[:] == np.tile(ref[:, kept], (copies, 1))).all())
        if url == keep:
            writer.finalize(reader.teacher_embedding(), reader.tokenizer_files())
        else:
            shutil.rmtree(url)
    return {"tokens": spec.n_tokens, "seconds": float(np.median(times)), "encode_seconds": float(np.median(encode)),
            "tokens_per_s": spec.n_tokens / float(np.median(times)), "same_bytes_as_stage_one": same}


def reader_cell(cache: str, fields: str, workers: int, batches: int, decode: bool, batch_size: int) -> dict:
    from goose.cache.device_codec import fields_to_read
    from goose.cache.reader import CacheReader
    from goose.pipeline.stage_two.loader import CacheLoader

    spec = CacheReader(cache).spec
    names = fields_for(fields, spec) if decode else fields_to_read(spec, fields_for(fields, spec))
    loader = CacheLoader(cache, names, batch_size=batch_size, chunk_windows=spec.chunk_windows,
                         num_workers=workers, dequantize=decode)
    import numpy as np

    loader.set_pool(np.arange(spec.n_windows))
    if batches > spec.n_windows // batch_size:
        raise SystemExit(f"{batches} batches need a store of {batches * batch_size} windows (--copies)")
    # timed from the first batch: a consumer that does not compute drains whatever the workers read ahead,
    # so only a long run from the start measures their rate (worker start-up included: pessimistic)
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


def run_cell(args, cell: dict, cache: str) -> dict:
    """One measurement in a fresh process pinned to the first --cores cores."""
    cmd = [sys.executable, __file__, "--cache", cache, "--cell", json.dumps(cell), "--cores", str(args.cores),
           "--copies", str(args.copies), "--repeats", str(args.repeats), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.cores)})
    if out.returncode:
        raise SystemExit(f"cell {cell} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a finished teacher store (GPT-2-shaped: see docs/BENCHMARKS.md)")
    ap.add_argument("--workers", default="0,2,4", help="CacheLoader num_workers values")
    ap.add_argument("--fields", default="kd_rs,kd,align")
    ap.add_argument("--batches", type=int, default=60, help="timed batches per reader cell (within one epoch)")
    ap.add_argument("--copies", type=int, default=16,
                    help="the writer writes the source's blocks this many times over; the readers read that store")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--writer-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="writer repeats (median)")
    ap.add_argument("--cores", type=int, default=1, help="cores each cell is pinned to")
    ap.add_argument("--work", help="where the written stores go (default: beside --cache); e.g. /dev/shm to "
                                    "take the disk out of the writer's figure")
    ap.add_argument("--no-hidden", action="store_true",
                    help="write (and read) the store without its hidden states: the kd / kd_rs store")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cell:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
        import torch

        torch.set_num_threads(args.cores)
        cell = json.loads(args.cell)
        if cell["kind"] == "writer":
            result = writer_cell(args.cache, cell["threads"], args.repeats, args.copies, cell.get("keep"),
                                 cell.get("no_hidden", False), cell.get("device_encoded", False))
        else:
            result = reader_cell(args.cache, cell["fields"], cell["workers"], args.batches, cell["decode"],
                                 args.batch_size)
        print(json.dumps({**cell, **result}))
        return

    rows = []
    with tempfile.TemporaryDirectory(dir=args.work or os.path.dirname(os.path.abspath(args.cache))) as work:
        copy = os.path.join(work, "copies.zarr")
        for device_encoded in (False, True):  # the top-k encoded by the host's writer (CPU) or before (CUDA)
            for threads in sorted({1, args.writer_threads}):
                rows.append(run_cell(args, {"kind": "writer", "threads": threads, "keep": copy,
                                            "no_hidden": args.no_hidden, "device_encoded": device_encoded},
                                     args.cache))
        for fields in args.fields.split(","):
            for decode in (True, False):
                for workers in (int(w) for w in args.workers.split(",")):
                    rows.append(run_cell(args, {"kind": "reader", "fields": fields, "workers": workers,
                                                "decode": decode}, copy))
    if args.json:
        print(json.dumps({"cache": args.cache, "cores": args.cores, "rows": rows}))
        return
    print(f"store {args.cache}, each cell pinned to {args.cores} core(s)")
    print(f"{'what':44s} {'tokens/s':>10s} {'per core':>10s}")
    for r in rows:
        if r["kind"] == "writer":
            what = (f"writer{' (no hidden)' if r.get('no_hidden') else ''}, {r['threads']} thread(s), top-k "
                    f"{'encoded before' if r.get('device_encoded') else 'encoded here'}")
        else:
            what = (f"reader {r['fields']:6s} workers {r['workers']} decode {'on ' if r['decode'] else 'off'} "
                    f"({r['batch_mb']:.0f} MB/batch)")
        print(f"{what:44s} {r['tokens_per_s']:10,.0f} {r['tokens_per_s'] / args.cores:10,.0f}")


if __name__ == "__main__":
    main()

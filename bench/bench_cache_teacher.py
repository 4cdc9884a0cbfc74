"""Time `cache-teacher` against a bare teacher forward over the same windows, side by side in one run.

    python bench/bench_cache_teacher.py                       # enwiki-tiny over WikiText-2 validation
    python bench/bench_cache_teacher.py --teacher gpt2 --seq-len 1024 --device cuda --dtype bf16

Prints tokens/s of both, their time ratio (median over alternating repeats, since this machine is noisy),
and bytes/token at the given k without hidden states, with one fp16 layer and with one int8 layer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from goose.pipeline.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.data import DataSpec, load_texts, tokenize_and_pack
from goose.pipeline.teacher import load_teacher

SHARED = Path(__file__).resolve().parents[2] / "shared"


def bare_forward(teacher, windows, batch_size) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[b : b + batch_size]).to(teacher.device)
            teacher.model(input_ids=ids, use_cache=False).logits.float().sum().item()  # sync on GPU
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(SHARED / "teachers" / "enwiki-tiny"))
    ap.add_argument("--data-file", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--hidden-layer", default="-1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device)
    data = DataSpec(data_files=(args.data_file,))
    windows = tokenize_and_pack(load_texts(data), teacher.tokenizer, text_column="text", seq_len=args.seq_len,
                                max_tokens=args.max_tokens)
    n_tokens = windows.size
    print(f"teacher {args.teacher} on {teacher.device} ({str(teacher.dtype)[6:]}), {len(windows)} windows x "
          f"{args.seq_len} = {n_tokens:,} tokens, batch {args.batch_size}, k={args.top_k}, "
          f"torch threads {torch.get_num_threads()}")
    bare_forward(teacher, windows[: args.batch_size], args.batch_size)  # warm-up

    def cache_once(tmp, name, **kw):
        cfg = CacheTeacherConfig(output=str(Path(tmp) / f"{name}.zarr"), teacher=args.teacher, dtype=args.dtype,
                                 device=args.device, batch_size=args.batch_size, data=data, seq_len=args.seq_len,
                                 max_tokens=args.max_tokens, top_k=args.top_k, progress=False, **kw)
        return run_cache_teacher(cfg)

    bare_s, cache_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate A and B so drift in machine speed hits both alike
            bare_s.append(bare_forward(teacher, windows, args.batch_size))
            cache_s.append(cache_once(tmp, f"plain{r}")["seconds"])
        plain = cache_once(tmp, "sizes")
        fp16 = cache_once(tmp, "h16", hidden_layers=args.hidden_layer)
        int8 = cache_once(tmp, "h8", hidden_layers=args.hidden_layer, hidden_dtype="int8")
        blosc = cache_once(tmp, "blosc", compression="blosc")
    bare, cache = statistics.median(bare_s), statistics.median(cache_s)
    emb = plain["spec"]["vocab_size"] * plain["spec"]["hidden_size"] * 2 / n_tokens  # once-per-store share
    print(f"bare teacher forward : {n_tokens / bare:10,.0f} tokens/s  (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in bare_s)} s)")
    print(f"cache-teacher        : {n_tokens / cache:10,.0f} tokens/s  (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in cache_s)} s)")
    print(f"time ratio cache-teacher / bare forward: {cache / bare:.2f}x")
    for label, s in (("top-k only", plain), (f"+ hidden {args.hidden_layer} fp16", fp16),
                     (f"+ hidden {args.hidden_layer} int8", int8), ("top-k only, blosc-zstd", blosc)):
        print(f"bytes/token {label:<24}: {s['bytes_per_token']:8.1f}  "
              f"({s['bytes_per_token'] - emb:6.1f} without the once-per-store teacher embedding)")


if __name__ == "__main__":
    main()

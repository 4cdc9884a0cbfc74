"""Time `cache-teacher` against a bare teacher forward over the same windows, side by side in one run.

    python bench/bench_cache_teacher.py                       # enwiki-tiny over WikiText-2 validation
    python bench/bench_cache_teacher.py --teacher gpt2 --seq-len 1024 --device cuda --dtype bf16
    python bench/bench_cache_teacher.py --teacher gpt2-small-random --seq-len 1024 --max-tokens 8192 --batch-size 4
        # GPT2Config() with random weights (V = 50257, 12 x 768) and the shared GPT-2 tokenizer

The targets run as compiled kernels by default (`--compile-targets on`, what a large run picks; compiled
once before the timed repeats) with an eager variant alongside. Prints tokens/s of both, their time ratio (median over alternating repeats, since this machine is noisy),
and bytes/token at the given k without hidden states, with one fp16 layer and with one int8 layer. On CPU a
third variant runs `compute_blocks`'s `in_order` schedule (each batch's targets after its forward) beside the
default one (at one torch thread each batch's targets on a second thread while the next forward runs; at
more, whole batches on two worker threads), so the choice is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from goose.pipeline.stage_one import cache_teacher
from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.data import DataSpec, load_texts, tokenize_and_pack
from goose.pipeline.teacher import load_teacher

SHARED = Path(__file__).resolve().parents[2] / "shared"


def random_gpt2_small(folder: Path) -> str:
    """GPT2Config() (GPT-2 small: 12 layers, width 768, V = 50257) with random weights and the shared GPT-2
    tokenizer, saved to `folder` (real GPT-2 weights are not reachable here; the cost is the same)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "data" / "gpt2-tokenizer"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def bare_forward(teacher, windows, batch_size) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[b : b + batch_size]).to(teacher.device)
            teacher.model(input_ids=ids, use_cache=False).logits.float().sum().item()  # sync on GPU
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(SHARED / "teachers" / "enwiki-tiny"),
                    help="a model folder or hub name, or gpt2-small-random")
    ap.add_argument("--data-file", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--hidden-layer", default="-1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", action="store_true", help="also build the stores that measure bytes/token")
    ap.add_argument("--compile-targets", choices=("on", "off", "auto"), default="on",
                    help="the reductions as compiled kernels (on: as a large run does by default; compiled once "
                         "before the timed repeats) or eager ops; with 'on' an eager variant runs alongside")
    args = ap.parse_args()

    scratch = tempfile.TemporaryDirectory()
    if args.teacher == "gpt2-small-random":
        args.teacher = random_gpt2_small(Path(scratch.name) / "gpt2-small-random")
    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device)
    data = DataSpec(data_files=(args.data_file,))
    windows = tokenize_and_pack(load_texts(data), teacher.tokenizer, text_column="text", seq_len=args.seq_len,
                                max_tokens=args.max_tokens)
    n_tokens = windows.size
    print(f"teacher {args.teacher} on {teacher.device} ({str(teacher.dtype)[6:]}), {len(windows)} windows x "
          f"{args.seq_len} = {n_tokens:,} tokens, batch {args.batch_size}, k={args.top_k}, "
          f"torch threads {torch.get_num_threads()}")
    bare_forward(teacher, windows[: args.batch_size], args.batch_size)  # warm-up

    compile_targets = {"on": True, "off": False, "auto": None}[args.compile_targets]

    def cache_once(tmp, name, **kw):
        kw = {"compile_targets": compile_targets, "max_tokens": args.max_tokens, **kw}
        cfg = CacheTeacherConfig(output=str(Path(tmp) / f"{name}.zarr"), teacher=args.teacher, dtype=args.dtype,
                                 device=args.device, batch_size=args.batch_size, data=data, seq_len=args.seq_len,
                                 top_k=args.top_k, progress=False, **kw)
        return run_cache_teacher(cfg)

    def in_order(*a, **kw):  # the schedule the default is measured against
        return default_blocks(*a, **kw, schedule="in_order")

    default_blocks = cache_teacher.compute_blocks
    compare = teacher.device.type == "cpu"
    # the figures name the thread count on CPU: at one torch thread cache-teacher has a core the bare forward
    # leaves idle, at two both compete for the same cores
    label = Path(args.teacher).name + (f", {torch.get_num_threads()} thread(s)" if compare else "")
    bare_s, cache_s, call_s, order_s, eager_s = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        if compile_targets:  # the one-off compilation (4-20 s) is not part of the per-token cost measured
            t0 = time.perf_counter()
            cache_once(tmp, "compile", max_tokens=args.seq_len * args.batch_size)
            print(f"compiling the targets kernels (and one batch): {time.perf_counter() - t0:.1f} s")
        for r in range(args.repeats):  # alternate the variants so drift in machine speed hits all alike
            bare_s.append(bare_forward(teacher, windows, args.batch_size))
            t0 = time.perf_counter()
            cache_s.append(cache_once(tmp, f"plain{r}")["seconds"])
            call_s.append(time.perf_counter() - t0)
            if compile_targets:
                eager_s.append(cache_once(tmp, f"eager{r}", compile_targets=False)["seconds"])
            if compare:
                cache_teacher.compute_blocks = in_order
                try:
                    order_s.append(cache_once(tmp, f"in_order{r}")["seconds"])
                finally:
                    cache_teacher.compute_blocks = default_blocks
        if args.sizes:
            plain = cache_once(tmp, "sizes")
            fp16 = cache_once(tmp, "h16", hidden_layers=args.hidden_layer)
            int8 = cache_once(tmp, "h8", hidden_layers=args.hidden_layer, hidden_dtype="int8")
            blosc = cache_once(tmp, "blosc", compression="blosc")
    bare, cache, call = statistics.median(bare_s), statistics.median(cache_s), statistics.median(call_s)
    print(f"bare teacher forward : {n_tokens / bare:10,.0f} tokens/s  (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in bare_s)} s)")
    print(f"cache-teacher        : {n_tokens / cache:10,.0f} tokens/s  (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in cache_s)} s; forward, targets, writes and finalize)")
    print(f"time ratio cache-teacher / bare forward: {cache / bare:.2f}x  (per repeat: "
          f"{', '.join(f'{c / b:.2f}' for b, c in zip(bare_s, cache_s))})")
    print(f"whole call incl. teacher load and the counting pass: {call / bare:.2f}x  (median of "
          f"{', '.join(f'{s:.2f}' for s in call_s)} s)")
    def variant(title: str, times: list[float], figure: str) -> None:
        """A variant's median ratio to the bare forward, per repeat, and its JSON figure line."""
        ratio = statistics.median(times) / bare
        print(f"{title}: {ratio:.2f}x  (per repeat: {', '.join(f'{c / b:.2f}' for b, c in zip(bare_s, times))})")
        print(json.dumps({"bench": "cache_teacher", "value": ratio, "figure": f"{figure}, {label}"}))

    if eager_s:
        variant("eager targets (--no-compile-targets)", eager_s, "P1 with eager targets")
    if order_s:
        variant("targets in order after each forward (schedule in_order)", order_s, "P1 in order")
    # one JSON line per figure, for bench/run_all.py
    print(json.dumps({"bench": "cache_teacher", "figure": f"P1: cache-teacher / bare forward, {label}",
                      "value": cache / bare, "target": "<= 1.10", "per_repeat": [c / b for b, c in zip(bare_s, cache_s)]}))
    if args.sizes:
        emb = plain["spec"]["vocab_size"] * plain["spec"]["hidden_size"] * 2 / n_tokens  # once-per-store share
        for store, s in (("top-k only", plain), (f"+ hidden {args.hidden_layer} fp16", fp16),
                         (f"+ hidden {args.hidden_layer} int8", int8), ("top-k only, blosc-zstd", blosc)):
            print(f"bytes/token {store:<24}: {s['bytes_per_token']:8.1f}  "
                  f"({s['bytes_per_token'] - emb:6.1f} without the once-per-store teacher embedding)")
            print(json.dumps({"bench": "cache_teacher", "figure": f"P2: bytes/token, {store}, k {args.top_k}",
                              "value": s["bytes_per_token"] - emb,
                              **({"target": "<= 128"} if store == "top-k only" else {})}))
    scratch.cleanup()


if __name__ == "__main__":
    main()

"""Efficiency measured, not estimated: generation on the ternary inference path against the same student in
fp32 and a dense GPT-2 of equal parameters with its KV cache, side by side in one run (repeats alternated,
medians), CPU, batch 1.

    OMP_NUM_THREADS=1 python bench/bench_ternary_inference.py                       # base and proxy, random weights
    OMP_NUM_THREADS=1 python bench/bench_ternary_inference.py --proxy-run runs27/tern_head_s0   # a trained proxy

For each preset (`base`: vocabulary 50,257; `proxy`: 8,192) the student is fully ternary (`ternary_weights`,
every site spiked, the head's input too). With random weights (fine for speed: the work does not depend on
the values) its zero-initialised matrices are made random and its spike sites initialised from one batch,
as training's first step does, so they fire at a trained-like rate (the rows skipped are printed).
Per context (128 and 4,096 tokens) the student's state after the context comes from one chunked prefill
(its per-token cost does not depend on the context: O(1) state); GPT-2 prefills its KV cache each repeat.
Then --new-tokens greedy steps are timed one by one:
- `student fp32`: Student in its recurrent form, eager (and compiled with --compile: `goose generate --compile`);
- `student ternary`: `ternary_student` (2-bit packed matrices, fired rows only; `goose generate --ternary`);
- `gpt2 kv-cache`: transformers' GPT2LMHeadModel, width matched to the student's parameters (bench_student_vs_dense).
Model bytes: parameters (and the packed buffers) as held in memory; GPT-2's KV cache at the context is
printed beside its weights. One torch thread (the C kernels are single-threaded; OMP_NUM_THREADS=1).
Prints one JSON line per figure and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_student_vs_dense import dense_peer, n_params  # noqa: E402

from goose.student.model import Student, copy_state, preset  # noqa: E402
from goose.student.ternary import measured_ops, packed_bytes, ternary_student  # noqa: E402

SITES = ["tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head"]


def random_ternary_student(name: str, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    model = Student(preset(name, ternary_weights=True, spike_sites=SITES))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:  # RWKV's zero inits (output, channel-mix value, low-rank A's)
                p.normal_(0, 0.02)
        model.train()
        model(torch.randint(0, model.cfg.vocab_size, (2, 64)))  # the spikes' data-dependent init
    return model.eval()


@torch.no_grad()
def prefill_state(model: Student, context: int, chunk: int = 256) -> tuple[list, torch.Tensor]:
    ids = torch.randint(0, model.cfg.vocab_size, (1, context))
    state = None
    for start in range(0, context, chunk):  # chunks: no (context x vocabulary) logits at once
        state = model(ids[:, start:start + chunk], state).state
    return state, ids[:, -1:]


@torch.no_grad()
def student_ms(model: Student, state: list, tok: torch.Tensor, new: int, step=None) -> float:
    step = model if step is None else step
    state = copy_state(state)
    times = []
    for _ in range(new):
        t = time.perf_counter()
        out = step(tok, state, mode="recurrent")
        state, tok = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.no_grad()
def gpt2_ms(model, context: int, new: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, ids[:, -1:]
    times = []
    for _ in range(new):
        t = time.perf_counter()
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def emit(rows: list, **row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def bench_preset(name: str, args, rows: list) -> None:
    if name == "proxy" and args.proxy_run:
        from goose.pipeline.evaluate import student_folder

        folder, _ = student_folder(args.proxy_run)
        model, source = Student.from_pretrained(folder).eval(), f"trained ({folder})"
    else:
        model, source = random_ternary_student(name), "random weights"
    packed = ternary_student(model)
    compiled = torch.compile(model) if args.compile else None
    params = n_params(model)
    contexts = [int(c) for c in args.contexts.split(",")]
    gpt2 = dense_peer(params, model.cfg.vocab_size, model.cfg.n_layer, max(contexts) + args.new_tokens + 1).eval()
    fp32_bytes = params * 4
    pb = packed_bytes(packed)
    w = gpt2.config.n_embd
    emit(rows, preset=name, source=source, figure="bytes", student_params=params, gpt2_params=n_params(gpt2),
         gpt2_width=w, student_fp32_bytes=fp32_bytes, ternary_bytes=pb["total"],
         ternary_bytes_by_part={k: v for k, v in pb.items() if k != "total"}, gpt2_bytes=n_params(gpt2) * 4,
         ternary_vs_fp32=pb["total"] / fp32_bytes,
         ternary_matrices_vs_their_fp32=pb["ternary_matrices"] / (4 * sum(
             m.packed.shape[0] * m.out_features for m in packed.modules() if hasattr(m, "packed"))))
    for context in contexts:
        state, tok = prefill_state(model, context)
        if compiled is not None:  # compilation is warm-up, not timed
            student_ms(model, state, tok, 3, step=compiled)
        runs = {"student_fp32": [], "student_ternary": [], "gpt2_kv_cache": []}
        if compiled is not None:
            runs["student_fp32_compiled"] = []
        for _ in range(args.repeats):
            runs["student_fp32"].append(student_ms(model, state, tok, args.new_tokens))
            if compiled is not None:
                runs["student_fp32_compiled"].append(student_ms(model, state, tok, args.new_tokens, step=compiled))
            for m in packed.modules():  # count only this context's timed steps
                if hasattr(m, "reset_counts"):
                    m.reset_counts()
            runs["student_ternary"].append(student_ms(packed, state, tok, args.new_tokens))
            runs["gpt2_kv_cache"].append(gpt2_ms(gpt2, context, args.new_tokens))
        ms = {k: statistics.median(v) for k, v in runs.items()}
        ops = measured_ops(packed)
        kv = 2 * gpt2.config.n_layer * context * w * 4
        emit(rows, preset=name, figure="generation", context=context, ms_per_token=ms,
             ternary_speedup_vs_fp32=ms["student_fp32"] / ms["student_ternary"],
             ternary_speedup_vs_fp32_compiled=(ms["student_fp32_compiled"] / ms["student_ternary"]
                                               if compiled is not None else None),
             ternary_speedup_vs_gpt2=ms["gpt2_kv_cache"] / ms["student_ternary"], gpt2_kv_cache_bytes=kv,
             rows_skipped={part: o["rows_skipped_fraction"] for part, o in ops.items()},
             rows_read_per_token={part: o["rows_read_per_token"] for part, o in ops.items()},
             rows_dense_per_token={part: o["rows_dense_per_token"] for part, o in ops.items()},
             row_updates_per_token={part: o["updates_per_token"] for part, o in ops.items()})


def table(rows: list) -> str:
    lines = ["| preset | context | student fp32 ms/token | fp32 compiled | ternary path | GPT-2 + KV cache | "
             "ternary vs fp32 | vs GPT-2 | rows skipped (proj / head) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["figure"] != "generation":
            continue
        ms = r["ms_per_token"]
        comp = f"{ms['student_fp32_compiled']:.2f}" if "student_fp32_compiled" in ms else "-"
        sk = r["rows_skipped"]
        lines.append(f"| {r['preset']} | {r['context']:,} | {ms['student_fp32']:.2f} | {comp} | "
                     f"{ms['student_ternary']:.2f} | {ms['gpt2_kv_cache']:.2f} | {r['ternary_speedup_vs_fp32']:.2f}x | "
                     f"{r['ternary_speedup_vs_gpt2']:.2f}x | {sk.get('projections', 0):.3f} / {sk.get('head', 0):.3f} |")
    lines += ["", "| preset | weights | student params | fp32 bytes | ternary path bytes | ratio | ternary matrices "
              "vs their fp32 | GPT-2 bytes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["figure"] == "bytes":
            lines.append(f"| {r['preset']} | {r['source']} | {r['student_params']:,} | {r['student_fp32_bytes'] / 2**20:.1f} MiB | "
                         f"{r['ternary_bytes'] / 2**20:.1f} MiB | {r['ternary_vs_fp32']:.3f} | "
                         f"{r['ternary_matrices_vs_their_fp32']:.4f} | {r['gpt2_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="base,proxy")
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--proxy-run", default=None, help="a trained ternary proxy student (run folder) instead of random weights")
    ap.add_argument("--compile", action="store_true", help="also time the fp32 student under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list = []
    for name in args.presets.split(","):
        bench_preset(name, args, rows)
    print(table(rows))


if __name__ == "__main__":
    main()

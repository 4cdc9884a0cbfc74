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
- `student fp32`: the same function held in fp32 for speed (`fp32_twin`: ternary matrices as plain nn.Linear
  holding codes x scale, not re-derived per step), recurrent form, eager and compiled (--compile);
- `student ternary`: `ternary_student` (2-bit packed matrices, fired rows only; `goose generate --ternary`);
- `gpt2 kv-cache`: transformers' GPT2LMHeadModel, width matched to the student's parameters (bench_student_vs_dense).
Model bytes: parameters (and the packed buffers) as held in memory; GPT-2's KV cache at the context is
printed beside its weights. One torch thread (the C kernels are single-threaded; OMP_NUM_THREADS=1).
Prints one JSON line per figure and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_student_vs_dense import dense_ms_per_token, dense_peer, n_params  # noqa: E402

from goose.student.model import Student, copy_state, preset  # noqa: E402
from goose.student.spikes import TernaryLinear  # noqa: E402
from goose.student.ternary import (PackedTernaryLinear, fp32_bytes, measured_ops, packed_bytes,  # noqa: E402
                                   ternary_student)

SITES = ["tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head"]


def random_ternary_student(name: str, embedding_bits: int = 0, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    model = Student(preset(name, ternary_weights=True, spike_sites=SITES, embedding_bits=embedding_bits))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:  # RWKV's zero inits (output, channel-mix value, low-rank A's)
                p.normal_(0, 0.02)
        model.train()
        model(torch.randint(0, model.cfg.vocab_size, (2, 64)))  # the spikes' data-dependent init
    return model.eval()


def fp32_twin(model: Student) -> Student:
    """The same function held in fp32 as a user would deploy it for speed: every ternary matrix as a plain
    nn.Linear holding codes * gamma, an integer embedding's rounded values as a plain embedding (neither
    re-derived every step, as the training model's TernaryLinear and RowQuantizedEmbedding do)."""
    twin = Student(dataclasses.replace(model.cfg, ternary_weights=False, embedding_bits=0))
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            codes, gamma = module.ternary_codes()
            state[f"{name}.weight"] = codes * gamma
    if model.cfg.embedding_bits:
        state["emb.weight"] = model.emb.quantised_weight().detach()
    twin.load_state_dict(state)
    return twin.eval()


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


def emit(rows: list, **row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def bench_preset(name: str, args, rows: list) -> None:
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = []
    for bits in (int(b) for b in args.embedding_bits.split(",")):
        if name == "proxy" and args.proxy_run:
            from goose.pipeline.evaluate import student_folder

            folder, _ = student_folder(args.proxy_run)
            model, source = Student.from_pretrained(folder).eval(), f"trained ({folder})"
            if bits != model.cfg.embedding_bits:
                continue
        else:
            model, source = random_ternary_student(name, bits), "random weights"
        variants.append((model, source))
    params = n_params(variants[0][0])
    vocab, layers = variants[0][0].cfg.vocab_size, variants[0][0].cfg.n_layer
    gpt2 = dense_peer(params, vocab, layers, max(contexts) + args.new_tokens + 1).eval()
    w = gpt2.config.n_embd
    timed = []
    for model, source in variants:
        fp32, packed = fp32_twin(model), ternary_student(model)
        pb = packed_bytes(packed)
        bits = model.cfg.embedding_bits or 32
        emit(rows, preset=name, source=source, embedding_bits=bits, figure="bytes", student_params=params,
             gpt2_params=n_params(gpt2), gpt2_width=w, student_fp32_bytes=fp32_bytes(model), ternary_bytes=pb["total"],
             ternary_bytes_by_part={k: v for k, v in pb.items() if k != "total"}, gpt2_bytes=n_params(gpt2) * 4,
             ternary_vs_fp32=pb["total"] / fp32_bytes(model),
             ternary_matrices_vs_their_fp32=pb["ternary_matrices"] / (4 * sum(
                 m.in_features * m.out_features for m in packed.modules() if isinstance(m, PackedTernaryLinear))))
        steps = {"student_fp32": (fp32, None), "student_ternary": (packed, None)}
        if args.compile:
            steps["student_fp32_compiled"] = (fp32, torch.compile(fp32))
            steps["student_ternary_compiled"] = (packed, torch.compile(packed))
        timed.append((bits, model, packed, steps))
    for context in contexts:
        gpt2_runs = []
        per_variant = []
        for bits, model, packed, steps in timed:
            state, tok = prefill_state(model, context)
            for key, (m, step) in steps.items():
                if step is not None:  # compilation is warm-up, not timed
                    student_ms(m, state, tok, 3, step=step)
            per_variant.append((state, tok, {k: [] for k in steps}))
        for _ in range(args.repeats):
            for (bits, model, packed, steps), (state, tok, runs) in zip(timed, per_variant):
                packed_count_reset(packed)
                for key, (m, step) in steps.items():
                    runs[key].append(student_ms(m, state, tok, args.new_tokens, step=step))
            gpt2_runs.append(dense_ms_per_token(gpt2, context, args.new_tokens, torch.device("cpu")))
        g = statistics.median(gpt2_runs)
        kv = 2 * gpt2.config.n_layer * context * w * 4
        for (bits, model, packed, steps), (_, _, runs) in zip(timed, per_variant):
            ms = {k: statistics.median(v) for k, v in runs.items()}
            ms["gpt2_kv_cache"] = g
            best_fp32 = min(v for k, v in ms.items() if k.startswith("student_fp32"))
            best_ternary = min(v for k, v in ms.items() if k.startswith("student_ternary"))
            ops = measured_ops(packed)
            emit(rows, preset=name, figure="generation", embedding_bits=bits, context=context, ms_per_token=ms,
                 ternary_speedup_vs_best_fp32=best_fp32 / best_ternary,
                 ternary_speedup_vs_gpt2=g / best_ternary, gpt2_kv_cache_bytes=kv,
                 rows_skipped={part: o["rows_skipped_fraction"] for part, o in ops.items()},
                 rows_read_per_token={part: o["rows_read_per_token"] for part, o in ops.items()},
                 rows_dense_per_token={part: o["rows_dense_per_token"] for part, o in ops.items()},
                 row_updates_per_token={part: o["updates_per_token"] for part, o in ops.items()})


def packed_count_reset(packed: Student) -> None:
    for m in packed.modules():  # count only the timed steps
        if hasattr(m, "reset_counts"):
            m.reset_counts()


def table(rows: list) -> str:
    lines = ["| preset | embedding | context | fp32 eager | fp32 compiled | ternary eager | ternary compiled | "
             "GPT-2 + KV cache | ternary vs best fp32 | vs GPT-2 | rows skipped (proj / head) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda ms, k: f"{ms[k]:.2f}" if k in ms else "-"  # noqa: E731
    for r in rows:
        if r["figure"] != "generation":
            continue
        ms, sk = r["ms_per_token"], r["rows_skipped"]
        lines.append(f"| {r['preset']} | {r['embedding_bits']}-bit | {r['context']:,} | {f(ms, 'student_fp32')} | "
                     f"{f(ms, 'student_fp32_compiled')} | {f(ms, 'student_ternary')} | {f(ms, 'student_ternary_compiled')} | "
                     f"{ms['gpt2_kv_cache']:.2f} | {r['ternary_speedup_vs_best_fp32']:.2f}x | "
                     f"{r['ternary_speedup_vs_gpt2']:.2f}x | {sk.get('projections', 0):.3f} / {sk.get('head', 0):.3f} |")
    lines += ["", "| preset | embedding | weights | student params | fp32 bytes | ternary path bytes | ratio | ternary "
              "matrices vs their fp32 | GPT-2 bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["figure"] == "bytes":
            lines.append(f"| {r['preset']} | {r['embedding_bits']}-bit | {r['source']} | {r['student_params']:,} | "
                         f"{r['student_fp32_bytes'] / 2**20:.1f} MiB | {r['ternary_bytes'] / 2**20:.1f} MiB | "
                         f"{r['ternary_vs_fp32']:.3f} | {r['ternary_matrices_vs_their_fp32']:.4f} | "
                         f"{r['gpt2_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="base,proxy")
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--proxy-run", default=None, help="a trained ternary proxy student (run folder) instead of random weights")
    ap.add_argument("--compile", action="store_true", help="also time both students under torch.compile")
    ap.add_argument("--embedding-bits", default="0,4",
                    help="students to time: fp32 (0) and/or integer (8, 4) embeddings (a --proxy-run: its own)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list = []
    for name in args.presets.split(","):
        bench_preset(name, args, rows)
    print(table(rows))


if __name__ == "__main__":
    main()

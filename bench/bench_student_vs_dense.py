"""The spiking student against its real peer: a dense GPT-2-architecture model of the same parameter count and
vocabulary, side by side in one run (repeats alternated, medians).

    OMP_NUM_THREADS=1 python bench/bench_student_vs_dense.py            # preset proxy, CPU
    python bench/bench_student_vs_dense.py --preset base --device cuda --batch 16 --seq-len 1024

1. Training throughput: tokens/s of one optimiser step (forward, backward, AdamW) of the student and of a
   `transformers` GPT2LMHeadModel whose width is chosen so its parameter count matches; same batch and
   sequence length. The student is measured with its spike sites on (the shipped default), with them off,
   and with LIF dynamics, so the spikes' own cost shows.
2. Generation: ms per new token at a context of --context tokens, batch 1: the student's recurrent form
   (its state is O(1) in the context) vs GPT-2 with its KV cache (O(context) per token).
Both are measured eagerly and under torch.compile (`--set compile=true` in training, `goose generate --compile`;
skip with --no-compile). The targets (issue 11: training >= 0.7, generation <= 0.5) sit on the ratio of the
compiled student to the dense peer in whichever of its two modes is faster, so the peer is never handicapped;
the eager ratios are printed beside them. Compilation is warm-up, not timed.
Prints one JSON line per figure (`bench/run_all.py` collects them) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from goose.student.model import Student, preset


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_peer(target: int, vocab: int, n_layer: int, ctx: int) -> GPT2LMHeadModel:
    """A GPT-2 (tied embeddings, 4x MLP) whose width, in steps of 32 with head size 32, comes closest to
    `target` parameters at `n_layer` layers, not counting its position table (a lookup that costs no
    compute, and 4k x width parameters at a 4k context)."""
    best = None
    for width in range(64, 4096, 32):
        cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=n_layer, n_head=width // 32)
        count = vocab * width + n_layer * (12 * width * width + 13 * width) + 2 * width
        if best is None or abs(count - target) < abs(best[0] - target):
            best = (count, cfg)
        if count > target:
            break
    model = GPT2LMHeadModel(best[1])
    model.config.loss_type = "ForCausalLMLoss"  # silences transformers' loss_type=None notice
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, batch: torch.Tensor, forward=None):
    """One optimiser step of `model`; `forward` (default the model) is what runs it, e.g. torch.compile(model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    targets = batch[:, 1:]
    forward = model if forward is None else forward

    def step():
        logits = forward(batch[:, :-1]).logits  # both models return an output with .logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def student_ms_per_token(model: Student, context: int, new: int, device, step=None) -> float:
    """`step` (default the model) runs the recurrent steps, e.g. torch.compile(model); the prompt runs eagerly."""
    step = model if step is None else step
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), device=device)
    out = model(ids)  # the prompt once, chunked form; then one token at a time from the O(1) state
    state, tok = out.state, ids[:, -1:]
    times = []
    for _ in range(new):
        t = time.perf_counter()
        out = step(tok, state, mode="recurrent")
        state = out.state
        sync(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.no_grad()
def dense_ms_per_token(model: GPT2LMHeadModel, context: int, new: int, device, step=None) -> float:
    step = model if step is None else step
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, ids[:, -1:]
    times = []
    for _ in range(new):
        t = time.perf_counter()
        out = step(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        sync(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="proxy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes a few minutes on CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    variants = {
        "student (spikes on)": Student(preset(args.preset)),
        "student (spikes off)": Student(preset(args.preset, spike_sites=())),
        "student (LIF spikes)": Student(preset(args.preset, spike={"lif": True})),
    }
    cfg = variants["student (spikes on)"].cfg
    target = n_params(variants["student (spikes on)"])
    dense = dense_peer(target, cfg.vocab_size, cfg.n_layer, max(args.context + args.new_tokens, args.seq_len + 1))
    models = {**variants, "dense GPT-2": dense}
    for m in models.values():
        m.to(device).train()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    steps = {name: train_step_fn(m, batch) for name, m in models.items()}
    for fn in steps.values():  # warm-up (and the spikes' data-dependent initialisation, eagerly)
        fn()
    compiled = {} if args.no_compile else {"student (spikes on)": "student (spikes on), compiled",
                                          "dense GPT-2": "dense GPT-2, compiled"}
    for name, label in compiled.items():  # LIF's per-token loop would unroll: it is measured eagerly only
        steps[label] = train_step_fn(models[name], batch, torch.compile(models[name]))
        steps[label]()  # compiles (warm-up, not timed)
        steps[label]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # alternated, so a busy machine slows every model alike
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    tokens = args.batch * args.seq_len
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    rows = []
    for name in steps:
        rows.append({"bench": "student_vs_dense", "figure": f"train tokens/s: {name}", "value": rates[name],
                     "params": n_params(models[name.replace(", compiled", "")])})
    for name in variants:
        rows.append({"bench": "student_vs_dense", "figure": f"train throughput ratio: {name} / dense (eager)",
                     "value": rates[name] / rates["dense GPT-2"]})
    if compiled:
        best = max(rates["dense GPT-2"], rates["dense GPT-2, compiled"])
        rows.append({"bench": "student_vs_dense", "value": rates["student (spikes on), compiled"] / best,
                     "figure": "train throughput ratio: student (spikes on), compiled / dense at its fastest",
                     "target": ">= 0.7"})

    if not args.skip_generation:
        for m in models.values():
            m.eval()
        student = variants["student (spikes on)"]
        gens = {"student": lambda step=None: student_ms_per_token(student, args.context, args.new_tokens, device, step),
                "dense GPT-2 (KV cache)": lambda step=None: dense_ms_per_token(dense, args.context, args.new_tokens,
                                                                                device, step)}
        if not args.no_compile:
            s_step, d_step = torch.compile(student), torch.compile(dense)
            gens["student, compiled"] = lambda: student_ms_per_token(student, args.context, args.new_tokens, device,
                                                                     s_step)
            gens["dense GPT-2 (KV cache), compiled"] = lambda: dense_ms_per_token(dense, args.context, 4, device,
                                                                                  d_step)
            for label in ("student, compiled", "dense GPT-2 (KV cache), compiled"):
                gens[label]()  # compiles (warm-up, not timed); the dense one then recompiles once for dynamic shapes
            gens["dense GPT-2 (KV cache), compiled"] = lambda: dense_ms_per_token(dense, args.context,
                                                                                  args.new_tokens, device, d_step)
        ms = {label: [] for label in gens}
        for _ in range(max(1, args.repeats // 2)):
            for label, fn in gens.items():
                ms[label].append(fn())
        med = {label: statistics.median(v) for label, v in ms.items()}
        ctx = args.context
        for label, v in med.items():
            rows.append({"bench": "student_vs_dense", "figure": f"generate ms/token at context {ctx}: {label}",
                         "value": v})
        rows.append({"bench": "student_vs_dense", "figure": f"generate ratio at context {ctx}: student / dense "
                     "(eager)", "value": med["student"] / med["dense GPT-2 (KV cache)"]})
        if not args.no_compile:
            best = min(med["dense GPT-2 (KV cache)"], med["dense GPT-2 (KV cache), compiled"])
            rows.append({"bench": "student_vs_dense", "figure": f"generate ratio at context {ctx}: student, compiled "
                         "/ dense at its fastest", "value": med["student, compiled"] / best, "target": "<= 0.5"})
    print(f"preset {args.preset}: student {target:,} parameters, dense GPT-2 {n_params(dense):,} "
          f"(width {dense.config.n_embd}, {dense.config.n_layer} layers); batch {args.batch} x {args.seq_len}, "
          f"{args.repeats} alternated repeats, torch threads {torch.get_num_threads()}")
    for r in rows:
        print(json.dumps(r))
    for r in rows:
        print(f"{r['figure']:<60} {r['value']:>10.3f}  {r.get('target', '')}")


if __name__ == "__main__":
    main()

"""The student's two execution forms side by side, and the recurrent form's cost as context grows.

    python bench/bench_student_forms.py                    # preset small, vocab 8192, CPU
    python bench/bench_student_forms.py --preset base --device cuda --batch 16 --seq-len 1024

1. Training step (forward + backward) and no-grad forward over a batch of windows: chunked vs recurrent
   form (same weights, same tokens), tokens/s and ratio, repeats alternated.
2. Generation: one token per call with carried state; per-token latency and process memory at growing
   context lengths (the state is O(1), so both should stay flat).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from goose.student.model import Student, preset


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contexts", default="64,256,1024,4096")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset, **({"vocab_size": args.vocab} if args.vocab else {}))
    torch.manual_seed(0)
    model = Student(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    model.train()
    model(ids[:, :16])  # data-dependent spike init
    n_params = model.parameter_report()["total"]
    print(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters, d={cfg.d_model}, layers={cfg.n_layer}, "
          f"vocab={cfg.vocab_size}; batch {args.batch} x {args.seq_len} tokens on {device}, "
          f"torch threads {torch.get_num_threads()}")

    def train_step(mode):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        logits = model(ids, mode=mode).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        sync(device)
        return time.perf_counter() - t0

    def infer(mode):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, mode=mode)
        sync(device)
        return time.perf_counter() - t0

    n_tok = ids.numel()
    for label, fn in (("train fwd+bwd", train_step), ("no-grad forward", infer)):
        chunked, recurrent = [], []
        for _ in range(args.repeats):
            chunked.append(fn("chunked"))
            recurrent.append(fn("recurrent"))
        c, r = statistics.median(chunked), statistics.median(recurrent)
        print(f"{label:<16}: chunked {n_tok / c:9,.0f} tok/s | recurrent {n_tok / r:9,.0f} tok/s | "
              f"chunked speed-up {r / c:.2f}x")

    model.eval()
    contexts = [int(c) for c in args.contexts.split(",")]
    state, done = None, 0
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    state_bytes = None
    print("generation (batch 1, one token per call, carried state):")
    with torch.no_grad():
        for ctx in contexts:
            while done < ctx - 32:  # advance to just before the measuring point
                state = model(tok, state, mode="recurrent").state
                done += 1
            sync(device)
            t0 = time.perf_counter()
            for _ in range(32):
                state = model(tok, state, mode="recurrent").state
            sync(device)
            done += 32
            per_tok = (time.perf_counter() - t0) / 32
            if state_bytes is None:
                state_bytes = sum(t.numel() * t.element_size() for t in _tensors(state))
            mem = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
            print(f"  context {ctx:>6}: {per_tok * 1e3:7.2f} ms/token, {'allocated' if device.type == 'cuda' else 'RSS'} "
                  f"{mem:8.1f} MB, state {state_bytes / 2**10:.1f} KB")


def _tensors(state):
    if isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, list):
        for v in state:
            yield from _tensors(v)
    elif isinstance(state, torch.Tensor):
        yield state


if __name__ == "__main__":
    main()

"""`base` (GPT-2 small's student, 52.6M) trained from a GPT-2-shaped store at seq 1,024: tokens/s, peak memory,
memory saved for backward per layer, and the memory model of one GPU at batch 16 x 1,024.

    OMP_NUM_THREADS=1 python bench/bench_base_memory.py --cache runs/gpt2-random-64k.zarr --batch-size 2
    python bench/bench_base_memory.py --cache STORE --device cuda --amp bf16 --batch-size 16   # on a GPU

For each shipped config (--configs, default kd_rs and full) one real Trainer (store, loader, losses,
optimiser) runs --steps steps. Then one more micro-batch's forward and losses run under
`torch.autograd.graph.saved_tensors_hooks`, which counts every byte autograd keeps for backward (each
storage once), attributed to the embedding, each block and the head + losses; with activation
checkpointing on, the same count shows what checkpointing keeps. Bytes per token of each part, times the
tokens of a GPU batch, plus 16 bytes per parameter (fp32 weights, gradients and AdamW's two moments) give
the memory model; the largest transient (the (B, T, V) fp32 tensors of the loss) is listed apart.
Prints one table per config and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from goose.pipeline.stage_two.config import load_config
from goose.pipeline.stage_two.train import Trainer


class SavedBytes:
    """Bytes autograd saves for backward, by the part of the model that was running (storages counted once)."""

    def __init__(self, model):
        self.part = "embedding"
        self.bytes: dict[str, int] = {}
        self.seen: set[int] = set()
        self.handles = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._enter(f"block {i}")))
            self.handles.append(block.register_forward_hook(lambda m, a, o: self._enter("head + losses")))

    def _enter(self, part: str) -> None:
        self.part = part

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and not isinstance(t, torch.nn.Parameter):
            self.seen.add(key)
            self.bytes[self.part] = self.bytes.get(self.part, 0) + storage.nbytes()
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(args, config: str, checkpointing: bool) -> dict:
    with tempfile.TemporaryDirectory() as run:
        overrides = [f"model.preset={args.preset}", f"batch_size={args.batch_size}", "val_every=100000",
                     "ckpt_every=100000", "loggers=[jsonl]", f"activation_checkpointing={str(checkpointing).lower()}",
                     *([f"amp={args.amp}"] if args.amp != "none" else []), *args.overrides]
        cfg = load_config(config, overrides, cache=args.cache, out=run, device=args.device, steps=10_000)
        trainer = Trainer(cfg, progress=False, echo=lambda *a, **k: None)
        params = sum(p.numel() for p in trainer.model.parameters())
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train_step()  # warm-up: spike initialisation, allocator, kernels
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync()
        seconds = (time.perf_counter() - t) / args.steps
        peak = (torch.cuda.max_memory_allocated() if trainer.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        tokens = args.batch_size * trainer.reader.spec.seq_len
        counter = SavedBytes(trainer.model)
        batch = trainer.next_batch()  # decoded on the device on CUDA, as train_step does
        trainer.model.train()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            parts = trainer.compute_losses(batch, trainer._stage_values(), 0.5)
        counter.close()
        del parts
        saved = dict(counter.bytes)
    return {"config": config, "checkpointing": checkpointing, "params": params, "tokens_per_step": tokens,
            "step_seconds": seconds, "tokens_per_s": tokens / seconds, "peak_bytes": peak,
            "saved_bytes": saved, "saved_bytes_per_token": {k: v / tokens for k, v in saved.items()}}


def memory_model(row: dict, gpu_tokens: int, vocab: int, one_block_per_token: float) -> dict:
    """With checkpointing, the forward keeps each block's input only (counted under "embedding": the
    checkpoint saves them before the block runs) and backward rebuilds one block at a time: add one block."""
    state = 16 * row["params"]  # fp32 weights + gradients + AdamW exp_avg and exp_avg_sq
    saved = (sum(row["saved_bytes_per_token"].values()) + (one_block_per_token if row["checkpointing"] else 0)) * gpu_tokens
    transient = 2 * 4 * gpu_tokens * vocab  # two (B, T, V) fp32 tensors live at once in the loss's backward
    return {"state_gb": state / 1e9, "saved_gb": saved / 1e9, "loss_transient_gb": transient / 1e9,
            "total_gb": (state + saved + transient) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--configs", default="kd_rs,full")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--gpu-batch", type=int, default=16, help="windows per GPU batch in the memory model")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # CONFIG:0|1, one measurement in this process
    args = ap.parse_args()
    from goose.cache.reader import CacheReader

    if args.row:
        config, checkpointing = args.row.split(":")
        print(json.dumps(measure(args, config, checkpointing == "1")))
        return

    spec = CacheReader(args.cache).spec
    gpu_tokens = args.gpu_batch * spec.seq_len
    rows = []
    print(f"{args.preset} from {args.cache}: batch {args.batch_size} x {spec.seq_len}, {args.device}, amp {args.amp}",
          file=sys.stderr if args.json else sys.stdout)
    for config in args.configs.split(","):
        one_block = 0.0
        for checkpointing in (False, True):
            row = run_row(config, checkpointing)
            if not checkpointing:
                one_block = max((v for k, v in row["saved_bytes_per_token"].items() if k.startswith("block")), default=0)
            row["gpu_model"] = memory_model(row, gpu_tokens, spec.vocab_size, one_block)
            rows.append(row)
            show(row, args, spec, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"cache": args.cache, "device": args.device, "amp": args.amp, "rows": rows}))


def run_row(config: str, checkpointing: bool) -> dict:
    """One measurement in a fresh process: peak memory is a process's high-water mark."""
    argv = [a for a in sys.argv[1:] if a != "--json"]
    out = subprocess.run([sys.executable, __file__, *argv, "--row", f"{config}:{int(checkpointing)}"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{config} (checkpointing {checkpointing}) failed with exit {out.returncode}:\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def show(r: dict, args, spec, file) -> None:
    per = r["saved_bytes_per_token"]
    blocks = [v for k, v in per.items() if k.startswith("block")]
    print(f"\n{r['config']} (activation checkpointing {'on' if r['checkpointing'] else 'off'}): "
          f"{r['params'] / 1e6:.1f}M parameters, {r['tokens_per_s']:,.0f} tokens/s, "
          f"peak {r['peak_bytes'] / 1e9:.2f} GB", file=file)
    first = "embedding + block inputs (checkpoints)" if r["checkpointing"] else "embedding"
    print(f"  saved for backward, bytes/token: {first} {per.get('embedding', 0):,.0f}, per block "
          f"{min(blocks, default=0):,.0f}-{max(blocks, default=0):,.0f} ({len(blocks)} blocks), head + losses "
          f"{per.get('head + losses', 0):,.0f}", file=file)
    m = r["gpu_model"]
    print(f"  one GPU at {args.gpu_batch} x {spec.seq_len}: weights+grads+Adam {m['state_gb']:.2f} GB + saved "
          f"{m['saved_gb']:.2f} GB + loss transient {m['loss_transient_gb']:.2f} GB = {m['total_gb']:.1f} GB",
          file=file, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

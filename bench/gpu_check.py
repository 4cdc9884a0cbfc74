"""The one prepared GPU check: everything goose has never run on CUDA, in one script and one table.

    python bench/gpu_check.py --out runs/gpu_check          # one H100/H200: about 5-8 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gc       # CPU, tiny shapes: the same code, for the tests

Steps (each row of the table says what ran and what it measured; a step that fails prints its error in its
row and the others still run):
1. **fla parity**: tests/test_fla_kernels.py and tests/test_wkv_fla.py on CUDA (fla's RWKV-7 Triton kernels
   against goose's step-by-step recurrence: chunk and fused-recurrent kernels, forward, backward, carried
   state, the whole student, bf16 autocast). The dry run runs them under Triton's interpreter where fla
   is installed.
2. **stage one (P1 on a GPU)**: a GPT-2-small-shaped teacher (GPT2Config(), random weights) in bf16,
   `cache-teacher` with the README's GPU settings (seq 1,024, top-64, hidden layers 4,8,12 int8, 50 RS-KD
   draws) against its bare forward over the same windows; tokens/s, bytes/token, peak GPU memory.
   Then **device codec**: that store's encodings decoded on the GPU (what train-from-cache now does on
   CUDA) and the top-k encoded there (what stage one does) against the host's numpy, element for element.
   And **store I/O**: this host's writer (1 thread and the CUDA default's threads) and reader (0-8 workers)
   in tokens/s, which 2 CPU cores could not measure.
3. **stage two**: `base` trained from that store at 16 x 1,024 under bf16 autocast with the `kd_rs` and
   `full` configs, fla kernels against goose's torch kernels: tokens/s, MFU (6 x parameters x tokens/s over
   the card's dense bf16 peak), peak GPU memory; and `full` with activation checkpointing.
4. **generation**: `base`'s recurrent form, a 4,096-token prompt then 64 single tokens, fla and torch:
   ms/token.
NCCL is not exercised: one GPU cannot host two NCCL ranks.

Inputs: the GPT-2 tokenizer folder and a text file (default: ../shared beside the checkout). Writes
`gpu_check.json` and `gpu_check.md` (the table) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GOOSE_SHARED", REPO.parent / "shared"))
# dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), for MFU
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # first match wins


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


class Settings:
    """The full check on a GPU, or the same code at tiny shapes on CPU (--dry-run)."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = "fp32" if self.dry else "bf16"
        self.amp = "none" if self.dry else "bf16"
        self.seq_len = 64 if self.dry else 1024
        self.windows = 16 if self.dry else args.windows
        self.hidden_layers = "1,2" if self.dry else "4,8,12"
        self.preset = "tiny" if self.dry else "base"
        self.batch = 2 if self.dry else 16
        self.steps = 2 if self.dry else args.steps
        self.context = 128 if self.dry else 4096
        self.new_tokens = 8 if self.dry else 64
        self.backends = ("torch",) if self.dry else ("fla", "torch")


def teacher_folder(tmp: Path, s: Settings, tokenizer_dir: Path) -> dict:
    """GPT2Config() with random weights (real GPT-2 weights are not needed: the cost is the same)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=s.seq_len) if s.dry else GPT2Config()
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    return {"ok": True, "path": str(tmp / "teacher")}


def step_parity(s: Settings) -> dict:
    env = dict(os.environ)
    if s.dry:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_fla_kernels.py",
           "tests/test_wkv_fla.py"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    text = out.stdout + out.stderr
    summary = re.findall(r"(\d+ (?:passed|failed|skipped|error))", text)
    # on a GPU every kernel test must run: a skip there means fla or CUDA is missing, not a pass
    skipped = any(x.endswith("skipped") for x in summary)
    diffs = [float(x) for x in re.findall(r"max \|reference\| = ([0-9.e+-]+)", text)]
    kernels = re.findall(r"Triton kernels launched: (.*)", text)
    return {"ok": out.returncode == 0 and (s.dry or not skipped), "summary": ", ".join(summary) or text[-300:],
            "worst_relative_difference": max(diffs) if diffs else None, "kernels": kernels[0] if kernels else None,
            "what": "tests/test_fla_kernels.py + tests/test_wkv_fla.py" + (" (Triton interpreter)" if s.dry else "")}


def step_stage_one(s: Settings, tmp: Path, teacher: str, data_files: list[str]) -> dict:
    from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
    from goose.pipeline.data import DataSpec, load_texts, tokenize_and_pack
    from goose.pipeline.teacher import load_teacher

    data = DataSpec(data_files=tuple(data_files))
    max_tokens = s.windows * s.seq_len
    loaded = load_teacher(teacher, dtype=s.dtype, device=str(s.device))
    windows = tokenize_and_pack(load_texts(data), loaded.tokenizer, text_column="text", seq_len=s.seq_len,
                                max_tokens=max_tokens)
    if len(windows) < s.windows:
        raise ValueError(f"the data files hold {len(windows)} windows of {s.seq_len}, not --windows {s.windows}: "
                         f"give more --data-files")

    def bare(model) -> float:
        sync(s.device)
        t = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(windows), s.batch):
                ids = torch.from_numpy(windows[b : b + s.batch]).to(s.device)
                model(input_ids=ids, use_cache=False).logits.float().sum().item()
        return time.perf_counter() - t

    bare(loaded.model)  # warm-up
    reset_peak(s.device)
    bare_s = min(bare(loaded.model), bare(loaded.model))
    forward_peak = peak_gb(s.device)
    del loaded
    reset_peak(s.device)
    cfg = CacheTeacherConfig(output=str(tmp / "store.zarr"), teacher=teacher, dtype=s.dtype, device=str(s.device),
                             batch_size=s.batch, data=data, seq_len=s.seq_len, max_tokens=max_tokens, top_k=64,
                             samples=50, hidden_layers=s.hidden_layers, hidden_dtype="int8", progress=False)
    summary = run_cache_teacher(cfg)
    tokens = summary["tokens"]
    return {"ok": True, "tokens": tokens, "bare_tokens_per_s": len(windows) * s.seq_len / bare_s,
            "cache_tokens_per_s": summary["tokens_per_s"], "ratio": summary["seconds"] / bare_s,
            "bytes_per_token": summary["bytes_per_token"], "peak_gb": peak_gb(s.device),
            "forward_peak_gb": forward_peak, "store": cfg.output,
            "what": f"cache-teacher {s.dtype} top-64, hidden {s.hidden_layers} int8, 50 draws / bare forward"}


def step_device_codec(s: Settings, store: str) -> dict:
    """The CUDA paths of the store's encodings (cache/device_codec.py) against the host's numpy, on this
    device: every field of `full` decoded on the device equals the host's decode, and the top-k encoded on
    the device equals numpy's, counted in elements that differ (0 expected)."""
    import numpy as np

    from goose.cache.device_codec import BatchDecoder, encode_topk, fields_to_read, raw_tensors
    from goose.cache.reader import CacheReader
    from goose.cache.schema import encode_topk as encode_numpy, hidden_name
    from goose.pipeline.stage_two.loader import to_tensors

    reader = CacheReader(store)
    spec = reader.spec
    fields = ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_counts",
              *(hidden_name(layer) for layer in spec.hidden_layers)]
    idx = np.arange(min(spec.n_windows, 8))
    host = to_tensors(reader.read_indices(idx, fields))
    raw = {k: v.to(s.device) for k, v in raw_tensors(reader.read_indices(idx, fields_to_read(spec, fields),
                                                                        dequantize=False)).items()}
    decoded = BatchDecoder(spec, fields, reader.pca_basis())(raw)
    differ = {}
    for name in fields:
        a, b = decoded[name].cpu(), host[name]
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        if a.dtype != b.dtype or not bool(same.all()):
            differ[name] = int((~same).sum()) if a.dtype == b.dtype else f"dtype {a.dtype} != {b.dtype}"
    ids, lp = decoded["topk_ids"].cpu().numpy(), decoded["topk_logprobs"].cpu().numpy()
    want = encode_numpy(ids, lp, spec.logprob_step, np.dtype(spec.token_dtype))
    got = encode_topk(decoded["topk_ids"], decoded["topk_logprobs"], spec.logprob_step)
    for name, w, g in zip(("encoded topk_ids", "encoded topk_logprobs"), want, got):
        n = int((g.cpu().numpy().astype(w.dtype) != w).sum())
        if n:
            differ[name] = n
    return {"ok": not differ, "differ": differ, "windows": len(idx), "fields": len(fields)}


def step_store_io(s: Settings, store: str) -> dict:
    """This host's side of the pipeline, what 2 CPU cores could not show (bench/bench_store_io.py's cells,
    in this process): stage one's writer with 1 thread and with the CUDA default's threads, and stage two's
    reader (the CUDA path: stored encodings, decoded on the GPU) for kd_rs, kd and align with 0, 2, 4 and 8
    workers, in tokens/s. It decides whether num_workers should default above 0 on CUDA."""
    import importlib.util

    from goose.pipeline.stage_one.cache_teacher import writer_threads

    spec = importlib.util.spec_from_file_location("bench_store_io", REPO / "bench" / "bench_store_io.py")
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    threads = writer_threads(0, s.device)
    writer = {t: io.writer_cell(store, t, 1, 1, None, False, s.device.type == "cuda")["tokens_per_s"]
              for t in sorted({1, threads})}
    from goose.cache.reader import CacheReader

    batches = min(40, CacheReader(store).n_windows // s.batch)
    reader = {f"{fields} w{workers}": io.reader_cell(store, fields, workers, batches, False, s.batch)["tokens_per_s"]
              for fields in ("kd_rs", "kd", "align") for workers in ((0, 2) if s.dry else (0, 2, 4, 8))}
    return {"ok": True, "writer_tokens_per_s": writer, "reader_tokens_per_s": reader,
            "cores": len(os.sched_getaffinity(0))}


def step_train(s: Settings, tmp: Path, store: str, config: str, backend: str, checkpointing: bool) -> dict:
    from goose.pipeline.stage_two.config import load_config
    from goose.pipeline.stage_two.train import Trainer

    run = tmp / f"train-{config}-{backend}-{int(checkpointing)}"
    overrides = [f"model.preset={s.preset}", f"model.overrides.wkv_backend={backend}", f"batch_size={s.batch}",
                 "val_every=100000", "ckpt_every=100000", "loggers=[jsonl]", f"amp={s.amp}",
                 f"activation_checkpointing={str(checkpointing).lower()}", "num_workers=0" if s.dry else "num_workers=4"]
    cfg = load_config(config, overrides, cache=store, out=str(run), device=str(s.device), steps=10_000)
    trainer = Trainer(cfg, progress=False, echo=lambda *a, **k: None)
    params = sum(p.numel() for p in trainer.model.parameters())
    trainer.train_step()  # warm-up: spike initialisation, Triton's autotuning, the allocator
    reset_peak(s.device)
    sync(s.device)
    t = time.perf_counter()
    for _ in range(s.steps):
        trainer.train_step()
    sync(s.device)
    seconds = (time.perf_counter() - t) / s.steps
    tokens_per_s = s.batch * s.seq_len / seconds
    peak = peak_flops(s.device)
    peak_memory = peak_gb(s.device)
    trainer.loader.close()
    del trainer  # nothing of this row may count in the next one's peak
    import gc

    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ok": True, "config": config, "backend": backend, "checkpointing": checkpointing, "params": params,
            "tokens_per_s": tokens_per_s, "mfu": 6 * params * tokens_per_s / peak if peak else None,
            "peak_gb": peak_memory}


def step_generate(s: Settings, backend: str) -> dict:
    from goose.pipeline.generate import generate
    from goose.student.model import Student, preset

    torch.manual_seed(0)
    model = Student(preset(s.preset, wkv_backend=backend)).to(s.device)
    prompt = torch.randint(0, model.cfg.vocab_size, (s.context,), generator=torch.Generator().manual_seed(0)).tolist()
    generate(model, prompt[:64], max_new_tokens=4, device=s.device)  # warm-up
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=not s.dry):
        out = generate(model, prompt, max_new_tokens=s.new_tokens, device=s.device, temperature=0)
    return {"ok": True, "backend": backend, "context": s.context, "prompt_tokens_per_s": s.context / out["prompt_seconds"],
            "ms_per_token": 1e3 * out["seconds"] / max(out["n_new"], 1), "state_mb": out["state_bytes"] / 2**20}


def guarded(name: str, fn, *a) -> dict:
    t = time.perf_counter()
    try:
        row = fn(*a)
    except Exception as exc:  # noqa: BLE001 - a failed step is a row of the table, the others still run
        row = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
               "traceback": traceback.format_exc()[-2000:]}
    row.update(step=name, seconds=time.perf_counter() - t)
    print(f"[{row['seconds']:6.1f} s] {name}: {'ok' if row['ok'] else 'FAILED ' + row['error']}", flush=True)
    return row


def table(rows: list[dict], device: str) -> str:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"goose GPU check on {device}", "", "| step | result |", "|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['step']} | FAILED: {r.get('error', '')} |")
            continue
        if r["step"] == "fla parity":
            res = (f"{r['summary']}; worst difference {fmt(r['worst_relative_difference'], '.1e')} of scale "
                   f"({r['what']})")
        elif r["step"] == "stage one":
            res = (f"{r['ratio']:.2f}x the bare forward ({r['cache_tokens_per_s']:,.0f} vs {r['bare_tokens_per_s']:,.0f} "
                   f"tokens/s over {r['tokens']:,} tokens); {r['bytes_per_token']:,.0f} B/token; peak "
                   f"{fmt(r['peak_gb'], '.1f')} GB (bare forward {fmt(r['forward_peak_gb'], '.1f')} GB)")
        elif r["step"] == "device codec":
            res = (f"the store's encodings decoded and the top-k encoded on this device equal numpy's "
                   f"({r['fields']} fields, {r['windows']} windows)")
        elif r["step"] == "store I/O":
            w = ", ".join(f"{t} thread(s) {v:,.0f}" for t, v in r["writer_tokens_per_s"].items())
            rd = ", ".join(f"{k} {v:,.0f}" for k, v in r["reader_tokens_per_s"].items())
            res = f"{r['cores']} cores; writer tokens/s: {w}; reader tokens/s (CUDA path): {rd}"
        elif r["step"].startswith("train"):
            res = (f"{r['tokens_per_s']:,.0f} tokens/s, MFU {fmt(r['mfu'], '.1%')}, peak {fmt(r['peak_gb'], '.1f')} GB "
                   f"({r['params'] / 1e6:.1f}M parameters)")
        else:
            res = (f"{r['ms_per_token']:.2f} ms/token after a {r['context']:,}-token prompt "
                   f"({r['prompt_tokens_per_s']:,.0f} prompt tokens/s), state {r['state_mb']:.1f} MiB")
        lines.append(f"| {r['step']} ({r['seconds']:.0f} s) | {res} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: every step's code, quickly")
    ap.add_argument("--tokenizer", default=str(SHARED / "data" / "gpt2-tokenizer"))
    ap.add_argument("--data-files", nargs="+", default=[str(SHARED / "data" / "enwiki-wikiextractor-2015" / f"wiki_0{i}")
                                                        for i in range(4)], help="text for stage one")
    ap.add_argument("--windows", type=int, default=768,
                    help="stage one's windows of 1,024 tokens on the GPU (wiki_00-03 hold ~870)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per row after one warm-up")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: parity,stage1,io,train,generate")
    args = ap.parse_args(argv)
    s = Settings(args)
    if not s.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU rehearsal)")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if s.device.type == "cuda" else "CPU (dry run)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "parity" not in skip:
            rows.append(guarded("fla parity", step_parity, s))
        teacher = guarded("teacher", teacher_folder, tmp, s, Path(args.tokenizer))
        if "stage1" not in skip:
            rows.append(guarded("stage one", step_stage_one, s, tmp, str(tmp / "teacher"), args.data_files))
        store = rows[-1].get("store") if rows and rows[-1]["step"] == "stage one" else None
        if store:
            rows.append(guarded("device codec", step_device_codec, s, store))
            if "io" not in skip:
                rows.append(guarded("store I/O", step_store_io, s, store))
        if "train" not in skip and store:
            for config in ("kd_rs", "full"):
                for backend in s.backends:
                    rows.append(guarded(f"train {config} {backend}", step_train, s, tmp, store, config, backend, False))
            rows.append(guarded(f"train full {s.backends[0]} checkpointed", step_train, s, tmp, store, "full",
                                s.backends[0], True))
        if "generate" not in skip:
            for backend in s.backends:
                rows.append(guarded(f"generate {backend}", step_generate, s, backend))
        if not teacher["ok"]:
            rows.insert(0, teacher)
    text = table(rows, device)
    print("\n" + text)
    (out / "gpu_check.md").write_text(text + "\n")
    result = {"device": device, "dry_run": s.dry, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()

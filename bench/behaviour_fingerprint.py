"""A fingerprint of what goose computes, for proving that a refactor moved nothing.

    python bench/behaviour_fingerprint.py --work /tmp/fp-before --out before.json   # on the old commit
    python bench/behaviour_fingerprint.py --work /tmp/fp-after --out after.json     # on the new one
    python bench/behaviour_fingerprint.py --compare before.json after.json          # exit 1 on any difference

Runs the real commands (`goose cache-teacher`, `train-from-cache`, `--resume`, `eval`) on the shared
enwiki-tiny teacher at small sizes and records SHA-256 digests of: every store array, every training
config's metrics rows (wall-clock fields dropped), its final checkpoint's tensors and state, its best/
weights, a run interrupted and resumed, and `eval`'s figures. Equal fingerprints mean bit-identical
stores, logs, checkpoints and eval figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TIMING = {"tokens_per_s", "elapsed_s", "seconds", "time", "wall_s", "ms_per_token", "tokens_per_second"}
CONFIGS = ("kd_rs", "kd", "ce_only", "ctkd", "pocl", "align", "full")


def goose(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-m", "goose.cli", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"goose {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(obj):
    """Nested state with every tensor replaced by the digest of its bytes, dtype and shape."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return f"{obj.dtype}{tuple(obj.shape)}:{hashlib.sha256(raw).hexdigest()[:16]}"
    if isinstance(obj, dict):
        return {str(k): tensor_digest(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, (list, tuple)):
        return [tensor_digest(v) for v in obj]
    return obj


def store_fingerprint(path: Path) -> dict:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}
    for name, arr in sorted(root.arrays(), key=lambda kv: kv[0]):
        out[name] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()[:16]
    for name, group in sorted(root.groups(), key=lambda kv: kv[0]):
        for sub, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
            out[f"{name}/{sub}"] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()[:16]
    return out


def run_fingerprint(run: Path) -> dict:
    import torch

    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=True)
    state.pop("goose_version", None)
    parts = {k: digest(tensor_digest(v)) for k, v in state.items() if k not in TIMING and k != "identity"}
    parts["identity"] = state.get("identity")  # in full: a config key added shows by name
    best = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted((run / "best").glob("*.safetensors"))}
    return {"metrics": digest(rows), "rows": len(rows), "last_row": rows[-1], "checkpoint": parts,
            "checkpoint_step": ckpts[-1].name, "best": best}


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING and k not in ("model", "cache", "out", "data_files")}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def fingerprint(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    teacher = str(SHARED / "teachers" / "enwiki-tiny")
    data = SHARED / "data"
    store = work / "store.zarr"
    if not (store / "zarr.json").exists():
        goose("cache-teacher", "--teacher", teacher, "--data-files", str(data / "enwiki-wikiextractor-2015" / "wiki_00"),
              "--seq-len", "128", "--max-tokens", "32768", "--hidden-layers", "-1", "--samples", "32",
              "--out", str(store), "--no-progress")
    fp = {"store": store_fingerprint(store), "runs": {}}
    common = ["--set", "model.preset=tiny", "--set", "batch_size=4", "--set", "val_every=10", "--set", "ckpt_every=10",
              "--set", "log_every=2", "--set", "val_windows=8", "--no-progress"]
    for name in CONFIGS:
        run = work / name
        if not (run / "metrics.jsonl").exists():
            extra = ["--set", "curriculum.transition_steps=4"] if name in ("pocl", "full") else []
            extra += ["--set", "loss.align.warmup_steps=2", "--set", "loss.align.ramp_steps=4"] \
                if name in ("align", "full") else []
            goose("train-from-cache", "--cache", str(store), "--out", str(run), "--config", name, "--steps", "30",
                  *common, *extra)
        fp["runs"][name] = run_fingerprint(run)
    # interrupted at step 16 and resumed to 30 (the resumed run's own log and checkpoint)
    run = work / "kd_rs-resumed"
    if not (run / "metrics.jsonl").exists():
        goose("train-from-cache", "--cache", str(store), "--out", str(run), "--config", "kd_rs", "--steps", "16", *common)
        goose("train-from-cache", "--cache", str(store), "--out", str(run), "--config", "kd_rs", "--steps", "30",
              "--resume", *common)
    fp["runs"]["kd_rs-resumed"] = run_fingerprint(run)
    ev = json.loads(goose("eval", str(work / "kd_rs"), "--data-files", str(data / "enwiki-eval" / "wiki_50"),
                          "--seq-len", "128", "--protocol", "windows", "--protocol", "stream", "--cache", str(store),
                          "--json"))
    fp["eval"] = strip_timing(ev)
    return normalised(fp)


def normalised(fp: dict) -> dict:
    """Paths of the work folder out of the keys (eval's store_overlap is keyed by the store's path)."""
    ev = fp.get("eval", {})
    if isinstance(ev.get("store_overlap"), dict):
        ev["store_overlap"] = sorted(ev["store_overlap"].values(), key=str)
    ev.get("data", {}).pop("data_files", None)
    return fp


def flatten(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        a, b = (flatten(normalised(json.loads(p.read_text()))) for p in args.compare)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for k in diff:
            print(f"differs: {k}: {a.get(k)!r} -> {b.get(k)!r}")
        print(f"{len(a)} entries compared, {len(diff)} differ")
        sys.exit(1 if diff else 0)
    if not args.work or not args.out:
        ap.error("--work and --out (or --compare BEFORE AFTER)")
    fp = fingerprint(args.work)
    args.out.write_text(json.dumps(fp, indent=1, sort_keys=True))
    print(f"fingerprint: {args.out} ({len(flatten(fp))} entries)")


if __name__ == "__main__":
    main()

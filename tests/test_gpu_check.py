"""bench/gpu_check.py, the one prepared GPU check, rehearsed on CPU at tiny shapes (--dry-run): every step's
code runs (parity tests, stage one against the bare forward, training on both configs and with
checkpointing, generation) and lands in its table, so the script does not first fail on the day a GPU is
lent. What only a GPU can show (fla on CUDA, bf16 autocast, MFU, peak GPU memory) it cannot check here."""

from __future__ import annotations

import importlib.util
import json

from conftest import ENWIKI_TEXT, GPT2_TOKENIZER, REPO, need


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--tokenizer", str(need(GPT2_TOKENIZER)),
                             "--data-files", str(need(ENWIKI_TEXT) / "wiki_00")])
    steps = [r["step"] for r in result["rows"]]
    assert steps == ["fla parity", "stage one", "device codec", "store I/O", "train kd_rs torch",
                     "train full torch", "train full torch checkpointed", "generate torch"]
    failed = {r["step"]: r.get("traceback") for r in result["rows"] if not r["ok"]}
    assert not failed, failed
    stage_one = result["rows"][1]
    assert stage_one["tokens"] == 16 * 64 and stage_one["ratio"] > 0 and stage_one["bytes_per_token"] > 0
    assert result["rows"][2]["differ"] == {}
    assert all(v > 0 for v in result["rows"][3]["reader_tokens_per_s"].values())
    assert all(r["tokens_per_s"] > 0 for r in result["rows"][4:7])
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {step} (" in table for step in steps)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"] is True

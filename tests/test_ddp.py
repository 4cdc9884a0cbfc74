"""Stage two under torchrun (gloo, CPU): two ranks with the same global batch train as one process does,
rank 0 is the only writer, and a run killed on one rank resumes and finishes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from goose.pipeline.stage_two.checkpoint import CKPT_FILE, checkpoints

# KD + CTKD (a learnable temperature outside the DDP module) + alignment (projectors, also outside) + LIF
# spikes with running statistics: everything that must be synchronised by hand is in play
SETTINGS = ["model.preset=tiny", "batch_size=4", "val_every=4", "log_every=1", "ckpt_every=2",
            "val_windows=8", "tensorboard=false", "optim.warmup_steps=2", "loss.align_weight=0.1",
            "loss.align.warmup_steps=1", "loss.align.ramp_steps=2", "temperature.mode=ctkd",
            "temperature.value=1.5", "model.overrides={spike: {lif: true}}", "keep_checkpoints=10"]


def train_cmd(store: str, out: Path, ranks: int, steps: int, *extra: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                 str(29500 + os.getpid() % 1000)] if ranks > 1 else [sys.executable])
    sets = sum((["--set", s] for s in SETTINGS), [])
    return [*launcher, "-m", "goose.cli", "train-from-cache", "--cache", store, "-o", str(out), "--no-progress",
            "--steps", str(steps), *sets, *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    return torch.load(checkpoints(run)[-1] / CKPT_FILE, weights_only=True)



def test_two_ranks_train_as_one_process_with_the_same_global_batch(tmp_path, store):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(train_cmd(store, one, 1, 6), check=True, env=ENV, capture_output=True)
    r = subprocess.run(train_cmd(store, two, 2, 6), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained: 6 steps") == 1  # rank 0 speaks for the run
    # Weights agree to float roundoff while no spike sits at its threshold (measured 6.8e-6 after 2 steps); a
    # ternary spike that flips on the last bit then moves a few weights by up to a learning rate (3.9e-3
    # after 4 steps, 6.4e-3 after 6 on the compact store; 3.0e-5 and 1.2e-3 on the v3 store), while the
    # losses still agree to 1e-6. The old code (no DDP) failed all of these.
    for step, tol in ((2, 1e-4), (4, 2e-2), (6, 2e-2)):
        a = torch.load(one / "checkpoints" / f"step_{step:07d}" / CKPT_FILE, weights_only=True)
        b = torch.load(two / "checkpoints" / f"step_{step:07d}" / CKPT_FILE, weights_only=True)
        worst = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
        assert worst < tol, (step, worst)
        for k in a["distiller"]:
            torch.testing.assert_close(a["distiller"][k], b["distiller"][k], rtol=1e-3, atol=tol)
    assert b["world_size"] == 2 and b["step"] == 6
    ma, mb = metrics(one), metrics(two)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]  # one writer: no line twice
    for x, y in zip(ma, mb):
        for key in ("loss", "kd", "ce", "align", "temperature", "val_ppl"):
            if key in x:
                rel = 2e-5 if x["step"] <= 2 else 1e-3  # before / after the spike flip noted above
                assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key)
    assert not list((two / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume_finishes(tmp_path, store):
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(store, run, 2, 12), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not any(
            int(p.name.split("_")[1]) >= 4 for p in checkpoints(run)):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    ranks = subprocess.run(["pgrep", "-f", f"{run} --no-progress"], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in ranks if int(p) != proc.pid]
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun tears down the rest
    proc.wait(timeout=120)
    assert proc.returncode != 0
    r = subprocess.run(train_cmd(store, run, 2, 12, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_weights(run)["step"] == 12
    steps = [m["step"] for m in metrics(run) if "kind" not in m]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # the redone part replaced, not appended twice


@pytest.mark.slow  # four trainings, two of them torchrun pairs: ~2.5 min on 2 cores
def test_fsdp_two_ranks_train_as_one_process_and_resume_on_one(tmp_path, store):
    """`parallel: fsdp` (FSDP2 fully_shard per block): the same weights as one process; its checkpoints hold
    the unsharded weights and the optimizer state by parameter name, so one process resumes them."""
    one, two = tmp_path / "one", tmp_path / "fsdp"
    fsdp = ("--set", "parallel=fsdp")
    subprocess.run(train_cmd(store, one, 1, 6, *fsdp), check=True, env=ENV, capture_output=True)
    r = subprocess.run(train_cmd(store, two, 2, 6, *fsdp), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (two / "best" / "model.safetensors").exists()

    def weights(run, step):
        return torch.load(run / "checkpoints" / f"step_{step:07d}" / CKPT_FILE, weights_only=True)["model"]

    def worst(a, b):
        assert set(a) == set(b)
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    # measured 1.3e-5 after 4 steps on the v3 store, before a spike flip (as in the DDP test above); before
    # the fixes: 22 from lost spike initialisation, 5e-4 after one step from Adam's bias correction counting
    # torch's placeholder step
    assert worst(weights(one, 2), weights(two, 2)) < 1e-4
    assert worst(weights(one, 4), weights(two, 4)) < 2e-2
    # the optimizer state by parameter name, unsharded: the same moments and step counts as one process
    opt_one, opt_two = (torch.load(run / "checkpoints" / f"step_{2:07d}" / CKPT_FILE, weights_only=True)["optimizer"]
                        for run in (one, two))
    assert set(opt_one["state"]) == set(opt_two["state"]) and len(opt_one["state"]) > 50
    for name, st in opt_one["state"].items():
        assert float(opt_two["state"][name]["step"]) == float(st["step"]) == 2.0
        torch.testing.assert_close(opt_two["state"][name]["exp_avg"], st["exp_avg"], rtol=1e-3, atol=1e-6)
    # resume from step 4 sharded over 2 ranks (FSDP's own load path), then in one process: both end where the
    # uninterrupted run ends, up to the spike-flip bound of the DDP test
    for ranks in (2, 1):
        shutil.rmtree(two / "checkpoints" / f"step_{6:07d}")
        r = subprocess.run(train_cmd(store, two, ranks, 6, *fsdp, "--resume"), env=ENV, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert worst(weights(two, 6), weights(one, 6)) < 2e-2, ranks

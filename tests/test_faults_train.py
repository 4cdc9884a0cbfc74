"""Stage two under faults: persistent non-finite losses (no livelock), fp16 overflows, resume checks,
truncated and crafted checkpoints, concurrent runs on one folder, and kill -9 then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from goose.cli import main
from goose.errors import GooseError, RunFailed
from goose.pipeline.stage_two.checkpoint import CKPT_FILE, checkpoints
from goose.pipeline.stage_two.run_folder import LOCK_FILE
from goose.pipeline.stage_two.train import Trainer

from test_train import cfg_for  # noqa: E402 (tests/ is on sys.path under pytest)


def events_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def poison_windows(monkeypatch, bad: set[int] | None):
    """Make compute_losses non-finite for every batch holding one of `bad` windows (None: every batch)."""
    real = Trainer.compute_losses

    def maybe_nan(self, batch, stage, progress):
        parts = real(self, batch, stage, progress)
        windows = set(self.loader.windows_of(self.loader.last_key))
        if bad is None or windows & bad:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(Trainer, "compute_losses", maybe_nan)


def test_rollback_skips_the_batches_that_failed_and_finishes(tmp_path, store, monkeypatch):
    # find three consecutive batches after the step-4 checkpoint and poison their windows: the old code
    # rolled back, replayed the same batches and looped forever
    probe = Trainer(cfg_for(store, tmp_path / "probe"), progress=False)
    plan = [probe.loader.windows_of((0, 0, i)) for i in range(12)]
    bad = set(plan[5]) | set(plan[6]) | set(plan[7])
    bad_keys = [[0, 0, i] for i in range(len(plan)) if set(plan[i]) & bad]
    poison_windows(monkeypatch, bad)
    trainer = Trainer(cfg_for(store, tmp_path / "r", "ckpt_every=4"), progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["rollbacks"] == 1
    rollback = [e for e in events_of(tmp_path / "r") if e["kind"] == "rollback"]
    assert len(rollback) == 1 and [f["batch"] for f in rollback[0]["skipped_batches"]] == bad_keys[:3]
    assert sorted(list(k) for k in trainer.loader.skip) == bad_keys[:3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_persistent_nan_stops_with_exit_1_naming_steps_and_windows(tmp_path, store, monkeypatch):
    poison_windows(monkeypatch, None)
    run = tmp_path / "r"
    args = ["train-from-cache", "--cache", store, "-o", str(run), "--no-progress", "--set", "model.preset=tiny",
            "--set", "batch_size=4", "--steps", "50", "--set", "val_every=10", "--set", "max_rollbacks=2",
            "--set", "tensorboard=false"]
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, args)
    assert time.perf_counter() - t0 < 120
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training stopped: 3 non-finite steps in a row after 2 rollbacks")
    assert "windows [" in lines[-1] and "step " in lines[-1] and "Traceback" not in result.output
    kinds = [e["kind"] for e in events_of(run)]
    assert kinds.count("rollback") == 2 and kinds[-1] == "diverged"
    with pytest.raises(RunFailed):
        poison_windows(monkeypatch, None)
        Trainer(cfg_for(store, tmp_path / "s", "max_rollbacks=0"), progress=False).fit()


def test_nan_patience_zero_is_refused(tmp_path, store):
    with pytest.raises(GooseError, match="nan_patience.* must be >= 1"):
        Trainer(cfg_for(store, tmp_path / "z", "nan_patience=0"), progress=False)


def test_fp16_nonfinite_loss_is_skipped_without_scaler_crash(tmp_path, store, monkeypatch):
    # old code: the loss check broke out before unscale_, then scaler.update() raised
    # "No inf checks were recorded prior to update"
    real = Trainer.compute_losses
    calls = {"n": 0}

    def nan_once(self, batch, stage, progress):
        parts = real(self, batch, stage, progress)
        calls["n"] += 1
        if calls["n"] == 2:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(Trainer, "compute_losses", nan_once)
    trainer = Trainer(cfg_for(store, tmp_path / "f", "amp=fp16", "steps=4", "val_every=4"), progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1 and summary["rollbacks"] == 0


def test_fp16_overflows_lower_the_scale_and_never_roll_back(tmp_path, store):
    # old code: every overflow counted as a non-finite step, so three early overflows rolled back and
    # replayed them (forced with init_scale=2**60: six rollbacks, still at step 3)
    trainer = Trainer(cfg_for(store, tmp_path / "o", "amp=fp16", "steps=12"), progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=2.0 ** -8)
    summary = trainer.fit()
    kinds = [e["kind"] for e in events_of(tmp_path / "o")]
    assert summary["steps"] == 12 and summary["rollbacks"] == 0 and "rollback" not in kinds
    assert kinds.count("amp_overflow") >= 3 and "nonfinite_step" not in kinds
    assert trainer.scaler.get_scale() < 2.0 ** 60
    assert summary["skipped_steps"] == kinds.count("amp_overflow") < 12
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.fixture()
def six_step_run(tmp_path, store):
    run = tmp_path / "run"
    Trainer(cfg_for(store, run, "steps=6", "ckpt_every=3", "keep_checkpoints=5"), progress=False).fit()
    return run


@pytest.mark.parametrize("changes, named", [
    (["model.preset=small"], "config.model.preset"),
    (["loss.kd_weight=0.9"], "config.loss.kd_weight"),
    (["batch_size=2"], "config.batch_size"),
    (["seed=3"], "config.seed"),
])
def test_resume_refuses_a_config_that_breaks_the_run(six_step_run, store, changes, named):
    before = (six_step_run / "config.yaml").read_text()
    with pytest.raises(GooseError, match="differs from the checkpoint in " + named.replace(".", r"\.")):
        Trainer(cfg_for(store, six_step_run, "steps=9", *changes), resume=True, progress=False)
    assert (six_step_run / "config.yaml").read_text() == before  # nothing rewritten


@pytest.mark.parametrize("identity_has_student", [True, False])
def test_resume_keeps_the_recorded_student_when_a_default_changes(six_step_run, store, monkeypatch,
                                                                  identity_has_student):
    """The same run config can resolve to another student when a model default changes between versions
    (token_gain's did): resume builds the student config.yaml recorded, also from checkpoints written before
    the student was part of the identity. Without that record it refuses instead of resuming another model."""
    from goose.pipeline.stage_two import train as train_module
    from goose.student.spikes import SpikeConfig

    if not identity_has_student:
        for ck in (six_step_run / "checkpoints").iterdir():
            payload = torch.load(ck / "state.pt", weights_only=True)
            del payload["identity"]["student"]
            torch.save(payload, ck / "state.pt")
    started = Trainer(cfg_for(store, six_step_run, "steps=6"), resume=True, progress=False).model.cfg.spike.token_gain
    resolve = train_module.config_for_store

    def new_default(name, vocab_size, **overrides):
        cfg = resolve(name, vocab_size, **overrides)
        cfg.spike = SpikeConfig(**{**cfg.spike.__dict__, "token_gain": 2 if cfg.spike.token_gain != 2 else 0})
        return cfg
    monkeypatch.setattr(train_module, "config_for_store", new_default)
    resumed = Trainer(cfg_for(store, six_step_run, "steps=9"), resume=True, progress=False)
    assert resumed.model.cfg.spike.token_gain == started
    resumed.fit()
    assert resumed.step == 9
    if identity_has_student:  # the checkpoints still know their student: a lost record is refused
        recorded = yaml.safe_load((six_step_run / "config.yaml").read_text())
        del recorded["_resolved"]["student"]
        (six_step_run / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
        with pytest.raises(GooseError, match=r"differs from the checkpoint in student\.spike\.token_gain"):
            Trainer(cfg_for(store, six_step_run, "steps=12"), resume=True, progress=False)


def test_resume_refuses_another_store(six_step_run, tmp_path, tiny_teacher, corpus_file):
    from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
    from goose.pipeline.data import DataSpec

    other = tmp_path / "other.zarr"
    run_cache_teacher(CacheTeacherConfig(output=str(other), teacher=str(tiny_teacher),
                                         data=DataSpec(data_files=(str(corpus_file),)), seq_len=64, max_tokens=96 * 64,
                                         top_k=32, chunk_windows=8, device="cpu", progress=False))
    with pytest.raises(GooseError, match=r"store\.(data_fingerprint|config_hash)"):
        Trainer(cfg_for(str(other), six_step_run, "steps=9"), resume=True, progress=False)


def test_resume_allows_harmless_changes(six_step_run, store):
    t = Trainer(cfg_for(store, six_step_run, "steps=9", "log_every=1", "val_every=9", "ckpt_every=9",
                        "tensorboard=false"), resume=True, progress=False)
    assert t.step == 6
    assert t.fit()["steps"] == 9


def test_truncated_latest_checkpoint_falls_back_to_the_previous(six_step_run, store, capsys):
    latest = checkpoints(six_step_run)[-1] / CKPT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    warnings = []
    t = Trainer(cfg_for(store, six_step_run, "steps=9"), resume=True, progress=False, echo=warnings.append)
    assert t.step == 3
    assert any("fell back to the previous checkpoint" in w for w in warnings)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GOOSE_MARKER']}",))


def test_crafted_checkpoint_does_not_run_code(six_step_run, store, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GOOSE_MARKER", str(marker))
    for ck in checkpoints(six_step_run):
        torch.save({"step": 3, "model": _Payload()}, ck / CKPT_FILE)
    with pytest.raises(GooseError, match="cannot load checkpoint"):
        Trainer(cfg_for(store, six_step_run, "steps=9"), resume=True, progress=False)
    assert not marker.exists()


def test_a_live_run_locks_its_folder_and_a_stale_lock_is_taken_over(tmp_path, store):
    run = tmp_path / "locked"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(str(sleeper.pid))
        with pytest.raises(GooseError, match=f"in use by another training \\(pid {sleeper.pid} on host "):
            Trainer(cfg_for(store, run, "steps=2"), progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    summary = Trainer(cfg_for(store, run, "steps=2", "val_every=2"), progress=False).fit()  # pid gone: stale
    assert summary["steps"] == 2 and not (run / LOCK_FILE).exists()


def _train_cmd(store: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "goose.cli", "train-from-cache", "--cache", store, "-o", str(out), "--no-progress",
            "--set", "model.preset=tiny", "--set", "batch_size=4", "--steps", "16", "--set", "val_every=8",
            "--set", "ckpt_every=2", "--set", "log_every=2", "--set", "tensorboard=false",
            "--set", "val_windows=8", "--set", "keep_checkpoints=3", *extra]


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, store):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(store, straight), check=True, env=env, capture_output=True)
    for i, after in enumerate((2, 8)):  # kill -9 once the step-2 / step-8 checkpoint exists
        run = tmp_path / f"killed{i}"
        proc = subprocess.Popen(_train_cmd(store, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not any(
                int(p.name.split("_")[1]) >= after for p in checkpoints(run)):
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (run / LOCK_FILE).exists()  # the dead run's lock is left behind and must not block the resume
        subprocess.run(_train_cmd(store, run, "--resume"), check=True, env=env, capture_output=True)
        a = torch.load(checkpoints(straight)[-1] / CKPT_FILE, weights_only=True)
        b = torch.load(checkpoints(run)[-1] / CKPT_FILE, weights_only=True)
        assert a["step"] == b["step"] == 16
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        log_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
        log_b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in log_a] == [m["step"] for m in log_b]


@pytest.mark.parametrize("override, named", [
    ("temperature.steps=[5]", "temperature.steps must be a list of [fraction, T] pairs"),
    ("curriculum.temperatures=[a, b, c, d]", "curriculum temperatures must be a list of finite numbers"),
    ("loss.align.pairs=[[1, x]]", "loss.align.pairs must be"),
    ("model.overrides={n_layer: 0}", "n_layer must be a positive integer"),
    ("model.overrides={d_model: -160}", "d_model must be a positive integer"),
])
def test_bad_list_elements_and_model_sizes_fail_before_any_work(tmp_path, store, override, named):
    # old code: a TypeError/ValueError traceback deep in the run (after the step-0 checkpoint for the
    # curriculum), or a model with no blocks trained silently
    with pytest.raises(GooseError, match=named.replace("[", r"\[")):
        Trainer(cfg_for(store, tmp_path / "bad", override), progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_monitor_ignores_the_gradient_norm_of_skipped_steps(tmp_path):
    from goose.pipeline.stage_two.config import MonitorConfig
    from goose.pipeline.stage_two.monitor import EventLog, HealthMonitor

    events = EventLog(tmp_path / "e.jsonl", echo=lambda line: None)
    mon = HealthMonitor(MonitorConfig(), events, t_bounds=None, grad_clip=1.0)
    for step in range(1, 21):  # an fp16 overflow every few steps, as a doubling GradScaler gives
        mon.on_step(step, {"loss": 5.0, "grad_norm": float("inf") if step % 5 == 0 else 0.5})
    assert "grad_explode" not in events.counts and float("inf") not in mon.grad_norms


def test_broken_newest_checkpoint_is_moved_aside_so_nothing_picks_it_again(six_step_run, store):
    latest = checkpoints(six_step_run)[-1]
    (latest / CKPT_FILE).write_bytes((latest / CKPT_FILE).read_bytes()[:100])
    t = Trainer(cfg_for(store, six_step_run, "steps=9", "ckpt_every=9"), resume=True, progress=False,
                echo=lambda line: None)
    assert t.step == 3 and latest not in checkpoints(six_step_run)
    assert (six_step_run / "checkpoints" / f".broken-{latest.name}").exists()
    assert t.fit()["steps"] == 9
    assert [int(p.name.split("_")[1]) for p in checkpoints(six_step_run)][-1] == 9


def test_disk_full_on_a_checkpoint_is_one_error_and_keeps_what_is_done(tmp_path, store, monkeypatch):
    import goose.pipeline.stage_two.train as train_mod

    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-0 checkpoint lands, the next one finds the disk full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train_mod.torch, "save", full_disk)
    run = tmp_path / "full"
    with pytest.raises(GooseError, match=r"is the disk full\?\); finished checkpoints are kept: step_0000000"):
        Trainer(cfg_for(store, run, "ckpt_every=2"), progress=False).fit()
    assert not (run / LOCK_FILE).exists() and not list((run / "checkpoints").glob(".tmp*"))


def test_a_reused_pid_does_not_hold_the_lock(tmp_path, store):
    run = tmp_path / "reused"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the pid is alive, but it is not the process that wrote the lock (another start time)
        (run / LOCK_FILE).write_text(f"{sleeper.pid} 1")
        summary = Trainer(cfg_for(store, run, "steps=2", "val_every=2"), progress=False).fit()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert summary["steps"] == 2

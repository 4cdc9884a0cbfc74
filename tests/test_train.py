"""Stage two end to end on a tiny store: resume equals uninterrupted, NaN survival, learning, read-only store."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from goose.cache.reader import CacheReader
from goose.cli import main
from goose.errors import GooseError
from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
from goose.pipeline.stage_two.config import MonitorConfig, load_config
from goose.pipeline.data import DataSpec
from goose.pipeline.stage_two.monitor import EventLog, HealthMonitor
from goose.pipeline.stage_two.train import Trainer, run_train


def cfg_for(store, out, *overrides, **top):
    base = ["model.preset=tiny", "batch_size=4", "steps=12", "val_every=6", "log_every=2", "ckpt_every=6",
            "val_windows=8", "tensorboard=false", "optim.warmup_steps=2"]
    return load_config(None, base + list(overrides), cache=store, out=str(out), **top)


def store_digest(url: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(url)):
        for name in sorted(files):
            p = Path(root) / name
            h.update(str(p.relative_to(url)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


FULL = ["loss.align_weight=0.1", "loss.align.warmup_steps=2", "loss.align.ramp_steps=2", "temperature.mode=ctkd",
        "temperature.value=1.5",
        "temperature.anchor_weight=0.01", "curriculum.enabled=true", "curriculum.transition_steps=2",
        "loss.firing_rate_weight=0.01", "model.overrides={spike: {lif: true}}"]


def test_resume_after_sigterm_equals_uninterrupted_run(tmp_path, store, monkeypatch):
    before = store_digest(store)
    straight = Trainer(cfg_for(store, tmp_path / "a", *FULL), progress=False)
    straight.fit()

    stopped = Trainer(cfg_for(store, tmp_path / "b", *FULL), progress=False)
    real_step = Trainer.train_step

    def step_then_signal(self):
        m = real_step(self)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the trainer
        return m

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    summary = stopped.fit()
    assert summary["interrupted"] and summary["steps"] == 5 and summary["signal"] == signal.SIGTERM
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(cfg_for(store, tmp_path / "b", *FULL), resume=True, progress=False)
    assert resumed.step == 5
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert torch.equal(straight.distiller.temperature.theta, resumed.distiller.temperature.theta)
    assert straight.loader.state_dict() == resumed.loader.state_dict()
    assert straight.curriculum.state_dict() == resumed.curriculum.state_dict()
    assert straight.monitor.state_dict() == resumed.monitor.state_dict()  # warnings fire as if never stopped
    # the logs of the two runs agree step by step
    log_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log_a] == [m["step"] for m in log_b]
    # the keys the health monitor reads are the ones the trainer logs
    assert any("align" in m and "temperature" in m and "kl" in m and "grad_norm" in m for m in log_a)
    assert [m.get("loss") for m in log_a] == pytest.approx([m.get("loss") for m in log_b])
    assert store_digest(store) == before  # training never writes to the store


def test_training_lowers_validation_loss(tmp_path, store):
    cfg = cfg_for(store, tmp_path / "r", "steps=40", "val_every=40", "optim.lr=3e-3")
    trainer = Trainer(cfg, progress=False)
    start = trainer.validate()["val_loss"]
    summary = trainer.fit()
    assert summary["last_val"]["val_loss"] < start - 0.5
    best = json.loads((tmp_path / "r" / "best" / "metrics.json").read_text())
    assert best["val_loss"] == pytest.approx(summary["last_val"]["val_loss"])
    assert (tmp_path / "r" / "config.yaml").exists() and "store_fingerprint" in (tmp_path / "r" / "config.yaml").read_text()


def test_injected_nan_is_skipped_then_rolled_back(tmp_path, store, monkeypatch):
    real = Trainer.compute_losses
    poisoned = {3, 7, 8, 9}  # one lone bad step, then three in a row (nan_patience = 3)
    calls = {"n": 0}

    def maybe_nan(self, batch, stage, progress):
        parts = real(self, batch, stage, progress)
        calls["n"] += 1
        if calls["n"] in poisoned:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(Trainer, "compute_losses", maybe_nan)
    trainer = Trainer(cfg_for(store, tmp_path / "n", "ckpt_every=4"), progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["skipped_steps"] == 4 and summary["rollbacks"] == 1
    assert trainer.lr_scale == 0.5
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "n" / "events.jsonl").read_text().splitlines()]
    assert kinds.count("nonfinite_step") == 4 and kinds.count("rollback") == 1


def test_rskd_and_val_cache_and_accumulation(tmp_path, store):
    cfg = cfg_for(store, tmp_path / "s", "loss.kd=rskd", "optim.accumulation=2", "steps=4", val_cache=store)
    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 4 and summary["last_val"]["val_ppl"] > 1


def test_topk_rskd_trains_and_logs_its_kl(tmp_path, store):
    summary = run_train(cfg_for(store, tmp_path / "h", "loss.kd=topk_rskd", "steps=3", "log_every=1"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r]
    assert summary["steps"] == 3 and len(kls) == 3 and all(math.isfinite(v) and v > 0 for v in kls)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["temperature.mode=fixed", "temperature.value=8"], "leave the store's tail temperatures"),
        (["loss.align_weight=0.1", "loss.align.layer_map=explicit", "loss.align.pairs=[[1, 3]]"],
         "alignment needs teacher layers [3]"),
        (["temperature.mode=stage"], "needs curriculum.enabled"),
        (["model.preset=huge"], "unknown preset"),
        (["loss.kd=full"], "loss.kd must be"),
        (["loss.kd=topk_rskd", "temperature.value=2"], "forward KL at T = 1"),
        (["loss.kd=rskd", "temperature.mode=ctkd", "temperature.value=1.5"], "forward KL at T = 1"),
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ],
)
def test_mismatches_fail_at_start(tmp_path, store, overrides, message):
    with pytest.raises(GooseError) as err:
        run_train(cfg_for(store, tmp_path / "m", *overrides), progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_store_without_samples_or_hidden_states_is_refused(tmp_path, tiny_teacher, corpus_file):
    out = tmp_path / "plain.zarr"
    run_cache_teacher(CacheTeacherConfig(output=str(out), teacher=str(tiny_teacher),
                                         data=DataSpec(data_files=(str(corpus_file),)), seq_len=32, max_tokens=640,
                                         top_k=8, chunk_windows=4, device="cpu", progress=False))
    with pytest.raises(GooseError, match="needs RS-KD samples"):
        run_train(cfg_for(str(out), tmp_path / "x", "loss.kd=rskd"), progress=False)
    with pytest.raises(GooseError, match="needs RS-KD samples"):
        run_train(cfg_for(str(out), tmp_path / "x2", "loss.kd=topk_rskd"), progress=False)
    with pytest.raises(GooseError, match="needs teacher hidden states"):
        run_train(cfg_for(str(out), tmp_path / "y", "loss.align_weight=0.1"), progress=False)
    # the student is sized to its store: another vocabulary is a one-line error before any step (it was a
    # TypeError about config_for_store's arguments)
    vocab = CacheReader(str(out)).vocab_size
    with pytest.raises(GooseError, match=f"vocab_size 8192 is not the store's vocabulary of {vocab}"):
        run_train(cfg_for(str(out), tmp_path / "v", "model.overrides.vocab_size=8192"), progress=False)
    assert not (tmp_path / "v" / "checkpoints").exists()


def test_cli_train_then_existing_run_needs_resume(tmp_path, store):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\nsteps: 4\nbatch_size: 4\nval_every: 4\nval_windows: 4\n"
                      "tensorboard: true\nloss: {kd: topk, kd_weight: 0.9, ce_weight: 0.1}\n")
    args = ["train-from-cache", "--cache", store, "-o", str(tmp_path / "run"), "--config", str(config), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "trained: 4 steps" in result.stdout and "teacher" in result.stdout
    assert any((tmp_path / "run" / "tb").iterdir())
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.stderr
    resumed = CliRunner().invoke(main, args + ["--resume", "--steps", "6"])
    assert resumed.exit_code == 0 and "trained: 6 steps" in resumed.stdout


def test_health_monitor_fires_on_synthetic_trouble(tmp_path):
    events = EventLog(tmp_path / "e.jsonl", echo=lambda line: None)
    mon = HealthMonitor(MonitorConfig(loss_check_steps=20, temperature_bound_steps=5, clip_window=10,
                                      align_window=5, cooldown_steps=1000), events, t_bounds=(1.0, 4.0),
                        grad_clip=1.0)
    for step in range(1, 31):
        mon.on_step(step, {"loss": 5.0 + 0.01 * step, "grad_norm": 100.0 if step == 25 else 2.0,
                           "temperature": 3.999, "kl": 30.0 if step == 12 else 1.0, "grad_scale": 0.5,
                           "align": float(step), "align_weight": 0.1})
    mon.on_spikes(30, {"0.tm_r": {"dead_fraction": 0.5, "saturated_fraction": 0.0},
                       "1.cm_v": {"dead_fraction": 0.0, "saturated_fraction": 0.4}})
    assert set(events.counts) == {"loss_not_dropping", "grad_explode", "temperature_at_bound", "kl_range",
                                  "clipping", "scaler_collapse", "align_rising", "dead_channels", "saturated_channels"}
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == sum(events.counts.values())


def test_profile_trace_and_activation_checkpointing(tmp_path, store):
    cfg = cfg_for(store, tmp_path / "p", "steps=4", "profile_steps=1", "activation_checkpointing=true",
                  "spike_anneal_steps=2")
    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 4
    traces = list((tmp_path / "p" / "profile").glob("*.json*"))
    assert traces and traces[0].stat().st_size > 0


def test_ctkd_lambda_scales_the_temperature_step(tmp_path, store):
    # theta is on SGD (as in zhengli97/CTKD), so the reversed gradient's scale lambda reaches the step: over the
    # warm-up the temperature moves in proportion to lambda_max, and lambda = 0 leaves it where it started.
    # (On AdamW, lambda_max 1.0 and 0.001 gave the same trajectory: Adam normalises the gradient's scale away.)
    moves = {}
    for lam in (0.0, 1e-3, 1e-2):
        cfg = cfg_for(store, tmp_path / f"l{lam}", "temperature.mode=ctkd", "temperature.value=2.0",
                      f"temperature.lambda_max={lam}", "temperature.lambda_warmup=1.0", "temperature.lr=1.0",
                      "steps=6", "val_every=100")
        trainer = Trainer(cfg, progress=False)
        for _ in range(6):
            before = float(trainer.distiller.temperature.raw().detach())
            m = trainer.train_step()
            assert m["temperature"] == pytest.approx(before, abs=1e-6)  # logged: the T this step's KD loss used
        moves[lam] = float(trainer.distiller.temperature.raw().detach()) - 2.0
    assert moves[0.0] == 0.0
    assert moves[1e-2] != 0.0
    assert moves[1e-2] / moves[1e-3] == pytest.approx(10.0, rel=0.05)


def test_carry_state_rows_follow_their_streams_and_resume_exactly(tmp_path, store, monkeypatch):
    from goose.pipeline.stage_two.loader import stream_plan

    plan = stream_plan(np.arange(3, 23), 4)  # 20 windows, 4 lanes of 5
    assert len(plan) == 5 and plan[0].tolist() == [3, 8, 13, 18] and plan[4].tolist() == [7, 12, 17, 22]
    seen = []
    real_forward = Trainer.compute_losses

    def record(self, batch, stage, progress):
        seen.append((self.loader.position, self.carry is not None))
        return real_forward(self, batch, stage, progress)

    monkeypatch.setattr(Trainer, "compute_losses", record)
    extra = ["carry_state=true", "steps=8", "ckpt_every=100"]
    straight = Trainer(cfg_for(store, tmp_path / "a", *extra), progress=False)
    straight.fit()
    # every step after a pass's first gets the previous window's state
    assert all(has for pos, has in seen[1:] if pos > 1) and not seen[0][1]
    monkeypatch.setattr(Trainer, "compute_losses", real_forward)
    stopped = Trainer(cfg_for(store, tmp_path / "b", *extra), progress=False)
    real_step = Trainer.train_step

    def step_then_signal(self):
        m = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return m

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    stopped.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(cfg_for(store, tmp_path / "b", *extra), resume=True, progress=False)
    assert resumed.step == 3 and resumed.carry is not None
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spike_anneal_fraction_blends_spikes_in_over_that_share_of_the_steps(tmp_path, store, monkeypatch):
    from goose.student.model import Student

    mixes, real = [], Student.set_spike_mix
    monkeypatch.setattr(Student, "set_spike_mix", lambda self, mix: (mixes.append(mix), real(self, mix))[1])
    run_train(cfg_for(store, tmp_path / "a", "steps=8", "val_every=8", "spike_anneal_fraction=0.5"), progress=False)
    assert mixes == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("weights", ["fp32", "ternary_anneal"])
def test_validation_mid_anneal_scores_the_fully_ternary_model_that_best_holds(tmp_path, store, weights):
    """With spikes (and, with ternary_anneal, ternary weights) annealing in over every step, each validation
    scores the model as saved (fully ternary, as best/ loads), not the partly continuous training blend; the
    training mix is restored afterwards."""
    from goose.pipeline.stage_two.validation import validate_model
    from goose.student.model import Student

    out = tmp_path / "anneal"
    extra = ["model.overrides={ternary_weights: true, ternary_anneal: true}"] if weights != "fp32" else []
    trainer = Trainer(cfg_for(store, out, "steps=6", "val_every=3", "spike_anneal_fraction=1.0", *extra),
                      progress=False)
    trainer.fit()
    annealed = trainer.model.annealed_modules()
    assert len(annealed) == len(trainer.model.spike_modules()) + (2 * 6 if extra else 0)  # 6 matrices a layer
    assert {m.mix for m in annealed} == {5 / 6}  # the last step's blend
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in x]
    best = min(rows, key=lambda r: r["val_loss"])
    model = Student.from_pretrained(str(out / "best"))
    assert {m.mix for m in model.annealed_modules()} == {1.0}
    reloaded, _ = validate_model(model, trainer.val_url, trainer.val_spec, trainer.val_windows,
                                 trainer.cfg.batch_size, "cpu")
    assert reloaded["val_ppl"] == pytest.approx(best["val_ppl"], rel=1e-5)
    model.set_spike_mix(best["step"] / 6 - 1 / 6)  # the blend training had at that validation
    blended, _ = validate_model(model, trainer.val_url, trainer.val_spec, trainer.val_windows,
                                trainer.cfg.batch_size, "cpu")
    assert blended["val_ppl"] == pytest.approx(best["val_ppl"], rel=1e-5)


def test_spike_lr_mult_scales_the_spike_parameters_step_only(tmp_path, store):
    """optim.spike_lr_mult: Adam's first step moves every parameter by about its lr (sign of the gradient),
    so with the multiplier the spike parameters move that many times as far and every other parameter
    exactly as far as without it."""
    moved = {}
    for mult in (1.0, 10.0):
        trainer = Trainer(cfg_for(store, tmp_path / f"m{mult}", f"optim.spike_lr_mult={mult}", "optim.warmup_steps=0",
                                  "steps=4", "val_every=100"), progress=False)
        trainer.train_step()  # the spikes' data-dependent init happens in this first forward
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step()
        moved[mult] = {n: (p.detach() - before[n]).abs() for n, p in trainer.model.named_parameters()}
    spike = [n for n in moved[1.0] if ".spikes." in n]
    assert spike and all(n in moved[10.0] for n in spike)
    ratio = torch.cat([moved[10.0][n].flatten() for n in spike]).sum() / torch.cat([moved[1.0][n].flatten() for n in spike]).sum()
    assert float(ratio) == pytest.approx(10.0, rel=0.2)
    for n in moved[1.0]:
        if n not in spike:
            torch.testing.assert_close(moved[10.0][n], moved[1.0][n], rtol=1e-5, atol=1e-8)
    with pytest.raises(GooseError, match="spike_lr_mult"):
        cfg_for(store, tmp_path / "bad", "optim.spike_lr_mult=0")


def test_residual_spike_steps_train_from_a_config_and_reload(tmp_path, store):
    """model.overrides={site_steps: ...} reaches the student the trainer builds: its residual steps initialise
    from real batches, learn, count in the logged energy, and come back from the saved best model."""
    from goose.student.model import Student

    out = tmp_path / "steps"
    run_train(cfg_for(store, out, "steps=4", "val_every=4", "model.overrides={site_steps: {cm_v: 2}}"), progress=False)
    model = Student.from_pretrained(str(out / "best"))
    assert model.cfg.site_steps == {"cm_v": 2}
    residual = model.blocks[0].ffn.spikes.spikes["cm_v"].residual
    assert residual is not None and bool(residual.initialized)
    assert not torch.equal(residual.amp_pos.detach(), torch.ones_like(residual.amp_pos))  # set from the batch
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in x][-1]
    stats = model(torch.randint(0, model.cfg.vocab_size, (2, 32)), collect_stats=True).spike_stats
    assert stats["0.cm_v"].tokens == 2 * 2 * 32  # both steps' indicators
    assert 0 < val["energy_ratio_vs_dense"] < 1

"""Experiment trackers (`loggers:` in the run config): validation, lazy imports, wandb offline, MLflow file
store, and a training run that reaches them tagged with its grid cell.

wandb and mlflow are optional extras. Each tracker test runs twice: against the real package when it is
installed (else skipped) and against a small fake module put in sys.modules (always), which checks the calls
goose makes; the real runs check that those calls are what the packages accept."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from goose.errors import GooseError
from goose.pipeline.stage_two.config import load_config
from goose.pipeline.stage_two.loggers import open_loggers, run_identity, scalars
from goose.pipeline.stage_two.run_folder import progress_postfix, run_files, summary_files_line

VAL_ROW = {"step": 2, "kind": "val", "val_ppl": 5.0, "val_loss": 1.6, "spike_rate": None,
           "spike_sites": {"0.tm_r": {"rate": 0.25, "dead": 0.0, "sat": 0.0}}}
TRAIN_ROW = {"step": 1, "loss": 2.0, "lr": 0.1, "skipped": False, "stage": 0}


# ---- config -------------------------------------------------------------------------------------

def test_default_loggers_and_validation():
    assert load_config(None, []).loggers == ["jsonl", "tensorboard"]
    assert load_config(None, ["loggers=[jsonl]"]).loggers == ["jsonl"]
    for value, msg in (("[jsonl, neptune]", "unknown logger 'neptune'"), ("jsonl", "must be a list"),
                       ("[tensorboard]", "must include jsonl"), ("[jsonl, jsonl]", "twice")):
        with pytest.raises(GooseError, match=msg):
            load_config(None, [f"loggers={value}"])


def test_a_named_tracker_that_is_not_installed_fails_with_the_config(monkeypatch):
    from goose.pipeline.stage_two import loggers

    monkeypatch.setattr(loggers, "_installed", lambda module: False)
    with pytest.raises(GooseError, match=r"pip install 'goose-distill\[mlflow\]'"):
        load_config(None, ["loggers=[jsonl, mlflow]"])


def test_trackers_are_imported_only_when_named(tmp_path):
    code = ("import sys; from pathlib import Path; from goose.pipeline.stage_two import train, loggers; "
            "L = loggers.open_loggers(['jsonl', 'tensorboard'], Path(sys.argv[1]), {}); L.close(); "
            "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_scalars_and_run_identity(tmp_path):
    assert scalars(TRAIN_ROW) == {"train/loss": 2.0, "train/lr": 0.1, "train/stage": 0.0}
    assert scalars(VAL_ROW) == {"val/val_ppl": 5.0, "val/val_loss": 1.6, "spikes/rate/0.tm_r": 0.25}
    cell = tmp_path / "ablate_distill" / "ctkd"
    assert run_identity(cell, {}) == ("ctkd", {"run": "ctkd", "group": "ablate_distill"})
    name, tags = run_identity(cell, {"run_name": "ctkd-seed1", "tags": ["grid:distill", "seed:1", "smoke"]})
    assert name == "ctkd-seed1" and tags == {"run": "ctkd", "group": "ablate_distill", "grid": "distill",
                                             "seed": "1", "smoke": "true"}


# ---- wandb --------------------------------------------------------------------------------------

class _FakeWandbRun:
    def __init__(self, kwargs):
        self.kwargs, self.id, self.logged, self.finished = kwargs, kwargs.get("id") or "fake123", [], False
        self.config = types.SimpleNamespace(update=lambda d, allow_val_change=False: self.kwargs["config"].update(d))

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


class _Recorder:
    """A real wandb Run that also records its log calls (the Run object takes no new attributes)."""

    def __init__(self, run):
        self.__dict__.update(_run=run, logged=[])

    def log(self, data, step):
        self.logged.append((step, dict(data)))
        self._run.log(data, step=step)

    def __getattr__(self, name):
        return getattr(self._run, name)


def _fake_wandb():
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kwargs):
        mod.runs.append(_FakeWandbRun(kwargs))
        return mod.runs[-1]

    mod.init = init
    return mod


@pytest.fixture(params=["real", "fake"])
def wandb_kind(request, monkeypatch, tmp_path):
    if request.param == "real":
        pytest.importorskip("wandb", reason="wandb is not installed (pip install goose-distill[wandb])")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
        monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
        monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    else:
        monkeypatch.setitem(sys.modules, "wandb", _fake_wandb())
    return request.param


def test_wandb_offline_logs_metrics_config_and_grid_tags(tmp_path, wandb_kind):
    run = tmp_path / "grid_distill" / "kd"
    run.mkdir(parents=True)
    config = {"loss": {"kd_weight": 0.5}, "loggers": ["jsonl", "wandb"]}
    log = open_loggers(["jsonl", "wandb"], run, config)
    assert log.names == ["jsonl", "wandb"]
    w = log.backends[1].run
    if wandb_kind == "real":  # record what reaches the real run's log (wandb commits a step's row later)
        w = log.backends[1].run = _Recorder(w)
    log.log_config(config)
    log.log_metrics(TRAIN_ROW, 1)
    log.log_metrics(VAL_ROW, 2)
    assert w.logged == [(1, scalars(TRAIN_ROW)), (2, scalars(VAL_ROW))]
    if wandb_kind == "real":
        assert w.name == "kd" and w.group == "grid_distill" and set(w.tags) == {"run:kd", "group:grid_distill"}
        assert w.summary["train/loss"] == 2.0 and w.config["loss"]["kd_weight"] == 0.5
    else:
        assert w.kwargs["name"] == "kd" and w.kwargs["group"] == "grid_distill"
        assert w.kwargs["tags"] == ["run:kd", "group:grid_distill"] and w.kwargs["dir"] == str(run / "trackers")
    run_id = w.id
    log.close()
    assert (run / "trackers" / "wandb_run_id").read_text() == run_id
    if wandb_kind == "real":
        offline = list((run / "trackers" / "wandb").glob(f"offline-run-*-{run_id}"))
        assert offline and list(offline[0].glob("run-*.wandb")), "no offline run written under RUN/trackers"
    else:
        assert w.finished
    # --resume continues the same tracker run
    again = open_loggers(["jsonl", "wandb"], run, config)
    assert again.backends[1].run.id == run_id
    again.close()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- mlflow -------------------------------------------------------------------------------------

def _fake_mlflow():
    """mlflow.tracking.MlflowClient and mlflow.entities.{Metric, Param}, keeping everything in memory."""
    store = {"experiments": {}, "runs": {}}

    class Client:
        def __init__(self, tracking_uri=None):
            self.uri = tracking_uri

        def get_experiment_by_name(self, name):
            eid = store["experiments"].get(name)
            return types.SimpleNamespace(experiment_id=eid) if eid else None

        def create_experiment(self, name):
            store["experiments"][name] = str(len(store["experiments"]) + 1)
            return store["experiments"][name]

        def create_run(self, experiment_id, run_name=None, tags=None):
            rid = f"run{len(store['runs'])}"
            store["runs"][rid] = {"experiment": experiment_id, "name": run_name, "tags": dict(tags or {}),
                                  "metrics": [], "params": {}, "status": "RUNNING"}
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=rid))

        def update_run(self, run_id, status=None):
            store["runs"][run_id]["status"] = status

        def log_batch(self, run_id, metrics=(), params=()):
            store["runs"][run_id]["metrics"] += [(m.key, m.value, m.step) for m in metrics]
            store["runs"][run_id]["params"].update({p.key: p.value for p in params})

        def set_terminated(self, run_id):
            store["runs"][run_id]["status"] = "FINISHED"

    mod = types.ModuleType("mlflow")
    mod.tracking = types.ModuleType("mlflow.tracking")
    mod.tracking.MlflowClient = Client
    mod.entities = types.SimpleNamespace(
        Metric=lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step),
        Param=lambda key, value: types.SimpleNamespace(key=key, value=value))
    mod.store = store
    return mod


class _RunView:
    """What a test asserts on, from the real MLflow file store or the fake's memory."""

    def __init__(self, kind, uri, module=None):
        self.kind, self.uri, self.module = kind, uri, module

    def get(self, run_id) -> dict:
        if self.kind == "fake":
            r = self.module.store["runs"][run_id]
            history = {}
            for key, value, step in r["metrics"]:
                history.setdefault(key, []).append((step, value))
            return {"name": r["name"], "tags": r["tags"], "params": r["params"], "history": history,
                    "status": r["status"]}
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        r = client.get_run(run_id)
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in r.data.metrics}
        return {"name": r.info.run_name, "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                "params": r.data.params, "history": history, "status": r.info.status}


@pytest.fixture(params=["real", "fake"])
def mlflow_view(request, monkeypatch, tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "goose-test")
    if request.param == "real":
        pytest.importorskip("mlflow", reason="mlflow is not installed (pip install goose-distill[mlflow])")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        return _RunView("real", uri)
    fake = _fake_mlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", fake.tracking)
    return _RunView("fake", uri, fake)


def test_mlflow_file_store_logs_params_metrics_tags_and_resumes(tmp_path, mlflow_view):
    run = tmp_path / "grid_spikes" / "lif"
    run.mkdir(parents=True)
    config = {"steps": 3, "loss": {"kd_weight": 0.5}, "loggers": ["jsonl", "mlflow"]}
    log = open_loggers(["jsonl", "mlflow"], run, config)
    log.log_config(config)
    log.log_metrics(TRAIN_ROW, 1)
    log.log_metrics(VAL_ROW, 2)
    log.close()
    run_id = (run / "trackers" / "mlflow_run_id").read_text()
    # a resumed run continues the same MLflow run (params are write-once: not logged again)
    again = open_loggers(["jsonl", "mlflow"], run, config)
    again.log_config(config)
    again.log_metrics({"step": 3, "loss": 1.5}, 3)
    again.close()
    assert again.backends[1].run_id == run_id
    r = mlflow_view.get(run_id)
    assert r["name"] == "lif" and r["tags"] == {"run": "lif", "group": "grid_spikes"}
    assert r["params"] == {"steps": "3", "loss.kd_weight": "0.5", "loggers": '["jsonl", "mlflow"]'}
    assert r["history"]["train/loss"] == [(1, 2.0), (3, 1.5)]
    assert r["history"]["val/val_ppl"] == [(2, 5.0)] and r["history"]["spikes/rate/0.tm_r"] == [(2, 0.25)]
    assert r["status"] == "FINISHED"


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    mod = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\nlong traceback text")

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    with pytest.raises(GooseError, match=r"^cannot start the wandb logger: api_key not configured \(no-tty\)$"):
        open_loggers(["jsonl", "wandb"], tmp_path, {})


# ---- training reaches the trackers ----------------------------------------------------------------

def test_training_logs_to_a_tracker_tagged_with_its_grid_cell(tmp_path, store, mlflow_view):
    from test_train import cfg_for

    from goose.pipeline.stage_two.train import run_train

    out = tmp_path / "ablate" / "kd"  # what `goose ablate --out ablate` gives grid cell kd
    s = run_train(cfg_for(store, out, "steps=4", "val_every=4", "log_every=2", "loggers=[jsonl, tensorboard, mlflow]",
                          "tensorboard=true"), progress=False)
    assert s["loggers"] == ["jsonl", "tensorboard", "mlflow"]
    r = mlflow_view.get((out / "trackers" / "mlflow_run_id").read_text())
    assert r["tags"] == {"run": "kd", "group": "ablate"} and r["name"] == "kd"
    assert [step for step, _ in r["history"]["train/loss"]] == [2, 4]
    assert r["history"]["val/val_ppl"][0][0] == 4 and any(k.startswith("spikes/rate/") for k in r["history"])
    assert r["params"]["loss.kd"] == "topk" and "_resolved.store_fingerprint" in r["params"]
    assert any((out / "tb").iterdir())
    assert set(s["outputs"]) == {"best", "metrics", "tensorboard", "trackers", "checkpoints"}  # no events: none


# ---- progress bar and end-of-run summary --------------------------------------------------------

def test_progress_bar_shows_t_only_while_kd_uses_it():
    assert progress_postfix({"loss": 2.0, "temperature": 2.0, "kd_weight": 0.0}) == {"loss": "2.000"}
    assert progress_postfix({"loss": 2.0, "ce": 2.0}) == {"loss": "2.000"}
    assert progress_postfix({"loss": 2.0, "temperature": 1.5, "kd_weight": 0.9}) == {"loss": "2.000", "T": "1.50"}


def test_summary_names_only_files_that_exist(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "best").mkdir()  # a best/ being written (no config.json yet) is not a best model
    files = run_files(run)
    assert set(files) == {"metrics", "checkpoints"}
    line = summary_files_line(files)
    assert "events" not in line and "best model:" not in line and "no best model yet" in line
    (run / "best" / "config.json").write_text("{}")
    (run / "events.jsonl").write_text("{}\n")
    line = summary_files_line(run_files(run))
    assert f"best model: {run / 'best'}" in line and f"events: {run / 'events.jsonl'}" in line

"""Experiment trackers for `train-from-cache`: the run config's `loggers` list picks the backends.

    loggers: [jsonl, tensorboard]            # the default
    loggers: [jsonl, tensorboard, wandb, mlflow]

Every backend has the same three calls: `log_config(dict)` once at the start, `log_metrics(dict, step)` for
every train row (every `log_every` steps) and validation row (`"kind": "val"`), and `close()`. A backend's
package is imported only when its name is in the list, so wandb and mlflow stay optional extras
(`pip install goose-distill[wandb]` / `[mlflow]`).

- `jsonl`: `RUN/metrics.jsonl`, one JSON object per row, the log that `goose report`, `validate` and
  `--resume` read (so it is required).
- `tensorboard`: `RUN/tb/` (scalars `train/*`, `val/*`, `spikes/rate/<layer>.<site>`, and the config as
  text); `tensorboard: false` in the config still turns it off.
- `wandb`: `wandb.init(dir=RUN/trackers, ...)` with the run folder's name as the run name; honours the usual
  environment (`WANDB_PROJECT` (default `goose`), `WANDB_ENTITY`, `WANDB_MODE=offline`, ...). The run id
  is kept in `RUN/trackers/wandb_run_id`, so `--resume` continues the same wandb run.
- `mlflow`: a run in experiment `MLFLOW_EXPERIMENT_NAME` (default `goose`) at `MLFLOW_TRACKING_URI`
  (MLflow's own default when unset); the config is logged flattened as params (`loss.kd_weight`, ...);
  the run id is kept in `RUN/trackers/mlflow_run_id` for `--resume`.

Run name and tags (what a tracker's table groups and compares by): the run folder's name, and the tags
`run=<folder name>` and `group=<parent folder name>`. `goose ablate` writes grid cell NAME to DIR/NAME, so
every ablation run is tagged with its grid cell and its grid folder without any extra setting. A config
that carries `run_name` (a string) or `tags` (a list of strings or a mapping) overrides / adds to these.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ...errors import GooseError

KNOWN_LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
DEFAULT_LOGGERS = ("jsonl", "tensorboard")


def check_loggers(names) -> None:
    """The `loggers` config value: a list of known backend names, jsonl among them, no repeats."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise GooseError(f"config key 'loggers' must be a list of names ({', '.join(KNOWN_LOGGERS)}), got {names!r}")
    unknown = [n for n in names if n not in KNOWN_LOGGERS]
    if unknown:
        raise GooseError(f"config key 'loggers': unknown logger {unknown[0]!r}; choose from "
                         f"{', '.join(KNOWN_LOGGERS)}")
    if len(set(names)) != len(names):
        raise GooseError(f"config key 'loggers' names a logger twice: {list(names)}")
    if "jsonl" not in names:
        raise GooseError("config key 'loggers' must include jsonl: metrics.jsonl is what goose report, validate "
                         "and --resume read")
    for name in ("wandb", "mlflow"):  # fail with the config, before any work; the package is not imported here
        if name in names and not _installed(name):
            raise GooseError(f"config key 'loggers' names {name}, but {name} is not installed: "
                             f"pip install 'goose-distill[{name}]' (or remove {name} from loggers)")


def _installed(module: str) -> bool:
    import importlib.util
    import sys

    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def scalars(m: dict) -> dict[str, float]:
    """The numeric entries of a metrics row as `train/KEY` or `val/KEY` (without `step`), plus every
    spike site's firing rate of a validation row as `spikes/rate/<layer>.<site>`."""
    prefix = "val/" if m.get("kind") == "val" else "train/"
    out = {}
    for k, v in m.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[prefix + k] = float(v)
    for key, s in (m.get("spike_sites") or {}).items():
        if isinstance(s, dict) and isinstance(s.get("rate"), (int, float)):
            out[f"spikes/rate/{key}"] = float(s["rate"])
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as `a.b.c: value` (lists and other leaves as they are)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(run: Path, config: dict) -> tuple[str, dict[str, str]]:
    """(run name, tags) for trackers: the folder's name and its parent's (an ablation's grid cell and grid),
    then the config's own `run_name` / `tags` when it has them."""
    name = config.get("run_name") or run.resolve().name
    tags = {"run": run.resolve().name, "group": run.resolve().parent.name}
    extra = config.get("tags")
    if isinstance(extra, dict):
        tags.update({str(k): str(v) for k, v in extra.items()})
    elif isinstance(extra, (list, tuple)):
        for t in extra:
            k, sep, v = str(t).partition(":") if ":" in str(t) else (str(t), "", "")
            tags[k] = v if sep else "true"
    return str(name), tags


def _state_dir(run: Path) -> Path:
    """RUN/trackers/: the trackers' run ids (for --resume) and wandb's local files, in one folder."""
    state = run / "trackers"
    state.mkdir(exist_ok=True)
    return state


def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GooseError(f"config key 'loggers' names {extra}, but {module} is not installed: "
                         f"pip install 'goose-distill[{extra}]' (or remove {extra} from loggers)") from None


class JsonlLogger:
    name = "jsonl"

    def __init__(self, run: Path):
        self.path = run / "metrics.jsonl"

    def log_config(self, config: dict) -> None:  # noqa: ARG002  (config.yaml is written by the trainer)
        return None

    def log_metrics(self, metrics: dict, step: int) -> None:  # noqa: ARG002  (the row carries its step)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics, default=float) + "\n")

    def close(self) -> None:
        return None


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run: Path, step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tb"), purge_step=step or None)

    def log_config(self, config: dict) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    name = "wandb"

    def __init__(self, run: Path, config: dict):
        import os

        wandb = _import("wandb", "wandb")
        name, tags = run_identity(run, config)
        state = _state_dir(run)
        id_file = state / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "goose"), name=name, dir=str(state),
                              id=run_id, resume="allow" if run_id else None, group=tags["group"],
                              tags=[f"{k}:{v}" for k, v in tags.items()], config=config)
        id_file.write_text(self.run.id)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    name = "mlflow"

    def __init__(self, run: Path, config: dict):
        import os

        mlflow = _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "goose")
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        name, tags = run_identity(run, config)
        state = _state_dir(run)
        id_file = state / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            id_file.write_text(self.run_id)
        self._metric = mlflow.entities.Metric
        self._param = mlflow.entities.Param
        self._params_file = state / "mlflow_params_logged"
        self._logged_params = self._params_file.is_file()

    def log_config(self, config: dict) -> None:
        if self._logged_params:  # params are write-once in MLflow: a resumed run keeps the first ones
            return
        params = [self._param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items()]
        params = [self._param(p.key, p.value[:500]) for p in params]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self._params_file.write_text("1")
        self._logged_params = True

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        now = int(time.time() * 1000)
        rows = [self._metric(k, v, now, step) for k, v in scalars(metrics).items()]
        for i in range(0, len(rows), 500):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 500])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Loggers:
    """Every configured backend behind one log_config / log_metrics / close."""

    def __init__(self, backends: list):
        self.backends = backends

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log_config(self, config: dict) -> None:
        for b in self.backends:
            b.log_config(config)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for b in self.backends:
            b.log_metrics(metrics, step)

    def close(self) -> None:
        for b in self.backends:
            try:
                b.close()
            except Exception:  # noqa: BLE001  a tracker failing to flush must not hide the run's own outcome
                pass


def open_loggers(names, run: Path, config: dict, *, step: int = 0, tensorboard: bool = True, warn=print) -> Loggers:
    """The backends in `names` for run folder `run`, in that order. `step` is the step a resumed run
    continues from (TensorBoard drops its events after it). TensorBoard missing is a warning (it is a
    default); a tracker that was asked for by name and is not installed is an error."""
    check_loggers(list(names))
    backends: list = []
    try:
        for name in names:
            if name == "jsonl":
                backends.append(JsonlLogger(run))
            elif name == "tensorboard":
                if not tensorboard:
                    continue
                try:
                    backends.append(TensorBoardLogger(run, step))
                except ImportError:
                    warn("warning: tensorboard is not installed: no RUN/tb logs (pip install tensorboard)")
            elif name in ("wandb", "mlflow"):
                try:
                    backends.append((WandbLogger if name == "wandb" else MlflowLogger)(run, config))
                except GooseError:
                    raise
                except Exception as exc:  # noqa: BLE001  a tracker's own error (server, login, store): one line
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise GooseError(f"cannot start the {name} logger: {first}") from None
    except BaseException:
        Loggers(backends).close()
        raise
    return Loggers(backends)


def open_run_loggers(cfg, run: Path, step: int, warn) -> Loggers:
    """A training's loggers (rank 0): the run's config.yaml (as written, resolved fields included; the
    config itself where there is none) logged to each. Closed again if any fails to start."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else cfg.to_dict()
    loggers = Loggers([])
    try:
        loggers = open_loggers(cfg.loggers, run, config, step=step, tensorboard=cfg.tensorboard, warn=warn)
        loggers.log_config(config)
    except BaseException:
        loggers.close()
        raise
    return loggers


def start_profiler(profile_steps: int, run: Path, device):
    """torch.profiler over `profile_steps` steps after one wait and one warm-up step, traces to RUN/profile
    (TensorBoard's format); None when profile_steps is 0."""
    if profile_steps <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=profile_steps, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(str(run / "profile")))
    profiler.start()
    return profiler

"""`goose ablate`: many student configs against one store, N at a time, resumable, then one report.

A grid is YAML:

    steps: 300                      # applied to every run (any top-level TrainConfig key works)
    set: ["batch_size=8"]           # overrides for every run
    runs:
      ce_only: {config: ce_only}    # a shipped config (configs/NAME.yaml) or a path
      kd:      {config: kd}
      kd_lif:  {config: kd, set: ["model.overrides={spike: {lif: true}}"]}

Each run is its own `goose train-from-cache` process (isolated, killable) writing DIR/NAME; a finished run
gets DIR/NAME/DONE and is never redone; an interrupted one is resumed from its last checkpoint. The store
is opened read-only by every run, so N runs share it safely.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..errors import GooseError

BUILTIN_GRIDS = {
    # the seed's distillation ablation: no KD / KD / +CTKD / +POCL / +alignment / full
    "distill": {"runs": {name: {"config": name} for name in ("ce_only", "kd", "ctkd", "pocl", "align", "full")}},
    # spike ablations on top of KD
    "spikes": {"runs": {
        "ternary": {"config": "kd"},
        "binary": {"config": "kd", "set": ["model.overrides={spike: {binary: true}}"]},
        "lif": {"config": "kd", "set": ["model.overrides={spike: {lif: true}}"]},
        "dense": {"config": "kd", "set": ["model.overrides={spike_sites: []}"]},
    }},
}


def resolve_config(name: str) -> str:
    """A grid run's config: a path, or a shipped config by name (pipeline/stage_two/config.py resolves both)."""
    from .stage_two.config import resolve_config_path

    return resolve_config_path(name)


def load_grid(grid: str) -> dict:
    if grid in BUILTIN_GRIDS:
        return BUILTIN_GRIDS[grid]
    p = Path(grid)
    if not p.is_file():
        raise GooseError(f"grid {grid!r} is neither a file nor a built-in grid ({', '.join(BUILTIN_GRIDS)})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GooseError(f"cannot parse grid {grid}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise GooseError(f"grid {grid} has no runs: mapping")
    return data


def _run_overrides(grid: dict, extra_set: list[str] = ()) -> dict[str, tuple[str | None, list[str]]]:
    """Per run: its config file (or None) and its --set overrides, in order."""
    common = [f"{k}={json.dumps(v)}" for k, v in grid.items() if k not in ("runs", "set")]
    common += list(grid.get("set") or []) + list(extra_set)
    out = {}
    for name, spec in grid["runs"].items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise GooseError(f"grid run {name!r} must be a mapping like {{config: kd, set: [...]}}")
        config = resolve_config(spec["config"]) if spec.get("config") else None
        out[str(name)] = (config, common + list(spec.get("set") or []))
    return out


def run_commands(grid: dict, cache: str, out: Path, extra_set: list[str] = (),
                 storage_options: dict | None = None) -> dict[str, list[str]]:
    """The train-from-cache command line of every run in the grid (`storage_options`: fsspec options for the
    store, passed to every run as --storage-options)."""
    cmds = {}
    for name, (config, overrides) in _run_overrides(grid, extra_set).items():
        cmd = [sys.executable, "-m", "goose.cli", "train-from-cache", "--cache", cache, "--out", str(out / name),
               "--no-progress"]
        if storage_options:
            cmd += ["--storage-options", json.dumps(storage_options)]
        if config:
            cmd += ["--config", config]
        for item in overrides:
            cmd += ["--set", item]
        cmds[name] = cmd
    return cmds


def check_grid(grid: dict, cache: str, out: Path, extra_set: list[str] = (),
               storage_options: dict | None = None) -> None:
    """Every run's config resolves (types and ranges), so a bad --set fails once, before any run starts."""
    from .stage_two.config import load_config

    for name, (config, overrides) in _run_overrides(grid, extra_set).items():
        try:
            load_config(config, overrides, cache=cache, out=str(out / name), storage_options=storage_options)
        except GooseError as exc:
            raise GooseError(f"grid run {name!r}: {exc}") from None


def run_ablation(cache: str, grid_name: str, out: str, *, parallel: int = 1, extra_set: list[str] = (),
                 storage_options: dict | None = None, echo=print) -> dict:
    from ..cache.reader import CacheReader
    from .stage_two.run_folder import run_entries
    from .report import run_report

    grid = load_grid(grid_name)
    out_dir = Path(out)
    check_grid(grid, cache, out_dir, extra_set, storage_options)  # fail now, not in every child, on a bad config ...
    CacheReader(cache, storage_options=storage_options)  # ... or a store that is missing or unfinished
    out_dir.mkdir(parents=True, exist_ok=True)
    cmds = run_commands(grid, cache, out_dir, extra_set, storage_options)
    todo, done = [], []
    for name, cmd in cmds.items():
        run = out_dir / name
        if (run / "DONE").exists():
            done.append(name)
            continue
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*")):
            cmd = cmd + ["--resume"]
        elif run_entries(run):  # stopped before its first checkpoint: nothing to resume, start it afresh
            cmd = cmd + ["--overwrite"]
        todo.append((name, cmd))
    echo(f"ablate: {len(cmds)} runs, {len(done)} already done, {len(todo)} to run, {parallel} at a time")
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    failed = []
    stop: list[int] = []  # the signal that asked us to stop, once one has
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.perf_counter()
    try:
        while (todo or running) and not stop:
            while todo and len(running) < parallel:
                name, cmd = todo.pop(0)
                log = open(out_dir / f"{name}.log", "a")
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
                echo(f"  started {name}")
            time.sleep(0.5)
            _reap(running, out_dir, done, failed, echo)
        if stop:
            _stop_children(running, stop[0], out_dir, done, failed, echo)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finished = [n for n in cmds if (out_dir / n / "DONE").exists()]
    if stop:  # no report: the grid is not finished; a rerun resumes the stopped runs
        return {"out": str(out_dir), "runs": list(cmds), "finished": finished, "failed": failed,
                "seconds": time.perf_counter() - t0, "report": None, "interrupted": True, "signal": stop[0]}
    report = run_report([str(out_dir / n) for n in finished], str(out_dir / "report")) if finished else None
    return {"out": str(out_dir), "runs": list(cmds), "finished": finished, "failed": failed,
            "seconds": time.perf_counter() - t0, "report": report, "interrupted": False, "signal": None}


def _reap(running: dict, out_dir: Path, done: list, failed: list, echo, stopping: bool = False) -> None:
    """Collect the runs that have exited: DONE for a clean exit, a failure otherwise (while stopping, a run
    that exited on the forwarded signal is not a failure: it resumes on the next ablate)."""
    for name, (proc, log) in list(running.items()):
        if proc.poll() is None:
            continue
        log.close()
        del running[name]
        if proc.returncode == 0:
            (out_dir / name / "DONE").write_text(json.dumps({"finished": time.time()}))
            done.append(name)
            echo(f"  finished {name}")
        elif stopping and (proc.returncode < 0 or proc.returncode > 128):
            echo(f"  stopped {name} (exit {proc.returncode}); rerun the same command to resume it")
        else:
            failed.append(name)
            echo(f"  FAILED {name} (exit {proc.returncode}; see {out_dir / (name + '.log')}): {_last_line(log.name)}")


def _last_line(path: str) -> str:
    """The failed run's last log line (its one-line error, usually), so the grid's output says why."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def _stop_children(running: dict, signum: int, out_dir: Path, done: list, failed: list, echo) -> None:
    """Forward the signal to every running training (each checkpoints and exits), and wait for them."""
    echo(f"ablate: signal {signum}: stopping {len(running)} running training(s); they checkpoint, then exit")
    for proc, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(signum)
    for proc, _ in running.values():
        proc.wait()
    _reap(running, out_dir, done, failed, echo, stopping=True)

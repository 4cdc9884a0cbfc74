"""A training's run folder: its lock, what a resumed run drops from its logs, the best model written
atomically, the files a summary names, and --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ...errors import GooseError
from ...locks import ProcessLock, describe, live_holder


LOCK_FILE = ".lock"


class RunLock:
    """One training process per run folder: RUN/.lock, goose's one process lock (`locks.py`), so a run held
    on another host (a cluster sharing the filesystem) is refused too, never judged stale by a pid that
    means nothing here. A lock whose process is gone on this host is stale (a killed run) and taken over."""

    def __init__(self, run: Path):
        self.path = run / LOCK_FILE
        self.lock = None

    def acquire(self) -> None:
        where = self.path.parent
        self.lock = ProcessLock.acquire(str(self.path), lambda who: (
            f"run folder {where} is in use by another training ({who}); wait for it or choose another --out "
            f"(if that run is gone, delete {self.path})"), reentrant=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop lines logged after `step` (they belong to the part of a crashed run that is being redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def run_files(run: Path) -> dict[str, str]:
    """The run's outputs that exist now, by role: best (best/, written at the first validation), metrics,
    events (written only when something happened), tensorboard, trackers, checkpoints. A final summary
    names only these, so it never points at a file an early interrupt or a quiet run did not write."""
    roles = {"best": "best", "metrics": "metrics.jsonl", "events": "events.jsonl", "tensorboard": "tb",
             "trackers": "trackers", "checkpoints": "checkpoints"}
    out = {}
    for role, name in roles.items():
        path = run / name
        if (path / "config.json").is_file() if role == "best" else path.exists():
            out[role] = str(path)
    return out


def summary_files_line(files: dict[str, str]) -> str:
    """'  best model: RUN/best   metrics: RUN/metrics.jsonl ...' over the files that exist (run_files; the
    `outputs` of run_train's result), for the end-of-run summary."""
    labels = (("best", "best model"), ("metrics", "metrics"), ("events", "events"), ("tensorboard", "TensorBoard"))
    parts = [f"{label}: {files[role]}" for role, label in labels if role in files]
    if "best" not in files:
        parts.insert(0, "no best model yet (no validation ran)")
    return "  " + "   ".join(parts)


def progress_postfix(m: dict) -> dict:
    """The progress bar's fields for a train row: the loss, and T only while a KD loss uses it (a CE-only
    run, or a stage with KD weight 0, has no temperature to show)."""
    out = {"loss": f"{m.get('loss', float('nan')):.3f}"}
    if m.get("temperature") is not None and (m.get("kd_weight") or 0) > 0:
        out["T"] = f"{m['temperature']:.2f}"
    return out


def write_best(run: Path, model, val: dict, provenance: dict, reader) -> None:
    """RUN/best: the model, its validation metrics, its provenance and the store's tokenizer, written to a
    temporary folder and swapped in, so a crash leaves the previous best (or none), never half of one."""
    tmp = run / ".best-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(val, indent=2, default=float))
        (tmp / "goose.json").write_text(json.dumps(provenance, indent=2))
        reader.save_tokenizer(tmp)  # the student folder is self-contained: eval/generate need nothing else
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GooseError(f"cannot write {run / 'best'} ({exc.strerror or exc}; is the disk full?); the "
                         f"previous best model and the checkpoints are kept") from None
    best = run / "best"
    old = run / ".best-old"
    if best.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


# Everything a goose training writes into its run folder (train.py; DONE from ablate, DONE.json from the
# quickstart). --overwrite removes only these, and refuses a folder that holds anything else.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "events.jsonl", "tb", "trackers", "checkpoints", "best", ".best-tmp",
               ".best-old", ".lock", "profile", "DONE", "DONE.json", "eval.json")


def run_entries(out: str | Path) -> list[str]:
    """The goose run files and folders present in `out` (empty when it holds no run or does not exist)."""
    folder = Path(out)
    if not folder.is_dir():
        return []
    return [name for name in RUN_ENTRIES if os.path.lexists(folder / name)]


def prepare_run_folder(cfg, *, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Check train-from-cache's --out before any training work, and with `overwrite` clear it.

    A folder holding a run (any of RUN_ENTRIES) needs --resume (continue it) or --overwrite (start afresh);
    without either it is refused. --overwrite removes goose's own run files only, after the store and config
    have been checked, and refuses a folder that also holds other files or that a live training holds.
    Returns the entries removed. Under torchrun only rank 0 removes; the other ranks wait for it."""
    if resume and overwrite:
        raise GooseError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                         "--overwrite deletes it and starts afresh")
    folder = Path(cfg.out)
    if folder.exists() and not folder.is_dir():
        raise GooseError(f"--out {folder} is a file, not a run folder")
    present = run_entries(folder)
    if resume or not present:
        return []
    if not overwrite:
        raise GooseError(f"run folder {folder} already holds a run ({', '.join(present)}): pass --resume to "
                         f"continue it or --overwrite to delete it and start afresh (or choose another --out)")
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:  # rank 0 clears the folder; wait until it has (it cannot start the run without this rank)
        deadline = time.monotonic() + 300
        while (folder / "checkpoints").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return []
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GooseError(f"--overwrite: {folder} holds files that are not goose's run files ({shown}); "
                         f"nothing was deleted: move them away or choose another --out")
    holder = live_holder(str(folder / ".lock"))
    if holder is not None:
        raise GooseError(f"--overwrite: run folder {folder} is in use by a running training ({describe(holder)}); "
                         f"nothing was deleted (if that run is gone, delete {folder / '.lock'})")
    # the store and the config must be usable before the old run is deleted
    from ...cache.reader import CacheReader
    from .checks import check_store

    options = cfg.storage_options or None
    reader = CacheReader(cfg.cache, storage_options=options)
    check_store(cfg, reader, CacheReader(cfg.val_cache, storage_options=options) if cfg.val_cache else None)
    for name in present:
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            raise GooseError(f"--overwrite: cannot delete {path}: {exc.strerror or exc}") from None
    return present

"""goose's one process lock (`locks.py`) across hosts: a lock held on another machine sharing the filesystem is
refused with its host named, never judged stale by a pid that means nothing here. Shown with real
processes in separate PID and UTS namespaces (as two cluster nodes: neither sees the other's pids, each has
its own hostname) for training, --overwrite and cache-teacher; and without namespaces by a lock file that
names another host."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from goose.errors import GooseError
from goose.locks import ProcessLock, read_holder

REPO = Path(__file__).resolve().parents[1]


def test_a_lock_from_another_host_is_refused_by_name_and_never_taken_over(tmp_path):
    path = str(tmp_path / "x.lock")
    Path(path).write_text(json.dumps({"pid": 1, "host": "node-7", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(GooseError, match="busy: pid 1 on host node-7 since 2026-01-01"):
        ProcessLock.acquire(path, lambda who: f"busy: {who}")
    assert read_holder(path)["host"] == "node-7"  # untouched
    Path(path).write_text(json.dumps({"pid": 2**22 + 1, "host": os.uname().nodename, "started": "x"}))
    with ProcessLock.acquire(path, lambda who: f"busy: {who}"):  # this host, no such pid: stale, taken over
        assert read_holder(path)["pid"] == os.getpid()
    assert not os.path.exists(path)


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--uts", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare (PID/UTS namespaces)")


def on_host(host: str, *argv: str) -> list[str]:
    """A command run as if on another machine: its own PID namespace (pids unseen from here) and hostname."""
    script = f"hostname {host} && exec " + " ".join(shlex.quote(a) for a in argv)
    # --kill-child: killing unshare kills the namespace's process too (else the training outlives the test)
    return ["unshare", "--pid", "--fork", "--kill-child", "--uts", "--mount-proc", "sh", "-c", script]


def _running_in(folder: Path) -> bool:
    """Whether a process whose command line names `folder` is still running (a leaked training)."""
    time.sleep(0.5)
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


@needs_namespaces
def test_training_held_on_another_host_refuses_resume_and_overwrite_there(store, tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "goose.cli", "train-from-cache", "--cache", store, "--out", str(run),
             "--no-progress", "--set", "model.preset=tiny", "--set", "batch_size=4", "--set", "val_every=100000",
             "--set", "ckpt_every=2", "--steps", "100000"]
    first = subprocess.Popen(on_host("host-a", *train), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints").exists() or not (run / ".lock").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first training never started"
            time.sleep(0.5)
        assert read_holder(str(run / ".lock"))["host"] == "host-a"
        for extra in ("--resume", "--overwrite"):
            second = subprocess.run(on_host("host-b", *train, extra), env=_env(), capture_output=True, text=True,
                                    timeout=300)
            lines = second.stderr.strip().splitlines()
            assert second.returncode != 0 and lines[-1].startswith("error: "), second.stderr
            assert "on host host-a" in lines[-1] and ".lock" in lines[-1], lines[-1]
        assert first.poll() is None  # the first run kept its folder
        assert (run / "checkpoints").exists()
    finally:
        first.kill()
        first.wait()
        assert not _running_in(run), "the first training outlived its namespace"


@needs_namespaces
def test_a_store_written_on_another_host_refuses_a_second_writer_there(tmp_path, tiny_teacher, corpus_file):
    out = tmp_path / "s.zarr"
    hold = (f"import time; from goose.cache.lock import StoreLock; lock = StoreLock.acquire({str(out)!r}); "
            f"print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen(on_host("host-a", sys.executable, "-c", hold), env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(on_host("host-b", sys.executable, "-m", "goose.cli", "cache-teacher", "--teacher",
                                        str(tiny_teacher), "--data-files", str(corpus_file), "--seq-len", "32",
                                        "--max-tokens", "320", "--top-k", "8", "--device", "cpu", "--no-progress",
                                        "--out", str(out)), env=_env(), capture_output=True, text=True, timeout=300)
        last = second.stderr.strip().splitlines()[-1]
        assert second.returncode != 0 and "being written by another goose cache-teacher" in last, second.stderr
        assert "on host host-a" in last
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()

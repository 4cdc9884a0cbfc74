"""The one process lock of goose: a file created with O_EXCL that says which process on which host holds it.

Used for a store's single writer (`cache/lock.py`, `<store>.lock`) and for a training's run folder
(`RUN/.lock`, taken by train-from-cache and checked by --overwrite). The file holds JSON: the holder's pid,
its start time (against pid reuse), its host and when it took the lock. A lock is stale, and taken over,
only when its process is provably gone: same host and no such pid (or the pid now belongs to a process
started at another time). A lock held on **another host** is never judged by pid (that pid means nothing
here, as on a cluster whose nodes share a filesystem): it is refused, naming the host and the file to
delete if that run is really gone. A lock file in the older "pid start" text form (run folders of earlier
goose versions) is read as held on this host.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid

from .errors import GooseError

_HELD: set[str] = set()  # lock files this process holds (a lock naming this pid but not here is stale)


def read_holder(path: str) -> dict | None:
    """The lock's content, {} if unreadable (being written, or damaged), None if there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return data
    pid, _, started = text.strip().partition(" ")  # the older run-folder form: "pid start_time" (or "pid")
    if pid.isdigit():
        return {"pid": int(pid), "pid_start": started, "host": socket.gethostname()}
    return {}


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def is_alive(holder: dict, path: str) -> bool:
    """Whether the holder may still be running: its pid exists on this host (another host's: assume so).
    An unreadable lock is being written, unless it is older than a few seconds (its writer died)."""
    if not holder:
        try:
            return os.path.getmtime(path) > time.time() - 10
        except OSError:
            return False
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or pid <= 0:
        return False  # no usable pid: a damaged lock, nobody can be holding it by pid
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return path in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    started = holder.get("pid_start")  # a reused pid is another process: its start time differs
    return not started or not start_time(pid) or started == start_time(pid)


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started', '?')}"
            if holder else "a run whose lock is being written")


def live_holder(path: str) -> dict | None:
    """The holder of the lock at `path` if it may still be running (another process's), else None."""
    holder = read_holder(path)
    if holder is None or not is_alive(holder, path):
        return None
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return None
    return holder


class ProcessLock:
    """`with ProcessLock.acquire(path, busy=...)`: `busy(holder_description)` is the error message when a
    live process (on this host or any other) holds it. `reentrant`: a lock this process already holds is
    handed out again (a run folder's trainers follow each other in one process, as in tests and ablations),
    where a store's writer lock refuses a second writer even from the same process."""

    def __init__(self, path: str | None):
        self.path = path

    @classmethod
    def acquire(cls, path: str, busy, reentrant: bool = False) -> "ProcessLock":
        mine = json.dumps({"pid": os.getpid(), "pid_start": start_time(os.getpid()), "host": socket.gethostname(),
                           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        if reentrant and path in _HELD:
            return cls(path)
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(path)
                if holder is None:
                    continue  # released meanwhile: try again
                if is_alive(holder, path):
                    raise GooseError(busy(describe(holder))) from None
                _take_away(path, holder)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(mine)
            _HELD.add(path)
            return cls(path)
        raise GooseError(f"cannot take the lock {path}: other runs keep taking it; try again")

    def release(self) -> None:
        if self.path is None or self.path not in _HELD:
            return
        _HELD.discard(self.path)
        holder = read_holder(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "ProcessLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _take_away(path: str, stale: dict) -> None:
    """Remove the stale lock `stale`, and only it: moved aside first, so that a fresh lock another run put
    there after we read the stale one is put back rather than deleted."""
    aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read_holder(aside) != stale:  # not the one we judged stale: give it back (if nobody took the place)
        try:
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass

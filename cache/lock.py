"""The writer lock of a local store: one single-writer `goose cache-teacher` at a time.

A one-process run may start a store afresh (an unfinished store with no block written and other
parameters is wiped), so a second run on the same --output could delete a store the first is still
creating. The lock is a file beside the store (`<store>.lock`, not inside it: zarr lists and wipes the
store folder) created with O_EXCL and holding the holder's pid (with its start time, against pid reuse),
host and start time. A lock whose process is gone on this host is stale and taken over; a live one, or one from another host (whose pid cannot be
checked from here), is refused with one line naming it. It is released (deleted) when the run ends.

Only the single-writer mode takes it (one process, or rank 0 under torchrun for all its ranks): `--shard`
jobs legitimately write one store concurrently and take none, but refuse to start while a single writer
holds the lock. Stores at non-local (fsspec) URLs are not locked: object stores have no O_EXCL create.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid

from ..errors import GooseError
from .integrity import StoreFiles

_HELD: set[str] = set()  # lock files this process holds (a lock naming this pid but not here is stale)


def lock_path(url: str, storage_options: dict | None = None) -> str | None:
    """The lock file of a local store, or None for a non-local URL (not locked)."""
    files = StoreFiles(url, storage_options)
    if not files.local:
        return None
    return os.path.abspath(files.root) + ".lock"


def _holder(path: str) -> dict | None:
    """The lock's content, {} if unreadable (being written, or damaged), None if there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(holder: dict, path: str) -> bool:
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
    return not started or not _start_time(pid) or started == _start_time(pid)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started', '?')}"
            if holder else "a run whose lock is being written")


def check_unlocked(url: str, storage_options: dict | None = None) -> None:
    """For a `--shard` job: refuse while a single-writer run holds the store's lock (it may wipe the store)."""
    path = lock_path(url, storage_options)
    holder = _holder(path) if path else None
    if holder is not None and _alive(holder, path):
        raise GooseError(f"store {url} is being written by a one-process goose cache-teacher ({_describe(holder)}); "
                         f"wait for it to finish, or delete {path} if that run is gone")


class StoreLock:
    """`with StoreLock.acquire(url):` around a single-writer run; a no-op for non-local URLs."""

    def __init__(self, path: str | None):
        self.path = path

    @classmethod
    def acquire(cls, url: str, storage_options: dict | None = None) -> "StoreLock":
        path = lock_path(url, storage_options)
        if path is None:
            return cls(None)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as exc:
            raise GooseError(f"cannot write the store at {url}: {exc.strerror or exc}") from None
        mine = json.dumps({"pid": os.getpid(), "pid_start": _start_time(os.getpid()), "host": socket.gethostname(),
                           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(path)
                if holder is None:
                    continue  # released meanwhile: try again
                if _alive(holder, path):
                    raise GooseError(f"store {url} is being written by another goose cache-teacher "
                                     f"({_describe(holder)}); wait for it to finish, or delete {path} if that "
                                     f"run is gone") from None
                _take_away(path, holder)  # stale: its process is gone
                continue
            except OSError as exc:
                raise GooseError(f"cannot write the store at {url}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(mine)
            _HELD.add(path)
            return cls(path)
        raise GooseError(f"cannot take the writer lock {path}: other runs keep taking it; try again")

    def release(self) -> None:
        if self.path is None or self.path not in _HELD:
            return
        _HELD.discard(self.path)
        holder = _holder(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "StoreLock":
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
    if _holder(aside) != stale:  # not the one we judged stale: give it back (if nobody took the place)
        try:
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass

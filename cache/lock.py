"""The writer lock of a local store: one single-writer `goose cache-teacher` at a time.

A one-process run may start a store afresh (an unfinished store with no block written and other
parameters is wiped), so a second run on the same --output could delete a store the first is still
creating. The lock is a file beside the store (`<store>.lock`, not inside it: zarr lists and wipes the
store folder) taken with goose's one process lock (`locks.py`: O_EXCL, the holder's pid, its start time and host). A lock
whose process is gone on this host is stale and taken over; a live one, or one from another host (whose pid
cannot be checked from here), is refused with one line naming it. It is released (deleted) when the run ends.

Only the single-writer mode takes it (one process, or rank 0 under torchrun for all its ranks): `--shard`
jobs legitimately write one store concurrently and take none, but refuse to start while a single writer
holds the lock. Stores at non-local (fsspec) URLs are not locked: object stores have no O_EXCL create.
"""

from __future__ import annotations

import os

from ..errors import GooseError
from ..locks import ProcessLock, describe, is_alive, read_holder
from .integrity import StoreFiles


def lock_path(url: str, storage_options: dict | None = None) -> str | None:
    """The lock file of a local store, or None for a non-local URL (not locked)."""
    files = StoreFiles(url, storage_options)
    if not files.local:
        return None
    return os.path.abspath(files.root) + ".lock"


def check_unlocked(url: str, storage_options: dict | None = None) -> None:
    """For a `--shard` job: refuse while a single-writer run holds the store's lock (it may wipe the store)."""
    path = lock_path(url, storage_options)
    holder = read_holder(path) if path else None
    if holder is not None and is_alive(holder, path):  # this process's own single writer counts too
        raise GooseError(f"store {url} is being written by a one-process goose cache-teacher ({describe(holder)}); "
                         f"wait for it to finish, or delete {path} if that run is gone")


class StoreLock(ProcessLock):
    """`with StoreLock.acquire(url):` around a single-writer run; a no-op for non-local URLs."""

    @classmethod
    def acquire(cls, url: str, storage_options: dict | None = None) -> "StoreLock":
        path = lock_path(url, storage_options)
        if path is None:
            return cls(None)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = ProcessLock.acquire(path, lambda who: f"store {url} is being written by another goose "
                                       f"cache-teacher ({who}); wait for it to finish, or delete {path} if that "
                                       f"run is gone")
        except OSError as exc:
            raise GooseError(f"cannot write the store at {url}: {exc.strerror or exc}") from None
        return cls(lock.path)

"""Create or resume a teacher-cache store and write it block by block.

Crash safety: a block's data arrays are written first, then the checksums of their stored bytes, then
its byte in `blocks_done`. A kill in between leaves the byte unset and the block is simply recomputed on
resume, so a finished store is identical to an uninterrupted run's. The root group is created with its
attributes in one write, so a kill during creation leaves either nothing or a store that resumes.
`complete` is set in the root attributes only after the last block, the teacher embedding, the tokenizer
files, their checksums and the consolidated metadata are written.

Concurrent writers (torchrun ranks, `--shard I/N` jobs) are safe because no two of them ever write one
stored object: a block's data is one chunk (or shard) per array, and its progress byte and checksum row
are chunks of their own (`blocks_done` and `chunk_checksums` are chunked one block a chunk). A shared
writer (`shared=True`) never rewrites the root attributes; it creates a missing store atomically (built
beside the target, then renamed into place) and otherwise opens the existing one and checks its spec.
Only the finaliser (one process: rank 0, or `goose cache finalize`) writes store-level attributes.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import time
import uuid
import warnings

import numpy as np
import zarr

from ..errors import GooseError
from .integrity import (
    ATTRS_CHECKSUM_VERSION,
    CHECKSUM_ALGORITHM,
    CHECKSUMMED_BYTES,
    StoreFiles,
    array_keys,
    attrs_checksum,
    block_key,
    checksum,
)
from .schema import (
    CHECKSUM_ARRAY,
    EMBEDDING_ARRAY,
    GOOSE_ATTR,
    PROGRESS_ARRAY,
    SCHEMA_VERSION,
    encode_logprobs,
    encode_topk,
    round_mantissa,
    TOKENIZER_GROUP,
    ArraySpec,
    StoreSpec,
    compressors,
)

# Attributes that may differ between the run that created a store and the run that resumes it.
_VOLATILE = ("created_at", "completed_at", "complete", "package_version", "resumed")
# provenance that only matters to blocks still to compute (how the targets are computed): not compared
# against a complete store, which a rerun only reports
_COMPUTE_ONLY = ("provenance.targets",)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _open_group(url: str, mode: str, storage_options: dict | None, attributes: dict | None = None):
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options or None,
                               attributes=attributes)
    except (PermissionError, NotADirectoryError, OSError) as exc:
        raise GooseError(f"cannot write the store at {url}: {exc.strerror or exc}") from None


def _writable(array):
    # zarr skips (and deletes) a chunk equal to the fill value by default; every chunk is written here so
    # that a missing chunk always means damage, and every chunk has stored bytes to checksum
    return array.with_config({"write_empty_chunks": True})


class CacheWriter:
    """Writes one store. Use `CacheWriter.open(url, spec, provenance)`, then `write_block`, `finalize`."""

    def __init__(self, group, spec: StoreSpec, url: str, storage_options: dict | None = None):
        self.group = group
        self.spec = spec
        self.url = url
        self._arrays = {name: _writable(group[name]) for name in spec.arrays()}
        self._done = group[PROGRESS_ARRAY]
        self._checksums = _writable(group[CHECKSUM_ARRAY])
        self._files = StoreFiles(url, storage_options)
        self.block_nbytes: dict[int, int] = {}  # block -> stored bytes of its per-window arrays, as written here

    # ---- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str,
        spec: StoreSpec,
        provenance: dict,
        *,
        package_version: str,
        storage_options: dict | None = None,
        shared: bool = False,
        once: dict | None = None,
    ) -> "CacheWriter":
        """Create a new store, or reopen an unfinished one made with exactly the same parameters.

        An unfinished store with no block written yet holds nothing worth keeping: made with other
        parameters, it is started afresh, so a run that failed before its first block (bad option, no space)
        never blocks a corrected rerun; made with the same ones, it is simply continued (never wiped). A
        one-process run holds the store's writer lock (`cache/lock.py`, taken by the caller) meanwhile.

        `shared=True` is for one of several writers of the same store (a `--shard` job, a torchrun rank):
        nothing is restarted or rewritten, a missing store is created atomically (with `once`, the
        teacher embedding and tokenizer files, already in it, so that `finalize_store` needs no teacher),
        and an existing one must match exactly.
        """
        meta = {
            "schema_version": SCHEMA_VERSION, "spec": spec.to_attrs(), "provenance": provenance,
            "checksums": {"algorithm": CHECKSUM_ALGORITHM, "bytes": CHECKSUMMED_BYTES, "arrays": list(spec.arrays())},
            "attrs_crc32_version": ATTRS_CHECKSUM_VERSION, "complete": False,
        }
        meta["attrs_crc32"] = attrs_checksum(meta)  # covers complete (False here): the finalize recomputes it
        if shared:
            attrs = {**meta, "package_version": package_version, "created_at": _now(), "complete": False}
            return cls._open_shared(url, spec, meta, attrs, storage_options, once)
        state, existing = _store_state(url, storage_options)
        if (state == "goose" and not existing.get("complete") and _nothing_written(url, storage_options)
                and not _is_same(existing, meta)):
            state = "restart"  # other parameters, nothing computed: start afresh (same ones: just continue)
        if state != "goose":
            attrs = {**meta, "package_version": package_version, "created_at": _now(), "complete": False}
            # one write: the group appears together with its goose attributes ("w" replaces a leftover)
            group = _open_group(url, "w-" if state == "absent" else "w", storage_options, {GOOSE_ATTR: attrs})
        else:
            _check_same(url, existing, meta)
            group = _open_group(url, "r+", storage_options)
            if not existing.get("complete"):
                attrs = dict(existing)
                attrs["resumed"] = int(attrs.get("resumed", 0)) + 1
                group.attrs.put({GOOSE_ATTR: attrs})
        _ensure_arrays(group, spec)  # (re)ensured on every open: a kill during creation leaves some missing
        return cls(group, spec, url, storage_options)

    @classmethod
    def _open_shared(cls, url, spec, meta, attrs, storage_options, once) -> "CacheWriter":
        files = StoreFiles(url, storage_options)
        state, existing = _store_state_settled(url, storage_options, files.local)
        if state == "absent":
            _create_atomically(files, attrs, spec, once)  # or another writer won the race: fine either way
            state, existing = _store_state_settled(url, storage_options, files.local)
        if state != "goose":
            raise GooseError(f"store {url} was left half-created by an older goose; run goose cache-teacher once "
                             f"without --shard, or delete it")
        _check_same(url, existing, meta)
        group = _open_group(url, "r+", storage_options)
        missing = [name for name in [*spec.arrays(), CHECKSUM_ARRAY, PROGRESS_ARRAY] if name not in group]
        if missing:
            raise GooseError(f"store {url} lacks {', '.join(missing[:3])} (its creation was interrupted); finish it "
                             f"with goose cache-teacher without --shard, or delete it")
        for name in (PROGRESS_ARRAY, CHECKSUM_ARRAY):
            if group[name].chunks[0] != 1:  # concurrent writers would lose each other's marks
                raise GooseError(f"store {url} keeps {name} of several blocks in one chunk, which concurrent "
                                 f"writers would corrupt; finish it with one goose cache-teacher process")
        return cls(group, spec, url, storage_options)

    @classmethod
    def reopen(cls, url: str, storage_options: dict | None = None) -> "CacheWriter":
        """An existing store of this schema version, as its own attributes describe it (for finalize_store)."""
        state, existing = _store_state(url, storage_options)
        if state != "goose":
            raise GooseError(f"no goose store at {url}")
        if existing.get("schema_version") != SCHEMA_VERSION:
            raise GooseError(f"store {url} has schema version {existing.get('schema_version')}, this goose "
                             f"finalizes version {SCHEMA_VERSION}: rebuild it")
        spec = StoreSpec.from_attrs(existing["spec"])
        group = _open_group(url, "r+", storage_options)
        return cls(group, spec, url, storage_options)

    # ---- progress ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.group.attrs[GOOSE_ATTR].get("complete"))

    def blocks_todo(self) -> list[int]:
        done = self._done[:]
        return [int(b) for b in np.flatnonzero(done == 0)]

    # ---- writing -----------------------------------------------------------------------------
    def write_block(self, block: int, data: dict[str, np.ndarray]) -> None:
        """Write every per-window array of one block, then mark the block done."""
        start, stop = self.spec.block_range(block)
        if set(data) != set(self._arrays):
            raise ValueError(f"block data has arrays {sorted(data)}, schema wants {sorted(self._arrays)}")
        data = self._encode(data)
        for name, array in self._arrays.items():
            values = data[name]
            if values.shape != (stop - start,) + array.shape[1:]:
                raise ValueError(f"{name}: block shape {values.shape} != {(stop - start,) + array.shape[1:]}")
            array[start:stop] = values.astype(array.dtype, copy=False)
        # the stored bytes, read back: what a later verify reads, whatever the codecs did
        stored = [self._stored_bytes(block_key(array, block)) for array in self._arrays.values()]
        self._checksums[block] = np.array([checksum(data) for data in stored], dtype=np.int64)
        self.block_nbytes[block] = sum(len(data) for data in stored)
        self._done[block] = 1

    def _encode(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The schema's encodings of float targets (teacher_targets' output): fixed-point or compact top-k,
        rounded tail log-masses. Already-encoded (integer) top-k log-probabilities pass as they are."""
        spec = self.spec
        data = dict(data)
        if data["topk_logprobs"].dtype.kind == "f":
            if spec.topk_encoding == "compact":
                data["topk_ids"], data["topk_logprobs"] = encode_topk(
                    data["topk_ids"], data["topk_logprobs"], spec.logprob_step, np.dtype(spec.token_dtype))
            else:
                data["topk_logprobs"] = encode_logprobs(data["topk_logprobs"], spec.logprob_step)
        if spec.tail_keepbits < 23:
            data["tail_logmass"] = round_mantissa(data["tail_logmass"], spec.tail_keepbits)
        return data

    def write_pca_basis(self, bases: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """The hidden states' PCA basis, layer -> (mean (d,), basis (r, d)); written before block 0's data
        (a resume that finds block 0 done reads it back instead of refitting)."""
        for name, array_spec in self.spec.pca_specs().items():
            layer = int(name.split("/")[1])
            value = bases[layer][0 if name.endswith("/mean") else 1]
            array = _ensure_array(self.group, name, array_spec, self.spec)
            array[:] = np.asarray(value, dtype=array_spec.dtype)

    def pca_basis(self) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        """The stored basis (None if not written yet)."""
        specs = self.spec.pca_specs()
        if not specs or any(name not in self.group for name in specs):
            return None
        from .schema import pca_basis_name, pca_mean_name

        return {layer: (self.group[pca_mean_name(layer)][:], self.group[pca_basis_name(layer)][:])
                for layer in self.spec.hidden_layers}

    def _stored_bytes(self, key: str) -> bytes:
        data = self._files.read(key)
        if data is None:
            raise GooseError(f"store {self.url}: {key} was just written but is not in the store")
        return data

    def finalize(self, teacher_embedding: np.ndarray | None = None,
                 tokenizer_files: dict[str, bytes] | None = None) -> None:
        """Write the once-per-store arrays (teacher embedding, tokenizer files) and mark the store complete
        (the very last write). Without a teacher embedding, the store must already hold them (a store
        created by a shared writer): they are checksummed as they are."""
        todo = self.blocks_todo()
        if todo:
            shown = ", ".join(map(str, todo[:12])) + (f" ... ({len(todo)} in all)" if len(todo) > 12 else "")
            raise GooseError(f"cannot finalize {self.url}: {len(todo)} of {self.spec.n_blocks} blocks are not done "
                             f"(blocks {shown}; block b belongs to shard b mod N): run or rerun the shards that "
                             f"own them, then finalize again")
        if teacher_embedding is not None:
            once = _write_once(self.group, self.spec, teacher_embedding, tokenizer_files)
        elif EMBEDDING_ARRAY in self.group:
            once = [self.group[EMBEDDING_ARRAY]]
            if TOKENIZER_GROUP in self.group:
                once += [arr for _, arr in sorted(self.group[TOKENIZER_GROUP].arrays())]
        else:
            raise GooseError(f"cannot finalize {self.url}: it has no teacher embedding (it was started by "
                             f"goose cache-teacher without --shard); rerun that command to finish it")
        missing = [name for name in self.spec.pca_specs() if name not in self.group]
        if missing:
            raise GooseError(f"cannot finalize {self.url}: its hidden-state PCA basis ({missing[0]}) was never "
                             f"written; rerun goose cache-teacher")
        once += [self.group[name] for name in self.spec.pca_specs()]
        # checksums of the once-per-store objects; their keys also tell the reader what must be present
        once_checksums = {key: checksum(self._stored_bytes(key)) for array in once for key in array_keys(array)[1:]}
        _consolidate(self.group.store)
        group = zarr.open_group(self.group.store, mode="r+", zarr_format=3)
        attrs = dict(group.attrs[GOOSE_ATTR])
        attrs["checksums"] = {**attrs["checksums"], "once": once_checksums}
        attrs.update(complete=True, completed_at=_now(), attrs_crc32_version=ATTRS_CHECKSUM_VERSION)
        attrs["attrs_crc32"] = attrs_checksum(attrs)  # now covering the once checksums and complete too
        group.attrs.put({GOOSE_ATTR: attrs})
        _consolidate(self.group.store)  # so the consolidated attributes say complete too


def _consolidate(store) -> None:
    # Consolidated metadata lets readers open a store with one request; zarr warns that it is not yet in
    # the v3 spec, which is known and harmless here (zarr-python reads it; plain v3 readers ignore it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(store)


def _write_once(group, spec: StoreSpec, teacher_embedding: np.ndarray, tokenizer_files: dict[str, bytes] | None):
    """Write the teacher embedding and the tokenizer files; returns their arrays."""
    emb_spec = spec.embedding_spec()
    emb = _ensure_array(group, EMBEDDING_ARRAY, emb_spec, spec)
    emb[:] = np.asarray(teacher_embedding, dtype=emb_spec.dtype)  # no copy when already float16
    once = [emb]
    for name, data in sorted((tokenizer_files or {}).items()):
        path = f"{TOKENIZER_GROUP}/{name}"
        if path in group:  # a finalize that was interrupted: rewrite from scratch
            del group[path]
        arr = _writable(group.create_array(
            path, shape=(len(data),), chunks=(max(len(data), 1),), dtype="uint8",
            compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0))
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        once.append(arr)
    return once


def finalize_store(url: str, storage_options: dict | None = None) -> dict:
    """`goose cache finalize`: mark a store written by `--shard` jobs complete once every block is done."""
    if storage_options is not None and not isinstance(storage_options, dict):
        raise GooseError(f"--storage-options must be a JSON object (e.g. '{{\"anon\": true}}'), "
                         f"got a JSON {type(storage_options).__name__}")
    writer = CacheWriter.reopen(url, storage_options)
    if writer.complete:
        return {"output": url, "already_complete": True, "blocks": writer.spec.n_blocks}
    writer.finalize()
    return {"output": url, "already_complete": False, "blocks": writer.spec.n_blocks}


def _ensure_arrays(group, spec: StoreSpec) -> None:
    """Every array a store holds besides the once-per-store ones; progress and checksums one block a chunk."""
    for name, array_spec in spec.arrays().items():
        _ensure_array(group, name, array_spec, spec)
    _ensure_array(group, CHECKSUM_ARRAY, ArraySpec((spec.n_blocks, len(spec.arrays())), "int64", per_window=False),
                  None, fill_value=-1)  # -1: no checksum recorded (a crc32 is never negative)
    _ensure_array(group, PROGRESS_ARRAY, ArraySpec((spec.n_blocks,), "uint8", per_window=False), None)


def _create_atomically(files: StoreFiles, attrs: dict, spec: StoreSpec, once: dict | None) -> bool:
    """Build the whole empty store (attributes, arrays, and `once` if given) away from the target, then put it
    in place in one step: a local folder is renamed (which fails if another writer's store got there
    first); on an object store the objects are uploaded with the root group last (a concurrent creator
    uploads the same array metadata, and its root differs only in created_at). False if another won."""
    local = files.local
    build = (f"{files.root}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}" if local
             else tempfile.mkdtemp(prefix="goose-store-"))
    try:
        if local:
            os.makedirs(os.path.dirname(files.root) or ".", exist_ok=True)
        group = _open_group(build, "w", None, {GOOSE_ATTR: attrs})
        _ensure_arrays(group, spec)
        if once is not None:
            _write_once(group, spec, once["teacher_embedding"], once.get("tokenizer_files"))
        if local:
            try:
                os.rename(build, files.root)  # replaces an empty folder, fails on a non-empty one
            except OSError as exc:
                if os.path.exists(os.path.join(files.root, "zarr.json")):
                    return False  # another writer's store is there
                raise GooseError(f"cannot write the store at {files.url}: {exc.strerror or exc}") from None
            return True
        keys = StoreFiles(build).keys()
        for key in sorted(keys - {"zarr.json"}):
            files.fs.pipe_file(f"{files.root}/{key}", StoreFiles(build).read(key))
        if files.read("zarr.json") is not None:
            return False
        files.fs.pipe_file(f"{files.root}/zarr.json", StoreFiles(build).read("zarr.json"))
        return True
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _store_state_settled(url: str, storage_options: dict | None, local: bool):
    """_store_state, but on an object store give a concurrent creator's upload (root object last) up to a
    minute to land before calling its half-uploaded objects "not a goose store"."""
    for attempt in range(1 if local else 30):
        try:
            return _store_state(url, storage_options)
        except GooseError:
            if attempt == 29 or local:
                raise
            time.sleep(2)
    return _store_state(url, storage_options)


def _store_state(url: str, storage_options: dict | None) -> tuple[str, dict | None]:
    """What is at url: ("absent", None), ("leftover", None) for the bare root group an interrupted creation
    left behind (goose before schema v3 wrote the group, then its attributes), or ("goose", attributes)."""
    files = StoreFiles(url, storage_options)
    fs, path = files.fs, files.root
    if not fs.exists(path):
        return "absent", None
    if fs.isfile(path):
        raise GooseError(f"output {url} is a file, not a store")
    keys = files.keys()
    if not keys:
        return "absent", None
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options or None)
        attrs = group.attrs.asdict()
    except Exception:  # noqa: BLE001 - anything unreadable is "not a goose store"
        attrs = {}
    if GOOSE_ATTR in attrs:
        return "goose", dict(attrs[GOOSE_ATTR])
    if keys == {"zarr.json"} and not attrs:
        return "leftover", None
    raise GooseError(f"output {url} exists and is not a goose store; choose another path")


def _nothing_written(url: str, storage_options: dict | None) -> bool:
    group = zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options or None)
    return PROGRESS_ARRAY not in group or not group[PROGRESS_ARRAY][:].any()


def _is_same(existing: dict, meta: dict) -> bool:
    try:
        _check_same("", existing, meta)
    except GooseError:
        return False
    return True


def _check_same(url: str, existing: dict, meta: dict) -> None:
    if existing.get("schema_version") != SCHEMA_VERSION:
        raise GooseError(
            f"store {url} has schema version {existing.get('schema_version')}, this goose writes {SCHEMA_VERSION}: "
            f"rebuild it (delete it, or choose another --output)"
        )
    old = _flatten({"spec": existing.get("spec", {}), "provenance": existing.get("provenance", {})})
    new = _flatten({"spec": meta["spec"], "provenance": meta["provenance"]})
    diffs = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key.split(".")[-1] not in _VOLATILE and old.get(key) != new.get(key)
        and not (existing.get("complete") and key in _COMPUTE_ONLY)
    ]
    if diffs:
        raise GooseError(
            f"store {url} was made with other parameters ({'; '.join(diffs[:4])}"
            f"{'; ...' if len(diffs) > 4 else ''}); use a new --output or delete the store"
        )


def _ensure_array(group, name: str, array_spec: ArraySpec, spec: StoreSpec | None, fill_value=None):
    dtype = np.dtype(array_spec.dtype)
    if name in group:
        array = group[name]
        if tuple(array.shape) != array_spec.shape or array.dtype != dtype:
            raise GooseError(f"store array {name} has shape {array.shape} {array.dtype}, expected {array_spec.shape}")
        return _writable(array)
    if spec is None:  # progress and checksums: tiny, one block a chunk so each block's mark is its own write
        chunks, shards, comp = (1,) + array_spec.shape[1:], None, None
    elif array_spec.per_window:
        chunks = (spec.chunk_windows,) + array_spec.shape[1:]
        shards = (spec.block_windows,) + array_spec.shape[1:] if spec.shard_chunks > 1 else None
        comp = compressors(spec)
    else:  # once-per-store arrays: ~2 MB row chunks, so a large one (GPT-2's 77 MB embedding) is compressed in
        # parallel chunks (0.12 s instead of 0.27 s, a cost every store pays at its finalize)
        row_bytes = max(1, int(np.prod(array_spec.shape[1:], dtype=np.int64)) * dtype.itemsize)
        chunks = (max(1, min(array_spec.shape[0], (2 << 20) // row_bytes)),) + array_spec.shape[1:]
        shards, comp = None, compressors(spec)
    fill = fill_value if fill_value is not None else np.nan if dtype.kind == "f" else 0
    return _writable(group.create_array(
        name, shape=array_spec.shape, chunks=chunks, shards=shards, dtype=dtype, compressors=comp, fill_value=fill
    ))

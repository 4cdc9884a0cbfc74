"""Read-only access to a finished teacher-cache store: metadata, windows by index, chunk-order iteration.

Opened with mode "r", so any number of training runs can read one store at the same time and none can
change it. Reads are whole windows; batches are gathered chunk by chunk because zarr reads whole chunks.

Opening checks what is cheap to check: the attributes' checksum, sane tail temperatures, and (from one
listing of the store's keys) that every stored object a reader needs is present, because zarr would read
a missing chunk as its fill value without a word. The listing costs ~0.7 s per 24k objects locally and far
more on an object store, and readers are opened per loader worker, epoch and validation, so a complete
store that passed it is remembered for the rest of the process (keyed by its URL, its attributes and, on a
local disk, the identity of its root metadata file): later opens of it do not list it again. A chunk that
is present but cannot be decoded is named (array, chunk, windows, store) when it is read. Per-block chunk
checksums are compared by `goose cache verify`; the once-per-store objects (teacher embedding, tokenizer
files) are small, so their checksums are compared whenever they are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import json
import os

import numpy as np
import zarr

from ..errors import GooseError
from .integrity import StoreFiles, array_keys, attrs_checksum, block_key, checksum
from .schema import (
    EMBEDDING_ARRAY,
    GOOSE_ATTR,
    PROGRESS_ARRAY,
    READABLE_VERSIONS,
    TOKENIZER_GROUP,
    StoreSpec,
    decode_logprobs,
    decode_topk,
    hidden_channel_scale_name,
    hidden_name,
    hidden_scale_name,
    pca_basis_name,
    pca_mean_name,
    tail_temperature_problem,
)

_REBUILD = "rebuild it (delete it and rerun goose cache-teacher)"

# Complete stores whose every required object was found present by a listing in this process (see the
# module docstring): keys from CacheReader._presence_key. Forked loader workers inherit it.
_PRESENT: set[tuple] = set()


def open_store_group(url: str, storage_options: dict | None = None):
    """The zarr group of a goose store, read-only, with its goose attributes; a clear error otherwise."""
    try:
        group = zarr.open_group(url, mode="r", zarr_format=3, storage_options=storage_options or None)
        attrs = group.attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise GooseError(f"no store at {url}") from None
    except Exception as exc:  # noqa: BLE001
        raise GooseError(f"cannot open store {url}: {exc}") from None
    if GOOSE_ATTR not in attrs:
        raise GooseError(f"{url} is a zarr group but not a goose teacher cache")
    return group, dict(attrs[GOOSE_ATTR])


def gather_windows(array, idx: np.ndarray) -> np.ndarray:
    """array[idx] along the window axis, reading every chunk the windows touch whole and once, one slice per
    run of consecutive chunks. zarr's orthogonal selection decompresses each touched chunk anyway and then
    copies out of it element-wise: 16 windows spread over 4 chunks of a GPT-2-shaped store read 4-9x slower
    per window that way than 4 whole chunks (bench/bench_store_io.py, docs/BENCHMARKS.md)."""
    cw = array.chunks[0]
    chunks = np.unique(idx // cw)
    runs = np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1) if len(chunks) else []
    out = np.empty((len(idx),) + tuple(array.shape[1:]), dtype=array.dtype)
    run_of = np.searchsorted([run[0] for run in runs], idx // cw, side="right") - 1 if runs else idx
    for r, run in enumerate(runs):  # each run's windows copied straight from its chunks into place (one copy)
        lo, hi = int(run[0]) * cw, int(min((int(run[-1]) + 1) * cw, array.shape[0]))
        rows = np.flatnonzero(run_of == r)
        out[rows] = array[lo:hi][idx[rows] - lo]
    return out


def span_hash(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2^64) of every n-token span along the last axis: (..., L) -> (..., L - n + 1)."""
    ids = np.asarray(ids, dtype=np.uint64)
    width = ids.shape[-1] - n + 1
    h = np.zeros(ids.shape[:-1] + (max(width, 0),), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * np.uint64(1_000_003) + ids[..., i : i + width] + np.uint64(1)
    return h


class CacheReader:
    """A finished store, read-only. `allow_incomplete=True` is for `info` and `verify` only.

    Refuses (GooseError) a store whose attributes fail their checksum, whose tail temperatures are unusable,
    or that lacks a stored object it needs (only the blocks marked done when incomplete); `check=False`
    (for `verify`, which reports them all) leaves the last two to `integrity_problems()`.
    """

    def __init__(self, url: str, *, storage_options: dict | None = None, allow_incomplete: bool = False,
                 check: bool = True):
        self.url = url
        self.storage_options = storage_options
        self.group, self.meta = open_store_group(url, storage_options)
        version = self.meta.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise GooseError(f"store {url} has schema version {version}; this goose reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (v2 and later store exact top-k "
                             f"log-probabilities and tail log-masses): {_REBUILD}")
        if not self.meta.get("complete") and not allow_incomplete:
            raise GooseError(f"store {url} is not complete (cache-teacher was interrupted); rerun it to finish")
        try:
            self.spec = StoreSpec.from_attrs(self.meta["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GooseError(f"store {url} has a damaged spec attribute ({type(exc).__name__}: {exc}); {_REBUILD}") from None
        problem = tail_temperature_problem(self.spec.tail_temperatures)
        if problem:
            raise GooseError(f"store {url} is unusable: {problem}; {_REBUILD} with valid --tail-temperatures")
        self.provenance = dict(self.meta.get("provenance", {}))
        if check:
            problems = self._open_problems()
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                raise GooseError(f"store {url}: {problems[0]}{more}; run `goose cache verify` on it, and {_REBUILD}")

    # ---- integrity ---------------------------------------------------------------------------
    @property
    def has_checksums(self) -> bool:
        return "attrs_crc32" in self.meta

    def integrity_problems(self) -> list[str]:
        """What a listing of the store shows wrong: edited attributes, missing objects (for an incomplete
        store, only those of blocks marked done). Each names the array and the chunk."""
        problems = self._attrs_problems()
        problems += [f"{name} {what} is missing ({key})" for name, key, what in self.missing_objects()]
        return problems

    def _attrs_problems(self) -> list[str]:
        if self.has_checksums and attrs_checksum(self.meta) != self.meta["attrs_crc32"]:
            return ["its attributes (schema, spec, provenance, checksums) do not match their checksum: "
                    "edited or damaged"]
        return []

    def _open_problems(self) -> list[str]:
        """integrity_problems(), without the listing for a complete store that passed it in this process."""
        key = self._presence_key()
        if key is not None and key in _PRESENT:
            return self._attrs_problems()  # (the key holds the attributes: they passed when it was added)
        problems = self.integrity_problems()
        if not problems and key is not None:
            _PRESENT.add(key)
        return problems

    def _presence_key(self) -> tuple | None:
        """What identifies this store's present state to the per-process cache: None (always list) for an
        incomplete store, whose required objects grow as blocks are done."""
        if not self.complete:
            return None
        files = StoreFiles(self.url, self.storage_options)
        root = None
        if files.local:  # a store rebuilt at the same path has a new root zarr.json
            try:
                st = os.stat(os.path.join(files.root, "zarr.json"))
                root = (os.path.abspath(files.root), st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                return None
        attrs = json.dumps(self.meta, sort_keys=True, default=str)
        options = json.dumps(self.storage_options, sort_keys=True, default=str)
        return self.url, options, root, attrs

    def missing_objects(self) -> list[tuple[str, str, str]]:
        present = StoreFiles(self.url, self.storage_options).keys()
        return [obj for obj in self.required_objects() if obj[1] not in present]

    def required_objects(self) -> list[tuple[str, str, str]]:
        """(array, store key, description) of every stored object a reader of this store needs."""
        required = []
        if self.complete:
            blocks = range(self.spec.n_blocks)
        else:
            required.append((PROGRESS_ARRAY, f"{PROGRESS_ARRAY}/zarr.json", "metadata"))
            blocks = [b for b in np.flatnonzero(self.blocks_done())] if PROGRESS_ARRAY in self.group else []
        for name in self.spec.arrays():
            if name not in self.group:
                required.append((name, f"{name}/zarr.json", "metadata"))
                continue
            array = self.group[name]
            required.append((name, f"{array.path}/zarr.json", "metadata"))
            required += [(name, block_key(array, int(b)), self.where(int(b))) for b in blocks]
        if self.complete:
            once = (self.meta.get("checksums") or {}).get("once")
            if once is not None:  # v3: the finalize recorded exactly which objects it wrote
                required += [(key.split("/c/")[0], key, "chunk") for key in once]
            else:  # v2: whatever the group lists
                for array in self._once_arrays():
                    required += [(array.path, key, "chunk") for key in array_keys(array)[1:]]
        return required

    def _once_arrays(self) -> list:
        arrays = [self.group[EMBEDDING_ARRAY]] if EMBEDDING_ARRAY in self.group else []
        if TOKENIZER_GROUP in self.group:
            arrays += [arr for _, arr in self.group[TOKENIZER_GROUP].arrays()]
        return arrays

    def where(self, block: int) -> str:
        """How messages name a block: a chunk, or a shard with --shard-chunks, with its windows."""
        start, stop = self.spec.block_range(block)
        return f"{'shard' if self.spec.shard_chunks > 1 else 'chunk'} {block} (windows {start}-{stop - 1})"

    def _unreadable(self, name: str, chunks, exc: Exception) -> GooseError:
        """A GooseError naming the first chunk of `name` among `chunks` that fails to read on its own."""
        array = self.group[name]
        cw = array.chunks[0] if array.ndim else 1
        for c in chunks:
            start, stop = c * cw, min((c + 1) * cw, array.shape[0])
            try:
                array[start:stop]
            except Exception as chunk_exc:  # noqa: BLE001 - any codec error means a damaged chunk
                unit = "windows" if name in self.spec.arrays() else "rows"
                exc, where = chunk_exc, f"chunk {c} ({unit} {start}-{stop - 1})"
                break
        else:
            where = f"chunks {min(chunks)}-{max(chunks)}" if len(chunks) else "a chunk"
        first = str(exc).splitlines()[0] if str(exc) else ""
        return GooseError(f"store {self.url}: {name} {where} cannot be read ({type(exc).__name__}: {first}); "
                          f"the store is damaged: run `goose cache verify` on it, and {_REBUILD}")

    def _get(self, name: str, rows, read):
        """read(array), turning a codec error (truncated or corrupt chunk) into a GooseError naming it."""
        array = self.group[name]
        try:
            return read(array)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - zstd, blosc and shape errors all mean a damaged chunk
            cw = array.chunks[0] if array.ndim else 1
            chunks = sorted({int(r) // cw for r in rows}) if rows is not None else list(range(array.cdata_shape[0]))
            raise self._unreadable(name, chunks, exc) from None

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def n_windows(self) -> int:
        return self.spec.n_windows

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def fields(self) -> list[str]:
        return list(self.spec.arrays())

    def array(self, name: str):
        return self.group[name]

    def blocks_done(self) -> np.ndarray:
        return self.group[PROGRESS_ARRAY][:]

    def teacher_embedding(self, *, check: bool = True) -> np.ndarray:
        """The teacher's input embedding, after checking its stored bytes against their recorded crc32
        (`check=False` for `verify`, which reports checksums on its own)."""
        if EMBEDDING_ARRAY not in self.group:
            raise GooseError(f"store {self.url} has no teacher embedding (not complete?)")
        if check:
            self._check_once(EMBEDDING_ARRAY)
        return self._get(EMBEDDING_ARRAY, None, lambda a: a[:])

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files as stored at cache time (empty for stores made before this), each
        checked against its recorded crc32 first: a damaged file that still decodes would otherwise be copied
        into every student saved from this store."""
        if TOKENIZER_GROUP not in self.group:
            return {}
        group = self.group[TOKENIZER_GROUP]
        out = {}
        for name, _ in sorted(group.arrays()):
            path = f"{TOKENIZER_GROUP}/{name}"
            self._check_once(path)
            out[name] = bytes(self._get(path, None, lambda a: a[:]).tobytes())
        return out

    def _check_once(self, name: str) -> None:
        """Compare each stored object of once-per-store array `name` with the crc32 the finalize recorded
        (`checksums.once`); a GooseError naming the array and object if one is missing or differs. Stores
        with no record (schema v2, or not finalized) are read unchecked, as before."""
        once = (self.meta.get("checksums") or {}).get("once")
        if not self.complete or once is None:
            return
        files = StoreFiles(self.url, self.storage_options)
        for key in array_keys(self.group[name])[1:]:
            data = files.read(key)
            if data is None:
                what = "is missing"
            elif key not in once:
                what = "has no recorded checksum (added after the store was finalized)"
            elif checksum(data) != once[key]:
                what = "does not match its checksum (its stored bytes changed since writing)"
            else:
                continue
            raise GooseError(f"store {self.url}: {name} ({key}) {what}; the store is damaged: run "
                             f"`goose cache verify` on it, and {_REBUILD}")

    def save_tokenizer(self, folder) -> bool:
        """Write the stored tokenizer files into `folder` (loadable with AutoTokenizer); False if none."""
        from pathlib import Path

        files = self.tokenizer_files()
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return bool(files)

    # ---- windows -----------------------------------------------------------------------------
    def read(self, start: int, stop: int, fields: Sequence[str] | None = None, *, dequantize: bool = True):
        """Windows [start, stop) as a dict of numpy arrays; unless dequantize=False, as the loss takes them
        whatever the encoding: top-k ids and their log-probabilities at T=1 (float32; by probability in a
        fixed16 store, by id in a compact one), hidden states as float32 at full width (int8 scaled back, PCA
        coordinates mapped back through the stored basis; `pca_basis()` gives the basis itself)."""
        fields = list(fields) if fields is not None else self._default_fields()
        rows = range(start, min(stop, self.n_windows))

        def get(name):
            return self._get(name, rows, lambda a: a[start:stop])

        out = {name: get(name) for name in fields}
        return self._dequantize(out, get) if dequantize else out

    def read_indices(self, indices: Sequence[int], fields: Sequence[str] | None = None, *, dequantize: bool = True):
        """Windows at arbitrary indices, in the order given (each storage chunk they touch read whole, once)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_windows):
            raise IndexError(f"window index out of range [0, {self.n_windows})")

        def get(name):
            return self._get(name, idx, lambda a: gather_windows(a, idx))

        fields = list(fields) if fields is not None else self._default_fields()
        out = {name: get(name) for name in fields}
        return self._dequantize(out, get) if dequantize else out

    def iter_chunks(
        self, fields: Sequence[str] | None = None, *, shuffle: bool = False, seed: int = 0, dequantize: bool = True
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (first window, arrays) one storage chunk at a time, in seeded shuffled order if asked."""
        cw = self.spec.chunk_windows
        starts = np.arange(0, self.n_windows, cw)
        if shuffle:
            starts = np.random.default_rng(seed).permutation(starts)
        for start in starts:
            start = int(start)
            yield start, self.read(start, min(start + cw, self.n_windows), fields, dequantize=dequantize)

    def span_hashes(self, n: int = 32, stride: int = 8) -> np.ndarray:
        """Sorted unique hashes of the store's n-token spans starting every `stride` tokens inside each window
        (a content fingerprint: `eval` uses it to tell whether its text overlaps the store's)."""
        parts = []
        for _, chunk in self.iter_chunks(["input_ids"]):
            ids = chunk["input_ids"].astype(np.uint64)
            starts = np.arange(0, ids.shape[1] - n + 1, stride)
            if len(starts):
                parts.append(span_hash(ids, n)[:, starts].reshape(-1))
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)

    # ---- helpers -----------------------------------------------------------------------------
    def _default_fields(self) -> list[str]:
        return [name for name in self.spec.arrays() if not name.startswith(("hidden_scale/", "hidden_channel_scale/"))]

    def _dequantize(self, out: dict, get) -> dict:
        """Stored encodings -> what the loss takes: top-k ids and float32 log-probabilities (fixed16 or
        compact), float32 hidden states at full width (int8 scaled back, PCA coordinates reconstructed)."""
        spec = self.spec
        if spec.topk_encoding == "compact" and ("topk_ids" in out or "topk_logprobs" in out):
            gaps = out["topk_ids"] if "topk_ids" in out else get("topk_ids")
            rel = out["topk_logprobs"] if "topk_logprobs" in out else get("topk_logprobs")
            tail = out["tail_logmass"] if "tail_logmass" in out else get("tail_logmass")
            ids, lp = decode_topk(gaps, rel, tail[..., spec.tail_temperatures.index(1.0)], spec.logprob_step)
            if "topk_ids" in out:
                out["topk_ids"] = ids
            if "topk_logprobs" in out:
                out["topk_logprobs"] = lp
        elif "topk_logprobs" in out:
            out["topk_logprobs"] = decode_logprobs(out["topk_logprobs"], spec.logprob_step)
        bases = self.pca_basis() if spec.hidden_pca_rank and any(
            hidden_name(layer) in out for layer in spec.hidden_layers) else {}
        for layer in spec.hidden_layers:
            name = hidden_name(layer)
            if name not in out:
                continue
            if spec.hidden_dtype == "int8":
                token = get(hidden_scale_name(layer)).astype(np.float32)
                channel = get(hidden_channel_scale_name(layer)).astype(np.float32)
                out[name] = out[name].astype(np.float32) * token[..., None] * channel[:, None, :]
            if layer in bases:
                mean, basis = bases[layer]
                out[name] = (out[name].astype(np.float32) @ basis + mean).astype(np.float32)
        return out

    def pca_basis(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """layer -> (mean (d,), basis (r, d)) of a store with hidden-state PCA (empty dict otherwise): the
        stored coordinates c of a token give its state as mean + c @ basis. Read once per reader, checked
        against the finalize's checksums like the other once-per-store arrays."""
        if not self.spec.hidden_pca_rank:
            return {}
        if getattr(self, "_pca", None) is None:
            bases = {}
            for layer in self.spec.hidden_layers:
                parts = []
                for name in (pca_mean_name(layer), pca_basis_name(layer)):
                    if name not in self.group:
                        raise GooseError(f"store {self.url} has no {name} (its PCA basis); {_REBUILD}")
                    self._check_once(name)
                    parts.append(self._get(name, None, lambda a: a[:]).astype(np.float32))
                bases[layer] = tuple(parts)
            self._pca = bases
        return self._pca

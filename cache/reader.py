"""Read-only access to a finished teacher-cache store: metadata, windows by index, chunk-order iteration.

Opened with mode "r", so any number of training runs can read one store at the same time and none can
change it. Reads are whole windows; batches are gathered chunk by chunk because zarr reads whole chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import zarr

from ..errors import GooseError
from .schema import (
    EMBEDDING_ARRAY,
    GOOSE_ATTR,
    PROGRESS_ARRAY,
    TOKENIZER_GROUP,
    StoreSpec,
    SCHEMA_VERSION,
    decode_logprobs,
    hidden_channel_scale_name,
    hidden_name,
    hidden_scale_name,
)


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
    """A finished store, read-only. `allow_incomplete=True` is for `info` and `verify` only."""

    def __init__(self, url: str, *, storage_options: dict | None = None, allow_incomplete: bool = False):
        self.url = url
        self.group, self.meta = open_store_group(url, storage_options)
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise GooseError(f"store {url} has schema version {version}; this goose reads version {SCHEMA_VERSION} "
                             f"(v2 stores exact top-k log-probabilities and tail log-masses): rebuild it with "
                             f"goose cache-teacher")
        if not self.meta.get("complete") and not allow_incomplete:
            raise GooseError(f"store {url} is not complete (cache-teacher was interrupted); rerun it to finish")
        self.spec = StoreSpec.from_attrs(self.meta["spec"])
        self.provenance = dict(self.meta.get("provenance", {}))

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

    def teacher_embedding(self) -> np.ndarray:
        if EMBEDDING_ARRAY not in self.group:
            raise GooseError(f"store {self.url} has no teacher embedding (not complete?)")
        return self.group[EMBEDDING_ARRAY][:]

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files as stored at cache time (empty for stores made before this)."""
        if TOKENIZER_GROUP not in self.group:
            return {}
        group = self.group[TOKENIZER_GROUP]
        return {name: bytes(arr[:].tobytes()) for name, arr in group.arrays()}

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
        """Windows [start, stop) as a dict of numpy arrays; top-k log-probabilities and int8 hidden states
        come back as float32 unless dequantize=False."""
        fields = list(fields) if fields is not None else self._default_fields()
        out = {name: self.group[name][start:stop] for name in fields}
        return self._dequantize(out, lambda name: self.group[name][start:stop]) if dequantize else out

    def read_indices(self, indices: Sequence[int], fields: Sequence[str] | None = None, *, dequantize: bool = True):
        """Windows at arbitrary indices, in the order given (one orthogonal read per array)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_windows):
            raise IndexError(f"window index out of range [0, {self.n_windows})")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))

        def get(name):
            return self.group[name].oindex[sorted_idx][inverse]

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
        """Stored encodings -> float32: fixed-point top-k log-probabilities, int8 hidden states."""
        if "topk_logprobs" in out:
            out["topk_logprobs"] = decode_logprobs(out["topk_logprobs"], self.spec.logprob_step)
        if self.spec.hidden_dtype != "int8":
            return out
        for layer in self.spec.hidden_layers:
            name = hidden_name(layer)
            if name in out:
                token = get(hidden_scale_name(layer)).astype(np.float32)
                channel = get(hidden_channel_scale_name(layer)).astype(np.float32)
                out[name] = out[name].astype(np.float32) * token[..., None] * channel[:, None, :]
        return out

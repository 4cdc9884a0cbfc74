"""Corpus -> packed token windows: load with `datasets`, tokenise in batches, join documents with EOS, pack.

Local text files are read one document per file, and WikiExtractor `<doc ...>` ... `</doc>` markup (as in
`shared/data/enwiki-wikiextractor-2015`) splits a file into its articles and is removed.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import GooseError

_BUILDERS = {"": "text", ".txt": "text", ".text": "text", ".raw": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".csv": "csv"}
_DOC_OPEN = re.compile(r"^<doc\b[^>]*>\s*$", re.MULTILINE)
_DOC_CLOSE = re.compile(r"^</doc>\s*$", re.MULTILINE)


@dataclass(frozen=True)
class DataSpec:
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    data_files: tuple[str, ...] = field(default_factory=tuple)
    text_column: str = "text"

    def describe(self) -> dict:
        d = asdict(self)
        d["data_files"] = [os.path.abspath(p) for p in self.data_files]
        return d


def _builder_for(files: tuple[str, ...]) -> str:
    kinds = set()
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise GooseError(f"unsupported data file type {ext!r} for {path} (txt or no extension, json, jsonl, parquet, csv)")
        kinds.add(_BUILDERS[ext])
    if len(kinds) > 1:
        raise GooseError(f"data files mix formats ({', '.join(sorted(kinds))}); pass one kind at a time")
    return kinds.pop()


def load_texts(spec: DataSpec):
    """A `datasets.Dataset` with the text column, from the hub or from local files."""
    import datasets

    datasets.disable_progress_bars()
    if bool(spec.dataset) == bool(spec.data_files):
        raise GooseError("give exactly one of --dataset or --data-files")
    try:
        if spec.data_files:
            missing = [p for p in spec.data_files if not os.path.isfile(p)]
            if missing:
                raise GooseError(f"data file not found: {missing[0]}")
            if spec.split not in (None, "train"):
                raise GooseError("--split does not apply to --data-files (local files form one 'train' split)")
            builder = _builder_for(spec.data_files)
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=list(spec.data_files), split="train", **kwargs)
        else:
            ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split or "train")
    except GooseError:
        raise
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "split" in msg.lower():
            raise GooseError(f"unknown split {spec.split!r} for {spec.dataset}: {msg}") from None
        raise GooseError(f"cannot load data: {msg}") from None
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for missing/unreachable data
        where = spec.dataset or ", ".join(spec.data_files)
        raise GooseError(
            f"cannot load dataset {where!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            + ("" if spec.data_files else " (offline? use --data-files with local files)")
        ) from None
    if spec.text_column not in ds.column_names:
        raise GooseError(f"no column {spec.text_column!r} in the data (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise GooseError("the data is empty")
    return ds


def split_documents(text: str) -> list[str]:
    """Split WikiExtractor markup into articles (tags removed); other text is one document."""
    if not _DOC_OPEN.search(text):
        return [text]
    docs = []
    for part in _DOC_OPEN.split(text):
        part = _DOC_CLOSE.sub("", part).strip("\n")
        if part.strip():
            docs.append(part)
    return docs


def tokenize_and_pack(
    ds, tokenizer, *, text_column: str, seq_len: int, max_tokens: int | None = None, batch_docs: int = 256
) -> np.ndarray:
    """Token ids of every document followed by EOS, packed into (n_windows, seq_len) int64 windows.

    The ragged remainder (fewer than seq_len tokens) is dropped; `max_tokens` caps the total.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GooseError("the teacher's tokenizer has no EOS token to join documents with")
    cap = None if max_tokens is None else int(max_tokens)
    pieces, total = [], 0
    for start in range(0, len(ds), batch_docs):
        texts = [t for t in ds[start : start + batch_docs][text_column] if isinstance(t, str)]
        docs = [d for text in texts for d in split_documents(text) if d.strip()]
        if not docs:
            continue
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=np.int64))
            total += len(ids) + 1
        if cap is not None and total >= cap:
            break
    if total == 0:
        raise GooseError("the data holds no text")
    tokens = np.concatenate(pieces)
    if cap is not None:
        tokens = tokens[:cap]
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise GooseError(f"only {len(tokens)} tokens of data, fewer than one window of --seq-len {seq_len}")
    return tokens[: n_windows * seq_len].reshape(n_windows, seq_len)


def windows_fingerprint(windows: np.ndarray) -> str:
    """Content hash of the packed token windows: the store's data identity."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]

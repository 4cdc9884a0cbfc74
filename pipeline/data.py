"""Corpus -> packed token windows: load with `datasets` (streamed), tokenise in batches, join documents with EOS,
pack. `iter_windows` yields the windows lazily, so memory does not grow with the corpus; `count_windows` is
the counting pass that gives their number and fingerprint without keeping them in memory (`WindowSpill`
keeps them in a temporary file for stage one's teacher pass).

Local text files are read one document per file, and WikiExtractor `<doc ...>` ... `</doc>` markup (as in
`shared/data/enwiki-wikiextractor-2015`) splits a file into its articles and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import GooseError

_BUILDERS = {"": "text", ".txt": "text", ".text": "text", ".raw": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".csv": "csv"}
_DOC_OPEN = re.compile(r"^<doc\b[^>]*>\s*$", re.MULTILINE)
_DOC_CLOSE = re.compile(r"^</doc>\s*$", re.MULTILINE)
PRETOKENIZED_COLUMN = "input_ids"  # --text-column input_ids: rows hold token ids and a per-token mask column
MASK_COLUMN = "loss_mask"


@dataclass(frozen=True)
class DataSpec:
    """A corpus: a hub dataset or local files. Each field's metadata is its command-line help."""

    dataset: str | None = field(default=None, metadata={"help": "Hub dataset name (e.g. wikitext); or use "
                                                                 "--data-files."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. "
                                                                        "wikitext-103-raw-v1)."})
    split: str | None = field(default=None, metadata={"help": "Dataset split [default: train]."})
    data_files: tuple[str, ...] = field(default_factory=tuple, metadata={
        "help": "Local txt/json/jsonl/parquet/csv files (repeat the option).", "cli": "multiple"})
    text_column: str = field(default="text", metadata={
        "help": "Column holding the text (json/parquet/csv); the prompt with --response-column; 'input_ids' for "
                "pre-tokenised rows with a per-token 'loss_mask' column."})
    # masked (instruction) data: text_column is the prompt and this column the response; only the response
    # (and its EOS) is trained on. None: plain text, no mask (see `iter_windows`)
    response_column: str | None = field(default=None, metadata={
        "help": "Column holding the response of prompt/response rows: the store keeps a loss mask and stage two "
                "trains only on response tokens (and their EOS) [default: none, plain text]."})

    @property
    def masked(self) -> bool:
        """Whether the windows carry a loss mask: prompt/response rows, or pre-tokenised rows (text column
        `input_ids`) with a `loss_mask` column."""
        return self.response_column is not None or self.text_column == PRETOKENIZED_COLUMN

    def describe(self) -> dict:
        d = asdict(self)
        d["data_files"] = [os.path.abspath(p) for p in self.data_files]
        if self.response_column is None:  # plain data: the provenance stores made before masks had
            del d["response_column"]
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


def load_texts(spec: DataSpec, *, cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` with the text column, from the hub or from local files (all of it; local files are
    held in memory unless `cache_dir` is given: see `open_texts`)."""
    return open_texts(spec, streaming=False, cache_dir=cache_dir)


def open_texts(spec: DataSpec, *, streaming: bool = True, cache_dir: str | os.PathLike | None = None):
    """The data as a `datasets` dataset with the text column. With `streaming` (the default, and what
    `cache-teacher` and `eval` use for local files) an `IterableDataset`: hub datasets are streamed and local
    files read lazily, so nothing is downloaded, converted or held whole; iterating it again reads it again, in
    the same order.

    Local files never leave a copy in the user's datasets cache (~/.cache/huggingface/datasets, which `datasets`
    would fill with an Arrow copy of every file, and lock files even when streaming): with `cache_dir` the
    Arrow copy goes there (e.g. under a command's output folder, reused by the next load); without it
    `datasets` works in a private temporary folder that is removed before this returns, and a non-streamed
    dataset is held in memory. Hub datasets use `cache_dir`, else the user's datasets cache as usual (where
    their downloads live)."""
    import datasets

    datasets.disable_progress_bars()
    if bool(spec.dataset) == bool(spec.data_files):
        raise GooseError("give exactly one of --dataset or --data-files")
    scratch = tempfile.mkdtemp(prefix="goose-datasets-") if spec.data_files and cache_dir is None else None
    where = {"cache_dir": str(scratch or cache_dir)} if (scratch or cache_dir) else {}
    if scratch and not streaming:
        where["keep_in_memory"] = True  # the Arrow files in the scratch folder go with it
    try:
        return _load(spec, streaming, where)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _load(spec: DataSpec, streaming: bool, cache_kwargs: dict):
    import datasets

    try:
        if spec.data_files:
            missing = [p for p in spec.data_files if not os.path.isfile(p)]
            if missing:
                raise GooseError(f"data file not found: {missing[0]}")
            if spec.split not in (None, "train"):
                raise GooseError("--split does not apply to --data-files (local files form one 'train' split)")
            builder = _builder_for(spec.data_files)
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=list(spec.data_files), split="train", streaming=streaming,
                                       **kwargs, **cache_kwargs)
        else:
            ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split or "train",
                                       streaming=streaming, **cache_kwargs)
        columns = ds.column_names if ds.column_names is not None else _first_columns(ds)
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
    if columns is None:
        raise GooseError("the data is empty")
    if spec.text_column not in columns:
        raise GooseError(f"no column {spec.text_column!r} in the data (columns: {', '.join(columns)})")
    if spec.response_column is not None and spec.response_column not in columns:
        raise GooseError(f"no column {spec.response_column!r} (--response-column) in the data "
                         f"(columns: {', '.join(columns)})")
    if spec.response_column is None and spec.text_column == PRETOKENIZED_COLUMN and MASK_COLUMN not in columns:
        raise GooseError(f"pre-tokenised rows (--text-column {PRETOKENIZED_COLUMN}) need a {MASK_COLUMN!r} column "
                         f"(columns: {', '.join(columns)})")
    if not streaming and len(ds) == 0:
        raise GooseError("the data is empty")
    return ds


def _first_columns(ds) -> list[str] | None:
    """An IterableDataset that does not know its columns: those of its first row (None: no rows)."""
    for row in ds:
        return list(row)
    return None


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


def _text_batches(ds, text_column: str, batch_docs: int):
    """Lists of up to batch_docs texts, in order, from a Dataset (sliced) or an IterableDataset (streamed)."""
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        for start in range(0, len(ds), batch_docs):
            yield ds[start : start + batch_docs][text_column]
        return
    batch = []
    for row in ds:
        batch.append(row.get(text_column))
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_windows(
    ds, tokenizer, *, text_column: str, seq_len: int, max_tokens: int | None = None, batch_docs: int = 256,
    response_column: str | None = None, with_mask: bool = False,
):
    """The packed windows, lazily: (n, seq_len) int64 arrays, in order, holding one batch of documents and
    the unfinished window at a time, so memory is flat in the corpus size.

    Token ids of every document followed by EOS, cut into seq_len windows; the ragged remainder (fewer than
    seq_len tokens) is dropped and `max_tokens` caps the total (only whole windows are kept). A deterministic
    function of the data and the tokenizer: the same windows on every pass.

    With `with_mask` it yields (windows, loss_mask) pairs instead: loss_mask is None for plain text, and for
    masked data (`response_column`, or pre-tokenised rows: see `iter_masked_windows`) a (n, seq_len) uint8
    array packed with the windows."""
    masked = response_column is not None or text_column == PRETOKENIZED_COLUMN
    if with_mask and masked:
        yield from iter_masked_windows(ds, tokenizer, text_column=text_column, response_column=response_column,
                                       seq_len=seq_len, max_tokens=max_tokens, batch_docs=batch_docs)
        return
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GooseError("the teacher's tokenizer has no EOS token to join documents with")
    room = None if max_tokens is None else int(max_tokens) // seq_len  # windows still allowed
    carry = np.zeros(0, dtype=np.int64)
    for texts in _text_batches(ds, text_column, batch_docs):
        docs = [d for t in texts if isinstance(t, str) for d in split_documents(t) if d.strip()]
        if not docs:
            continue
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        pieces = [carry] + [np.asarray(x + [eos], dtype=np.int64) for x in ids]
        tokens = np.concatenate(pieces)
        n = len(tokens) // seq_len
        if room is not None:
            n = min(n, room)
            room -= n
        if n:
            yield (tokens[: n * seq_len].reshape(n, seq_len), None) if with_mask else \
                tokens[: n * seq_len].reshape(n, seq_len)
        if room == 0:
            return
        carry = tokens[n * seq_len :].copy()


def _row_batches(ds, columns: tuple[str, ...], batch_docs: int):
    """Lists of up to batch_docs rows (tuples of the given columns), in order, sliced or streamed."""
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        for start in range(0, len(ds), batch_docs):
            part = ds[start : start + batch_docs]
            yield list(zip(*(part[c] for c in columns)))
        return
    batch = []
    for row in ds:
        batch.append(tuple(row.get(c) for c in columns))
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def _masked_documents(ds, tokenizer, text_column: str, response_column: str | None, batch_docs: int):
    """Batches of documents as (token ids, target flags) int64/uint8 arrays, EOS included. A target flag is
    1 on a token that is trained on (predicted from the tokens before it): the response tokens and the EOS
    after them for prompt/response rows (prompt tokens 0); for pre-tokenised rows their `loss_mask` as given,
    and the appended EOS takes the flag of the row's last token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GooseError("the teacher's tokenizer has no EOS token to join documents with")
    if response_column is not None:
        for rows in _row_batches(ds, (text_column, response_column), batch_docs):
            rows = [(p if isinstance(p, str) else "", r) for p, r in rows if isinstance(r, str) and r]
            if not rows:
                continue
            prompts = tokenizer([p for p, _ in rows], add_special_tokens=False, verbose=False)["input_ids"]
            answers = tokenizer([r for _, r in rows], add_special_tokens=False, verbose=False)["input_ids"]
            yield [(np.asarray(p + r + [eos], dtype=np.int64),
                    np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(r) + 1, np.uint8)]))
                   for p, r in zip(prompts, answers)]
        return
    vocab = len(tokenizer)
    for rows in _row_batches(ds, (text_column, MASK_COLUMN), batch_docs):
        docs = []
        for ids, mask in rows:
            if ids is None or len(ids) == 0:
                continue
            ids = np.asarray(ids, dtype=np.int64)
            mask = np.asarray(mask if mask is not None else [], dtype=np.int64)
            if ids.ndim != 1 or mask.shape != ids.shape:
                raise GooseError(f"a pre-tokenised row has {ids.size} {text_column} but {mask.size} {MASK_COLUMN} "
                                 f"values (one 0/1 per token is needed)")
            if ids.min() < 0 or ids.max() >= vocab:
                raise GooseError(f"a pre-tokenised row holds token id {int(ids.max() if ids.max() >= vocab else ids.min())}"
                                 f", outside the teacher tokenizer's vocabulary of {vocab}")
            if not np.isin(mask, (0, 1)).all():
                raise GooseError(f"{MASK_COLUMN} values must be 0 or 1")
            docs.append((np.append(ids, eos), np.append(mask, mask[-1]).astype(np.uint8)))
        if docs:
            yield docs


def iter_masked_windows(ds, tokenizer, *, text_column: str, response_column: str | None, seq_len: int,
                        max_tokens: int | None = None, batch_docs: int = 256):
    """(windows (n, L) int64, loss_mask (n, L) uint8) of masked data, packed like `iter_windows` (the same
    windows as plain packing of the same token stream). loss_mask[w, t] = 1 when the prediction made at
    position t, i.e. of the stream's next token (position t + 1, or the first token of the next window at
    t = L - 1), counts: it is the target flag of that next token (`_masked_documents`). So the prediction
    at an EOS of the next document's first (prompt) token is 0, at the last prompt token of the first response
    token 1. The last window of the stream has no next token after it: its last position is 0."""
    room = None if max_tokens is None else int(max_tokens) // seq_len
    carry, carry_flags = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)

    def cut(tokens, flags, n):
        shifted = np.append(flags[1 : n * seq_len + 1], np.zeros(max(0, n * seq_len + 1 - len(flags)), np.uint8))
        return tokens[: n * seq_len].reshape(n, seq_len), shifted.reshape(n, seq_len).astype(np.uint8)

    for docs in _masked_documents(ds, tokenizer, text_column, response_column, batch_docs):
        tokens = np.concatenate([carry] + [d[0] for d in docs])
        flags = np.concatenate([carry_flags] + [d[1] for d in docs])
        n = (len(tokens) - 1) // seq_len  # a window leaves the batch once the token after it is known
        if room is not None:
            n = min(n, room)
            room -= n
        if n:
            yield cut(tokens, flags, n)
        if room == 0:
            return
        carry, carry_flags = tokens[n * seq_len :].copy(), flags[n * seq_len :].copy()
    if len(carry) >= seq_len and room != 0:  # exactly one whole window left, with nothing after it
        yield cut(carry, carry_flags, 1)


class WindowSpill:
    """The counting pass's windows (and loss masks) in local temporary files, read back in batches by the
    teacher pass: the corpus is tokenised (and, for a hub stream, downloaded) once instead of twice. At
    GPT-2 scale tokenising again cost ~4 % of the teacher's forward on two CPU threads (bench/
    bench_cache_teacher.py). 2 bytes a token (uint16 ids where the vocabulary allows, else int32; one more
    for a mask), written and read in batches with plain file I/O, so memory stays flat in the corpus size
    (a memory map would count every page read in the resident set; a TMPDIR on tmpfs is memory, though:
    point TMPDIR at a disk for a large corpus). Every process of a torchrun job keeps its own copy. The files
    are unlinked as they are created (`tempfile.TemporaryFile`), so their space is freed however the process
    ends, a kill included; nothing is ever left behind in `directory` (TMPDIR by default)."""

    def __init__(self, seq_len: int, vocab: int, masked: bool, directory: str | None = None):
        self.seq_len, self.n_windows = seq_len, 0
        self.dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)
        self._sizes: list[int] = []  # windows per appended batch: read back in the same batches, since a
        # masked fingerprint interleaves each batch's windows and mask (`fingerprint_update`)
        self._where = directory or tempfile.gettempdir()
        self._ids = self._mask = None
        with self._io("create"):
            self._ids = tempfile.TemporaryFile(prefix="goose-windows-", dir=directory)
            self._mask = tempfile.TemporaryFile(prefix="goose-mask-", dir=directory) if masked else None

    def __enter__(self) -> "WindowSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except OSError as exc:
            raise GooseError(f"cannot {what} the temporary copy of the token windows in {self._where} "
                             f"({exc.strerror or exc}; it takes 2 bytes a token): free space there or point "
                             f"TMPDIR at a disk with room") from None

    def append(self, windows: np.ndarray, mask: np.ndarray | None) -> None:
        if windows.size and (windows.min() < 0 or windows.max() > np.iinfo(self.dtype).max):
            raise GooseError(f"a token id outside 0..{np.iinfo(self.dtype).max} cannot be spilled as {self.dtype}")
        with self._io("write"):
            self._ids.write(np.ascontiguousarray(windows, dtype=self.dtype).tobytes())
            if self._mask is not None:
                self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self.n_windows += len(windows)
        self._sizes.append(len(windows))

    def batches(self):
        """(windows (n, seq_len) int64, loss_mask (n, seq_len) uint8 or None): the batches appended, in order."""
        row = self.seq_len * self.dtype.itemsize
        with self._io("read"):
            for f in (self._ids, self._mask):
                if f is not None:
                    f.flush()
                    f.seek(0)
        for n in self._sizes:
            with self._io("read"):
                ids = np.frombuffer(self._ids.read(n * row), dtype=self.dtype)
                mask = None if self._mask is None else np.frombuffer(self._mask.read(n * self.seq_len), np.uint8)
            if ids.size != n * self.seq_len or (mask is not None and mask.size != ids.size):
                raise GooseError(f"the temporary copy of the token windows in {self._where} was truncated while "
                                 f"this run read it")
            yield ids.astype(np.int64).reshape(n, self.seq_len), None if mask is None else mask.reshape(n, self.seq_len)

    def close(self) -> None:
        for f in (self._ids, self._mask):
            if f is not None:
                f.close()


def count_windows(ds, tokenizer, *, text_column: str, seq_len: int, max_tokens: int | None = None,
                  batch_docs: int = 256, response_column: str | None = None,
                  spill: WindowSpill | None = None) -> tuple[int, str]:
    """One streamed pass: how many windows `iter_windows` yields and their `windows_fingerprint` (the counting
    pass of `cache-teacher`, which must know the store's shape before it writes), keeping nothing in memory;
    with `spill` every window (and mask) also goes to that file, for the teacher pass to read back.
    For masked data the fingerprint covers the loss mask too (`fingerprint_update`)."""
    digest = hashlib.sha256()
    n_windows = 0
    for windows, mask in iter_windows(ds, tokenizer, text_column=text_column, seq_len=seq_len,
                                      max_tokens=max_tokens, batch_docs=batch_docs,
                                      response_column=response_column, with_mask=True):
        fingerprint_update(digest, windows, mask)
        n_windows += len(windows)
        if spill is not None:
            spill.append(windows, mask)
    if n_windows == 0:
        tokens = _count_tokens(ds, tokenizer, text_column, batch_docs, response_column)
        if tokens == 0:
            raise GooseError("the data holds no text")
        raise GooseError(f"only {tokens} tokens of data, fewer than one window of --seq-len {seq_len}")
    return n_windows, digest.hexdigest()[:16]


def fingerprint_update(digest, windows: np.ndarray, mask: np.ndarray | None) -> None:
    """Add one batch of windows (and their loss mask, for masked data) to a data fingerprint; plain data
    hashes exactly as before masks existed."""
    digest.update(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
    if mask is not None:
        digest.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())


def _count_tokens(ds, tokenizer, text_column: str, batch_docs: int, response_column: str | None = None) -> int:
    """All tokens of a corpus too short for one window (for the error message)."""
    if response_column is not None or text_column == PRETOKENIZED_COLUMN:
        return sum(len(d[0]) for docs in _masked_documents(ds, tokenizer, text_column, response_column, batch_docs)
                   for d in docs)
    total = 0
    for texts in _text_batches(ds, text_column, batch_docs):
        docs = [d for t in texts if isinstance(t, str) for d in split_documents(t) if d.strip()]
        if docs:
            total += sum(len(x) + 1 for x in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"])
    return total


def tokenize_and_pack(
    ds, tokenizer, *, text_column: str, seq_len: int, max_tokens: int | None = None, batch_docs: int = 256
) -> np.ndarray:
    """Every window of `iter_windows`, in memory: (n_windows, seq_len) int64 (for evaluation and benches;
    `cache-teacher` streams them instead)."""
    parts = list(iter_windows(ds, tokenizer, text_column=text_column, seq_len=seq_len, max_tokens=max_tokens,
                              batch_docs=batch_docs))
    if not parts:
        tokens = _count_tokens(ds, tokenizer, text_column, batch_docs)
        if tokens == 0:
            raise GooseError("the data holds no text")
        raise GooseError(f"only {tokens} tokens of data, fewer than one window of --seq-len {seq_len}")
    return np.concatenate(parts)


def windows_fingerprint(windows: np.ndarray) -> str:
    """Content hash of the packed token windows: the store's data identity."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]

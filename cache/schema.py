"""Store schema, version 4: the only place that says which arrays a teacher cache holds and how.

A store holds N windows of L tokens. Every per-window array is chunked along windows only, so a chunk
holds whole windows and a reader fetches a batch with a few large reads. Work is done (and resumed) in
*blocks*: one chunk, or one shard when sharding is on, so a block is always written by one writer in
one go.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..numerics import log1mexp

SCHEMA_VERSION = 4
# v1 kept raw fp16 top-k logits and the full logsumexp per T, and the tail bucket was their difference:
# at GPT-2's logit scale (-60 to -100, fp16 step 0.0625) that difference is rounding noise for confident
# tokens. v2 keeps what the loss needs directly: top-k log-probabilities and the tail log-mass per T.
# v3 adds checksums (CHECKSUM_ARRAY, and the "checksums" and "attrs_crc32" attributes); its data arrays are
# v2's, so v2 stores are still read (without checksums to verify against) but no longer written or resumed.
# v4 adds the compact top-k encoding (TOPK_ENCODINGS) and the optional PCA projection of hidden states; a v4
# store written with topk_encoding "fixed16" and no PCA has exactly v3's arrays. v2 and v3 stores are read as
# "fixed16" stores (their specs lack the new fields, whose defaults describe them).
# Still v4: the optional per-token `loss_mask` (masked instruction data, spec field loss_mask) is an extra
# array recorded in the spec and in the checksum record; a store without it (every store made before it) has
# exactly the arrays it had, and its spec attributes leave the field out (read as False: all tokens count).
READABLE_VERSIONS = (2, 3, 4)
GOOSE_ATTR = "goose"  # root attribute holding everything goose knows about a store
PROGRESS_ARRAY = "blocks_done"  # one uint8 per block, set only after the block's data is written
EMBEDDING_ARRAY = "teacher_embedding"
TOKENIZER_GROUP = "tokenizer"  # the teacher tokenizer's files, one uint8 array each, so a store is self-contained
CHECKSUM_ARRAY = "chunk_checksums"  # (n_blocks, n per-window arrays) int64: crc32 of each block's stored bytes
COMPRESSIONS = ("zstd", "blosc", "none")
HIDDEN_DTYPES = ("float16", "int8")
# How topk_ids / topk_logprobs are stored (see encode_topk):
#   fixed16: by probability, descending; ids as they are; log p at T=1 in uint16 fixed point (schema v2/v3)
#   compact: the top-1, then the rest by id as gaps (first id, then differences); log p relative to the top-1 in
#            uint16 fixed point of step `logprob_step` (default 1/16); tail_logmass rounded to `tail_keepbits`
#            mantissa bits (default 12). ~half the bytes at equal KD targets (docs/STORE.md)
TOPK_ENCODINGS = ("fixed16", "compact")
COMPACT_LOGPROB_STEP = 2.0**-4
COMPACT_TAIL_KEEPBITS = 12
PCA_BASIS_GROUP = "hidden_pca"  # hidden_pca/<layer>/mean (d,) and hidden_pca/<layer>/basis (r, d), float32


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str
    per_window: bool = True  # chunked along the first (window) axis


@dataclass(frozen=True)
class StoreSpec:
    """Everything that fixes a store's layout. Two runs with equal specs write identical stores."""

    n_windows: int
    seq_len: int
    vocab_size: int
    top_k: int
    tail_temperatures: tuple[float, ...]
    hidden_layers: tuple[int, ...] = ()
    hidden_size: int = 0
    hidden_dtype: str = "float16"
    samples: int = 0  # RS-KD draws per token; 0 = no samples stored
    chunk_windows: int = 16
    shard_chunks: int = 1  # chunks per shard; 1 = no sharding
    compression: str = "zstd"
    compression_level: int = 3
    logprob_step: float = 2.0**-10  # fixed-point step of topk_logprobs (see encode_logprobs)
    topk_encoding: str = "fixed16"  # TOPK_ENCODINGS; stores before v4 are fixed16
    tail_keepbits: int = 23  # mantissa bits kept of tail_logmass (23 = fp32 as computed)
    hidden_pca_rank: int = 0  # > 0: hidden states stored as this many principal components per layer
    loss_mask: bool = False  # a per-token loss_mask array (1: the prediction made at this position counts)

    def __post_init__(self) -> None:
        if self.topk_encoding not in TOPK_ENCODINGS:
            raise ValueError(f"topk encoding must be one of {TOPK_ENCODINGS}, got {self.topk_encoding!r}")
        if not 1 <= self.tail_keepbits <= 23:
            raise ValueError(f"tail_keepbits must be between 1 and 23, got {self.tail_keepbits}")
        if self.hidden_pca_rank < 0 or (self.hidden_layers and self.hidden_pca_rank > self.hidden_size):
            raise ValueError(f"hidden PCA rank must be between 0 and the hidden size {self.hidden_size}, "
                             f"got {self.hidden_pca_rank}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")

    # ---- derived layout ----------------------------------------------------------------------
    @property
    def token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"

    @property
    def count_dtype(self) -> str:
        return "uint8" if self.samples <= np.iinfo(np.uint8).max else "uint16"

    @property
    def hidden_width(self) -> int:
        """Stored width of each hidden layer: the PCA rank when projected, else the hidden size."""
        return self.hidden_pca_rank or self.hidden_size

    @property
    def block_windows(self) -> int:
        return self.chunk_windows * self.shard_chunks

    @property
    def n_blocks(self) -> int:
        return -(-self.n_windows // self.block_windows)

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.seq_len

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_windows
        return start, min(start + self.block_windows, self.n_windows)

    def arrays(self) -> dict[str, ArraySpec]:
        """Per-window arrays (name -> spec). The embedding and the progress array are listed apart."""
        n, L, k = self.n_windows, self.seq_len, self.top_k
        arrays = {
            "input_ids": ArraySpec((n, L), self.token_dtype),
            "topk_ids": ArraySpec((n, L, k), self.token_dtype),
            # fixed16: log p_i at T=1, sorted descending; compact: top-1 log p minus log p_i, by id (fixed point)
            "topk_logprobs": ArraySpec((n, L, k), "uint16"),
            "tail_logmass": ArraySpec((n, L, len(self.tail_temperatures)), "float32"),  # log p(not top-k) at T_j
            "gold_nll": ArraySpec((n, L), "float32"),
            "entropy": ArraySpec((n, L), "float16"),
        }
        if self.samples:
            arrays["sample_ids"] = ArraySpec((n, L, self.samples), self.token_dtype)
            arrays["sample_counts"] = ArraySpec((n, L, self.samples), self.count_dtype)
        for layer in self.hidden_layers:
            arrays[hidden_name(layer)] = ArraySpec((n, L, self.hidden_width), self.hidden_dtype)
            if self.hidden_dtype == "int8":  # h ~= q * token_scale * channel_scale
                arrays[hidden_scale_name(layer)] = ArraySpec((n, L), "float16")
                arrays[hidden_channel_scale_name(layer)] = ArraySpec((n, self.hidden_width), "float16")
        if self.loss_mask:  # last, so the checksum columns of the other arrays keep their places
            # loss_mask[w, t] = 1: the prediction made at position t (of token t + 1) counts (docs/STORE.md)
            arrays["loss_mask"] = ArraySpec((n, L), "uint8")
        return arrays

    def pca_specs(self) -> dict[str, ArraySpec]:
        """The PCA basis arrays (once per store, written with block 0): name -> spec; empty without PCA."""
        if not self.hidden_pca_rank:
            return {}
        out = {}
        for layer in self.hidden_layers:
            out[pca_mean_name(layer)] = ArraySpec((self.hidden_size,), "float32", per_window=False)
            out[pca_basis_name(layer)] = ArraySpec((self.hidden_pca_rank, self.hidden_size), "float32",
                                                   per_window=False)
        return out

    def embedding_spec(self) -> ArraySpec:
        return ArraySpec((self.vocab_size, self.hidden_size), "float16", per_window=False)

    def to_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["tail_temperatures"] = list(self.tail_temperatures)
        d["hidden_layers"] = list(self.hidden_layers)
        if not self.loss_mask:  # unmasked stores keep the attributes they had before masks existed
            del d["loss_mask"]
        return d

    @classmethod
    def from_attrs(cls, d: dict) -> "StoreSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {key: value for key, value in d.items() if key in fields}
        kw["tail_temperatures"] = tuple(float(t) for t in kw["tail_temperatures"])
        kw["hidden_layers"] = tuple(int(x) for x in kw.get("hidden_layers", ()))
        return cls(**kw)


# Top-k log-probabilities in uint16 fixed point: log p = -q * step, q in [0, 65535]. The default step 2^-10
# keeps log p in [-64, 0] to within 4.9e-4 nats (fp16 is 4x coarser at log p = -4 to -8, where most top-k
# entries sit). A log p below -64 is stored as -64: mass under 1.6e-28 at T = 1 and under 1.1e-7 per entry
# even re-tempered at T = 4, so the floor costs nothing at any stored temperature.
def encode_logprobs(logprobs: np.ndarray, step: float) -> np.ndarray:
    return np.rint(np.clip(-np.asarray(logprobs, dtype=np.float32), 0.0, 65535 * step) / step).astype(np.uint16)


def decode_logprobs(q: np.ndarray, step: float) -> np.ndarray:
    return q.astype(np.float32) * np.float32(-step)


# ---- the compact top-k encoding (schema v4) ------------------------------------------------------
# What the KD loss needs from the head is its inner distribution, softmax(log p_i / T), which depends only on
# the differences log p_1 - log p_i, and the exact tail log-mass at each stored T (kept separately). So the
# head is stored relative to its top-1 (rel_i = round((log p_1 - log p_i) / step), uint16) and the absolute
# log-probabilities are rebuilt from the tail at T=1: log p_i = -rel_i * step + log(1 - tail_1) -
# logsumexp_j(-rel_j * step), so head + tail = 1 exactly. The loss does not care about the order of the
# entries either, so after the top-1 (kept first, as its id: validation's top-1 agreement reads
# topk_ids[..., 0]) the other k - 1 are stored by id, ascending, as gaps (the smallest id, then differences
# >= 1): small numbers that compress to about half of the ids in probability order. The reader puts them
# back in probability order (the top-1 first; entries whose rounded log p tie, by id). A rounding error of
# at most step / 2 in every log p_i moves the bucket distribution by KL <= step^2 / 8 at T = 1 (Hoeffding;
# / T^2 at T), and on average by ~step^2 / 24 x (head mass) (measured on enwiki-tiny at T = 1: 7e-5 nats
# per token at step 1/16, 1.8e-5 at 1/32).
def encode_topk(ids: np.ndarray, logprobs: np.ndarray, step: float, id_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log p) in any order (..., k) -> compact (gaps, rel): the top-1 first, then the rest by id."""
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    top = lp.argmax(-1)[..., None]
    key = np.where(np.arange(ids.shape[-1]) == top, -1, ids)  # the top-1 sorts first, the rest by id
    order = np.argsort(key, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, -1)
    lp = np.take_along_axis(lp, order, -1)
    rel = np.rint((lp[..., :1] - lp) / step)
    gaps = ids.copy()
    gaps[..., 2:] = np.diff(ids[..., 1:], axis=-1)
    return gaps.astype(id_dtype), np.clip(rel, 0, 65535).astype(np.uint16)


def decode_topk(gaps: np.ndarray, rel: np.ndarray, tail_t1: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Compact (gaps, rel) and the stored tail log-mass at T=1 -> (ids, log p at T=1 as float32), by
    probability descending (the top-1 first, ties by id)."""
    g = gaps.astype(np.int64)
    ids = np.concatenate([g[..., :1], np.cumsum(g[..., 1:], axis=-1)], axis=-1)
    lp = rel.astype(np.float64) * -step
    m = lp.max(-1, keepdims=True)
    lse = m + np.log(np.exp(lp - m).sum(-1, keepdims=True))
    t = np.asarray(tail_t1, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_head = log1mexp(t)  # log(1 - tail), exact
    lp = lp - lse + log_head
    order = np.argsort(-lp, axis=-1, kind="stable")
    return (np.take_along_axis(ids, order, -1).astype(gaps.dtype),
            np.take_along_axis(lp, order, -1).astype(np.float32))


def fold_topk(logprobs: np.ndarray, tail_logmass: np.ndarray, temps, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage-adaptive k (measured by bench/bench_store_size.py, not a store format): keep per token only the
    shortest prefix of the top-k (log p at T=1, sorted descending) whose mass reaches `threshold` (all k if
    none does), and fold the rest into the tail at every stored T exactly: the head's mass at T_j is
    1 - tail_j, split by softmax(log p / T_j), so the dropped share moves to the tail in fp64.
    Returns (entries kept (...,), new tail log-masses (..., T) as float32)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    k = lp.shape[-1]
    keep = np.minimum((np.cumsum(np.exp(lp), -1) < threshold).sum(-1) + 1, k)
    dropped = np.arange(k) >= keep[..., None]
    tail = np.asarray(tail_logmass, dtype=np.float64)
    out = np.empty_like(tail)
    for j, t in enumerate(temps):
        z = lp / float(t)
        m = z.max(-1, keepdims=True)
        e = np.exp(z - m)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_frac = np.log(np.where(dropped, e, 0.0).sum(-1)) - np.log(e.sum(-1))
            tj = tail[..., j]
            log_head = log1mexp(tj)
        out[..., j] = np.logaddexp(tj, log_head + log_frac)
    return keep, out.astype(np.float32)


def round_mantissa(x: np.ndarray, keepbits: int) -> np.ndarray:
    """float32 rounded to nearest (ties to even) keeping `keepbits` of the 23 mantissa bits; the dropped bits
    become zeros, which the compressor then removes. Relative error <= 2^-(keepbits + 1); +-inf and NaN are
    kept as they are. For a log-mass x the mass changes by at most e^x |x| 2^-(keepbits + 1) <= 4.5e-5 at
    keepbits 12 (the worst x is -1)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if keepbits >= 23:
        return x
    drop = 23 - keepbits
    bits = x.view(np.uint32).astype(np.uint64)
    half = np.uint64((1 << (drop - 1)) - 1)
    rounded = ((bits + half + ((bits >> np.uint64(drop)) & np.uint64(1))) >> np.uint64(drop)) << np.uint64(drop)
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(x), out, x).astype(np.float32)


def tail_temperature_problem(temps) -> str | None:
    """Why these tail temperatures cannot serve the loss (None when they can). The loss interpolates the
    tail in 1/T with Lagrange weights, which divide by differences of 1/T: equal (or nearly equal) nodes
    make it divide by zero, and NaN, inf or T <= 0 make every interpolated value meaningless."""
    temps = [float(t) for t in temps]
    if not temps:
        return "no tail temperatures"
    if not all(math.isfinite(t) and t > 0 for t in temps):
        return f"tail temperatures must be finite positive numbers, got {temps}"
    if 1.0 not in temps:
        return f"tail temperatures must include 1 (coverage, entropy and RS-KD are defined at T=1), got {temps}"
    betas = sorted(1.0 / t for t in temps)
    if any(b - a < MIN_BETA_GAP for a, b in zip(betas, betas[1:])):
        return (f"tail temperatures repeat a temperature or are too close (1/T must differ by at least "
                f"{MIN_BETA_GAP:g}), got {temps}")
    return None


# Levels each codec accepts (zarr checks only when it first writes, after the teacher has loaded).
COMPRESSION_LEVELS = {"zstd": (1, 22), "blosc": (0, 9)}


def compression_level_problem(compression: str, level: int) -> str | None:
    if compression not in COMPRESSIONS:
        return f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
    lo, hi = COMPRESSION_LEVELS.get(compression, (level, level))
    if not lo <= level <= hi:
        return f"--compression-level for {compression} must be between {lo} and {hi}, got {level}"
    return None


# Lagrange weights scale like 1 / (gap in 1/T): below this the fp32 interpolation error grows past ~1e-3 nats.
MIN_BETA_GAP = 1e-3


HIDDEN_PREFIXES = ("hidden/", "hidden_scale/", "hidden_channel_scale/")  # a hidden layer's arrays, by layer


def hidden_name(layer: int) -> str:
    return f"hidden/{layer}"


def hidden_layer_of(name: str) -> int | None:
    """The teacher layer of a hidden-state array's name (`hidden_name`'s inverse); None for other arrays."""
    return int(name.split("/", 1)[1]) if name.startswith("hidden/") else None


def hidden_scale_name(layer: int) -> str:
    return f"hidden_scale/{layer}"


def hidden_channel_scale_name(layer: int) -> str:
    return f"hidden_channel_scale/{layer}"


def pca_mean_name(layer: int) -> str:
    return f"{PCA_BASIS_GROUP}/{layer}/mean"


def pca_basis_name(layer: int) -> str:
    return f"{PCA_BASIS_GROUP}/{layer}/basis"


def fit_pca(hidden: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), basis (rank, d)) of the token states hidden (..., d): the top principal directions, in
    fp64, each row of unit length, signs fixed (largest entry positive) so a refit gives the same basis."""
    h = np.asarray(hidden, dtype=np.float64).reshape(-1, hidden.shape[-1])
    mean = h.mean(0)
    cov = (h - mean).T @ (h - mean) / max(len(h) - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    basis = vecs[:, np.argsort(vals)[::-1][:rank]].T
    sign = np.sign(basis[np.arange(rank), np.abs(basis).argmax(1)])
    basis = basis * np.where(sign == 0, 1, sign)[:, None]
    return mean.astype(np.float32), basis.astype(np.float32)


def compressors(spec: StoreSpec):
    """zarr v3 compressor list for a spec."""
    import zarr

    if spec.compression == "none":
        return None
    if spec.compression == "zstd":
        return zarr.codecs.ZstdCodec(level=spec.compression_level)
    # blosc with byte shuffle: groups the high bytes of ids and logits, which compresses them best
    return zarr.codecs.BloscCodec(cname="zstd", clevel=spec.compression_level, shuffle="shuffle")

"""Store schema, version 3: the only place that says which arrays a teacher cache holds and how.

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

SCHEMA_VERSION = 3
# v1 kept raw fp16 top-k logits and the full logsumexp per T, and the tail bucket was their difference:
# at GPT-2's logit scale (-60 to -100, fp16 step 0.0625) that difference is rounding noise for confident
# tokens. v2 keeps what the loss needs directly: top-k log-probabilities and the tail log-mass per T.
# v3 adds checksums (CHECKSUM_ARRAY, and the "checksums" and "attrs_crc32" attributes); its data arrays are
# v2's, so v2 stores are still read (without checksums to verify against) but no longer written or resumed.
READABLE_VERSIONS = (2, 3)
GOOSE_ATTR = "goose"  # root attribute holding everything goose knows about a store
PROGRESS_ARRAY = "blocks_done"  # one uint8 per block, set only after the block's data is written
EMBEDDING_ARRAY = "teacher_embedding"
TOKENIZER_GROUP = "tokenizer"  # the teacher tokenizer's files, one uint8 array each, so a store is self-contained
CHECKSUM_ARRAY = "chunk_checksums"  # (n_blocks, n per-window arrays) int64: crc32 of each block's stored bytes
COMPRESSIONS = ("zstd", "blosc", "none")
HIDDEN_DTYPES = ("float16", "int8")


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

    def __post_init__(self) -> None:
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
            "topk_logprobs": ArraySpec((n, L, k), "uint16"),  # log p_i at T=1, sorted descending (fixed point)
            "tail_logmass": ArraySpec((n, L, len(self.tail_temperatures)), "float32"),  # log p(not top-k) at T_j
            "gold_nll": ArraySpec((n, L), "float32"),
            "entropy": ArraySpec((n, L), "float16"),
        }
        if self.samples:
            arrays["sample_ids"] = ArraySpec((n, L, self.samples), self.token_dtype)
            arrays["sample_counts"] = ArraySpec((n, L, self.samples), self.count_dtype)
        for layer in self.hidden_layers:
            arrays[hidden_name(layer)] = ArraySpec((n, L, self.hidden_size), self.hidden_dtype)
            if self.hidden_dtype == "int8":  # h ~= q * token_scale * channel_scale
                arrays[hidden_scale_name(layer)] = ArraySpec((n, L), "float16")
                arrays[hidden_channel_scale_name(layer)] = ArraySpec((n, self.hidden_size), "float16")
        return arrays

    def embedding_spec(self) -> ArraySpec:
        return ArraySpec((self.vocab_size, self.hidden_size), "float16", per_window=False)

    def to_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["tail_temperatures"] = list(self.tail_temperatures)
        d["hidden_layers"] = list(self.hidden_layers)
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


def hidden_name(layer: int) -> str:
    return f"hidden/{layer}"


def hidden_scale_name(layer: int) -> str:
    return f"hidden_scale/{layer}"


def hidden_channel_scale_name(layer: int) -> str:
    return f"hidden_channel_scale/{layer}"


def compressors(spec: StoreSpec):
    """zarr v3 compressor list for a spec."""
    import zarr

    if spec.compression == "none":
        return None
    if spec.compression == "zstd":
        return zarr.codecs.ZstdCodec(level=spec.compression_level)
    # blosc with byte shuffle: groups the high bytes of ids and logits, which compresses them best
    return zarr.codecs.BloscCodec(cname="zstd", clevel=spec.compression_level, shuffle="shuffle")

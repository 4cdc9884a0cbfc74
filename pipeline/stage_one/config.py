"""Stage one's run configuration: `CacheTeacherConfig`, the one place its defaults and help text live.

`goose cache-teacher` builds its options from these fields (cli.py `config_options`): each field's
metadata holds its help, and where the command line needs it, its flags, choices and how the text is parsed
(`cli`: floats, json, shard, flag). Torch-free, so the command line can read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import GooseError
from ..data import DataSpec

DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
STORAGE_HELP = "JSON object of fsspec options for remote URLs (e.g. '{\"anon\": true}')."


def _opt(default=None, help: str = "", **meta):  # noqa: A002 - the option's help, as click names it
    """A field with its command-line metadata; a mutable default is given as a factory."""
    meta["help"] = help
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CacheTeacherConfig:
    output: str = field(metadata={"help": "Store path or fsspec URL to write (e.g. runs/wt2.zarr, s3://b/x.zarr); "
                                          "--output is an alias.", "flags": ("--out", "--output", "-o"),
                                  "required": True})
    teacher: str = _opt("gpt2", "Hub name or local model folder.")
    revision: str | None = _opt(None, "Hub revision (branch, tag or commit) [default: the hub's main].")
    dtype: str = _opt("auto", "Teacher dtype; auto = fp32 on CPU, bf16 on CUDA.", choices=DTYPES)
    device: str = _opt("auto", DEVICE_HELP)
    batch_size: int = _opt(8, "Windows per teacher forward.")
    data: DataSpec = _opt(DataSpec, "The corpus (its own options: DataSpec's fields).", cli="nested")
    seq_len: int = _opt(1024, "Window length in tokens.")
    max_tokens: int | None = _opt(None, "Cap on tokens cached [default: the whole corpus].")
    top_k: int = _opt(64, "Teacher logits stored per token (the rest is one exact tail bucket).")
    tail_temperatures: tuple[float, ...] = _opt(
        (1.0, 1.25, 1.5, 2.0, 3.0, 4.0), "Temperatures at which the full-vocabulary logsumexp is stored.", cli="floats")
    samples: int = _opt(0, "RS-KD draws per token (0 = none).")
    seed: int = _opt(0, "Seeds the RS-KD draws (--samples).")
    hidden_layers: str | None = _opt(None, "Teacher layers to store: '0,6,12', '-1', 'all' (0 = embeddings) "
                                     "[default: none].")
    hidden_dtype: str = _opt("float16", "Storage of the hidden states; int8 (with per-channel and per-token "
                             "scales) is ~1/3 the bytes.", choices=("float16", "int8"))
    chunk_windows: int = _opt(16, "Windows per storage chunk.")
    shard_chunks: int = _opt(1, "Chunks per shard (1 = no sharding; use for very large stores).")
    compression: str = _opt("blosc", "Compressor of every array; blosc is zstd with byte shuffle (best for the "
                            "compact encoding).", choices=("zstd", "blosc", "none"))
    compression_level: int = _opt(3, "Level of the compressor.")
    topk_encoding: str = _opt(
        "compact", "How the top-k is stored: compact (schema v4: the top-1, then the rest by id as gaps; "
        "log-probabilities relative to the top-1 in steps of --logprob-step; tail log-masses to 12 mantissa bits; "
        "about half the bytes, KD targets within KL step^2/8 per token) or fixed16 (the v3 layout, fp32 tails).",
        choices=("compact", "fixed16"))
    logprob_step: float | None = _opt(None, "Fixed-point step (nats) of the stored top-k log-probabilities "
                                      "[default: 1/16 compact, 2^-10 fixed16].")
    hidden_pca_rank: int = _opt(0, "Store each --hidden-layers layer as its R leading principal components "
                                "(fitted on the first block, basis kept in the store; readers get the full-width "
                                "reconstruction). 0 = full width. One process only.")
    # None: on CPU when the run is large enough to repay the one-off compilation (use_compiled_targets). Falls
    # back to eager ops, with a warning, if inductor cannot build them
    compile_targets: bool | None = _opt(
        None, "Run the vocabulary-wide reductions as compiled kernels: the top-k in C, the tail sums and entropy as "
        "torch.compile'd fused loops (CPU; ~3x cheaper, equal to the eager ops to fp32 rounding, equal logits in "
        "ascending id order; building takes 4-20 s) [default: on for a CPU teacher when tokens x vocabulary >= "
        "2^33, e.g. 1M tokens at V 8192].", cli="flag")
    storage_options: dict | None = _opt(None, STORAGE_HELP, cli="json")
    writer_threads: int = _opt(0, "Threads encoding, compressing and writing finished blocks beside the forward; "
                               "0 = auto (1 on CPU, half the host's cores up to 8 on CUDA: one thread writes ~0.1M "
                               "tokens/s at GPT-2's shapes). The stored bytes are the same for any count.", min=0)
    progress: bool = _opt(True, "No progress bar.", flags=("--no-progress",), cli="off_flag")
    shard: tuple[int, int] | None = _opt(None, "Compute only blocks b with b mod N == I (one job of N sharing the "
                                         "store; no finalize: run `goose cache finalize STORE` after all N).",
                                         cli="shard", metavar="I/N")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N), with 0 <= I < N."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise GooseError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise GooseError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count

"""The teacher: a causal LM loaded from a hub name or a local folder, with what identifies it (config,
weights and tokenizer hashes) and its hidden-layer choice. Shared by stage one, `eval` and the harness; the
per-token targets computed from its logits are stage one's (`stage_one/targets.py`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from ..errors import GooseError
from .devices import device_name, resolve_device, resolve_dtype


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _hub_id_shape(name)


def _hub_id_shape(name: str) -> bool:
    # "org/model" is a hub id; a path with more parts or an existing folder is not.
    return name.count("/") == 1 and not os.path.exists(name)


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    weights_hash: str = ""

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(self.config, key, None)
            if value:
                return int(value)
        return None

    def provenance(self) -> dict:
        return {
            "teacher": self.name,
            "revision": self.revision or "main",
            "config_hash": config_hash(self.config),
            "weights_hash": self.weights_hash,
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": device_name(self.device),  # another device type or GPU model rounds differently
        }

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer as the files `save_pretrained` writes (stored in the cache with the embedding)."""
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    def embedding_matrix(self):
        """The input embedding (V, d) as a float16 numpy array, the store's dtype: converted by torch, bit for
        bit numpy's rounding but 10x faster (numpy's float32 -> float16 cast took 0.26 s at GPT-2's size, a
        once-per-store cost that showed in a short run's wall time)."""
        return self.model.get_input_embeddings().weight.detach().to("cpu", torch.float16).numpy()

    def body_and_head(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(body, head) with model(ids).logits == head(body(ids).last_hidden_state), bit for bit, where this
        is known to hold (GPT-2: its LM head is one Linear on the final-norm states); None otherwise, as
        other architectures may scale or cap their logits after the head."""
        if type(self.model).__name__ == "GPT2LMHeadModel":
            return self.model.transformer, self.model.lm_head
        return None




def load_teacher(name: str, *, revision: str | None = None, dtype: str = "auto", device: str = "auto") -> Teacher:
    """AutoModelForCausalLM + AutoTokenizer from a hub name or a local folder, in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    expanded = os.path.expanduser(name)
    local = os.path.isdir(expanded)
    if not local and _looks_like_path(name):
        raise GooseError(f"teacher folder not found: {name}")
    verbosity = transformers.utils.logging.get_verbosity()
    # its multi-line load report would bury the one-line error below (and says nothing when all is well)
    transformers.utils.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(expanded if local else name, revision=revision)
        model, info = AutoModelForCausalLM.from_pretrained(expanded if local else name, revision=revision,
                                                           dtype=torch_dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers/safetensors raise many types for a bad folder
        if local:  # truncated weights (SafetensorError), config.json against the weights (RuntimeError), ...
            first = str(exc).splitlines()[0] if str(exc) else ""
            if "mismatched_sizes" in first:  # its report (suppressed above) lists the shapes
                raise GooseError(f"teacher {name}: its config.json does not match its weights "
                                 f"(parameter shapes differ)") from None
            raise GooseError(f"{name} is not a loadable model folder: {type(exc).__name__}: {first}") from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        raise GooseError(
            f"cannot load teacher {name!r} from the Hugging Face Hub (offline, or no such model): "
            f"download it where you have network and pass the local folder with --teacher"
        ) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    # transformers initialises weights the checkpoint lacks at random, with only a log line: a config.json
    # with more layers than the weights would silently cache a partly random teacher
    bad = {kind: info.get(kind) or [] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(sorted(map(str, keys))[:3])}"
                           f"{' ...' if len(keys) > 3 else ''} ({len(keys)})" for kind, keys in bad.items() if keys)
        raise GooseError(f"teacher {name}: its config.json does not match its weights ({detail})")
    weights = weights_hash(model)  # on the host, before the move: identifies the exact checkpoint
    model.to(dev).eval()
    # A local folder is recorded by absolute path so a resume from another working directory matches.
    return Teacher(model, tokenizer, os.path.abspath(expanded) if local else name, revision, dev, torch_dtype, weights)


def config_hash(config) -> str:
    d = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache"):
        d.pop(volatile, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_hidden_layers(spec: str | None, n_layers: int) -> tuple[int, ...]:
    """'0,6,12', '-1', 'all' or ''/None -> sorted unique layer indices in [0, n_layers] (0 = embeddings)."""
    if not spec or spec.strip().lower() == "none":
        return ()
    if spec.strip().lower() == "all":
        return tuple(range(n_layers + 1))
    layers = []
    for part in spec.split(","):
        try:
            index = int(part)
        except ValueError:
            raise GooseError(f"hidden layer {part.strip()!r} is not an integer") from None
        resolved = index + n_layers + 1 if index < 0 else index
        if not 0 <= resolved <= n_layers:
            raise GooseError(f"hidden layer {index} out of range: the teacher has layers 0..{n_layers} (0 = embeddings)")
        layers.append(resolved)
    return tuple(sorted(set(layers)))

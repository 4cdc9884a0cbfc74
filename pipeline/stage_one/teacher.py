"""The teacher: loading (hub name or local folder) and the per-token targets computed from its logits.

`teacher_targets` is the one function that turns full-vocabulary logits into what the store keeps. All
reductions run in fp32 whatever the teacher's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ...errors import GooseError
from .native_topk import topk_rows_native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GooseError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GooseError(f"device {device!r} asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise GooseError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


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


class NonFiniteLogits(ValueError):
    """The teacher produced NaN or +-inf logits; `rows` are the flat (B*L) row indices where it did."""

    def __init__(self, rows: list[int]):
        super().__init__(f"non-finite logits in {len(rows)} positions")
        self.rows = rows


# A tail position's shifted logit: exp(_MASKED / T) is 0 at every T, and 0 * _MASKED is 0, not NaN.
_MASKED = -1e30


def _slice_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits per slice: on CPU about 1 MB of fp32 (L2-resident, so the passes over the
    vocabulary below cost what the arithmetic costs, not what main memory does: measured 2-3x cheaper
    than 16 MB slices), but at least 8 rows so the per-op overhead stays small at V = 50257."""
    if device.type != "cpu":
        return max(1, (1 << 26) // vocab)
    return max(8, (1 << 18) // vocab)


def _compiled_slice_rows(vocab: int) -> int:
    """Rows per call of the compiled kernels: as `_slice_rows`, but at least 16 (3.2 MB at V = 50257): each
    call pays dynamo's guards and wrappers, under the GIL, and with two worker threads 16-row calls ran
    ~13 % faster than 8-row ones (a fused kernel reads the slice twice, not once per op, so L2 matters less)."""
    return max(16, (1 << 18) // vocab)


_TOPK_GROUP = 16
_TOPK_INNER_MIN_GROUPS = 2


def topk_uses_groups(vocab: int, k: int, device: torch.device, min_groups: int = 8) -> bool:
    return device.type == "cpu" and vocab >= min_groups * k * _TOPK_GROUP


def topk_rows(z: torch.Tensor, k: int, sorted: bool = True, min_groups: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(z, k, sorted=sorted) for 2-D z, in two small top-k's instead of one over the vocabulary.

    The row is cut into W strided groups of g elements (group j = {j, j + W, j + 2W, ...}) plus single
    elements past g * W. Every one of the row's k largest lies in one of the k groups with the largest
    maxima (a group outside them has k groups above it, so k distinct elements above its maximum), so
    the top-k of those k * g candidates is the row's top-k (equal values may come in another order).
    The group maxima are one vectorised pass; the two top-k's see V / g and k * g elements, and where V / g
    is itself large (3,142 at V = 50257) its top-k is found the same way, one level down. CPU only (on a GPU
    torch.topk is fast and this saves nothing); plain torch.topk when the vocabulary is small.
    sorted=False: the k in any order (the inner level's).
    """
    rows, vocab = z.shape
    g = _TOPK_GROUP
    if not topk_uses_groups(vocab, k, z.device, min_groups):
        return torch.topk(z, k, dim=-1, sorted=sorted)
    width = vocab // g
    # group maxima by halving: max of the two halves, four times (elementwise ops run vectorised; a
    # reduction over a middle axis of 16 does not, measured 5x slower)
    maxima = torch.maximum(z[:, : width * g // 2], z[:, width * g // 2 : width * g])
    while maxima.shape[1] > width:
        half = maxima.shape[1] // 2
        maxima = torch.maximum(maxima[:, :half], maxima[:, half:])
    rest = vocab - width * g
    if rest:
        maxima = torch.cat([maxima, z[:, width * g :]], -1)  # the remainder: groups of one
    # the k largest maxima: the same two-level search again where the maxima are still many (3,142 at
    # V = 50257: 4x cheaper than their plain top-k)
    _, group = topk_rows(maxima, k, sorted=False, min_groups=_TOPK_INNER_MIN_GROUPS)  # (rows, k)
    cols = group.unsqueeze(-1) + torch.arange(g, device=z.device) * width  # (rows, k, g)
    if rest:
        single = group >= width  # a remainder element: its own column, once; its other g - 1 slots masked
        cols = torch.where(single.unsqueeze(-1), (group + (width * g - width)).unsqueeze(-1), cols)
        cand = z.gather(-1, cols.view(rows, k * g)).view(rows, k, g)
        cand[..., 1:].masked_fill_(single.unsqueeze(-1), float("-inf"))
        cand = cand.view(rows, k * g)
    else:
        cand = z.gather(-1, cols.view(rows, k * g))
    vals, j = torch.topk(cand, k, dim=-1, sorted=sorted)
    return vals, cols.view(rows, k * g).gather(-1, j)


def _temperature_order(temps: list[float]) -> tuple[list[tuple[int, float]], set[int]]:
    """The order to visit the temperatures in, and which of them are squares of the one before.

    exp(s / T) = exp(s / 2T)^2, so where T and 2T are both stored (1, 2, 4 and 1.5, 3 by default) one
    exp and a multiplication replace two exps, the costliest pass per temperature. Each squaring doubles
    the relative rounding error of an element (4 ulp for T = 1 from T = 4, 2.4e-7), below the fp32
    summation error over the vocabulary that the tail sum has anyway; a 0 (a masked top-k entry) stays 0.
    """
    index = {t: j for j, t in enumerate(temps)}
    order, squared_from, seen = [], set(), set()
    for j, t in sorted(enumerate(temps), key=lambda jt: -jt[1]):  # hottest first: chains run downwards
        if j in seen:
            continue
        chain = [(j, t)]
        while t / 2 in index and index[t / 2] not in seen:
            t = t / 2
            chain.append((index[t], t))
        for i, (jj, _) in enumerate(chain):
            seen.add(jj)
            if i:
                squared_from.add(jj)
        order += chain
    return order, squared_from


_MAX_EXP_POWER = 64


def exp_power_plan(temps) -> tuple[int, list[int]] | None:
    """(N, n_j) with 1 / T_j = n_j / N for every stored temperature, n_j an integer <= 64, N the smallest
    such; None if there is none (a temperature like 1.1 beside 1.25 needs N = 55: fine; an irrational one
    has none).

    Then exp(s / T_j) = u^n_j with u = exp(s / N): one exp per logit and a few multiplications make every
    temperature's term, where each exp costs several times a multiplication (the default grid 1, 1.25, 1.5,
    2, 3, 4 is N = 60, powers 60, 48, 40, 30, 20, 15). Each multiplication adds half an ulp, and u's own
    rounding is raised to the n-th power: at most ~n ulp of relative error per element (3.6e-6 at n = 60),
    below the 1e-5 the targets are held to and unbiased enough that the tail sums over the vocabulary
    keep far less (tested against float64). Terms small enough to underflow do so as the direct exp would
    (u^n < 1e-38 either way); a tail that small is recomputed exactly anyway (`_redo_low_tails`).
    """
    for n_base in range(1, _MAX_EXP_POWER + 1):
        powers = [n_base / t for t in temps]
        if all(abs(p - round(p)) < 1e-9 and 1 <= round(p) <= _MAX_EXP_POWER for p in powers):
            return n_base, [int(round(p)) for p in powers]
    return None


def _powers_of(u: torch.Tensor, wanted) -> dict[int, torch.Tensor]:
    """u^n for each n in `wanted`, by repeated squaring with shared intermediate powers (u^15 = (u^7)^2 u,
    u^7 = (u^3)^2 u, ...): about two multiplications per distinct power."""
    out = {1: u}

    def power(n: int) -> torch.Tensor:
        if n not in out:
            half = power(n // 2)
            out[n] = half * half if n % 2 == 0 else half * half * u
        return out[n]

    for n in sorted(set(wanted)):
        power(n)
    return out


class _CompiledReductions:
    """The vocabulary-wide passes of `teacher_targets` for one slice of rows as two compiled kernels: the top-k
    in C (`native_topk.topk_rows_native`: the k-th largest strided group maximum, then the ~k logits of the
    groups that reach it ranked branch-free; torch.topk's sorts mispredict on every new row and were two
    thirds of these reductions at V = 8192), then one torch.compile'd (inductor) function for every
    temperature's tail sum, the entropy's tail dot product and the count of ties with the k-th value in one
    more read of the logits, with one exp per logit where the temperatures allow (`exp_power_plan`). The
    eager ops they replace make one pass (and one (n, V) temporary) per shift, mask, exp, square and sum.
    Equal to the eager reference to fp32 rounding (summation order and the powers differ), tested; the top-k
    keeps equal values in ascending id order (torch.topk's order among ties is its own).

    The tail is every id whose logit is below the k-th largest value v_k; ids equal to v_k that top-k left out
    (ties at the boundary) are added back by count, so the masks agree with the eager path's index mask.
    Kernels are generated for one thread (`cpp.threads` 1): slices are small, and the caller shares them out
    among its own worker threads. They are called through inductor's C++ wrapper (`cpp_wrapper`), which
    releases the GIL, as ctypes does for the C top-k; through the default Python wrapper two worker threads
    ran them no faster than one. Built, and compiled by one call on random logits, once per (temperatures,
    rows, vocabulary, k), on the thread that asks first (`compiled_reductions`), so worker threads never race
    to compile."""

    def __init__(self, temps: tuple[float, ...], rows: int, vocab: int, top_k: int):
        self.rows, self.vocab, self.top_k = rows, vocab, top_k
        order, squared_from = _temperature_order(list(temps))
        plan = exp_power_plan(temps)

        def slice_targets(z, vals, gold):
            """Everything per row but the top-k itself: (top-k log-probs, tail log-masses, entropy, gold
            NLL), the same formulas as `_finish_slice`."""
            m, vk = vals[:, :1], vals[:, -1:]
            s = z - m
            tail = z < vk
            # ids equal to v_k that the top-k left out belong to the tail: added back by count (exact, no
            # subtraction of masses; ties at the boundary are rare, so almost always 0)
            extra = ((z == vk).sum(-1) - (vals == vk).sum(-1)).to(z.dtype)
            head_s = vals - m
            sk = (vk - m)[:, 0]
            tails, log_totals, logmass, e = [None] * len(temps), [None] * len(temps), [None] * len(temps), None
            if plan is not None:  # one exp per logit, every temperature's term a power of it
                n_base, powers = plan
                u_pow = _powers_of(torch.where(tail, torch.exp(s * (1.0 / n_base)), 0.0), powers)
            for j, t in order:
                if plan is not None:
                    e = u_pow[powers[j]]
                else:
                    e = e * e if j in squared_from else torch.where(tail, torch.exp(s * (1.0 / t)), 0.0)
                tail_t = e.sum(-1) + extra * torch.exp(sk * (1.0 / t))
                head_e = torch.exp(head_s * (1.0 / t))
                total = tail_t + head_e.sum(-1)
                log_total = total.log()
                tails[j], log_totals[j] = tail_t, log_total
                logmass[j] = tail_t.log() - log_total
                if t == 1.0:
                    dot = (e * s).sum(-1) + extra * torch.exp(sk) * sk
                    entropy = log_total - (dot + (head_e * head_s).sum(-1)) / total
                    gold_nll = log_total - (z.gather(-1, gold).squeeze(-1) - m[:, 0])
                    logprobs = head_s - log_total.unsqueeze(-1)
            return (logprobs, torch.stack(logmass, -1), entropy, gold_nll, torch.stack(tails, -1),
                    torch.stack(log_totals, -1))

        # the options go with every compilation, a recompilation included (a guard that fails on new inputs)
        options = {"cpp.threads": 1, "cpp_wrapper": True}
        self.slice_targets = torch.compile(_own_code(slice_targets), dynamic=False, fullgraph=True, options=options)

    @torch.inference_mode()
    def compile_now(self) -> None:
        """One call on random logits of the slice shape (inference tensors, as the teacher's logits are): the
        compilation happens here, not in the first worker thread to need it. At one torch thread, the count
        every caller runs the kernels at (`teacher_targets` gives each slice to a one-thread worker or runs it
        on a one-thread caller): dynamo guards on the count, and a compilation at another would be redone,
        by every worker thread at once."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            z = torch.randn(self.rows, self.vocab)
            vals, _ = topk_rows_native(z, self.top_k)  # builds the C top-k as well
            self.slice_targets(z, vals, torch.zeros(self.rows, 1, dtype=torch.long))
        finally:
            torch.set_num_threads(threads)


def _own_code(fn):
    """fn with a code object of its own: dynamo keeps compiled graphs, and counts recompilations against its
    limit of 8, per code object, and every instance above is one shape of its own (a process that builds
    stores for several teachers or temperature sets would otherwise run into the limit)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


_COMPILED: dict[tuple, _CompiledReductions] = {}
_COMPILED_LOCK = threading.Lock()


def compiled_reductions(tail_temperatures, vocab: int, top_k: int) -> _CompiledReductions:
    """The compiled kernels for CPU slices of this shape, built and compiled on first use (4-20 s; raises
    whatever inductor raises if it cannot build them, e.g. without a C++ compiler)."""
    rows = _compiled_slice_rows(vocab)
    key = (tuple(float(t) for t in tail_temperatures), rows, vocab, top_k)
    with _COMPILED_LOCK:
        if key not in _COMPILED:
            kernels = _CompiledReductions(key[0], rows, vocab, top_k)
            kernels.compile_now()
            _COMPILED[key] = kernels
        return _COMPILED[key]


@torch.inference_mode()
def teacher_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    top_k: int,
    tail_temperatures: tuple[float, ...],
    samples: int = 0,
    sample_seeds: list[int] | None = None,
    threads: int = 1,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token targets from full logits (B, L, V) and the window's ids (B, L).

    topk_ids / topk_logprobs: the k most likely tokens, sorted descending, with their log-probabilities
        at T=1 (log p_i = z_i - logsumexp(z), computed in fp32; the store keeps them in uint16 fixed point,
        4.9e-4 nats, where fp16 raw GPT-2 logits near -80 would keep 0.03).
    tail_logmass[..., j]: log of the probability mass outside the top-k at T_j, as
        logsumexp(z/T_j over the non-top-k ids) - logsumexp(z/T_j over all ids), both sums taken
        directly in fp32 (the non-top-k entries summed on their own, never total minus head), so the tail
        bucket is exact at every stored temperature however confident the token is.
    gold_nll: -log p(next token) at T=1; the last position has no next token in the window: NaN.
    entropy: H(p) at T=1.
    sample_ids/sample_counts: unique ids and counts of `samples` draws from p (RS-KD), ascending ids,
        zero-padded; each window's draws are seeded by its own seed, so resume and batching can't change them.

    Raises NonFiniteLogits if any logit is NaN or +-inf (checked for free: such a row makes its entropy
    non-finite, and only those rows are then checked exactly).

    One pass structure per slice of rows (about 1 MB on CPU, so every pass below runs from cache): the
    top-k, one shifted copy s = z - max with the top-k entries masked out, then per temperature one
    scale-and-exp into a scratch buffer (or a squaring of the previous temperature's, where
    T and 2T are both stored) and one sum (the tail mass); the head's mass at each T comes from
    the k top values alone, and the entropy's tail term is one dot product of exp(s) with s. The max is
    shared by all temperatures (max(z / T) = max(z) / T exactly). Everything stays on the logits' device;
    only the (B, L, k) and (B, L, T) results leave it. threads > 1 (CPU): the slices are shared out among
    that many worker threads; every slice is computed as with one, so the results are identical.
    compiled=True: the top-k in C and the other passes as torch.compile'd fused loops (`_CompiledReductions`),
    equal to this eager reference to fp32 rounding (equal logits in ascending id order).
    """
    B, L, V = logits.shape
    device = logits.device
    flat = logits.reshape(B * L, V)
    gold = torch.zeros(B, L, dtype=torch.long, device=device)
    gold[:, :-1] = input_ids[:, 1:]
    gold = gold.reshape(-1, 1)
    temps = [float(t) for t in tail_temperatures]
    topk_logprobs = torch.empty(B * L, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(B * L, top_k, dtype=torch.long, device=device)
    tail_logmass = torch.empty(B * L, len(temps), dtype=torch.float32, device=device)
    gold_nll = torch.empty(B * L, dtype=torch.float32, device=device)
    entropy = torch.empty(B * L, dtype=torch.float32, device=device)
    order, squared_from = _temperature_order(temps)
    rows = _compiled_slice_rows(V) if compiled else _slice_rows(V, device)

    if compiled and device.type != "cpu":
        raise ValueError("compiled teacher targets are for CPU logits (on a GPU the eager reductions are cheap)")
    kernels = compiled_reductions(temps, V, top_k) if compiled else None

    def reduce_rows(lo: int, hi: int, torch_threads: int | None = None) -> None:
        """Rows lo..hi of every output, in slices of `rows`, with this call's own scratch buffers."""
        if torch_threads is not None:  # a worker thread: inference mode and the thread count are per thread
            torch.set_num_threads(torch_threads)
        with torch.inference_mode():
            if kernels is not None:  # compiled for one slice shape: a short last slice is padded to it
                for r0 in range(lo, hi, rows):
                    n = min(rows, hi - r0)
                    z = flat[r0 : r0 + n].float()
                    if n < rows:
                        z = torch.cat([z, z[:1].expand(rows - n, V)])
                    g = gold[r0 : r0 + n]
                    if n < rows:
                        g = torch.cat([g, g.new_zeros(rows - n, 1)])
                    vals, idx = topk_rows_native(z, top_k)
                    logprobs, logmass, ent, nll, tails, log_totals = kernels.slice_targets(z, vals, g)
                    topk_ids[r0 : r0 + n], topk_logprobs[r0 : r0 + n] = idx[:n], logprobs[:n]
                    tail_logmass[r0 : r0 + n], entropy[r0 : r0 + n], gold_nll[r0 : r0 + n] = logmass[:n], ent[:n], nll[:n]
                    if bool((tails[:n] < 1e-30).any()):  # one check for every temperature
                        m = z[:n].gather(-1, idx[:n, :1])  # the max: the top-1's logit
                        for j, t in order:
                            _redo_low_tails(z[:n], r0, idx[:n], m, tails[:n, j], log_totals[:n, j], j, t)
                return
            s_buf = torch.empty(min(rows, hi - lo), V, dtype=torch.float32, device=device)
            e_buf = torch.empty_like(s_buf)
            for r0 in range(lo, hi, rows):
                z = flat[r0 : min(r0 + rows, hi)].float()
                _finish_slice(z, r0, *_eager_slice(z, s_buf, e_buf))

    def _eager_slice(z: torch.Tensor, s_buf: torch.Tensor, e_buf: torch.Tensor):
        """(top-k values, ids, tail sums (n, T), tail dot sum(exp(s) * s) at T = 1): the reference."""
        n = z.shape[0]
        vals, idx = topk_rows(z, top_k)
        m = vals[:, :1]
        s = torch.sub(z, m, out=s_buf[:n])  # <= 0: every exp below is in (0, 1], no overflow at any T
        s.scatter_(-1, idx, _MASKED)  # the tail only
        e = e_buf[:n]
        tails = torch.empty(n, len(temps), dtype=torch.float32, device=device)
        dot = None
        for j, t in order:
            if j in squared_from:  # exp(s / t) = exp(s / 2t)^2, from the temperature done just before
                torch.mul(e, e, out=e)
            elif t == 1.0:
                torch.exp(s, out=e)
            else:
                torch.mul(s, 1.0 / t, out=e)
                e.exp_()
            tails[:, j] = e.sum(-1)
            if t == 1.0:
                # the entropy's tail term as one dot product (in place: e is not read again at this
                # temperature, and a fresh (n, V) product costs more in allocation than the multiply does)
                dot = torch.mul(e, s, out=e).sum(-1)
        return vals, idx, tails, dot

    def _finish_slice(z: torch.Tensor, r0: int, vals, idx, tails, dot) -> None:
        """The slice's rows of every output from its top-k and tail sums."""
        n = z.shape[0]
        topk_ids[r0 : r0 + n] = idx
        m = vals[:, :1]
        head_s = vals - m  # (n, k), <= 0
        for j, t in order:
            tail = tails[:, j]
            head_e = torch.exp(head_s / t) if t != 1.0 else torch.exp(head_s)
            total = tail + head_e.sum(-1)
            log_total = total.log()
            tail_logmass[r0 : r0 + n, j] = tail.log() - log_total
            if t == 1.0:
                # H = log S - sum(e * s) / S over every id: the tail's part from `dot`, the head's from its
                # k values
                entropy[r0 : r0 + n] = log_total - (dot + (head_e * head_s).sum(-1)) / total
                gold_nll[r0 : r0 + n] = log_total - (z.gather(-1, gold[r0 : r0 + n]).squeeze(-1) - m[:, 0])
                topk_logprobs[r0 : r0 + n] = head_s - log_total.unsqueeze(-1)
            _redo_low_tails(z, r0, idx, m, tail, log_total, j, t)

    def _redo_low_tails(z, r0: int, idx, m, tail, log_total, j: int, t: float) -> None:
        """A tail far below the top (< e^-69 of it) loses precision in fp32 or underflows to zero: redo
        those rows shifted by their own largest tail logit, so only an empty tail (k = V) is -inf."""
        low = (tail < 1e-30).nonzero().squeeze(-1)
        if len(low) and top_k < V:
            zt = z[low].scatter(-1, idx[low], float("-inf")) / t
            tail_logmass[r0 + low, j] = torch.logsumexp(zt, -1) - (m[low, 0] / t + log_total[low])

    if threads > 1 and device.type == "cpu" and B * L > rows:
        # the slices are independent: spread them over `threads` workers of one torch thread each (a slice
        # is too small for torch's own intra-op threads to help)
        bounds = [min(B * L, -(-B * L // threads // rows) * rows * i) for i in range(threads + 1)]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="goose-reduce") as pool:
            for job in [pool.submit(reduce_rows, lo, hi, 1) for lo, hi in zip(bounds, bounds[1:]) if lo < hi]:
                job.result()
    else:
        reduce_rows(0, B * L)
    # a NaN or infinite logit anywhere in a row makes its entropy NaN (NaN or inf - inf in the sums, or
    # 0 * -inf in the dot product); only such rows are checked exactly (one sync, no full-size pass)
    suspect = (~torch.isfinite(entropy)).nonzero().squeeze(-1)
    if len(suspect):
        bad = suspect[~torch.isfinite(flat[suspect]).all(-1)]
        if len(bad):
            raise NonFiniteLogits(bad.tolist())
    gold_nll = gold_nll.view(B, L)
    gold_nll[:, -1] = float("nan")
    out = {
        "topk_ids": topk_ids.view(B, L, top_k),
        "topk_logprobs": topk_logprobs.view(B, L, top_k),
        "tail_logmass": tail_logmass.view(B, L, len(temps)),
        "gold_nll": gold_nll,
        "entropy": entropy.view(B, L),
    }
    if samples:
        out["sample_ids"], out["sample_counts"] = draw_samples(logits, samples, sample_seeds)
    return out


def draw_samples(logits: torch.Tensor, n: int, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws with replacement per token from softmax(logits) (B, L, V) -> unique ids and counts (B, L, n).

    One seeded generator per window (seeds[b]) and one multinomial call per window, so a window's draws
    do not depend on which batch it was computed in.
    """
    B, L, _ = logits.shape
    draws = torch.empty(B, L, n, dtype=torch.long, device=logits.device)
    for b in range(B):
        gen = torch.Generator(device=logits.device).manual_seed(int(seeds[b]))
        probs = torch.softmax(logits[b].float(), dim=-1)
        draws[b] = torch.multinomial(probs, n, replacement=True, generator=gen)
    ordered, _ = draws.sort(dim=-1)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = is_new.long().cumsum(-1) - 1  # index of each draw's unique id
    ids = torch.zeros_like(ordered).scatter_(-1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    return ids, counts


def quantize_int8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a per-token and a per-channel scale: h ~= q * token_scale * channel_scale.

    hidden: (B, L, d). channel_scale (B, d) is each channel's RMS over the window, so GPT-2's outlier
    channels (~100x typical) get their own range instead of flattening every ordinary channel of the
    token to a level or two (per-token absmax alone loses ~23% there); token_scale (B, L) is the absmax of
    the channel-normalised token / 127, so an outlier token (GPT-2's first position) keeps its own range.
    Both scales are kept in fp16, and q is computed against the fp16-rounded scales.
    """
    h = hidden.float()
    tiny = torch.finfo(torch.float16).tiny
    # RMS over positions 1.. : GPT-2's first position can be ~30x every other, and would set a coarse step
    # for the whole window; the per-token scale below gives that position its own range
    body = h[:, 1:] if h.shape[1] > 1 else h
    channel = body.pow(2).mean(1).sqrt().clamp_min(tiny).to(torch.float16)  # (B, d)
    hc = h / channel.float().unsqueeze(1)
    token = (hc.abs().amax(-1) / 127.0).clamp_min(tiny).to(torch.float16)  # (B, L)
    q = torch.round(hc / token.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, token, channel

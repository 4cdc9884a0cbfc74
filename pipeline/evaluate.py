"""`goose eval`: perplexity of a student or a teacher under the standard protocols, with one code path.

Protocols over one token stream (documents joined with EOS, as in stage one):
- windows:  non-overlapping windows of L tokens, each scored on its tokens 2..L (no context crosses a
            window boundary);
- sliding:  windows of L tokens every S tokens, each scoring only the tokens the previous window did not
            (the Hugging Face perplexity recipe), so every token after the first is scored once with up
            to L - 1 tokens of context;
- stream:   (recurrent students only) the whole stream in consecutive chunks of L with the state carried,
            every token after the first scored with all previous tokens as context.
A model is a `Scorer`: log-probabilities of the next tokens for a window, optionally with a state.

With `harness`, EleutherAI's lm-evaluation-harness runs too, on the same model (pipeline/harness.py), and its
text perplexity is put next to goose's protocols on the same text.

Local text files are streamed (pipeline/data.py `open_texts`): nothing is written to the datasets cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GooseError
from ..student.model import Student
from .data import DataSpec, open_texts, tokenize_and_pack
from .harness import TEXT_TASK, HarnessConfig
from .scoring import PROTOCOLS, StudentScorer, TeacherScorer, evaluate_stream

# ---- loading -----------------------------------------------------------------------------------


def student_folder(path: str) -> tuple[Path, dict]:
    """A saved student: a run folder (its best/), or a folder with config.json + model.safetensors."""
    p = Path(path)
    for cand in (p / "best", p):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            meta = {}
            if (cand / "goose.json").is_file():
                try:
                    meta = json.loads((cand / "goose.json").read_text())
                except (ValueError, UnicodeDecodeError) as exc:
                    raise GooseError(f"{cand / 'goose.json'} is not valid JSON ({exc}); the saved student is "
                                     f"damaged") from None
                if not isinstance(meta, dict):
                    raise GooseError(f"{cand / 'goose.json'} is not a JSON object; the saved student is damaged")
            return cand, meta
    raise GooseError(f"no saved student in {path} (expected best/ or config.json + model.safetensors)")


def load_tokenizer(name: str | None, meta: dict, folder: Path | None = None):
    """--tokenizer if given; else the tokenizer saved beside the student; else its store's teacher."""
    from transformers import AutoTokenizer

    if name is None and folder is not None and (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a damaged file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GooseError(f"the tokenizer saved in {folder} is damaged ({reason}); pass --tokenizer") from None
    source = name or meta.get("teacher")
    if not source:
        raise GooseError("cannot tell which tokenizer this student uses; pass --tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source, revision=None if name else meta.get("revision"))
    except Exception:  # noqa: BLE001 - OSError, ValueError, or tokenizers' plain Exception on a damaged file
        raise GooseError(f"cannot load tokenizer {source!r}; pass --tokenizer with a local folder") from None


def check_tokenizer(tokenizer, vocab_size: int, what: str = "the student") -> None:
    """A tokenizer whose ids run past the model's vocabulary belongs to another model."""
    if len(tokenizer) > vocab_size:
        raise GooseError(f"the tokenizer has {len(tokenizer)} tokens but {what} has a vocabulary of {vocab_size}: "
                         f"they do not belong together (pass the --tokenizer the student was trained with)")


@dataclass
class EvalConfig:
    student: str | None = None
    teacher: str | None = None
    tokenizer: str | None = None
    data: DataSpec | None = None
    protocols: tuple[str, ...] = ("windows",)
    seq_len: int = 256
    stride: int | None = None
    max_tokens: int | None = None
    cache: str | None = None  # teacher agreement and calibration on a store's windows
    cache_windows: int = 64
    storage_options: dict | None = None  # fsspec options for --cache and the student's store (remote URLs)
    device: str = "auto"
    dtype: str = "auto"
    harness: HarnessConfig | None = None  # lm-eval tasks on the same model (pipeline/harness.py)
    ternary: bool = False  # score the student on its ternary inference path (student/ternary.py, CPU)

    def check(self) -> None:
        """Bad numbers fail here, before any model or text is loaded. The harness's text task reads the eval's
        --data-files unless it was given its own."""
        if self.seq_len < 2:
            raise GooseError(f"--seq-len must be >= 2 (a window scores its tokens 2..L), got {self.seq_len}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise GooseError(f"--stride must be in 1..{self.seq_len} (the --seq-len), got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise GooseError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        if self.cache_windows < 1:
            raise GooseError(f"--cache-windows must be >= 1, got {self.cache_windows}")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise GooseError(f"--storage-options must be a JSON object (e.g. '{{\"anon\": true}}'), "
                             f"got a JSON {type(self.storage_options).__name__}")
        for p in self.protocols:
            if p not in PROTOCOLS:
                raise GooseError(f"unknown protocol {p!r}; choose from {PROTOCOLS}")
        if self.harness is not None:
            h = self.harness
            if TEXT_TASK in h.tasks and not h.data_files.get(TEXT_TASK) and self.data and self.data.data_files:
                h.data_files = {**h.data_files, TEXT_TASK: tuple(self.data.data_files)}
                h.text_column = self.data.text_column
            h.check()
            from .harness import require_lm_eval

            require_lm_eval()
        if self.ternary and self.teacher:
            raise GooseError("--ternary is the student's ternary inference path; a teacher has none")
        if self.ternary:
            from .devices import ternary_device

            ternary_device(self.device)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins: sum_b (n_b / n) |accuracy_b - confidence_b|."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)


@torch.no_grad()
def cache_agreement(model: Student, url: str, n_windows: int, device, storage_options: dict | None = None) -> dict:
    """KL to the teacher (top-k + tail at T=1), top-1 agreement and ECE on a store's held-out windows: the
    first `n_windows` of its held-out last 5 % (what train-from-cache validates on by default), never training ones."""
    from .stage_two.checks import held_out_windows
    from .stage_two.loader import read_windows
    from .stage_two.validation import teacher_agreement
    from ..cache.reader import CacheReader

    reader = CacheReader(url, storage_options=storage_options or None)
    if reader.vocab_size != model.cfg.vocab_size:
        raise GooseError(f"store vocabulary {reader.vocab_size} != student vocabulary {model.cfg.vocab_size}")
    idx = held_out_windows(reader.n_windows)[:n_windows]
    kl = agree = 0.0
    n = 0
    conf, correct = [], []
    for batch in read_windows(url, idx, ["input_ids", "topk_ids", "topk_logprobs", "tail_logmass"], 8,
                              storage_options):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"]).logits.float()
        kl_tok, agrees = teacher_agreement(logits, batch, reader.spec.tail_temperatures)
        kl += float(kl_tok.sum())
        agree += float(agrees.sum())
        n += logits.shape[0] * logits.shape[1]
        probs = torch.softmax(logits[:, :-1], -1)
        top, pred = probs.max(-1)
        conf.append(top.flatten().cpu().numpy())
        correct.append((pred == batch["input_ids"][:, 1:]).flatten().cpu().numpy())
    conf_a, corr_a = np.concatenate(conf), np.concatenate(correct).astype(np.float64)
    return {"cache": url, "windows": int(len(idx)), "kl_to_teacher": kl / n, "top1_agreement": agree / n,
            "ece": expected_calibration_error(conf_a, corr_a), "accuracy": float(corr_a.mean())}


def store_overlap(tokens: np.ndarray, url: str, n: int = 32, storage_options: dict | None = None) -> float:
    """Fraction of the text's tokens inside an n-token span that also occurs in a store's windows: 0 for
    held-out text, near 1 for text the store was cached from. The store fingerprints spans starting every
    8th token of each window, so text shared with the store is found wherever it runs for n + 8 tokens."""
    from ..cache.reader import CacheReader, span_hash

    hashes = span_hash(tokens, n)
    if not len(hashes):
        return 0.0
    hit = np.isin(hashes, CacheReader(url, storage_options=storage_options or None).span_hashes(n))
    covered = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.add.at(covered, np.flatnonzero(hit), 1)
    np.add.at(covered, np.flatnonzero(hit) + n, -1)
    return float((np.cumsum(covered)[: len(tokens)] > 0).mean())


def run_eval(cfg: EvalConfig) -> dict:
    from .devices import resolve_device, ternary_device
    from .teacher import load_teacher

    if bool(cfg.student) == bool(cfg.teacher):
        raise GooseError("give exactly one of a student (run folder or saved model) or --teacher")
    cfg.check()
    device = ternary_device(cfg.device) if cfg.ternary else resolve_device(cfg.device)
    result: dict = {}
    executed: dict = {}  # with --ternary and text: what the path executed while scoring it
    if cfg.student:
        folder, meta = student_folder(cfg.student)
        model = Student.from_pretrained(folder, device=device).eval()
        tokenizer = load_tokenizer(cfg.tokenizer, meta, folder) if cfg.data or cfg.harness else None
        if tokenizer is not None:
            check_tokenizer(tokenizer, model.cfg.vocab_size)
        result["model"] = {"kind": "student", "path": str(folder), "parameters": model.parameter_report()}
        # what is scored: the model itself or its ternary path (the same function; energy_report reads the model)
        scored = model
        if cfg.ternary:
            from ..student.ternary import ternary_student

            scored = ternary_student(model)
        scorer = StudentScorer(scored, device)
    else:
        teacher = load_teacher(cfg.teacher, dtype=cfg.dtype, device=cfg.device)
        tokenizer, scorer, model = teacher.tokenizer, TeacherScorer(teacher.model, device), None
        result["model"] = {"kind": "teacher", "name": teacher.name,
                           "parameters": sum(p.numel() for p in teacher.model.parameters())}
        ctx = teacher.max_positions
        if ctx is not None and cfg.seq_len > ctx:
            raise GooseError(f"--seq-len {cfg.seq_len} is above the teacher's context of {ctx} tokens")
    if cfg.data is not None:
        # local files streamed (no Arrow copy in the datasets cache); a hub dataset as datasets caches it
        ds = open_texts(cfg.data, streaming=bool(cfg.data.data_files))
        tokens = tokenize_and_pack(ds, tokenizer, text_column=cfg.data.text_column, seq_len=1,
                                   max_tokens=cfg.max_tokens).reshape(-1)
        result["data"] = {**cfg.data.describe(), "tokens": int(len(tokens))}
        vocab = model.cfg.vocab_size if model is not None else None
        if vocab is not None and len(tokens) and int(tokens.max()) >= vocab:
            raise GooseError(f"the text has token id {int(tokens.max())}, outside the student's vocabulary of {vocab}: "
                             f"wrong --tokenizer")
        stores = {cfg.cache} | ({meta.get("store")} if cfg.student else set())
        for url in sorted(u for u in stores if u):
            try:
                frac = store_overlap(tokens, url, storage_options=cfg.storage_options)
            except GooseError:
                continue  # the training store moved or is gone: nothing to compare with
            result.setdefault("store_overlap", {})[url] = frac
            if frac > 0.01:
                result.setdefault("warnings", []).append(
                    f"{frac:.0%} of the evaluation text's tokens sit in 32-token spans that store {url} also "
                    f"holds: this text is not held out, its perplexity is not a test result")
        result["perplexity"] = [evaluate_stream(scorer, tokens, p, cfg.seq_len, cfg.stride) for p in cfg.protocols]
        if cfg.ternary:  # what the path executed on the text the estimate is from (not the harness or --cache)
            from ..student.ternary import measured_ops

            executed = measured_ops(scored)
    result["harness"] = None  # a stable key: null without --harness
    if cfg.harness is not None:
        from .harness import run_harness

        if model is not None:
            from ..student.hf import GooseForCausalLM

            hf_model = GooseForCausalLM.from_student(model, eos_token_id=tokenizer.eos_token_id,
                                                     bos_token_id=tokenizer.bos_token_id)
            if cfg.ternary:
                hf_model.student = scored
        else:
            hf_model = teacher.model
        result["harness"] = run_harness(hf_model, tokenizer, cfg.harness, max_length=cfg.seq_len, scorer=scorer)
    if cfg.cache:
        if model is None:
            raise GooseError("--cache agreement is for students (the store already holds the teacher)")
        result["teacher_agreement"] = cache_agreement(scored, cfg.cache, cfg.cache_windows, device,
                                                      cfg.storage_options)
    if model is not None and isinstance(scorer, StudentScorer) and scorer.stats:
        summaries = {k: s.summary() for k, s in scorer.stats.items()}
        rates = [s["firing_rate"] for s in summaries.values() if s]
        result["spikes"] = {"firing_rate": float(np.mean(rates)) if rates else None,
                            "zero_fraction": 1 - float(np.mean(rates)) if rates else None,
                            "dead_fraction_max": max((s["dead_fraction"] for s in summaries.values() if s), default=None),
                            "saturated_fraction_max": max((s["saturated_fraction"] for s in summaries.values() if s),
                                                          default=None),
                            "sites": summaries}
        result["energy"] = model.energy_report(scorer.stats)
    if cfg.ternary:
        from ..student.ternary import fp32_bytes, packed_bytes

        result["ternary_path"] = {"measured_ops": executed,
                                  "bytes": packed_bytes(scored), "fp32_bytes": fp32_bytes(model)}
    if "perplexity" not in result and "teacher_agreement" not in result and result["harness"] is None:
        raise GooseError("nothing to evaluate: give --dataset/--data-files, --cache and/or --harness")
    return result


def describe_ternary_path(t: dict) -> str:
    """The lines `goose eval --ternary` prints: what the path executed and what it holds."""
    lines = []
    for part, ops in t["measured_ops"].items():
        lines.append(f"  ternary path, {part}: read {ops['rows_read_per_token']:,.0f} of "
                     f"{ops['rows_dense_per_token']:,.0f} weight rows per token (skipped "
                     f"{ops['rows_skipped_fraction']:.1%}), {ops['additions_per_token']:,.0f} additions of non-zero "
                     f"weights and {ops['updates_per_token']:,.0f} row updates per token")
    b = t["bytes"]
    lines.append(f"  ternary path, bytes: {b['total'] / 2**20:.2f} MiB vs fp32 {t['fp32_bytes'] / 2**20:.2f} MiB "
                 f"({b['total'] / t['fp32_bytes']:.3f}x; ternary matrices {b['ternary_matrices'] / 2**20:.2f}, "
                 f"embedding {b['embedding'] / 2**20:.2f}, other {b['other'] / 2**20:.2f} MiB)")
    return "\n".join(lines)

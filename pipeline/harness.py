"""`goose eval --harness`: EleutherAI's lm-evaluation-harness (`lm-eval`, the optional extra `[harness]`) on a
student or a teacher, offline, beside goose's own protocols.

goose ships two local tasks in `harness_tasks/` (package data), whose documents are read here, in memory
(no download, nothing written to the datasets cache):
- goose_text_ppl: wikitext-style perplexity (loglikelihood_rolling) over local text files, documents split as
                  goose splits them (pipeline/data.py), the text scored as it is;
- goose_mc:       multiple choice from a local jsonl ({"question", "choices", "answer"}), acc and acc_norm.
Any other lm-eval task name is passed through (it downloads its data as lm-eval does: not offline).

The model runs through lm-eval's own `HFLM` (a student as `GooseForCausalLM`, student/hf.py; a teacher as its
transformers model) with `max_length` = goose's --seq-len and the EOS token as the prefix of every document.
For goose_text_ppl the same text is also scored by goose itself, two ways (`comparison` in the result):
- goose_rolling: goose's scorer over lm-eval's own rolling windows: must equal the harness's log-likelihood to
                 float rounding (it checks that the harness ran the same model on the same tokens);
- goose_windows: goose's `windows` protocol (documents joined with EOS, non-overlapping windows of L tokens,
                 each scoring its tokens 2..L): the protocol of `goose eval`, close to but not the same as the
                 harness's, which scores every token of each document including the first of every window
                 (seen after 1 token of context), restarts at each document and does not score the EOS
                 between documents.
Per-token NLL is the like-for-like figure (lm-eval reports word and byte perplexity and bits per byte, which
divide the same log-likelihood by words or bytes); both sides are also given in bits per byte.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GooseError
from .data import DataSpec, open_texts, split_documents

TASK_DIR = Path(__file__).resolve().parent.parent / "harness_tasks"
TEXT_TASK, MC_TASK = "goose_text_ppl", "goose_mc"
GOOSE_TASKS = (TEXT_TASK, MC_TASK)
INSTALL_HINT = "pip install 'goose-distill[harness]' (or: pip install 'lm-eval[hf]')"
LN2 = math.log(2)


def lm_eval_version() -> str | None:
    """The installed lm-eval's version, or None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lm_eval")
    except PackageNotFoundError:
        return None


def require_lm_eval() -> None:
    """A one-line GooseError, with the install command, when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise GooseError(f"--harness needs EleutherAI's lm-evaluation-harness, which is not installed "
                         f"({exc.name or exc}): {INSTALL_HINT}") from None


# ---- options -------------------------------------------------------------------------------------


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """--harness: comma-separated task names."""
    tasks = tuple(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))
    if text is not None and not tasks:
        raise GooseError(f"--harness needs task names, e.g. {TEXT_TASK},{MC_TASK}")
    return tasks


def parse_data_files(items) -> dict[str, tuple[str, ...]]:
    """--harness-data-files TASK=FILE (repeatable) -> {task: (file, ...)}."""
    files: dict[str, list[str]] = {}
    for item in items or ():
        task, sep, path = item.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise GooseError(f"--harness-data-files takes TASK=FILE (e.g. {MC_TASK}=questions.jsonl), got {item!r}")
        files.setdefault(task.strip(), []).append(path.strip())
    return {k: tuple(v) for k, v in files.items()}


@dataclass
class HarnessConfig:
    tasks: tuple[str, ...]
    data_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # goose task -> its local files
    limit: int | None = None  # documents (questions) per task
    text_column: str = "text"
    batch_size: int = 1

    def check(self) -> None:
        """Bad options fail here, before lm-eval or any model is loaded."""
        if not self.tasks:
            raise GooseError(f"--harness needs task names, e.g. {TEXT_TASK},{MC_TASK}")
        if self.limit is not None and self.limit < 1:
            raise GooseError(f"--harness-limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise GooseError(f"the harness batch size must be >= 1, got {self.batch_size}")
        for task in self.data_files:
            if task not in GOOSE_TASKS:
                raise GooseError(f"--harness-data-files names {task!r}, which is not a goose task "
                                 f"({', '.join(GOOSE_TASKS)})")
            if task not in self.tasks:
                raise GooseError(f"--harness-data-files gives files for {task!r}, which --harness does not run")
        for task in self.tasks:
            if task in GOOSE_TASKS and not self.data_files.get(task):
                what = "text files" if task == TEXT_TASK else "a jsonl file"
                default = " (or give the eval --data-files)" if task == TEXT_TASK else ""
                raise GooseError(f"harness task {task} reads local {what}: pass --harness-data-files "
                                 f"{task}=FILE{default}")
            for path in self.data_files.get(task, ()):
                if not os.path.isfile(path):
                    raise GooseError(f"harness data file not found: {path}")


# ---- the local tasks' documents (in memory; used by harness_tasks/goose_tasks.py) -------------------


def text_documents(files, text_column: str = "text") -> list[str]:
    """The documents of local text files as goose's pipeline reads them (pipeline/data.py: one per file, or
    one per WikiExtractor article; json/jsonl/parquet/csv rows by their text column), streamed: nothing is
    written to the datasets cache."""
    if not files:
        raise GooseError(f"harness task {TEXT_TASK} has no text files: pass --harness-data-files {TEXT_TASK}=FILE")
    ds = open_texts(DataSpec(data_files=tuple(str(f) for f in files), text_column=text_column), streaming=True)
    docs = [d for row in ds for t in [row.get(text_column)] if isinstance(t, str)
            for d in split_documents(t) if d.strip()]
    if not docs:
        raise GooseError(f"the text files of {TEXT_TASK} hold no text: {', '.join(map(str, files))}")
    return docs


def mc_questions(files) -> list[dict]:
    """Questions of local jsonl files: {"question": str, "choices": [str, ...], "answer": index | letter | text}
    -> rows with an integer answer. A bad line is a GooseError naming its file and line."""
    if not files:
        raise GooseError(f"harness task {MC_TASK} has no jsonl file: pass --harness-data-files {MC_TASK}=FILE")
    rows = []
    for path in files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise GooseError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise GooseError(f"{path} is not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GooseError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise GooseError(f"{where}: expected a JSON object with question, choices, answer")
            question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
            if not isinstance(question, str):
                raise GooseError(f"{where}: 'question' must be a string")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise GooseError(f"{where}: 'choices' must be a list of at least two non-empty strings")
            rows.append({"question": question, "choices": choices, "answer": _answer_index(answer, choices, where)})
    if not rows:
        raise GooseError(f"no questions in {', '.join(map(str, files))}")
    return rows


def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        if text.isdigit() and int(text) < len(choices):
            return int(text)
        if len(text) == 1 and text.isalpha() and ord(text.upper()) - ord("A") < len(choices):
            return ord(text.upper()) - ord("A")
        if answer in choices:
            return choices.index(answer)
    raise GooseError(f"{where}: 'answer' must be the index (0..{len(choices) - 1}), letter or text of one of the "
                     f"choices, got {answer!r}")


def text_ppl_dataset(files, text_column: str = "text"):
    """goose_text_ppl's data: a DatasetDict with one 'test' split of {"text": document}, built in memory."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": text_documents(files, text_column)})})


def mc_dataset(files):
    """goose_mc's data: a DatasetDict with one 'test' split of {"question", "choices", "answer"}, in memory."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(mc_questions(files))})


# ---- goose's own numbers on the harness's text ------------------------------------------------------


def rolling_nll(scorer, docs_ids, max_length: int, prefix_id: int) -> tuple[float, int]:
    """goose's scorer over lm-eval's rolling windows (lm_eval.utils.get_rolling_token_windows with
    context_len=1, as HFLM.loglikelihood_rolling): every token of every document, the first after the prefix
    token, windows of max_length inputs. Sum of NLL and count."""
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total, n = 0.0, 0
    for ids in docs_ids:
        for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=list(ids), prefix_token=prefix_id, max_seq_len=max_length, context_len=1)):
            whole = (list(context) + list(continuation))[-(max_length + 1):]
            inputs = torch.tensor(whole[:-1], dtype=torch.long).unsqueeze(0)
            tgt, last, _ = scorer.next_logprobs(inputs)  # log p of whole[1:-1], and the distribution after it
            logp = torch.cat([tgt[0].double().cpu(), last[0, whole[-1]].double().cpu().reshape(1)])
            total -= float(logp[-len(continuation):].sum())
            n += len(continuation)
    return total, n


def _figures(nll: float, tokens_per_byte: float, scored: int) -> dict:
    return {"token_nll": nll, "token_perplexity": math.exp(nll), "bits_per_byte": nll * tokens_per_byte / LN2,
            "tokens_scored": scored}


def compare_text(scorer, lm, tokenizer, samples: list[dict], max_length: int, harness_metrics: dict) -> dict:
    """The harness's goose_text_ppl figures next to goose's on the documents it scored (see the module doc)."""
    from .scoring import evaluate_stream

    samples = sorted(samples, key=lambda s: s["doc_id"])
    docs = [s["doc"]["text"] for s in samples]
    loglik = float(sum(_loglikelihood(s) for s in samples))
    harness_ids = [lm.tok_encode(d) for d in docs]  # the harness's own tokens
    n_tokens = sum(len(x) for x in harness_ids)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    per_byte = n_tokens / n_bytes
    eos = tokenizer.eos_token_id
    rolling_total, rolling_n = rolling_nll(scorer, harness_ids, max_length, lm.prefix_token_id)
    goose_ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]  # as pipeline/data.py
    stream = np.concatenate([np.asarray(x + [eos], dtype=np.int64) for x in goose_ids])
    windows = evaluate_stream(scorer, stream, "windows", max_length)
    harness = {**_figures(-loglik / n_tokens, per_byte, n_tokens),
               **{k: harness_metrics.get(k) for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}}
    rolling = _figures(rolling_total / rolling_n, per_byte, rolling_n)
    goose_windows = {**_figures(windows["nll"], per_byte, windows["tokens_scored"]), "seq_len": max_length}
    return {
        "documents": len(docs), "tokens": n_tokens, "bytes": n_bytes, "tokens_per_byte": per_byte,
        "max_length": max_length, "harness": harness, "goose_rolling": rolling, "goose_windows": goose_windows,
        # goose_rolling must equal the harness; goose_windows differs only by its protocol (module doc)
        "rolling_minus_harness_nll": rolling["token_nll"] - harness["token_nll"],
        "windows_over_harness_ppl": goose_windows["token_perplexity"] / harness["token_perplexity"],
    }


def _loglikelihood(sample: dict) -> float:
    resp = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(resp, (list, tuple)):
        resp = resp[0]
    return float(resp)


def _metrics(task_result: dict) -> dict:
    """lm-eval's 'metric,filter' keys -> 'metric' (the default filter 'none'); 'N/A' stderr -> None."""
    out = {}
    for key, value in task_result.items():
        if key in ("alias", "name", "sample_len"):  # labels; `samples` counts the documents
            continue
        name, _, flt = key.partition(",")
        if flt not in ("", "none"):
            name = f"{name},{flt}"
        out[name] = None if value == "N/A" else value
    return out


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning for a model passed as an object and for custom datasets, transformers one for
    every document longer than the model's context (lm-eval cuts it into windows), and lm-eval records the git
    commit of the working directory with a `git describe` whose "fatal: not a git repository" reaches the
    terminal outside a checkout: keep its errors only, and ask git quietly."""
    import subprocess

    from lm_eval import evaluator
    from transformers.utils import logging as hf_logging

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    logger = logging.getLogger("lm_eval")
    level, original = logger.level, getattr(evaluator, "get_git_commit_hash", None)
    hf_level = hf_logging.get_verbosity()
    logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum": lm-eval windows it
    if original is not None:
        evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        logger.setLevel(level)
        hf_logging.set_verbosity(hf_level)
        if original is not None:
            evaluator.get_git_commit_hash = original


def run_harness(model, tokenizer, cfg: HarnessConfig, *, max_length: int, scorer) -> dict:
    """lm-eval's tasks on `model` (a transformers PreTrainedModel: GooseForCausalLM or a teacher), with goose's
    comparison for goose_text_ppl. `scorer` is goose's Scorer of the same model (pipeline/evaluate.py)."""
    require_lm_eval()
    cfg.check()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if tokenizer.eos_token_id is None:
        raise GooseError("the tokenizer has no EOS token to start each harness document with")
    others = [t for t in cfg.tasks if t not in GOOSE_TASKS]
    metadata = {"goose_data_files": {k: [os.path.abspath(p) for p in v] for k, v in cfg.data_files.items()},
                "goose_text_column": cfg.text_column}
    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=bool(others), metadata=metadata)
        unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
        if unknown:
            raise GooseError(f"unknown harness task {unknown[0]!r} (goose ships {', '.join(GOOSE_TASKS)}; "
                             f"other names are lm-eval's own tasks)")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
                  batch_size=cfg.batch_size, prefix_token_id=tokenizer.eos_token_id)
        try:
            out = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                                  log_samples=True, bootstrap_iters=1000, verbosity=None)
        except GooseError:
            raise
        except Exception as exc:  # noqa: BLE001 - a task that cannot load its data, a model lm-eval refuses
            cause = exc
            while cause.__cause__ is not None or cause.__context__ is not None:
                if isinstance(cause, GooseError):
                    break
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, GooseError):
                raise GooseError(str(cause)) from None
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise GooseError(f"lm-eval failed: {type(exc).__name__}: {reason}"
                             + (" (lm-eval's own tasks download their data: offline, use goose's local tasks)"
                                if others else "")) from None
    tasks = {}
    for task in cfg.tasks:
        metrics = _metrics(out["results"].get(task, {}))
        metrics["samples"] = len(out["samples"].get(task, []))
        tasks[task] = metrics
    result = {"lm_eval_version": lm_eval_version(), "max_length": max_length, "limit": cfg.limit,
              "prefix_token_id": lm.prefix_token_id, "tasks": tasks,
              "data_files": {k: [os.path.abspath(p) for p in v] for k, v in cfg.data_files.items()}}
    if TEXT_TASK in cfg.tasks:
        result["comparison"] = compare_text(scorer, lm, tokenizer, out["samples"][TEXT_TASK], max_length,
                                            tasks[TEXT_TASK])
    return result


def describe(h: dict) -> str:
    """The harness part of `goose eval`'s text output."""
    lines = [f"  harness (lm-eval {h['lm_eval_version']}, windows of {h['max_length']} tokens"
             + (f", at most {h['limit']} documents per task" if h["limit"] else "") + "):"]
    for task, m in h["tasks"].items():
        if task == TEXT_TASK:
            lines.append(f"    {task}: word PPL {m.get('word_perplexity', float('nan')):.3f}, byte PPL "
                         f"{m.get('byte_perplexity', float('nan')):.4f}, bits/byte "
                         f"{m.get('bits_per_byte', float('nan')):.4f} over {m['samples']} documents")
        elif task == MC_TASK:
            def pm(name):
                err = m.get(f"{name}_stderr")
                return f"{m.get(name, float('nan')):.3f}" + (f" ± {err:.3f}" if isinstance(err, float) else "")
            lines.append(f"    {task}: acc {pm('acc')}, acc_norm {pm('acc_norm')} over {m['samples']} questions")
        else:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                              if isinstance(v, float) and not k.endswith("_stderr"))
            lines.append(f"    {task}: {shown} over {m['samples']} documents")
    c = h.get("comparison")
    if c:
        hh, ro, wi = c["harness"], c["goose_rolling"], c["goose_windows"]
        lines.append(f"    same text per token ({c['tokens']:,} tokens, {c['bytes']:,} bytes): harness PPL "
                     f"{hh['token_perplexity']:.3f}; goose on the harness's windows {ro['token_perplexity']:.3f}; "
                     f"goose windows protocol {wi['token_perplexity']:.3f} ({(c['windows_over_harness_ppl'] - 1):+.2%})")
        lines.append(f"    same text in bits/byte: harness {hh['bits_per_byte']:.4f}, goose windows "
                     f"{wi['bits_per_byte']:.4f}")
    return "\n".join(lines)

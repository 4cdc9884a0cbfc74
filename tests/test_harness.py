"""`goose eval --harness`: EleutherAI's lm-evaluation-harness on the shared teacher and a quick student, offline
(local task files only), its numbers checked against goose's own on the same text; and local data files never
leave a copy in the user's datasets cache.

The lm-eval tests skip without lm-eval: it is the optional extra [harness] (pip install -e '.[harness]'),
~30 packages that CI's `.[dev]` does not install.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENWIKI_TEACHER, REPO, SHARED, need
from goose.errors import GooseError
from goose.pipeline.data import DataSpec, load_texts, open_texts
from goose.pipeline.evaluate import EvalConfig, run_eval
from goose.pipeline.scoring import StudentScorer, TeacherScorer
from goose.pipeline.harness import (
    GOOSE_TASKS,
    MC_TASK,
    TASK_DIR,
    TEXT_TASK,
    HarnessConfig,
    mc_questions,
    parse_data_files,
    parse_tasks,
    require_lm_eval,
)
from test_cli import documented_keys, ok, one_line_error, run_cli

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(
    not HAVE_LM_EVAL, reason="lm-eval is not installed: it is the optional extra [harness] "
                             "(pip install -e '.[harness]'); CI installs only .[dev]")
EVAL_TEXT = SHARED / "data" / "enwiki-eval" / "wiki_50"  # held out: the stores are built from enwiki-wikiextractor
QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "banana", "seventeen"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["purple", "Celsius"], "answer": "B"},
    {"question": "The opposite of up is", "choices": ["down", "the"], "answer": "down"},
    {"question": "He was born in the year", "choices": ["1922", "blue", "of", "seven apples"], "answer": "0"},
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """Two held-out enwiki articles (cut to ~3,000 characters each, in WikiExtractor markup) and a jsonl of
    four questions."""
    raw = need(EVAL_TEXT).read_text()
    docs = re.findall(r"(<doc [^>]*>\n)(.*?)\n</doc>", raw, flags=re.S)[:2]
    folder = tmp_path_factory.mktemp("harness_text")
    held = folder / "held_out.txt"
    held.write_text("".join(f"{head}{body[:3000]}\n</doc>\n" for head, body in docs))
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return held, questions


def goose_mc(scorer, tokenizer, rows) -> tuple[float, float]:
    """acc and acc_norm computed by goose's scorer alone, the way lm-eval defines them: each choice scored as
    the continuation ' CHOICE' of 'Question: ...\\nAnswer:' (its tokens split off the tokenised whole); acc_norm
    divides by the choice's length in characters."""
    acc = acc_norm = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        lls = []
        for choice in row["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            n_ctx = len(tokenizer(context)["input_ids"])
            tgt, _, _ = scorer.next_logprobs(torch.tensor([whole]))
            lls.append(float(tgt[0, n_ctx - 1:].double().sum()))
        answer = row["answer"]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == answer
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i])) == answer
    return acc / len(rows), acc_norm / len(rows)


def check_comparison(r: dict, *, windows_tolerance: float) -> dict:
    h = r["harness"]
    c, tm = h["comparison"], h["tasks"][TEXT_TASK]
    assert c["documents"] == tm["samples"] == 2
    assert c["harness"]["tokens_scored"] == c["goose_rolling"]["tokens_scored"] == c["tokens"]
    # goose's scorer over lm-eval's own windows gives lm-eval's log-likelihood: same model, same tokens
    assert abs(c["rolling_minus_harness_nll"]) < 1e-5, c
    # lm-eval's bits per byte and byte perplexity are that log-likelihood per byte
    assert tm["bits_per_byte"] == pytest.approx(c["harness"]["token_nll"] * c["tokens_per_byte"] / math.log(2),
                                                rel=1e-6)
    assert tm["byte_perplexity"] == pytest.approx(2 ** tm["bits_per_byte"], rel=1e-6)
    # goose's windows figure on the same text is the eval's own windows result, and close to the harness's
    windows = next(p for p in r["perplexity"] if p["protocol"] == "windows")
    assert c["goose_windows"]["token_nll"] == pytest.approx(windows["nll"], rel=1e-9)
    assert abs(c["windows_over_harness_ppl"] - 1) < windows_tolerance, c
    return c


@needs_lm_eval
def test_teacher_harness_agrees_with_goose(texts):
    held, questions = texts
    teacher = str(need(ENWIKI_TEACHER))
    harness = HarnessConfig(tasks=(TEXT_TASK, MC_TASK), data_files={MC_TASK: (str(questions),)})
    r = run_eval(EvalConfig(teacher=teacher, data=DataSpec(data_files=(str(held),)), seq_len=128, device="cpu",
                            harness=harness))
    h = r["harness"]
    assert h["data_files"][TEXT_TASK] == [str(held.resolve())]  # the text task reads the eval's --data-files
    assert h["max_length"] == 128 and h["limit"] is None
    c = check_comparison(r, windows_tolerance=0.05)
    assert c["harness"]["token_perplexity"] < 1000  # the tiny teacher has learnt English (PPL ~450 on WikiText)
    m = h["tasks"][MC_TASK]
    assert m["samples"] == len(QUESTIONS)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    acc, acc_norm = goose_mc(TeacherScorer(model, torch.device("cpu")), AutoTokenizer.from_pretrained(teacher),
                             mc_questions([questions]))
    assert (m["acc"], m["acc_norm"]) == pytest.approx((acc, acc_norm))
    assert m["acc_stderr"] is not None


@pytest.fixture(scope="module")
def student_run(store, tmp_path_factory) -> Path:
    """A quick student: trained a few steps on the shared teacher's store (its best/ carries the tokenizer)."""
    from goose.pipeline.stage_two.train import run_train
    from test_train import cfg_for

    run = tmp_path_factory.mktemp("harness_student") / "run"
    run_train(cfg_for(store, run, "steps=4", "val_every=4"), progress=False)
    return run


@needs_lm_eval
def test_student_harness_through_the_cli(student_run, texts):
    held, questions = texts
    r = json.loads(ok(run_cli(["eval", student_run, "--data-files", held, "--seq-len", "64", "--device", "cpu",
                               "--harness", f"{TEXT_TASK},{MC_TASK}", "--harness-data-files",
                               f"{MC_TASK}={questions}", "--json"])).stdout)
    assert r["model"]["kind"] == "student"
    check_comparison(r, windows_tolerance=0.10)
    # every key docs/CLI.md names for `harness` is in the output
    row = next(line for line in (REPO / "docs" / "CLI.md").read_text().splitlines() if line.startswith("| `harness` |"))
    named = set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[2])) - set(GOOSE_TASKS) - {"null"}
    present = set()

    def walk(obj):
        if isinstance(obj, dict):
            present.update(obj)
            for v in obj.values():
                walk(v)

    walk(r["harness"])
    assert named <= present, named - present
    assert "harness" in documented_keys()["eval"]
    from goose.pipeline.evaluate import load_tokenizer, student_folder
    from goose.student.model import Student

    folder, meta = student_folder(str(student_run))
    model = Student.from_pretrained(folder).eval()
    acc, acc_norm = goose_mc(StudentScorer(model, torch.device("cpu")), load_tokenizer(None, meta, folder),
                             mc_questions([questions]))
    m = r["harness"]["tasks"][MC_TASK]
    assert (m["acc"], m["acc_norm"]) == pytest.approx((acc, acc_norm))


@needs_lm_eval
def test_harness_text_output_and_limit(texts):
    held, questions = texts
    out = ok(run_cli(["eval", "--teacher", need(ENWIKI_TEACHER), "--seq-len", "64", "--device", "cpu",
                      "--harness", MC_TASK, "--harness-data-files", f"{MC_TASK}={questions}",
                      "--harness-limit", "2"])).stdout
    assert "harness (lm-eval" in out and f"{MC_TASK}: acc" in out and "over 2 questions" in out
    assert "fatal" not in out
    one_line_error(run_cli(["eval", "--teacher", need(ENWIKI_TEACHER), "--device", "cpu", "--harness",
                            "no_such_task_here"]), "unknown harness task 'no_such_task_here'")


# ---- options and local task data (no lm-eval needed) ------------------------------------------------------

def test_harness_options_fail_before_anything_loads(tmp_path, texts):
    held, questions = texts
    args = ["eval", "--teacher", tmp_path / "no-teacher", "--device", "cpu"]
    one_line_error(run_cli([*args, "--harness-limit", "3"]), "need --harness TASKS")
    one_line_error(run_cli([*args, "--harness", MC_TASK]), f"--harness-data-files {MC_TASK}=FILE")
    one_line_error(run_cli([*args, "--harness", TEXT_TASK]), "or give the eval --data-files")
    one_line_error(run_cli([*args, "--harness", MC_TASK, "--harness-data-files", tmp_path / "q.jsonl"]),
                   "TASK=FILE")
    one_line_error(run_cli([*args, "--harness", MC_TASK, "--harness-data-files", f"{MC_TASK}={tmp_path / 'q.jsonl'}"]),
                   "harness data file not found")
    one_line_error(run_cli([*args, "--harness", MC_TASK, "--harness-data-files", f"{TEXT_TASK}={held}"]),
                   "which --harness does not run")
    one_line_error(run_cli([*args, "--harness", MC_TASK, "--harness-data-files", f"{MC_TASK}={questions}",
                            "--harness-limit", "0"]), "--harness-limit must be >= 1")
    one_line_error(run_cli([*args, "--harness", " , "]), "--harness needs task names")
    assert parse_tasks("goose_mc, goose_mc,x") == ("goose_mc", "x")
    assert parse_data_files(["goose_mc=a.jsonl", "goose_mc=b.jsonl"]) == {"goose_mc": ("a.jsonl", "b.jsonl")}


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch, texts):
    _, questions = texts
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(GooseError, match=r"pip install 'goose-distill\[harness\]'"):
        require_lm_eval()
    one_line_error(run_cli(["eval", "--teacher", "x", "--harness", MC_TASK, "--harness-data-files",
                            f"{MC_TASK}={questions}"]), "not installed")


def test_mc_questions_read_every_answer_form_and_name_a_bad_line(tmp_path, texts):
    _, questions = texts
    assert [q["answer"] for q in mc_questions([questions])] == [0, 1, 0, 0]
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' must be"),
                          ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
                          ('{"choices": ["a", "b"], "answer": 0}', "'question' must be"),
                          ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', "'answer' must be"),
                          ("not json", "not valid JSON")]:
        bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + line + "\n")
        with pytest.raises(GooseError, match=re.escape(f"{bad}:2: ") + ".*" + re.escape(message)):
            mc_questions([bad])


def test_harness_tasks_are_package_data():
    assert TASK_DIR == REPO / "harness_tasks"
    assert {p.name for p in TASK_DIR.iterdir()} >= {f"{t}.yaml" for t in GOOSE_TASKS} | {"goose_tasks.py"}
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"harness_tasks/*.yaml"' in pyproject and '"harness_tasks/*.py"' in pyproject
    assert re.search(r'^harness = \["lm-eval\[hf\]', pyproject, flags=re.M)
    dev = re.search(r"^dev = \[(.*)\]", pyproject, flags=re.M).group(1)
    assert "lm-eval" not in dev  # heavy: an extra of its own, not part of dev


# ---- the datasets cache: local files leave no copy outside the output folders --------------------------------

def test_local_files_leave_nothing_in_the_datasets_cache(tmp_path, monkeypatch, texts):
    import datasets

    held, _ = texts
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # read at import: patch the live value too
    spec = DataSpec(data_files=(str(held),))
    assert len(load_texts(spec)) == 1
    assert [row["text"] for row in open_texts(spec)] == load_texts(spec)["text"]
    assert list(cache.iterdir()) == []
    # a cache_dir (e.g. under a command's output folder) gets the Arrow copy instead
    out = tmp_path / "out" / "datasets"
    assert len(load_texts(spec, cache_dir=out)) == 1
    assert any(p.suffix == ".arrow" for p in out.rglob("*")) and list(cache.iterdir()) == []


def _eval_in_a_clean_environment(tmp_path, args) -> tuple[dict, Path, Path]:
    cache, home = tmp_path / "hf-datasets", tmp_path / "hf-home"
    cache.mkdir()
    home.mkdir()
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "goose.cli", "eval", *map(str, args), "--json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), cache, home


def test_eval_on_a_local_file_leaves_the_datasets_cache_empty(tmp_path, texts):
    held, _ = texts
    r, cache, home = _eval_in_a_clean_environment(
        tmp_path, ["--teacher", need(ENWIKI_TEACHER), "--data-files", held, "--seq-len", "64", "--max-tokens", "512",
                   "--device", "cpu"])
    assert r["perplexity"][0]["tokens_scored"] > 0 and r["harness"] is None
    assert list(cache.iterdir()) == [] and list(home.iterdir()) == []


@needs_lm_eval
def test_eval_with_the_harness_leaves_the_datasets_cache_empty(tmp_path, texts):
    held, questions = texts
    before = set(tmp_path.iterdir())
    r, cache, home = _eval_in_a_clean_environment(
        tmp_path, ["--teacher", need(ENWIKI_TEACHER), "--data-files", held, "--seq-len", "64", "--device", "cpu",
                   "--harness", f"{TEXT_TASK},{MC_TASK}", "--harness-data-files", f"{MC_TASK}={questions}",
                   "--harness-limit", "1"])
    assert r["harness"]["tasks"][TEXT_TASK]["samples"] == 1
    assert list(cache.iterdir()) == [] and list(home.iterdir()) == []
    assert set(tmp_path.iterdir()) == before | {cache, home}  # nothing written in the working directory either

"""The fault suite for the user-facing commands: every bad input is one `error: ...` line on stderr, exit 2,
no traceback, and nothing left behind that looks complete; signals stop commands cleanly.

The bad-input matrix runs the real CLI (click's CliRunner) on tiny fixtures: a random tiny student saved
with the quick start's word tokenizer (no store, no network), and hand-made run folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import GPT2_TOKENIZER, need
from goose.cli import main
from goose.pipeline.stage_two.config import TrainConfig, dump_config
from goose.pipeline.quickstart import make_corpus, save_tokenizer
from test_student import random_student

# files whose presence says "this finished": none may appear because of a failed command
COMPLETE_MARKERS = {"report.md", "summary.json", "DONE", "DONE.json", "metrics.json", "model.safetensors"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny student (with its tokenizer) and damaged copies of it, a text, configs, run folders."""
    root = tmp_path_factory.mktemp("faults")
    student = root / "student" / "best"
    random_student().save_pretrained(student)
    save_tokenizer(student)
    (student / "goose.json").write_text(json.dumps({"teacher": None}))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_corpus(20, 0)))

    def damaged(name: str, edit) -> Path:
        folder = root / name / "best"
        folder.mkdir(parents=True)
        for f in student.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        edit(folder)
        return folder.parent

    w = {"root": root, "student": student.parent, "text": text}
    w["truncated"] = damaged("truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]))
    w["bad_config_json"] = damaged("bad_config_json", lambda f: (f / "config.json").write_text('{"d_model": 64,'))
    w["wrong_config_json"] = damaged("wrong_config_json", lambda f: (f / "config.json").write_text(
        json.dumps({**json.loads((student / "config.json").read_text()), "d_model": 96, "head_size": 32})))
    w["nul_tokenizer"] = damaged("nul_tokenizer", lambda f: (f / "tokenizer.json").write_bytes(
        b"\0" * (f / "tokenizer.json").stat().st_size))
    w["bad_goose_json"] = damaged("bad_goose_json", lambda f: (f / "goose.json").write_text("{"))

    (root / "list.yaml").write_text("- steps: 3\n- lr: 1\n")
    (root / "scalar.yaml").write_text("42\n")
    (root / "notyaml.yaml").write_text("steps: [1,\n")

    # run folders for validate / report: a config, a best/ model, no metrics.json (or an empty config)
    for name, config in (("run_empty_config", ""), ("run_no_metrics", None)):
        run = root / name
        (run / "best").mkdir(parents=True)
        for f in student.iterdir():
            if f.name in ("config.json", "model.safetensors"):
                (run / "best" / f.name).write_bytes(f.read_bytes())
        if config is None:
            dump_config(TrainConfig(cache=str(root / "no_store.zarr"), out=str(run)), run / "config.yaml")
        else:
            (run / "config.yaml").write_text(config)
    logged = root / "logged_run"
    logged.mkdir()
    (logged / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 5.0, "lr": 1e-3}) + "\n"
        + json.dumps({"step": 1, "kind": "val", "val_loss": 5.0, "val_ppl": 148.4, "teacher_ppl": 40.0}) + "\n")
    (root / "a_file").write_text("not a folder")
    (root / "not_quickstart").mkdir()
    (root / "not_quickstart" / "keep.txt").write_text("someone's work")
    (root / "grid.yaml").write_text("runs:\n  kd: {config: kd}\n")
    (root / "list_grid.yaml").write_text("- kd\n")
    return w


def _train(*extra):
    return lambda w: ["train-from-cache", "--cache", str(w["root"] / "no_store.zarr"), "--out",
                      str(w["root"] / "out" / "train"), *extra]


def _eval(student="student", *extra):
    return lambda w: ["eval", str(w[student]), "--data-files", str(w["text"]), *extra]


def _generate(student="student", *extra):
    return lambda w: ["generate", str(w[student]), "--prompt", "the dog", *extra]


def _gpt2_tokenizer(w):
    return ["eval", str(w["student"]), "--data-files", str(w["text"]), "--tokenizer", str(need(GPT2_TOKENIZER))]


CASES = {
    # config: types, ranges, roots (train-from-cache fails before any work)
    "set-list-for-number": (_train("--set", "optim.lr=[1, 2]"), "optim.lr"),
    "set-scalar-for-section": (_train("--set", "optim=3"), "section"),
    "set-scalar-for-nested-section": (_train("--set", "loss.align=mse"), "section"),
    "config-list-root": (lambda w: _train("--config", str(w["root"] / "list.yaml"))(w), "mapping"),
    "config-scalar-root": (lambda w: _train("--config", str(w["root"] / "scalar.yaml"))(w), "mapping"),
    "config-not-yaml": (lambda w: _train("--config", str(w["root"] / "notyaml.yaml"))(w), "cannot parse"),
    "log-every-0": (_train("--set", "log_every=0"), "log_every"),
    "val-every-0": (_train("--set", "val_every=0"), "val_every"),
    "ckpt-every-0": (_train("--set", "ckpt_every=0"), "ckpt_every"),
    "val-windows-0": (_train("--set", "val_windows=0"), "val_windows"),
    "val-windows-negative": (_train("--set", "val_windows=-3"), "val_windows"),
    "lr-nan": (_train("--set", "optim.lr=nan"), "finite"),
    "lr-inf": (_train("--set", "optim.lr=.inf"), "finite"),
    "lr-zero": (_train("--set", "optim.lr=0"), "optim.lr"),
    "tensorboard-maybe": (_train("--set", "tensorboard=maybe"), "true or false"),
    "bool-as-number": (_train("--set", "carry_state=1"), "true or false"),
    "steps-fraction": (_train("--set", "steps=2.5"), "whole number"),
    "nan-patience-0": (_train("--set", "nan_patience=0"), "nan_patience"),
    "max-rollbacks-negative": (_train("--set", "max_rollbacks=-1"), "max_rollbacks"),
    "string-for-list": (_train("--set", "curriculum.temperatures=hot"), "list"),
    "empty-override-key": (_train("--set", "optim.=3"), "empty key"),
    # eval
    "eval-seq-len-0": (_eval("student", "--seq-len", "0"), "--seq-len"),
    "eval-seq-len-1": (_eval("student", "--seq-len", "1"), "--seq-len"),
    "eval-seq-len-negative": (_eval("student", "--seq-len", "-4"), "--seq-len"),
    "eval-stride-0": (_eval("student", "--protocol", "sliding", "--stride", "0"), "--stride"),
    "eval-stride-above-seq-len": (_eval("student", "--protocol", "sliding", "--seq-len", "8", "--stride", "9"),
                                  "--stride"),
    "eval-cache-windows-0": (_eval("student", "--cache", "x.zarr", "--cache-windows", "0"), "--cache-windows"),
    "eval-max-tokens-1": (_eval("student", "--max-tokens", "1"), "--max-tokens"),
    "eval-tokenizer-mismatch": (_gpt2_tokenizer, "do not belong together"),
    "eval-truncated-weights": (_eval("truncated"), "model.safetensors"),
    "eval-broken-config-json": (_eval("bad_config_json"), "config.json"),
    "eval-config-json-other-model": (_eval("wrong_config_json"), "model.safetensors"),
    "eval-nul-tokenizer": (_eval("nul_tokenizer"), "tokenizer"),
    "eval-broken-goose-json": (_eval("bad_goose_json"), "goose.json"),
    # generate
    "generate-max-new-tokens-0": (_generate("student", "--max-new-tokens", "0"), "--max-new-tokens"),
    "generate-max-new-tokens-negative": (_generate("student", "--max-new-tokens", "-1"), "--max-new-tokens"),
    "generate-top-p-0": (_generate("student", "--top-p", "0"), "--top-p"),
    "generate-truncated-weights": (_generate("truncated"), "model.safetensors"),
    "generate-nul-tokenizer": (_generate("nul_tokenizer"), "tokenizer"),
    # validate
    "validate-empty-config-yaml": (lambda w: ["validate", str(w["root"] / "run_empty_config")], "config.yaml"),
    "validate-missing-metrics-json": (lambda w: ["validate", str(w["root"] / "run_no_metrics")], "metrics.json"),
    # report
    "report-out-under-a-file": (lambda w: ["report", str(w["root"] / "logged_run"), "--out",
                                           str(w["root"] / "a_file" / "report")], "cannot write the report"),
    # quickstart
    "quickstart-foreign-folder": (lambda w: ["quickstart", "--out", str(w["root"] / "not_quickstart")],
                                  "not a quickstart folder"),
    "quickstart-zero-steps": (lambda w: ["quickstart", "--out", str(w["root"] / "out" / "qs"), "--teacher-steps", "0"],
                              "--teacher-steps"),
    # ablate
    "ablate-parallel-0": (lambda w: ["ablate", "--cache", "x.zarr", "--grid", "distill", "--out",
                                     str(w["root"] / "out" / "abl"), "--parallel", "0"], "--parallel"),
    "ablate-bad-set": (lambda w: ["ablate", "--cache", "x.zarr", "--grid", str(w["root"] / "grid.yaml"), "--out",
                                  str(w["root"] / "out" / "abl"), "--set", "log_every=0"], "log_every"),
    "ablate-list-grid": (lambda w: ["ablate", "--cache", "x.zarr", "--grid", str(w["root"] / "list_grid.yaml"),
                                    "--out", str(w["root"] / "out" / "abl")], "no runs"),
}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_exit_2_and_leaves_nothing_complete(case, world):
    args, expect = CASES[case]
    before = _files(world["root"])
    r = CliRunner().invoke(main, args(world))
    lines = r.stderr.splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.exception
    new = _files(world["root"]) - before
    assert not [p for p in new if p.name in COMPLETE_MARKERS], sorted(new)
    assert not (world["root"] / "out" / "train").exists()


def test_report_to_a_read_only_folder(world, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the case 'report-out-under-a-file' covers the error")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["report", str(world["root"] / "logged_run"), "--out", str(ro / "rep")])
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 2 and r.stderr.startswith("error: cannot write the report") and len(r.stderr.splitlines()) == 1


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_generate_streams_tokens_as_they_come(world):
    """100M tokens would take hours: the first words must show up at once, not at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "generate", str(world["student"]), "--prompt", "the dog",
                             "--max-new-tokens", "100000000", "--ignore-eos"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        got = b""

        def enough():
            nonlocal got
            got += proc.stdout.read() or b""
            return len(got) >= 60

        _wait_for(enough, 120, "streamed tokens")
        assert proc.poll() is None  # still generating: the words came while it runs
        assert got.startswith(b"the dog")
    finally:
        proc.send_signal(signal.SIGINT)
        os.set_blocking(proc.stdout.fileno(), True)
        try:  # keep draining both pipes: a child blocked on a full pipe could not finish its last lines
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 130 and "interrupted" in err.decode()


def test_ablate_forwards_sigterm_to_its_trainings_and_exits_128_plus_signal(tmp_path, store):
    grid = tmp_path / "grid.yaml"
    grid.write_text("steps: 100000\nbatch_size: 2\nval_every: 100000\nckpt_every: 100000\nval_windows: 2\n"
                    "tensorboard: false\nset: ['model.preset=tiny']\nruns:\n  kd: {config: kd}\n  ce: {config: ce_only}\n")
    out = tmp_path / "abl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "ablate", "--cache", store, "--grid", str(grid),
                             "--out", str(out), "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    try:
        # both trainings are in their loop once each has written its step-0 checkpoint
        _wait_for(lambda: all(any((out / n / "checkpoints").glob("step_*")) for n in ("kd", "ce")), 180,
                  "both trainings to start")
        children = _children(proc.pid)
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted by signal 15"), stderr
    assert not [c for c in children if _alive(c)]  # no orphans
    for name in ("kd", "ce"):
        events = [json.loads(x) for x in (out / name / "events.jsonl").read_text().splitlines() if x.strip()]
        assert any(e.get("kind") == "interrupted" for e in events), name  # each checkpointed on the signal
        assert not (out / name / "DONE").exists()
    assert not (out / "report" / "report.md").exists()

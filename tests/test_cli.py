"""The command line as a whole: every option of every command has help (walked from click's command tree),
examples close every --help, shared options are uniform, configs resolve by name from any directory,
--json output parses and carries the keys docs/CLI.md documents, and train-from-cache on an existing run
folder refuses, resumes or overwrites (never deleting someone else's files)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import goose
from conftest import ENWIKI_TEXT
from goose import cli
from goose.cli import main
from goose.pipeline.stage_two import config as config_mod
from goose.pipeline.stage_two.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLI_DOC = REPO / "docs" / "CLI.md"

TRAIN = ["--set", "model.preset=tiny", "--set", "batch_size=2", "--set", "log_every=1", "--set", "val_every=2",
         "--set", "ckpt_every=2", "--set", "val_windows=2", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=1", "--steps", "2", "--device", "cpu", "--no-progress"]


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def one_line_error(result, pattern):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


def all_commands(command: click.Command = main, path: tuple[str, ...] = ()):
    """(path, command) of every command and group in the tree, from click itself."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from all_commands(sub, path + (name,))


COMMANDS = list(all_commands())


# ---- help: every option, every command ---------------------------------------------------------------

def test_the_tree_has_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in ("cache-teacher", "train-from-cache", "eval", "generate", "validate", "report", "ablate",
                     "quickstart", "export", "cache info", "cache verify", "cache finalize", "config list",
                     "config show"):
        assert expected in names


@pytest.mark.parametrize("path", [" ".join(p) or "goose" for p, _ in COMMANDS])
def test_every_option_has_help_and_every_help_ends_with_examples(path):
    command = dict((" ".join(p) or "goose", c) for p, c in COMMANDS)[path]
    missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, f"options without help in `goose {path}`: {missing}"
    for p in command.params:
        if not isinstance(p, click.Option) or p.is_flag or p.multiple:
            continue
        if p.default is not None and "UNSET" not in repr(p.default):  # a default that matters is shown
            assert p.show_default, f"`goose {path}` {p.opts[0]}: default {p.default!r} not shown"
    assert command.epilog and "Examples:" in command.epilog, f"`goose {path}` has no examples"
    examples = [line.strip() for line in command.epilog.splitlines()[2:]]
    assert examples and all(line.startswith("goose ") for line in examples), examples
    result = ok(run_cli([*path.split(), "--help"] if path != "goose" else ["--help"]))
    assert result.output.rstrip().splitlines()[-1].strip() == examples[-1]
    for p in command.params:
        if isinstance(p, click.Option):
            assert p.opts[-1] in result.output or p.opts[0] in result.output


def test_uniform_options():
    seen_dtype, seen_device, seeds = 0, 0, {}
    for path, command in COMMANDS:
        for p in command.params:
            if not isinstance(p, click.Option):
                continue
            if p.name == "dtype":
                seen_dtype += 1
                assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == cli.DTYPES, path
                assert p.default == "auto"
            if p.name == "device":
                seen_device += 1
                assert p.default == "auto" or (p.default is None and "auto" in str(p.show_default)), path
            if p.name == "seed":
                seeds[" ".join(path)] = p.help
            if p.name == "as_json":
                assert p.opts == ["--json"]
    assert seen_dtype == 2 and seen_device >= 5
    assert "RS-KD" in seeds["cache-teacher"]
    assert "initialisation" in seeds["train-from-cache"] and "data order" in seeds["train-from-cache"]
    assert "sampling" in seeds["generate"]
    assert all(help_text.startswith("Seeds") for help_text in seeds.values()), seeds
    # --out everywhere a command writes a folder or a store; --output stays as cache-teacher's alias
    for name in ("cache-teacher", "train-from-cache", "report", "ablate", "quickstart", "export"):
        opts = next(p for p in main.commands[name].params if p.name in ("out", "output")).opts
        assert "--out" in opts and "-o" in opts, name
    assert "--output" in next(p for p in main.commands["cache-teacher"].params if p.name == "output").opts


def test_train_flag_defaults_shown_in_help_are_the_configs():
    shown = {p.name: p.show_default for p in main.commands["train-from-cache"].params}
    for key in ("steps", "batch_size", "seed", "device", "amp"):
        assert shown[key] == f"the config's {key}, else {getattr(TrainConfig(), key)}", key


def test_cache_teacher_options_are_its_configs_fields():
    """Every CacheTeacherConfig (and DataSpec) field is an option with the config's default and help, and the
    options given nothing build the config's defaults."""
    import dataclasses

    from goose.pipeline.stage_one.config import CacheTeacherConfig
    from goose.pipeline.data import DataSpec

    params = {p.name: p for p in main.commands["cache-teacher"].params}
    for cls in (CacheTeacherConfig, DataSpec):
        for f in dataclasses.fields(cls):
            if f.name == "data":
                continue
            assert params[f.name].help == f.metadata["help"], f.name
    ctx = main.commands["cache-teacher"].make_context("cache-teacher", ["--out", "s.zarr"])
    kw = dict(ctx.params)
    kw.pop("as_json")
    assert cli.config_from_options(CacheTeacherConfig, kw) == CacheTeacherConfig(output="s.zarr") and not kw


def test_train_from_cache_requires_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run_cli(["train-from-cache", "--cache", "x.zarr"]), "pass --out")
    assert not (tmp_path / "runs").exists()


def test_usage_errors_are_one_line():
    one_line_error(run_cli(["cache-teacher", "--teacher", "gpt2"]), "Missing option '--out'")
    one_line_error(run_cli(["eval", "x", "--dtype", "float64"]), "--dtype")
    one_line_error(run_cli(["no-such-command"]), "No such command")


# ---- configs by name, from any directory -------------------------------------------------------------

def test_shipped_configs_are_package_data():
    assert config_mod.CONFIG_DIR == Path(goose.__file__).resolve().parent / "configs"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'package-dir\s*=\s*\{\s*"goose"\s*=\s*"\."', pyproject)
    assert '"configs/*.yaml"' in pyproject
    assert set(config_mod.shipped_configs()) >= {"ce_only", "kd", "ctkd", "pocl", "align", "full"}


@pytest.mark.parametrize("name", ["kd", "kd.yaml", "configs/kd.yaml"])
def test_config_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(config_mod.resolve_config_path(name)) == config_mod.CONFIG_DIR / "kd.yaml"
    assert load_config(name).loss.kd == "topk"
    shown = yaml.safe_load(ok(run_cli(["config", "show", name])).stdout)
    assert shown["temperature"]["value"] == 1.0 and shown["steps"] == 2000


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kd.yaml").write_text("steps: 7\n")
    assert load_config("kd.yaml").steps == 7
    assert load_config("kd").steps == 2000


def test_unknown_config_name_suggests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run_cli(["config", "show", "kdd"]), "did you mean 'kd'")
    one_line_error(run_cli(["train-from-cache", "--cache", "x", "--out", tmp_path / "r", "--config", "nope.yaml"]),
                   "`goose config list`")


def test_config_list_and_show_every_default():
    listed = ok(run_cli(["config", "list"])).stdout
    assert all(name in listed for name in ("ce_only", "kd", "full"))
    shown = yaml.safe_load(ok(run_cli(["config", "show"])).stdout)
    assert shown == TrainConfig().to_dict()
    shown = yaml.safe_load(ok(run_cli(["config", "show", "full", "--set", "optim.lr=1e-3", "--set", "steps=5"])).stdout)
    assert shown["optim"]["lr"] == 1e-3 and shown["steps"] == 5 and shown["temperature"]["mode"] == "ctkd"
    assert set(shown["monitor"]) == {f.name for f in dataclasses.fields(config_mod.MonitorConfig)}


@pytest.mark.parametrize("key, nearest", [("optim.lrr", "optim.lr"), ("lr", "optim.lr"), ("stepz", "steps"),
                                          ("warmup_steps", "optim.warmup_steps"), ("loss.algn.loss", "loss.align"),
                                          ("temperature.mod", "temperature.mode")])
def test_unknown_key_suggests_the_nearest(key, nearest, tmp_path):
    one_line_error(run_cli(["config", "show", "--set", f"{key}=1"]), f"did you mean {nearest!r}?")
    config = tmp_path / "c.yaml"
    parts = key.split(".")
    data: dict = {}
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = 1
    config.write_text(yaml.safe_dump(data))
    one_line_error(run_cli(["train-from-cache", "--cache", "x", "--out", tmp_path / "r", "--config", config]),
                   f"did you mean {nearest!r}?")


# ---- --json: parses, and has the documented keys ------------------------------------------------------

def documented_keys() -> dict[str, list[str]]:
    """Command -> the keys docs/CLI.md's table lists for its --json output."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in CLI_DOC.read_text().splitlines():
        heading = re.match(r"^### `goose ([a-z -]+)`", line)
        if heading:
            current = heading.group(1)
            sections[current] = []
            continue
        row = re.match(r"^\| `([^`]+)` \|", line)
        if current and row:
            sections[current].append(row.group(1))
    return sections


def lookup(obj, path: str):
    """Every value at a documented path ('a.b', 'a[].b', '[].name'); asserts each step exists."""
    values = [obj]
    for part in re.findall(r"\[\]|[^.\[\]]+", path):
        nxt = []
        for v in values:
            if part == "[]":
                assert isinstance(v, list), (path, v)
                nxt += v
            else:
                assert isinstance(v, dict) and part in v, f"{path}: no {part!r} in {sorted(v) if isinstance(v, dict) else v}"
                nxt.append(v[part])
        values = nxt
    return values


def check_json(command: str, result, conditional: tuple[str, ...] = ()):
    out = json.loads(result.stdout)  # strict: the whole of stdout is one JSON document
    keys = documented_keys()[command]
    assert keys, command
    for key in keys:
        if key.split(".")[0] not in conditional:
            lookup(out, key)
    return out


def test_every_json_command_is_documented():
    documented = set(documented_keys())
    with_json = {" ".join(p) for p, c in COMMANDS if any(getattr(q, "name", "") == "as_json" for q in c.params)}
    assert with_json == documented, (with_json ^ documented)
    for name in ("cache-teacher", "train-from-cache", "validate", "generate", "eval", "cache info"):
        assert name in with_json


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = ok(run_cli(["train-from-cache", "--cache", store, "--out", out, *TRAIN, "--json"]))
    return out, r


def test_train_from_cache_json(trained):
    out, r = trained
    s = check_json("train-from-cache", r)
    assert s["steps"] == 2 and s["run"] == str(out) and s["files"]["best"] == str(out / "best")
    assert s["files"]["metrics.jsonl"] and not s["interrupted"]


def test_validate_generate_eval_report_export_json(trained, store, tmp_path):
    run, _ = trained
    v = run_cli(["validate", run, "--max-ppl-ratio", "1e9", "--min-rate", "0", "--max-rate", "1", "--max-dead", "1",
                 "--max-saturated", "1", "--json"])
    assert v.exit_code in (0, 1), v.output
    v = check_json("validate", v)
    assert v["total"] == len(v["checks"]) and v["passed"] <= v["total"]
    g = check_json("generate", ok(run_cli(["generate", run, "--prompt", "The history of", "--max-new-tokens", "5",
                                           "--ignore-eos", "--json"])))
    assert g["n_new"] == 5 and isinstance(g["text"], str) and g["prompt"] == "The history of"
    text = ENWIKI_TEXT / "wiki_00"  # the store's own text
    e = check_json("eval", ok(run_cli(["eval", run, "--data-files", text, "--max-tokens", "256", "--seq-len", "32",
                                       "--cache", store, "--cache-windows", "2", "--json"])), conditional=("ternary_path",))
    assert e["warnings"]  # the store's own text: not held out, and the JSON says so
    check_json("report", ok(run_cli(["report", run, "--out", tmp_path / "report", "--json"])))
    x = check_json("export", ok(run_cli(["export", run, "--out", tmp_path / "hf", "--json"])))
    assert "config.json" in x["files"]


def test_cache_commands_json(store, tiny_teacher, corpus_file, tmp_path):
    out = tmp_path / "s.zarr"
    args = ["cache-teacher", "--out", out, "--teacher", tiny_teacher, "--data-files", corpus_file, "--seq-len", "32",
            "--max-tokens", "128", "--top-k", "8", "--chunk-windows", "2", "--batch-size", "2", "--no-progress",
            "--device", "cpu", "--json"]
    s = check_json("cache-teacher", ok(run_cli(args)))
    assert s["tokens"] == 128 and s["output"] == str(out) and s["tokens_computed"] == 128
    again = check_json("cache-teacher", ok(run_cli([a if a != "--out" else "--output" for a in args])))
    assert again["already_complete"] and again["tokens_computed"] == 0
    check_json("cache info", ok(run_cli(["cache", "info", out, "--json"])))
    assert check_json("cache verify", ok(run_cli(["cache", "verify", out, "--json"])))["ok"]
    assert check_json("cache finalize", ok(run_cli(["cache", "finalize", out, "--json"])))["already_complete"]


def test_config_json():
    listed = check_json("config list", ok(run_cli(["config", "list", "--json"])))
    assert {c["name"] for c in listed} == set(config_mod.shipped_configs())
    shown = check_json("config show", ok(run_cli(["config", "show", "kd", "--json"])))
    assert shown == load_config("kd").to_dict()


def test_ablate_json_and_storage_options(store, tmp_path):
    """One tiny run through the real ablate: --storage-options reaches the run's command line (and its
    config), --json carries the documented keys."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("runs:\n  kd: {config: kd}\n")
    options = {"auto_mkdir": False}
    url = f"file://{Path(store).resolve()}"  # fsspec options need an fsspec URL
    r = ok(run_cli(["ablate", "--cache", url, "--grid", grid, "--out", tmp_path / "abl", "--json",
                    "--storage-options", json.dumps(options),
                    *TRAIN[:TRAIN.index("--steps")], "--set", "steps=2", "--set", "device=cpu"]))
    a = check_json("ablate", r)
    assert a["finished"] == ["kd"] and not a["failed"]
    saved = yaml.safe_load((tmp_path / "abl" / "kd" / "config.yaml").read_text())
    assert saved["storage_options"] == options
    one_line_error(run_cli(["ablate", "--cache", store, "--grid", grid, "--out", tmp_path / "abl2",
                            "--storage-options", "[1]"]), "--storage-options must be a JSON object")


def test_run_commands_pass_storage_options(tmp_path):
    from goose.pipeline.ablate import BUILTIN_GRIDS, run_commands

    cmds = run_commands(BUILTIN_GRIDS["distill"], "s3://b/s.zarr", tmp_path, storage_options={"anon": True})
    for cmd in cmds.values():
        i = cmd.index("--storage-options")
        assert json.loads(cmd[i + 1]) == {"anon": True}


def test_quickstart_json(tmp_path, monkeypatch):
    from goose.pipeline import quickstart

    monkeypatch.setattr(quickstart, "run_quickstart",
                        functools.partial(quickstart.run_quickstart, train_docs=300, cache_tokens=16384))
    r = ok(run_cli(["quickstart", "--out", tmp_path / "qs", "--teacher-steps", "10", "--student-steps", "4",
                    "--json"]))
    s = check_json("quickstart", r)
    assert set(s["held_out_ppl"]) == {"teacher", "student_kd", "student_ce"}


# ---- train-from-cache on a folder that already holds a run --------------------------------------------

def test_existing_run_folder_refuse_resume_overwrite(store, tmp_path):
    out = tmp_path / "run"
    args = ["train-from-cache", "--cache", store, "--out", out, *TRAIN]
    ok(run_cli(args))
    first = (out / "metrics.jsonl").read_text()
    # no flag: refused, nothing touched
    one_line_error(run_cli(args), "pass --resume to continue it or --overwrite")
    assert (out / "metrics.jsonl").read_text() == first
    one_line_error(run_cli([*args, "--resume", "--overwrite"]), "exclude each other")
    # --resume continues
    ok(run_cli([*args, "--resume", "--steps", "4"]))
    assert max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) == 4
    # --overwrite starts afresh: the old steps are gone
    r = ok(run_cli([*args, "--overwrite", "--json"]))
    assert json.loads(r.stdout)["steps"] == 2
    assert max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) == 2
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_0000000", "step_0000002"]


def test_overwrite_never_deletes_other_files(store, tmp_path):
    out = tmp_path / "run"
    args = ["train-from-cache", "--cache", store, "--out", out, *TRAIN]
    ok(run_cli(args))
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    one_line_error(run_cli([*args, "--overwrite"]), "notes.txt")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_checks_the_store_before_deleting(store, tmp_path):
    out = tmp_path / "run"
    ok(run_cli(["train-from-cache", "--cache", store, "--out", out, *TRAIN]))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = run_cli(["train-from-cache", "--cache", tmp_path / "missing.zarr", "--out", out, *TRAIN, "--overwrite"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_refuses_a_folder_in_use(store, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    ok(run_cli(["train-from-cache", "--cache", store, "--out", out, *TRAIN]))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19] \
            if Path(f"/proc/{sleeper.pid}/stat").exists() else ""
        (out / ".lock").write_text(f"{sleeper.pid} {started}")
        one_line_error(run_cli(["train-from-cache", "--cache", store, "--out", out, *TRAIN, "--overwrite"]),
                       f"in use by a running training (pid {sleeper.pid} on host ")  # the older lock form
        assert (out / "checkpoints").is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.path.exists(out / ".lock")

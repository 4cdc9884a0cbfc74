"""Reading a store over fsspec: `cache info`, `cache verify`, `train-from-cache` and `eval --cache` against
fsspec's in-process `memory://` filesystem and a local `file://` URL, with --storage-options on each.

memory:// lives in this process only, so every command runs in-process (CliRunner) and num_workers is 0.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from goose.cache.reader import CacheReader
from goose.cli import main

# fsspec's memory and local filesystems take any keyword, so a harmless one shows the options travel
OPTIONS = json.dumps({"auto_mkdir": False})


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def local_store(tiny_teacher, corpus_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fsspec") / "tiny.zarr"
    ok(run_cli(["cache-teacher", "-o", out, "--teacher", tiny_teacher, "--data-files", corpus_file,
                "--seq-len", "32", "--max-tokens", str(24 * 32), "--top-k", "8", "--chunk-windows", "4",
                "--batch-size", "4", "--no-progress", "--device", "cpu"]))
    return str(out)


@pytest.fixture(scope="module")
def memory_store(local_store) -> str:
    url = f"memory://goose-test-{uuid.uuid4().hex}/tiny.zarr"
    fs = fsspec.filesystem("memory")
    fs.put(local_store, url, recursive=True)
    yield url
    fs.rm(url, recursive=True)


@pytest.fixture(scope="module")
def file_store(local_store) -> str:
    return "file://" + str(Path(local_store).resolve())


def test_memory_copy_is_the_local_store(local_store, memory_store):
    local, remote = CacheReader(local_store), CacheReader(memory_store)
    assert remote.n_windows == local.n_windows == 24
    assert remote.meta == local.meta


@pytest.mark.parametrize("which", ["memory_store", "file_store"])
def test_info_and_verify(which, request, local_store):
    url = request.getfixturevalue(which)
    info = json.loads(ok(run_cli(["cache", "info", url, "--json", "--storage-options", OPTIONS])).output)
    want = json.loads(ok(run_cli(["cache", "info", local_store, "--json"])).output)
    assert info["url"] == url and info["complete"]
    for key in ("windows", "tokens", "teacher_ppl", "mean_topk_coverage", "bytes_on_disk", "spec", "provenance"):
        assert info[key] == want[key], key
    text = ok(run_cli(["cache", "info", url, "--storage-options", OPTIONS])).output
    assert text.startswith(f"store        {url}")
    r = ok(run_cli(["cache", "verify", url, "--storage-options", OPTIONS]))
    assert r.output.startswith("verify: OK") and url in r.output


def test_verify_finds_a_missing_chunk_over_fsspec(local_store):
    url = f"memory://goose-test-{uuid.uuid4().hex}/tiny.zarr"
    fs = fsspec.filesystem("memory")
    fs.put(local_store, url, recursive=True)
    try:
        chunk = sorted(p for p in fs.find(url + "/topk_ids") if "/c/" in p)[0]
        fs.rm(chunk)
        r = run_cli(["cache", "verify", url, "--storage-options", OPTIONS])
        assert r.exit_code == 2, (r.output, r.stderr)
        assert "FAIL" in r.stderr and "topk_ids" in r.stderr
    finally:
        fs.rm(url, recursive=True)


TRAIN = ["--set", "model.preset=tiny", "--set", "batch_size=2", "--set", "log_every=1", "--set", "val_every=2",
         "--set", "ckpt_every=2", "--set", "val_windows=2", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=1", "--set", "num_workers=0", "--steps", "2", "--device", "cpu",
         "--no-progress"]


def train(url, out, *extra):
    ok(run_cli(["train-from-cache", "--cache", url, "--out", out, *TRAIN, *extra]))
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_numbers(a: dict, b: dict):
    skip = ("time", "seconds", "per_s", "elapsed", "wall")
    keys = [k for k in a if isinstance(a[k], (int, float)) and not any(s in k for s in skip)]
    return {k: (a[k], b.get(k)) for k in keys if a[k] != b.get(k)}


@pytest.fixture(scope="module")
def local_run(local_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "local"
    return out, train(local_store, out, "--val-cache", local_store)


@pytest.mark.parametrize("which", ["memory_store", "file_store"])
def test_train_over_fsspec_equals_local(which, request, local_run, tmp_path, monkeypatch):
    url = request.getfixturevalue(which)
    opened = []
    real_init = CacheReader.__init__

    def spy(self, url_, **kw):
        opened.append((url_, kw.get("storage_options")))
        return real_init(self, url_, **kw)

    monkeypatch.setattr(CacheReader, "__init__", spy)
    log = train(url, tmp_path / "run", "--val-cache", url, "--storage-options", OPTIONS)
    # every reader (training store, --val-cache, the loader's, validation's) got the options
    assert len(opened) >= 3 and {u for u, _ in opened} == {url}
    assert all(o == json.loads(OPTIONS) for _, o in opened), opened
    _, local_log = local_run
    steps = [m for m in log if m.get("step") == 2 and "loss" in m]
    local_steps = [m for m in local_log if m.get("step") == 2 and "loss" in m]
    assert steps and local_steps
    assert steps[0]["loss"] == local_steps[0]["loss"]
    assert not same_numbers(local_steps[0], steps[0]), same_numbers(local_steps[0], steps[0])
    vals = [m for m in log if "val_ppl" in m]
    local_vals = [m for m in local_log if "val_ppl" in m]
    assert vals and vals[-1]["val_ppl"] == local_vals[-1]["val_ppl"]
    # options that are not credentials are kept in the run's config.yaml as given
    assert "auto_mkdir: false" in (tmp_path / "run" / "config.yaml").read_text()


def test_config_key_and_resume_with_other_options(memory_store, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"storage_options": {"auto_mkdir": False, "secret": "hunter2"}}))
    train(memory_store, out, "--config", cfg)
    assert "hunter2" not in (out / "config.yaml").read_text()
    # credentials may change between resumes
    r = ok(run_cli(["train-from-cache", "--cache", memory_store, "--out", out, *TRAIN, "--steps", "3", "--resume",
                    "--storage-options", json.dumps({"secret": "rotated"})]))
    assert "trained: 3 steps" in r.output


def test_eval_cache_over_fsspec(memory_store, local_store, local_run, corpus_file):
    run, _ = local_run
    common = ["eval", run, "--device", "cpu", "--json", "--cache-windows", "4"]
    local = json.loads(ok(run_cli([*common, "--cache", local_store])).output)
    remote = json.loads(ok(run_cli([*common, "--cache", memory_store, "--storage-options", OPTIONS])).output)
    a, b = local["teacher_agreement"], remote["teacher_agreement"]
    assert b["cache"] == memory_store and b["windows"] == a["windows"]
    for key in ("kl_to_teacher", "top1_agreement", "ece", "accuracy"):
        assert b[key] == a[key], key
    # the held-out check reads the --cache store over fsspec too: the store's own text is flagged
    r = ok(run_cli(["eval", run, "--device", "cpu", "--json", "--cache", memory_store, "--cache-windows", "2",
                    "--storage-options", OPTIONS, "--data-files", corpus_file, "--max-tokens", "512"]))
    result = json.loads(r.output)
    assert result["store_overlap"][memory_store] > 0.5
    assert any(memory_store in w for w in result["warnings"])


def assert_one_line_error(result, pattern):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


# fsspec's memory and local filesystems accept unknown keywords (fsspec 2026.9: no error for
# {"bogus_option": 1}), so the bad input tested is the option string itself
@pytest.mark.parametrize("value, pattern", [("{not json", "--storage-options is not valid JSON"),
                                            ("[1]", "--storage-options must be a JSON object"),
                                            ('"anon"', "--storage-options must be a JSON object")])
@pytest.mark.parametrize("command", ["info", "verify", "train", "eval"])
def test_bad_storage_options_is_one_line(command, value, pattern, memory_store, local_run, tmp_path):
    args = {"info": ["cache", "info", memory_store],
            "verify": ["cache", "verify", memory_store],
            "train": ["train-from-cache", "--cache", memory_store, "--out", tmp_path / "run", *TRAIN],
            "eval": ["eval", local_run[0], "--cache", memory_store, "--device", "cpu"]}[command]
    assert_one_line_error(run_cli([*args, "--storage-options", value]), pattern)
    assert not (tmp_path / "run").exists()


def test_missing_memory_store_is_one_line():
    url = f"memory://goose-test-{uuid.uuid4().hex}/absent.zarr"
    for args in (["cache", "info", url], ["cache", "verify", url]):
        r = run_cli([*args, "--storage-options", OPTIONS])
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [f"error: no store at {url}"], r.stderr


def test_validate_a_run_trained_over_fsspec(memory_store, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"storage_options": {"auto_mkdir": False, "token": "s3cr3t"}}))
    train(memory_store, out, "--config", cfg)
    # config.yaml keeps no credentials: validate says what to pass instead of failing deep in fsspec
    r = run_cli(["validate", str(out)])
    assert r.exit_code == 2 and "pass --storage-options" in r.stderr
    r = run_cli(["validate", str(out), "--storage-options", json.dumps({"auto_mkdir": False, "token": "s3cr3t"})])
    assert "PASS  reproduces val PPL" in r.output and "PASS  recurrent == chunked" in r.output, r.output

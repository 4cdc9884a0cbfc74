"""Stage one with several writers: torchrun ranks and `--shard I/N` jobs build the same store as one process.

Each store is compared array by array with a one-process store (floats to roundoff, integers exactly,
the per-block checksums included), then checked with `goose cache verify`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from goose.cache.reader import CacheReader
from goose.cache.schema import CHECKSUM_ARRAY, PROGRESS_ARRAY
from goose.cache.writer import CacheWriter
from goose.errors import GooseError
from test_cache_cli import base_args, run_cli
from test_cache_teacher import store_arrays

SMALL = ["--chunk-windows", "1", "--samples", "4", "--hidden-layers", "1"]  # 8 windows, 8 blocks
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli_cmd(args) -> list[str]:
    return [sys.executable, "-m", "goose.cli", *map(str, args)]


def torchrun_cmd(args, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "goose.cli", *map(str, args)]


def assert_store_equal(reference, other) -> None:
    """Same arrays (floats to roundoff, integers exactly), same spec and provenance, both complete."""
    a, b = store_arrays(reference), store_arrays(other)
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    meta_a = zarr.open_group(str(reference), mode="r").attrs["goose"]
    meta_b = zarr.open_group(str(other), mode="r").attrs["goose"]
    assert meta_a["complete"] and meta_b["complete"]
    assert meta_a["spec"] == meta_b["spec"] and meta_a["provenance"] == meta_b["provenance"]
    assert meta_a["checksums"] == meta_b["checksums"]


def assert_verifies(store) -> None:
    result = run_cli(["cache", "verify", store])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    result = run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL))
    assert result.exit_code == 0, result.output
    return out


def test_two_shards_equal_one_process_and_finalize_refuses_until_both_are_done(tmp_path, reference, tiny_teacher,
                                                                                corpus_file):
    out = tmp_path / "sharded.zarr"
    first = run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", "0/2"))
    assert first.exit_code == 0, first.output
    assert "shard 0/2: computed 4 blocks" in first.stdout and "goose cache finalize" in first.stdout
    half = CacheReader(str(out), allow_incomplete=True)
    assert not half.complete and list(np.flatnonzero(half.blocks_done())) == [0, 2, 4, 6]
    with pytest.raises(GooseError, match="not complete"):
        CacheReader(str(out))
    # each block's progress byte and checksum row is a chunk of its own: concurrent writers never share one
    group = zarr.open_group(str(out), mode="r")
    assert group[PROGRESS_ARRAY].chunks == (1,) and group[CHECKSUM_ARRAY].chunks[0] == 1

    refused = run_cli(["cache", "finalize", out])
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert "4 of 8 blocks are not done (blocks 1, 3, 5, 7;" in lines[0]
    assert not zarr.open_group(str(out), mode="r").attrs["goose"]["complete"]

    second = run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", "1/2"))
    assert second.exit_code == 0, second.output
    assert "0 blocks of the store left" in second.stdout
    done = run_cli(["cache", "finalize", out])
    assert done.exit_code == 0 and "marked complete" in done.stdout, done.output
    assert_store_equal(reference, out)
    assert_verifies(out)
    again = run_cli(["cache", "finalize", out])
    assert again.exit_code == 0 and "already complete" in again.stdout
    rerun = run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", "1/2"))  # nothing left to do
    assert rerun.exit_code == 0 and "already complete" in rerun.stdout, rerun.output


def test_shard_with_other_parameters_is_refused_and_bad_shard_is_one_line(tmp_path, tiny_teacher, corpus_file):
    out = tmp_path / "s.zarr"
    assert run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", "0/2")).exit_code == 0
    other = run_cli(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", "1/2", "--top-k", "4"))
    assert other.exit_code == 2 and "other parameters (spec.top_k: 8 -> 4" in other.stderr, other.output
    assert CacheReader(str(out), allow_incomplete=True).blocks_done().sum() == 4  # untouched
    for bad in ("2/2", "x", "1/0", "-1/2"):
        result = run_cli(base_args(tiny_teacher, corpus_file, tmp_path / "b.zarr", "--shard", bad))
        assert result.exit_code == 2 and "--shard" in result.stderr, (bad, result.output)
        assert not (tmp_path / "b.zarr").exists()
    missing = run_cli(["cache", "finalize", tmp_path / "nothing.zarr"])
    assert missing.exit_code == 2 and "no goose store" in missing.stderr


def test_shared_creation_race_leaves_one_store(tmp_path, reference):
    """Two shared writers that both find no store: one creates it, the other opens that one."""
    from goose.cache import writer as writer_module

    meta = zarr.open_group(str(reference), mode="r").attrs["goose"]
    from goose.cache.schema import StoreSpec

    spec = StoreSpec.from_attrs(meta["spec"])
    out = tmp_path / "race.zarr"
    real_state = writer_module._store_state
    calls = {"n": 0}

    def state_then_rival_creates(url, storage_options):
        calls["n"] += 1
        if calls["n"] == 1:  # we looked and saw nothing; a rival creates the store before we do
            CacheWriter.open(str(out), spec, meta["provenance"], package_version="rival", shared=True)
            return "absent", None
        return real_state(url, storage_options)

    writer_module._store_state = state_then_rival_creates
    try:
        writer = CacheWriter.open(str(out), spec, meta["provenance"], package_version="late", shared=True)
    finally:
        writer_module._store_state = real_state
    assert writer.blocks_todo() == list(range(spec.n_blocks))
    assert zarr.open_group(str(out), mode="r").attrs["goose"]["package_version"] == "rival"
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name]  # the loser's build is removed


def test_shards_on_an_object_store_url(tmp_path, tiny_teacher, corpus_file):
    """fsspec memory:// stands in for an object store: no rename there, the root object is uploaded last."""
    from goose.cache.stats import verify_store
    from goose.cache.writer import finalize_store
    from goose.pipeline.stage_one.cache_teacher import run_cache_teacher
    from test_cache_teacher import make_cfg

    ref = make_cfg(tmp_path / "ref.zarr", tiny_teacher, corpus_file)
    run_cache_teacher(ref)
    url = f"memory://shards-{tmp_path.name}/s.zarr"
    for index in range(2):
        summary = run_cache_teacher(make_cfg(url, tiny_teacher, corpus_file, shard=(index, 2)))
        assert not summary["already_complete"] and summary["blocks_left"] == (2 if index == 0 else 0)
    assert finalize_store(url) == {"output": url, "already_complete": False, "blocks": 5}
    a, b = store_arrays(ref.output), store_arrays(url)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert verify_store(url).ok


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, reference, tiny_teacher, corpus_file):
    out = tmp_path / "ranks.zarr"
    proc = subprocess.run(torchrun_cmd(base_args(tiny_teacher, corpus_file, out, *SMALL)), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("cached 256 tokens (8 windows)") == 1  # rank 0 reports for both
    assert_store_equal(reference, out)
    assert_verifies(out)


@pytest.mark.slow
def test_two_concurrent_shard_jobs_then_finalize_equal_one_process(tmp_path, reference, tiny_teacher, corpus_file):
    out = tmp_path / "jobs.zarr"
    jobs = [subprocess.Popen(cli_cmd(base_args(tiny_teacher, corpus_file, out, *SMALL, "--shard", f"{i}/2")),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
    finalize = run_cli(["cache", "finalize", out])
    assert finalize.exit_code == 0, finalize.output
    assert_store_equal(reference, out)
    assert_verifies(out)


def _run_until_then_kill(cmd, ready, out) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    victim = _children(proc.pid) or [proc.pid]  # under torchrun: one worker rank, not the launcher
    os.kill(victim[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert not zarr.open_group(str(out), mode="r").attrs["goose"]["complete"], \
        "the run finished before it could be killed; give it more work"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _done(out) -> np.ndarray:
    try:
        return CacheReader(str(out), allow_incomplete=True, check=False).blocks_done()
    except Exception:  # noqa: BLE001 - not created yet
        return np.zeros(0, dtype=np.uint8)


BIG = ["--max-tokens", "4096", "--chunk-windows", "1", "--batch-size", "1", "--samples", "16"]  # 128 blocks


@pytest.mark.slow
def test_kill_9_of_one_shard_then_its_rerun_completes_the_store(tmp_path, tiny_teacher, corpus_file):
    ref = tmp_path / "ref.zarr"
    assert run_cli(base_args(tiny_teacher, corpus_file, ref, *BIG)).exit_code == 0
    out = tmp_path / "killed.zarr"
    assert run_cli(base_args(tiny_teacher, corpus_file, out, *BIG, "--shard", "0/2")).exit_code == 0
    shard1 = cli_cmd(base_args(tiny_teacher, corpus_file, out, *BIG, "--shard", "1/2"))
    _run_until_then_kill(shard1, lambda: _done(out)[1::2].sum() >= 3, out)
    assert 0 < _done(out)[1::2].sum() < 64
    assert run_cli(["cache", "finalize", out]).exit_code == 2  # shard 1 is not done
    rerun = run_cli(base_args(tiny_teacher, corpus_file, out, *BIG, "--shard", "1/2"))
    assert rerun.exit_code == 0, rerun.output
    assert run_cli(["cache", "finalize", out]).exit_code == 0
    assert_store_equal(ref, out)
    assert_verifies(out)


@pytest.mark.slow
def test_kill_9_of_one_rank_then_a_torchrun_rerun_completes_the_store(tmp_path, tiny_teacher, corpus_file):
    ref = tmp_path / "ref.zarr"
    assert run_cli(base_args(tiny_teacher, corpus_file, ref, *BIG)).exit_code == 0
    out = tmp_path / "killed.zarr"
    cmd = torchrun_cmd(base_args(tiny_teacher, corpus_file, out, *BIG))
    _run_until_then_kill(cmd, lambda: _done(out).sum() >= 6, out)
    assert 0 < _done(out).sum() < 128
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_store_equal(ref, out)
    assert_verifies(out)


def test_store_size_while_another_job_writes(tmp_path):
    """A shard job sizes the store (`store_nbytes`) while another job's chunk writes create and rename
    temporary files in it; a file that vanishes between listing and sizing must not fail the job (it did:
    fsspec's `du` raised FileNotFoundError on a `.partial` file, seen in the concurrent-shards test)."""
    import os
    import threading

    from goose.cache.stats import store_nbytes

    for i in range(200):
        (tmp_path / "a" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / str(i % 10) / str(i)).write_bytes(b"x" * 100)
    stop = threading.Event()

    def another_writer():
        i = 0
        while not stop.is_set():
            part = tmp_path / "a" / str(i % 10) / f"t{i}.partial"
            part.write_bytes(b"y" * 10)
            os.replace(part, tmp_path / "a" / str(i % 10) / f"c{i % 50}")
            i += 1

    writer = threading.Thread(target=another_writer)
    writer.start()
    try:
        sizes = [store_nbytes(str(tmp_path)) for _ in range(300)]
    finally:
        stop.set()
        writer.join()
    assert min(sizes) >= 200 * 100
    assert store_nbytes(str(tmp_path / "missing")) == 0

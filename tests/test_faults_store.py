"""Fault suite, store side (issue 9): bad input at the door, damaged stores, interrupted and resumed writes.

Every case asserts what a user sees: one `error:` line and exit 2 (or a named failure from `cache verify`),
and nothing left behind that looks complete; a damaged store is refused by the reader that training uses.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from goose.cache.reader import CacheReader
from goose.cache.writer import CacheWriter
from goose.errors import GooseError
from test_cache_cli import assert_one_line_error, base_args, run_cli
from test_cache_teacher import assert_same_store


def _attrs(store) -> dict:
    return dict(zarr.open_group(str(store), mode="r").attrs["goose"])


def _edit_attrs(store, edit) -> None:
    """Change the goose attributes in place, as a hand edit of zarr.json would."""
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["goose"])
    edit(attrs)
    group.attrs.put({"goose": attrs})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, corpus_file) -> Path:
    """An uninterrupted run's store: 8 windows of 32 tokens in 4 blocks of 2 windows."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    """A private copy of the reference store to damage."""
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    return out


# ---- item 3: tail temperatures ---------------------------------------------------------------------
@pytest.mark.parametrize("temps, pattern", [
    ("1,1,2", "repeat a temperature"),
    ("1,1.0000001,2", "too close"),  # distinct floats, but the interpolation would divide by ~1e-7
    ("1,nan", "finite positive"),
    ("1,inf", "finite positive"),
    ("1,-2", "finite positive"),
    ("0,1", "finite positive"),
])
def test_bad_tail_temperatures_are_refused_before_the_teacher_loads(tmp_path, corpus_file, temps, pattern):
    out = tmp_path / "s.zarr"
    # a teacher that does not exist: the error must be about the temperatures, so no teacher was loaded
    result = run_cli(base_args("./no/such/teacher", corpus_file, out, "--tail-temperatures", temps))
    assert_one_line_error(result, pattern, out)
    assert not out.exists()


@pytest.mark.parametrize("temps, pattern", [
    ([1.0, 1.0, 2.0], "repeat a temperature"),
    ([1.0, float("nan")], "finite positive"),
    ([1.0, -1.0], "finite positive"),
    ([2.0, 3.0], "must include 1"),
])
def test_reader_and_verify_refuse_a_store_with_bad_tail_temperatures(copy, temps, pattern):
    def edit(attrs):
        attrs["spec"] = {**attrs["spec"], "tail_temperatures": temps}
    _edit_attrs(copy, edit)
    with pytest.raises(GooseError, match=pattern):
        CacheReader(str(copy))  # what train-from-cache opens
    assert_one_line_error(run_cli(["cache", "verify", copy]), pattern)
    assert_one_line_error(run_cli(["cache", "info", copy]), pattern)


# ---- item 5: missing and changed objects, checksums ----------------------------------------------
def test_missing_input_ids_chunk_is_named_by_verify_reader_and_info(copy):
    (copy / "input_ids" / "c" / "1" / "0").unlink()
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2
    assert "input_ids chunk 1 (windows 2-3) is missing" in result.stderr
    with pytest.raises(GooseError, match=r"input_ids chunk 1 \(windows 2-3\) is missing"):
        CacheReader(str(copy))
    assert_one_line_error(run_cli(["cache", "info", copy]), "input_ids chunk 1 (windows 2-3) is missing")


def test_missing_tokenizer_chunk_is_refused(copy):
    (copy / "tokenizer" / "tokenizer.json" / "c" / "0").unlink()
    with pytest.raises(GooseError, match="tokenizer/tokenizer.json chunk is missing"):
        CacheReader(str(copy))
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2 and "tokenizer/tokenizer.json chunk is missing" in result.stderr


def test_changed_chunk_that_still_decodes_fails_its_checksum(copy):
    group = zarr.open_group(str(copy), mode="r+")
    ids = group["input_ids"][6:8]
    ids[0, 5] = (int(ids[0, 5]) + 1) % 50257  # a plausible token: every invariant still holds
    group["input_ids"][6:8] = ids
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2
    assert "input_ids chunk 3 (windows 6-7): checksum differs" in result.stderr
    assert result.stderr.count("FAIL") == 1, result.stderr


def test_nul_tokenizer_and_changed_embedding_fail_their_checksums(copy):
    group = zarr.open_group(str(copy), mode="r+")
    tok = group["tokenizer/tokenizer.json"].with_config({"write_empty_chunks": True})  # else zarr deletes it
    tok[:] = np.zeros(tok.shape, dtype=np.uint8)
    emb = group["teacher_embedding"]
    emb[0, 0] = emb[0, 0] + 1
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2
    assert "tokenizer/tokenizer.json (tokenizer/tokenizer.json/c/0): checksum differs" in result.stderr
    assert "teacher_embedding (teacher_embedding/c/0/0): checksum differs" in result.stderr


@pytest.mark.parametrize("field", ["provenance", "spec"])
def test_edited_attributes_fail_their_checksum(copy, field):
    def edit(attrs):
        if field == "provenance":
            attrs["provenance"] = {**attrs["provenance"], "teacher": "gpt2"}
        else:  # still valid temperatures, just not the ones the tails were computed at
            attrs["spec"] = {**attrs["spec"], "tail_temperatures": [1.0, 1.5, 2.0, 2.5, 3.5, 4.0]}
    _edit_attrs(copy, edit)
    with pytest.raises(GooseError, match="attributes .* do not match their checksum"):
        CacheReader(str(copy))
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2 and "do not match their checksum" in result.stderr


def test_schema_v2_store_is_read_but_verify_warns_and_cache_teacher_will_not_resume_it(copy, tiny_teacher,
                                                                                        corpus_file):
    def to_v2(attrs):
        attrs["schema_version"] = 2
        del attrs["checksums"], attrs["attrs_crc32"]
    _edit_attrs(copy, to_v2)
    shutil.rmtree(copy / "chunk_checksums")
    reader = CacheReader(str(copy))  # v2 data arrays are v3's: still readable
    assert not reader.has_checksums and reader.read(0, 2)["input_ids"].shape == (2, 32)
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 0 and "warning: schema v2 store: no checksums" in result.stderr
    assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, copy)), "schema version 2, this goose writes 4")


# ---- item 6: truncated chunks ---------------------------------------------------------------------
def test_truncated_chunk_is_named_when_read(copy):
    path = copy / "topk_logprobs" / "c" / "2" / "0" / "0"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    reader = CacheReader(str(copy))  # present, so the open-time listing passes
    with pytest.raises(GooseError, match=rf"store {copy}: topk_logprobs chunk 2 \(windows 4-5\) cannot be read"):
        reader.read_indices([0, 5, 7])  # the trainer's read
    with pytest.raises(GooseError, match=r"topk_logprobs chunk 2 \(windows 4-5\)"):
        list(reader.iter_chunks(["topk_logprobs"]))
    np.testing.assert_array_equal(reader.read_indices([0, 7], ["input_ids"])["input_ids"].shape, (2, 32))
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2 and "chunk 2 (windows 4-5): topk_logprobs unreadable" in result.stderr


def test_truncated_chunk_in_cache_info_is_one_line(copy):
    path = copy / "gold_nll" / "c" / "1" / "0"
    path.write_bytes(path.read_bytes()[:7])
    assert_one_line_error(run_cli(["cache", "info", copy]), "gold_nll chunk 1 (windows 2-3) cannot be read")


# ---- item 9: resume with arguments that change the bytes -------------------------------------------
class _Killed(Exception):
    """Stands in for a kill: nothing after the raise runs (click would turn KeyboardInterrupt into Abort)."""


def _interrupt_after(monkeypatch, n_blocks: int, exc: BaseException):
    """Make CacheWriter.write_block raise `exc` when asked for block number n_blocks + 1 (0-based n)."""
    real = CacheWriter.write_block
    calls = {"n": 0}

    def write_block(self, block, data):
        calls["n"] += 1
        if calls["n"] > n_blocks:
            raise exc
        return real(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    return real


def test_resume_with_another_batch_size_is_refused(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    out = tmp_path / "s.zarr"
    real = _interrupt_after(monkeypatch, 2, _Killed())
    with pytest.raises(_Killed):
        run_cli_raising(base_args(tiny_teacher, corpus_file, out))
    monkeypatch.setattr(CacheWriter, "write_block", real)
    assert CacheReader(str(out), allow_incomplete=True).blocks_done().sum() == 2
    args = base_args(tiny_teacher, corpus_file, out)
    args[args.index("--batch-size") + 1] = "1"
    assert_one_line_error(run_cli(args), "provenance.batch_size: 2 -> 1", out)
    assert CacheReader(str(out), allow_incomplete=True).blocks_done().sum() == 2  # untouched


def run_cli_raising(args):
    from click.testing import CliRunner

    from goose.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---- item 10: a kill between creating the store and writing its attributes -------------------------
def test_bare_group_left_by_an_interrupted_creation_is_restarted(tmp_path, reference, tiny_teacher, corpus_file):
    out = tmp_path / "s.zarr"
    zarr.open_group(str(out), mode="w-", zarr_format=3)  # what goose < v3 had written when it was killed
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0, result.output
    assert_same_store(reference, out)


def test_kill_the_instant_the_store_is_created_leaves_a_store_a_rerun_finishes(tmp_path, reference, tiny_teacher,
                                                                               corpus_file, monkeypatch):
    out = tmp_path / "s.zarr"
    real_open = zarr.open_group

    def open_then_die(*args, **kw):
        group = real_open(*args, **kw)
        if kw.get("mode") in ("w", "w-"):
            raise _Killed  # killed right after the root group's first write
        return group

    monkeypatch.setattr(zarr, "open_group", open_then_die)
    with pytest.raises(_Killed):
        run_cli_raising(base_args(tiny_teacher, corpus_file, out))
    monkeypatch.setattr(zarr, "open_group", real_open)
    assert out.exists()
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0, result.output
    assert_same_store(reference, out)


# ---- item 6 (one-line errors) ----------------------------------------------------------------------
@pytest.mark.parametrize("extra, pattern", [
    (["--compression", "zstd", "--compression-level", "99"], "--compression-level for zstd must be between 1 and 22, got 99"),
    (["--compression", "blosc", "--compression-level", "10"], "for blosc must be between 0 and 9"),
    (["--max-tokens", "1"], "--max-tokens must be at least one window"),
    (["--max-tokens", "0"], "--max-tokens must be at least one window"),
    (["--max-tokens", "-5"], "--max-tokens must be at least one window"),
])
def test_bad_arguments_fail_before_the_teacher_loads(tmp_path, corpus_file, extra, pattern):
    out = tmp_path / "s.zarr"
    assert_one_line_error(run_cli(base_args("./no/such/teacher", corpus_file, out, *extra)), pattern, out)
    assert not out.exists()


def test_corrected_rerun_after_a_failure_before_the_first_block_is_accepted(tmp_path, tiny_teacher, corpus_file,
                                                                            monkeypatch, reference):
    out = tmp_path / "s.zarr"
    real = _interrupt_after(monkeypatch, 0, OSError(errno.ENOSPC, "No space left on device"))
    assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, out, "--compression-level", "5")),
                          "disk full", out)
    monkeypatch.setattr(CacheWriter, "write_block", real)
    # other parameters, but nothing was computed: the empty store is started afresh
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0, result.output
    assert_same_store(reference, out)


def _teacher_variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _config_edit(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("name, edit, pattern", [
    ("more-layers", _config_edit(n_layer=4), "its config.json does not match its weights (missing keys"),
    ("fewer-layers", _config_edit(n_layer=1), "its config.json does not match its weights (unexpected keys"),
    ("wider", _config_edit(n_embd=64), "its config.json does not match its weights (parameter shapes differ)"),
    ("truncated", _truncate_weights, "is not a loadable model folder: SafetensorError"),
])
def test_broken_teacher_folder_is_one_line(tmp_path, tiny_teacher, corpus_file, name, edit, pattern):
    teacher = _teacher_variant(tiny_teacher, tmp_path / name, edit)
    out = tmp_path / "s.zarr"
    assert_one_line_error(run_cli(base_args(teacher, corpus_file, out)), pattern, out)
    assert not out.exists()


class _FullDisk:
    """Stands in for one store array: its write fails as a full disk does."""

    def __init__(self, array):
        self.array = array

    def __getattr__(self, name):
        return getattr(self.array, name)

    def __setitem__(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_finished_blocks_and_a_rerun_completes(tmp_path, reference, tiny_teacher, corpus_file,
                                                               monkeypatch):
    out = tmp_path / "s.zarr"
    real = CacheWriter.write_block
    calls = {"n": 0}

    def write_block(self, block, data):  # the third block runs out of space half-way through its arrays
        calls["n"] += 1
        if calls["n"] == 3:
            self._arrays = {**self._arrays, "gold_nll": _FullDisk(self._arrays["gold_nll"])}
        return real(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, out)),
                          "disk full while writing store", out)
    half = CacheReader(str(out), allow_incomplete=True)
    assert half.blocks_done().tolist() == [1, 1, 0, 0]  # the half-written block is not marked done
    monkeypatch.setattr(CacheWriter, "write_block", real)
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0 and "resumed after 2 finished blocks" in result.stdout
    assert_same_store(reference, out)


def test_disk_full_while_finalizing_leaves_an_incomplete_store(tmp_path, reference, tiny_teacher, corpus_file,
                                                                monkeypatch):
    out = tmp_path / "s.zarr"

    def finalize(self, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = CacheWriter.finalize
    monkeypatch.setattr(CacheWriter, "finalize", finalize)
    assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, out)), "4 of 4 blocks are done and kept", out)
    with pytest.raises(GooseError, match="not complete"):
        CacheReader(str(out))
    monkeypatch.setattr(CacheWriter, "finalize", real)
    assert run_cli(base_args(tiny_teacher, corpus_file, out)).exit_code == 0
    assert_same_store(reference, out)


# ---- kill -9 at several points, then resume -------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_equals_uninterrupted(tmp_path, tiny_teacher, corpus_file):
    extra = ["--max-tokens", "2048", "--chunk-windows", "1", "--batch-size", "1", "--samples", "8",
             "--hidden-layers", "1"]
    ref = tmp_path / "ref.zarr"
    assert run_cli(base_args(tiny_teacher, corpus_file, ref, *extra)).exit_code == 0
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "goose.cli", *map(str, base_args(tiny_teacher, corpus_file, out, *extra))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def blocks_done() -> int:
        try:
            return int(CacheReader(str(out), allow_incomplete=True, check=False).blocks_done().sum())
        except Exception:  # noqa: BLE001 - not created yet
            return -1

    def run_and_kill(ready) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not _attrs(out)["complete"], "the run finished before it could be killed; give it more work"

    run_and_kill(lambda: (out / "zarr.json").exists())  # 1: just after the store appears
    first = blocks_done()
    run_and_kill(lambda: blocks_done() >= max(first, 0) + 3)  # 2: a few blocks further on
    assert 0 < blocks_done() < 64
    result = run_cli(base_args(tiny_teacher, corpus_file, out, *extra))
    assert result.exit_code == 0, result.output
    assert_same_store(ref, out)
    assert run_cli(["cache", "verify", out]).exit_code == 0


# ---- review: once-per-store objects checked when read, the checksum record covered --------------------
def _zero_tokenizer(store) -> None:
    """Zero tokenizer.json in place, keeping its chunk: it still decodes (to NUL bytes), and is present."""
    group = zarr.open_group(str(store), mode="r+")
    tok = group["tokenizer/tokenizer.json"].with_config({"write_empty_chunks": True})  # else zarr deletes it
    tok[:] = np.zeros(tok.shape, dtype=np.uint8)


def test_zeroed_tokenizer_is_refused_when_read_naming_the_array(copy, tmp_path):
    _zero_tokenizer(copy)
    reader = CacheReader(str(copy))  # present, so opening passes; reading it must not
    pattern = r"tokenizer/tokenizer.json \(tokenizer/tokenizer.json/c/0\) does not match its checksum"
    with pytest.raises(GooseError, match=pattern):
        reader.tokenizer_files()
    with pytest.raises(GooseError, match=pattern):
        reader.save_tokenizer(tmp_path / "tok")
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    assert reader.teacher_embedding().shape[1] == 32  # the embedding is intact


def test_changed_teacher_embedding_is_refused_when_read(copy):
    group = zarr.open_group(str(copy), mode="r+")
    emb = group["teacher_embedding"]
    emb[0, 0] = emb[0, 0] + 1  # still finite, still decodes
    reader = CacheReader(str(copy))
    with pytest.raises(GooseError, match=r"teacher_embedding \(teacher_embedding/c/0/0\) does not match its checksum"):
        reader.teacher_embedding()
    assert len(reader.tokenizer_files()) > 0  # the tokenizer is intact
    result = run_cli(["cache", "verify", copy])  # reported once, as a checksum failure
    assert result.exit_code == 2 and result.stderr.count("FAIL") == 1, result.stderr
    assert "teacher_embedding (teacher_embedding/c/0/0): checksum differs" in result.stderr


def test_training_on_a_store_with_a_zeroed_tokenizer_fails_and_saves_no_nul_tokenizer(copy, tmp_path):
    _zero_tokenizer(copy)
    run = tmp_path / "run"
    result = run_cli(["train-from-cache", "--cache", copy, "-o", run, "--no-progress", "--steps", "2",
                      "--set", "model.preset=tiny", "--set", "batch_size=2", "--set", "val_every=1",
                      "--set", "val_windows=2", "--set", "tensorboard=false", "--device", "cpu"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "tokenizer/tokenizer.json" in result.stderr and "does not match its checksum" in result.stderr
    saved = run / "best" / "tokenizer.json"
    assert not saved.exists() or saved.read_bytes().strip(b"\0"), "a NUL tokenizer was saved"


@pytest.mark.parametrize("edit", ["once", "complete-on-verify"])
def test_the_attributes_checksum_covers_the_checksum_record_and_complete(copy, edit):
    key = "tokenizer/tokenizer.json/c/0"
    if edit == "once":  # e.g. to make a damaged tokenizer "match" again
        _edit_attrs(copy, lambda a: a["checksums"]["once"].update({key: a["checksums"]["once"][key] ^ 1}))
        with pytest.raises(GooseError, match="attributes .* do not match their checksum"):
            CacheReader(str(copy))
    else:
        _edit_attrs(copy, lambda a: a.update(complete=False))
        with pytest.raises(GooseError, match="attributes .* do not match their checksum"):
            CacheReader(str(copy), allow_incomplete=True)
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2 and "do not match their checksum" in result.stderr


def test_a_store_finalized_by_the_older_goose_still_checks_against_what_it_recorded(copy):
    from goose.cache.integrity import attrs_checksum

    def to_v1(attrs):  # the attributes checksum as goose wrote it before it covered the record
        del attrs["attrs_crc32_version"]
        attrs["attrs_crc32"] = attrs_checksum(attrs)
    _edit_attrs(copy, to_v1)
    assert CacheReader(str(copy)).tokenizer_files()
    _edit_attrs(copy, lambda a: a["provenance"].update(teacher="gpt2"))
    with pytest.raises(GooseError, match="do not match their checksum"):
        CacheReader(str(copy))


# ---- review: one listing of a store per process -------------------------------------------------------
def _count_listings(monkeypatch) -> dict:
    from goose.cache import integrity

    real, calls = integrity.StoreFiles.keys, {"n": 0}

    def keys(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(integrity.StoreFiles, "keys", keys)
    return calls


def test_a_second_open_of_a_complete_store_does_not_list_it_again(copy, monkeypatch):
    calls = _count_listings(monkeypatch)
    CacheReader(str(copy))
    assert calls["n"] == 1
    for _ in range(3):  # loader workers, epochs, validation
        CacheReader(str(copy)).read_indices([0, 7])
    assert calls["n"] == 1
    # a chunk that goes missing afterwards is still caught where silence would hurt: the once-per-store
    # objects are checked when read, and `verify` always lists
    (copy / "tokenizer" / "tokenizer.json" / "c" / "0").unlink()
    with pytest.raises(GooseError, match=r"tokenizer/tokenizer.json \(tokenizer/tokenizer.json/c/0\) is missing"):
        CacheReader(str(copy)).save_tokenizer(copy.parent / "tok")
    result = run_cli(["cache", "verify", copy])
    assert result.exit_code == 2 and "tokenizer/tokenizer.json chunk is missing" in result.stderr


def test_a_rebuilt_or_other_store_is_listed_again_and_a_missing_chunk_refused(copy, reference, monkeypatch):
    calls = _count_listings(monkeypatch)
    CacheReader(str(copy))
    CacheReader(str(reference))  # another store: its own listing
    assert calls["n"] == 2
    # the same path, rebuilt damaged: a new root zarr.json, so it is listed (and refused) again
    shutil.rmtree(copy)
    shutil.copytree(reference, copy, copy_function=shutil.copy)
    (copy / "input_ids" / "c" / "1" / "0").unlink()
    with pytest.raises(GooseError, match=r"input_ids chunk 1 \(windows 2-3\) is missing"):
        CacheReader(str(copy))
    assert calls["n"] == 3


def test_an_incomplete_store_is_listed_on_every_open(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    out = tmp_path / "s.zarr"
    real = _interrupt_after(monkeypatch, 2, _Killed())
    with pytest.raises(_Killed):
        run_cli_raising(base_args(tiny_teacher, corpus_file, out))
    monkeypatch.setattr(CacheWriter, "write_block", real)
    calls = _count_listings(monkeypatch)
    CacheReader(str(out), allow_incomplete=True)
    CacheReader(str(out), allow_incomplete=True)
    assert calls["n"] == 2


# ---- review: --storage-options that is JSON but not an object ----------------------------------------
@pytest.mark.parametrize("value", ["[1]", "3", '"anon"', "true"])
def test_storage_options_that_is_not_a_json_object_is_one_line(tmp_path, corpus_file, value):
    out = tmp_path / "s.zarr"
    result = run_cli(base_args("./no/such/teacher", corpus_file, out, "--storage-options", value))
    assert_one_line_error(result, "--storage-options must be a JSON object", out)
    assert not out.exists()


def test_finalize_storage_options_that_is_not_a_json_object_is_one_line(copy):
    assert_one_line_error(run_cli(["cache", "finalize", copy, "--storage-options", "[1]"]),
                          "--storage-options must be a JSON object")


# ---- review: the writer lock ------------------------------------------------------------------------
def _lock_of(store: Path) -> Path:
    return store.parent / (store.name + ".lock")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_the_same_output_is_refused_while_the_first_creates_it(tmp_path, reference, tiny_teacher,
                                                                               corpus_file, monkeypatch):
    out = tmp_path / "s.zarr"
    real = CacheWriter.write_block
    seen = {}

    def write_block(self, block, data):
        if not seen:  # the first run has created the store and written nothing yet: what the old code wiped
            seen["lock"] = json.loads(_lock_of(out).read_text())
            seen["second"] = run_cli(base_args(tiny_teacher, corpus_file, out))
            seen["shard"] = run_cli(base_args(tiny_teacher, corpus_file, out, "--shard", "0/2"))
        return real(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    result = run_cli(base_args(tiny_teacher, corpus_file, out))
    assert result.exit_code == 0, result.output
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"]
    assert_one_line_error(seen["second"], f"is being written by another goose cache-teacher (pid {os.getpid()}")
    assert_one_line_error(seen["shard"], "is being written by a one-process goose cache-teacher")
    assert_same_store(reference, out)
    assert not _lock_of(out).exists()  # released


def test_a_live_lock_is_refused_and_the_store_is_untouched(tmp_path, tiny_teacher, corpus_file):
    import socket

    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_of(out).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, out)),
                              f"(pid {holder.pid} on host {socket.gethostname()}", out)
        assert not out.exists()
        assert json.loads(_lock_of(out).read_text())["pid"] == holder.pid  # not taken
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("content", ["stale", "reused-pid", "damaged"])
def test_a_stale_lock_is_taken_over(tmp_path, reference, tiny_teacher, corpus_file, content):
    import socket

    out = tmp_path / "s.zarr"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        if content == "stale":
            text = json.dumps({"pid": _dead_pid(), "host": socket.gethostname()})
        elif content == "reused-pid":  # a live pid, but not the process that took the lock
            text = json.dumps({"pid": other.pid, "pid_start": "1", "host": socket.gethostname()})
        else:
            text = "{\"pi"
        _lock_of(out).write_text(text)
        if content == "damaged":  # an unreadable lock is taken as being written for a few seconds
            old = time.time() - 60
            os.utime(_lock_of(out), (old, old))
        result = run_cli(base_args(tiny_teacher, corpus_file, out))
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 0, result.output
    assert_same_store(reference, out)
    assert not _lock_of(out).exists()


def test_lock_is_released_after_a_failed_run_and_shards_take_none(tmp_path, tiny_teacher, corpus_file, monkeypatch):
    out = tmp_path / "s.zarr"
    real = _interrupt_after(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    assert_one_line_error(run_cli(base_args(tiny_teacher, corpus_file, out)), "disk full", out)
    assert not _lock_of(out).exists()
    monkeypatch.setattr(CacheWriter, "write_block", real)
    shared = tmp_path / "shared.zarr"
    seen = []

    def write_block(self, block, data):
        seen.append(_lock_of(shared).exists())
        return real(self, block, data)

    monkeypatch.setattr(CacheWriter, "write_block", write_block)
    for index in range(2):
        assert run_cli(base_args(tiny_teacher, corpus_file, shared, "--shard", f"{index}/2")).exit_code == 0
    assert seen and not any(seen) and not _lock_of(shared).exists()
    assert run_cli(["cache", "finalize", shared]).exit_code == 0

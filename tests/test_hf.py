"""The student as a transformers model (student/hf.py) and `goose export` (pipeline/export.py): logits and greedy
generation equal goose's own, the exported folder loads in a fresh process where goose cannot be imported,
and bad export input is one `error:` line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from goose.cli import main
from goose.pipeline.export import CODE_FILES, PACKAGE, exported_code
from goose.pipeline.generate import generate
from goose.pipeline.quickstart import save_tokenizer
from goose.student.hf import GooseConfig, GooseForCausalLM
from test_student import random_student

PROMPT = [5, 7, 9, 11, 30, 42]


def _save_run(student, folder: Path) -> Path:
    """A run folder as train-from-cache leaves it: best/ with the model, its tokenizer and goose.json."""
    best = folder / "best"
    student.save_pretrained(best)
    save_tokenizer(best)
    (best / "goose.json").write_text(json.dumps({"teacher": None, "step": 0}))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untied student (its greedy continuations vary) with ternary weights and a spiked head (so the
    folder's ternary path, packed matrices and packed head, is live) and its `goose export` folder, made by
    the CLI."""
    root = tmp_path_factory.mktemp("hf")
    student = random_student(tie_embeddings=False, ternary_weights=True,
                             spike_sites=["tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head"])
    run = _save_run(student, root / "run")
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(root / "export")])
    assert r.exit_code == 0, r.output
    return student, root / "export"


@pytest.mark.parametrize("tied", [True, False])
def test_automodel_logits_equal_goose_forward(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    student = random_student(tie_embeddings=tied)
    run = _save_run(student, tmp_path / "run")
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")  # goose is imported: its registered class
    assert isinstance(model, GooseForCausalLM) and isinstance(model.config, GooseConfig)
    ids = torch.randint(0, student.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(ids).logits
        out = model(ids)
        assert torch.allclose(out.logits, want, atol=1e-6, rtol=0)
        # carried state: the second half fed after the first equals the whole, token by token recurrently too
        first = model(ids[:, :20])
        rest = model(ids[:, 20:], state=first.state)
        assert torch.allclose(torch.cat([first.logits, rest.logits], 1), want, atol=1e-4, rtol=0)
        step = model(ids[:, 20:21], state=first.state)  # one token after a state: the recurrent form
        assert torch.allclose(step.logits[:, 0], want[:, 20], atol=1e-4, rtol=0)
        loss = model(ids, labels=ids).loss
        ref = torch.nn.functional.cross_entropy(want[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert torch.allclose(loss, ref, atol=1e-5)


@pytest.mark.parametrize("spikes", ["default", "lif"])
def test_hf_greedy_generate_equals_goose_generate(spikes):
    """generate(): the prompt once through the chunked form, then one token per call through the recurrent form
    with the state carried (LIF spike sites carry membranes in it too), token for token what goose generates."""
    overrides = {"spike": {"lif": True}} if spikes == "lif" else {}
    student = random_student(seed=1, tie_embeddings=False, **overrides)  # a seed whose continuation varies
    model = GooseForCausalLM.from_student(student)
    calls = []
    forward = model.student.forward

    def recording(input_ids, state=None, *, mode="chunked", **kw):
        calls.append((mode, input_ids.shape[1], state is not None))
        return forward(input_ids, state, mode=mode, **kw)

    model.student.forward = recording
    n = 24
    hf = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    want = generate(student, PROMPT, max_new_tokens=n, temperature=0)["new_tokens"]
    assert hf[0, len(PROMPT):].tolist() == want
    assert len(set(want)) > 3  # a continuation that varies, so the comparison means something
    assert calls[0] == ("chunked", len(PROMPT), False)
    assert set(calls[1:]) == {("recurrent", 1, True)} and len(calls) >= n


def test_beam_search_reorders_the_state():
    """With the state (use_cache) beam search must reorder it per beam; without it every step rereads the whole
    sequence. Both give the same beams only if the reordering is right."""
    model = GooseForCausalLM.from_student(random_student(tie_embeddings=False))
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    with_state = model.generate(torch.tensor([PROMPT]), use_cache=True, **kw)
    without = model.generate(torch.tensor([PROMPT]), use_cache=False, **kw)
    assert with_state.tolist() == without.tolist()


def test_generate_continues_from_a_given_state():
    """generate(new_ids, state=...) reads new_ids after the state, as if the whole text had been the prompt."""
    model = GooseForCausalLM.from_student(random_student(tie_embeddings=False))
    ids = torch.tensor([PROMPT])
    whole = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(PROMPT):]
    with torch.no_grad():
        state = model(ids[:, :4]).state
    cont = model.generate(ids[:, 4:], state=state, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 2:]
    assert cont.tolist() == whole.tolist()


def test_padding_is_refused():
    model = GooseForCausalLM.from_student(random_student())
    with pytest.raises(ValueError, match="padding"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_exported_code_is_the_package_source():
    """One source of truth: the exported files are goose's own, only their relative imports rewritten."""
    code = exported_code()
    assert set(code) == set(CODE_FILES.values())
    for src, name in CODE_FILES.items():
        original = (PACKAGE / src).read_text().splitlines()
        copied = code[name].splitlines()
        changed = [(a, b) for a, b in zip(original, copied) if a != b]
        assert len(original) == len(copied)
        assert all(a.replace("from ..", "from .") == b for a, b in changed), changed


FRESH = textwrap.dedent("""
    import json, sys

    class NoGoose:  # before every other finder, including goose's editable install
        def find_spec(self, name, path=None, target=None):
            if name == "goose" or name.startswith("goose."):
                raise ImportError("goose is made unimportable for this test")

    sys.meta_path.insert(0, NoGoose())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, prompt = sys.argv[1], json.loads(sys.argv[2])
    try:
        import goose  # noqa: F401
        sys.exit("goose is importable")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0]
    new = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
    model.use_ternary_path()  # the folder's own ternary.py and its C kernels
    with torch.no_grad():
        ternary_logits = model(ids).logits[0]
    ternary_new = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
    print(json.dumps({"module": type(model).__module__, "goose_modules": [m for m in sys.modules if m.startswith("goose")],
                      "logits": logits.tolist(), "new": new.tolist(), "tokenizer_len": len(tok),
                      "encoded": tok("the dog")["input_ids"], "ternary_logits": ternary_logits.tolist(),
                      "ternary_new": ternary_new.tolist(),
                      "packed": [type(model.student.blocks[0].att.key).__name__, type(model.student.head).__name__]}))
""")


def test_export_loads_in_a_fresh_process_without_goose(exported, tmp_path):
    student, folder = exported
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(folder), json.dumps(PROMPT)],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.") and got["goose_modules"] == []
    with torch.no_grad():
        want = student(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-6, rtol=0)
    assert got["new"] == generate(student, PROMPT, max_new_tokens=12, temperature=0)["new_tokens"]
    assert got["packed"] == ["PackedTernaryLinear", "PackedHead"] and got["ternary_new"] == got["new"]
    torch.testing.assert_close(torch.tensor(got["ternary_logits"]), want, atol=1e-4, rtol=1e-4)
    tok = save_tokenizer(tmp_path / "tok")
    assert got["tokenizer_len"] == len(tok) and got["encoded"] == tok("the dog")["input_ids"]


def test_export_folder_contents(exported):
    _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "goose-rwkv7-spiking"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_goose.GooseForCausalLM"
    for name in ("model.safetensors", "tokenizer.json", "goose.json", "README.md", *CODE_FILES.values()):
        assert (folder / name).is_file(), name


@pytest.mark.parametrize("case", ["missing", "not-a-model", "out-not-empty", "damaged-config"])
def test_export_bad_input_is_one_error_line(exported, tmp_path, case):
    _, folder = exported
    source, out = str(tmp_path / "nothing"), tmp_path / "out"
    if case == "not-a-model":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "notes.txt").write_text("no model here")
        source = str(tmp_path / "plain")
    elif case == "out-not-empty":
        source, out = str(folder), folder  # an existing export (or anything else) is never overwritten
    elif case == "damaged-config":
        run = _save_run(random_student(), tmp_path / "run")
        (run / "best" / "config.json").write_text('{"d_model": 64,')
        source = str(run)
    r = CliRunner().invoke(main, ["export", source, "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    if case != "out-not-empty":
        assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_push_to_hub_failure_keeps_the_export(tmp_path):
    """The upload itself needs network (untested here); offline, it fails as one error line after the export."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest) so that no upload is attempted")
    run = _save_run(random_student(), tmp_path / "run")
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "export"),
                                  "--push-to-hub", "someone/goose-test"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error: exported to ")
    assert (tmp_path / "export" / "config.json").is_file()

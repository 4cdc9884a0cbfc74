"""`goose export`: a saved student as a transformers model folder that loads without goose.

The folder holds config.json (model type, the student's config, `auto_map`), model.safetensors, the
tokenizer, and the modelling code: student/hf.py (as modeling_goose.py), student/model.py, spikes.py,
wkv.py, ternary.py (the ternary inference path, its C kernels inside), native.py and errors.py copied from this package with their relative imports rewritten for a flat folder.
The copies are the real source files, so the export cannot drift from the model goose trains.
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` then works with only torch,
transformers and safetensors installed. `--push-to-hub` uploads the folder with huggingface_hub.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import GooseError

PACKAGE = Path(__file__).resolve().parents[1]
# source file (relative to the package root) -> name in the exported folder
CODE_FILES = {
    "student/hf.py": "modeling_goose.py",
    "student/model.py": "model.py",
    "student/spikes.py": "spikes.py",
    "student/wkv.py": "wkv.py",
    "student/ternary.py": "ternary.py",  # the ternary inference path (GooseForCausalLM.use_ternary_path)
    "native.py": "native.py",  # builds ternary.py's kernels with the machine's C compiler on first use
    "errors.py": "errors.py",
    "ranks.py": "ranks.py",  # the student's spike statistics are global-batch ones under torchrun
}
AUTO_MAP = {"AutoConfig": "modeling_goose.GooseConfig", "AutoModelForCausalLM": "modeling_goose.GooseForCausalLM"}
PROVENANCE_FILES = ("goose.json", "metrics.json")  # kept beside the model: where it came from, how it scored
MODEL_CARD = """---
library_name: transformers
tags: [goose, rwkv7, spiking, distillation]
---
# A goose student

A ternary-spiking RWKV-7-style language model distilled from `{teacher}` with goose.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(FOLDER_OR_REPO, trust_remote_code=True)
ids = tok("The history of", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

`generate()` reads the prompt in the chunked form once, then one token per step in the recurrent form
with the state (`state=`) as its cache; padded batches are not supported. goose.json says where the
model came from; metrics.json how it scored on its store's validation windows.
"""
_RELATIVE = re.compile(r"^(\s*from\s+)\.+(\w+)(\s+import\b)", flags=re.MULTILINE)


def exported_code() -> dict[str, str]:
    """{exported file name: source text}: `from ..errors import` and `from .model import` both become
    `from .<module> import` (the folder is one flat package when transformers loads it)."""
    out = {}
    for src, name in CODE_FILES.items():
        text = _RELATIVE.sub(r"\1.\2\3", (PACKAGE / src).read_text())
        out[name] = text
    modules = {Path(name).stem for name in out}
    for name, text in out.items():  # a new goose import in those files must be added to CODE_FILES
        missing = {m for _, m, _ in _RELATIVE.findall(text)} - modules
        if missing or re.search(r"^\s*(from|import)\s+goose\b", text, flags=re.MULTILINE):
            raise RuntimeError(f"{name} imports {sorted(missing) or 'goose'}, which the export does not carry")
    return out


def run_export(student: str, out: str, *, tokenizer: str | None = None, push_to_hub: str | None = None,
               private: bool = False) -> dict:
    """Write the transformers folder for STUDENT (run folder or saved model) into OUT; optionally upload it."""
    from ..student.hf import GooseForCausalLM
    from ..student.model import Student
    from .evaluate import check_tokenizer, load_tokenizer, student_folder

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GooseError(f"--out {out} exists and is not an empty folder; choose a new one")
    code = exported_code()
    folder, meta = student_folder(student)
    model = Student.from_pretrained(folder)
    tok = load_tokenizer(tokenizer, meta, folder)
    check_tokenizer(tok, model.cfg.vocab_size)
    hf = GooseForCausalLM.from_student(model, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
    hf.config.auto_map = dict(AUTO_MAP)

    # written beside OUT and renamed into place: an interrupted export leaves no folder that looks complete
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name, text in code.items():
        (tmp / name).write_text(text)
    for name in PROVENANCE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    (tmp / "README.md").write_text(MODEL_CARD.format(teacher=meta.get("teacher") or "unknown"))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    tmp.rename(out_dir)

    url = _push(out_dir, push_to_hub, private) if push_to_hub else None
    return {"out": str(out_dir), "source": str(folder), "files": sorted(p.name for p in out_dir.iterdir()),
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": model.cfg.vocab_size,
            "pushed": url}


def _push(folder: Path, repo: str, private: bool) -> str:
    """Upload FOLDER to the hub repository REPO (created if absent). Needs network and a token
    (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo, private=private, exist_ok=True)
        info = upload_folder(repo_id=repo, folder_path=str(folder), commit_message="goose export")
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GooseError(f"exported to {folder}, but the upload to {repo} failed: {reason}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


def describe(summary: dict) -> str:
    """The lines `goose export` prints."""
    lines = [f"exported {summary['source']} ({summary['parameters']:,} parameters, vocabulary "
             f"{summary['vocab_size']}) -> {summary['out']}",
             f"  files: {', '.join(summary['files'])}",
             f"  load:  AutoModelForCausalLM.from_pretrained({json.dumps(summary['out'])}, trust_remote_code=True)"]
    if summary["pushed"]:
        lines.append(f"  pushed: {summary['pushed']}")
    return "\n".join(lines)

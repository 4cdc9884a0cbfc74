"""`goose quickstart`: the whole product offline in about two minutes on 2 CPU cores.

1. Generate a corpus from a probabilistic grammar with long-range structure (subject-verb number agreement
   across relative clauses, a per-document topic, a protagonist's name that recurs), so a teacher has
   something real to learn and a student something real to distil.
2. Build a word-level tokenizer and train a small GPT-2 teacher on it (saved as a Hugging Face folder).
3. `cache-teacher`, `train-from-cache` (KD and CE-only students), `eval` and `report`: each through the
   same code as the real commands. Progress is printed as six numbered steps ([1/6] ... [6/6]); each
   student's held-out `eval` result is kept in RUN/eval.json, which `goose report` reads.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch

from ..errors import GooseError

EOS = "<|endoftext|>"
TOPICS = {
    "farm": dict(nouns=[("dog", "dogs"), ("farmer", "farmers"), ("horse", "horses"), ("cow", "cows"),
                        ("hen", "hens")],
                 verbs=[("runs", "run"), ("sleeps", "sleep"), ("eats", "eat"), ("waits", "wait")],
                 trans=[("feeds", "feed"), ("chases", "chase"), ("sees", "see"), ("follows", "follow")],
                 adjs=["old", "brown", "quiet", "hungry"], places=["barn", "field", "river"]),
    "city": dict(nouns=[("driver", "drivers"), ("teacher", "teachers"), ("child", "children"),
                        ("officer", "officers"), ("artist", "artists")],
                 verbs=[("walks", "walk"), ("talks", "talk"), ("works", "work"), ("smiles", "smile")],
                 trans=[("meets", "meet"), ("helps", "help"), ("calls", "call"), ("visits", "visit")],
                 adjs=["busy", "young", "tired", "clever"], places=["station", "market", "park"]),
    "sea": dict(nouns=[("sailor", "sailors"), ("fish", "fishes"), ("captain", "captains"), ("gull", "gulls"),
                       ("whale", "whales")],
                verbs=[("swims", "swim"), ("sings", "sing"), ("dives", "dive"), ("rests", "rest")],
                trans=[("watches", "watch"), ("catches", "catch"), ("guides", "guide"), ("finds", "find")],
                adjs=["wet", "large", "silent", "swift"], places=["harbour", "ship", "shore"]),
    "school": dict(nouns=[("student", "students"), ("professor", "professors"), ("writer", "writers"),
                          ("reader", "readers"), ("poet", "poets")],
                   verbs=[("reads", "read"), ("thinks", "think"), ("writes", "write"), ("learns", "learn")],
                   trans=[("teaches", "teach"), ("praises", "praise"), ("asks", "ask"), ("answers", "answer")],
                   adjs=["curious", "careful", "bright", "patient"], places=["library", "hall", "garden"]),
}
NAMES = ["alice", "bruno", "chen", "dara", "emil", "farah", "goran", "hana", "ivan", "juno"]


def _np(rng: random.Random, t: dict, plural: bool) -> list[str]:
    det = rng.choice(["the", "some", "these"] if plural else ["the", "a", "this"])
    noun = rng.choice(t["nouns"])[1 if plural else 0]
    return [det] + ([rng.choice(t["adjs"])] if rng.random() < 0.4 else []) + [noun]


def _sentence(rng: random.Random, t: dict, name: str) -> list[str]:
    if rng.random() < 0.2:  # the protagonist recurs: copying a name seen far back is a long-range skill
        return [name, rng.choice(["said", "knew", "saw"]), "that"] + _sentence(rng, t, name)
    plural = rng.random() < 0.5
    words = _np(rng, t, plural)
    if rng.random() < 0.45:  # object relative clause: the main verb agrees with the head, across the clause
        inner = rng.random() < 0.5
        words += ["that"] + _np(rng, t, inner) + [rng.choice(t["trans"])[1 if inner else 0]]
    r = rng.random()
    if r < 0.4:
        words += [rng.choice(t["verbs"])[1 if plural else 0]]
        if rng.random() < 0.5:
            words += ["near", "the", rng.choice(t["places"])]
    elif r < 0.75:
        words += [rng.choice(t["trans"])[1 if plural else 0]] + _np(rng, t, rng.random() < 0.5)
    else:
        words += ["are" if plural else "is", rng.choice(t["adjs"])]
    return words + ["."]


def make_corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        topic = rng.choice(sorted(TOPICS))
        name = rng.choice(NAMES)
        words = ["topic", ":", topic, "."]
        for _ in range(rng.randint(4, 12)):
            words += _sentence(rng, TOPICS[topic], name)
        docs.append(" ".join(words))
    return docs


def vocabulary() -> list[str]:
    words = {EOS, "topic", ":", ".", "the", "a", "this", "some", "these", "that", "near", "is", "are", "said",
             "knew", "saw", *NAMES, *TOPICS}
    for t in TOPICS.values():
        for pair in t["nouns"] + t["verbs"] + t["trans"]:
            words.update(pair)
        words.update(t["adjs"] + t["places"])
    return [EOS] + sorted(words - {EOS})


def save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tok.save_pretrained(folder)
    return tok


def train_teacher(folder: Path, docs: list[str], *, steps: int, seq_len: int, seed: int) -> dict:
    """A small GPT-2 trained from scratch on the corpus (plain PyTorch loop), saved as a HF folder. It is
    written to FOLDER.partial and renamed into place at the end, so an interrupted run leaves no teacher."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .data import tokenize_and_pack

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tok = save_tokenizer(partial)
    torch.manual_seed(seed)
    import datasets

    windows = tokenize_and_pack(datasets.Dataset.from_dict({"text": docs}), tok, text_column="text", seq_len=seq_len)
    config = GPT2Config(vocab_size=len(tok), n_positions=seq_len, n_embd=128, n_layer=3, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(windows)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        # next-token CE computed here, not by `labels=`: transformers' built-in loss selection warns
        # "`loss_type=None` ... unrecognized" for GPT2LMHeadModel, a warning a first run should not show
        logits = model(batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.save_pretrained(partial)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "final_loss": float(loss.detach()),
            "seconds": time.perf_counter() - t0, "tokens": steps * 16 * seq_len}
    (partial / "quickstart_teacher.json").write_text(json.dumps(info))
    os.replace(partial, folder)
    return info


class _Interrupted(BaseException):
    """SIGTERM or SIGINT outside student training (which checkpoints and returns on its own). A
    BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise _Interrupted(signum)


def _open_out(root: Path, params: dict, echo) -> None:
    """A new or empty --out, or one this quickstart started with the same settings (then it continues)."""
    marker = root / "quickstart.json"
    if root.exists() and any(root.iterdir()):
        if not marker.is_file():
            raise GooseError(f"{root} exists, is not empty and is not a quickstart folder; choose a new --out")
        try:
            previous = json.loads(marker.read_text())
        except ValueError:
            raise GooseError(f"{marker} is damaged; choose a new --out") from None
        if previous != params:
            changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in params.items() if previous.get(k) != v)
            raise GooseError(f"{root} holds a quickstart with other settings ({changed}); choose a new --out "
                             f"or rerun with the same settings to continue it")
        echo(f"continuing the quickstart in {root}")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params))


def run_quickstart(out: str, *, seed: int = 0, teacher_steps: int = 300, student_steps: int = 150,
                   train_docs: int = 4000, cache_tokens: int = 400_000, echo=print) -> dict:
    """Every stage in order; a rerun on the same --out continues where an interrupted one stopped (the
    teacher is kept once saved, the store resumes, students resume from their last checkpoint).

    SIGTERM or Ctrl-C returns {"interrupted": True, "signal": N} instead of the summary."""
    root = Path(out)
    params = {"seed": seed, "teacher_steps": teacher_steps, "student_steps": student_steps,
              "train_docs": train_docs, "cache_tokens": cache_tokens}
    _open_out(root, params, echo)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_stages(root, echo=echo, **params)
    except _Interrupted as exc:
        return {"interrupted": True, "signal": exc.signum, "out": str(root)}
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run_stages(root: Path, *, seed: int, teacher_steps: int, student_steps: int, train_docs: int,
                cache_tokens: int, echo) -> dict:
    from .stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
    from .stage_two.config import load_config
    from .data import DataSpec
    from .evaluate import EvalConfig, run_eval
    from .report import run_report
    from .stage_two.checkpoint import latest_checkpoint
    from .stage_two.train import run_train

    t_start = time.perf_counter()
    (root / "data").mkdir(parents=True, exist_ok=True)
    train_docs, valid_docs = make_corpus(train_docs, seed), make_corpus(300, seed + 1)
    for name, docs in (("train", train_docs), ("valid", valid_docs)):
        tmp = root / "data" / f"{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        os.replace(tmp, root / "data" / f"{name}.jsonl")
    echo(f"[1/6] corpus: {len(train_docs)} training and {len(valid_docs)} validation documents -> {root / 'data'}")

    teacher_dir = root / "teacher"
    if (teacher_dir / "quickstart_teacher.json").is_file():
        teacher = json.loads((teacher_dir / "quickstart_teacher.json").read_text())
        echo(f"[2/6] teacher: already trained -> {teacher_dir}")
    else:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        teacher = train_teacher(teacher_dir, train_docs, steps=teacher_steps, seq_len=128, seed=seed)
        echo(f"[2/6] teacher: GPT-2 architecture, {teacher['parameters']:,} parameters, {teacher['tokens']:,} tokens "
             f"in {teacher['seconds']:.0f} s (final loss {teacher['final_loss']:.3f}) -> {teacher_dir}")

    store = root / "cache.zarr"
    cache = run_cache_teacher(CacheTeacherConfig(
        output=str(store), teacher=str(teacher_dir), data=DataSpec(data_files=(str(root / "data" / "train.jsonl"),)),
        seq_len=128, max_tokens=cache_tokens, top_k=32, hidden_layers="-1", chunk_windows=16, batch_size=16,
        device="cpu", dtype="fp32"))
    echo(f"[3/6] cache-teacher: {cache['tokens']:,} tokens, {cache['bytes_per_token']:.0f} bytes/token, "
         f"{cache['tokens_per_s']:,.0f} tokens/s -> {store}")

    runs = {}
    students = (("student_kd", "KD student", ["loss.kd=topk", "loss.kd_weight=0.9", "loss.ce_weight=0.1",
                                              "temperature.mode=fixed", "temperature.value=1.5"]),
                ("student_ce", "CE-only student", ["loss.kd=none", "loss.kd_weight=0", "loss.ce_weight=1"]))
    for number, (name, label, overrides) in enumerate(students, start=4):
        done = root / name / "DONE.json"
        if done.is_file():
            runs[name] = json.loads(done.read_text())
            echo(f"[{number}/6] {label}: already trained -> {root / name}")
            continue
        # the gradient norm sits above optim.grad_clip through the warm-up of these small students, which is
        # expected: the clipping health check looks at 100 steps (not 50), so only persistent clipping warns
        cfg = load_config(None, ["model.preset=tiny", "model.overrides={d_model: 128, head_size: 32}",
                                 "batch_size=8", "val_every=50", "val_windows=32", "optim.lr=3e-3",
                                 "optim.warmup_steps=20", "monitor.clip_window=100"] + overrides,
                          cache=str(store), out=str(root / name), steps=student_steps, seed=seed)
        r = run_train(cfg, resume=latest_checkpoint(root / name) is not None)
        if r["interrupted"]:
            return {"interrupted": True, "signal": r["signal"], "out": str(root)}
        runs[name] = {"tokens": r["tokens"], "seconds": r["seconds"], "last_val": r["last_val"]}
        done.write_text(json.dumps(runs[name], default=float))
        v = r["last_val"] or {}
        where = r.get("outputs", {}).get("best") or str(root / name)
        echo(f"[{number}/6] {label} ({name}): {r['tokens']:,} tokens in {r['seconds']:.0f} s, store validation PPL "
             f"{v.get('val_ppl', float('nan')):.2f} (teacher {v.get('teacher_ppl', float('nan')):.2f} on the same "
             f"windows) -> {where}")

    valid = DataSpec(data_files=(str(root / "data" / "valid.jsonl"),))
    evals = {"teacher": run_eval(EvalConfig(teacher=str(teacher_dir), data=valid, seq_len=128, device="cpu"))}
    for name in runs:
        evals[name] = run_eval(EvalConfig(student=str(root / name), tokenizer=str(teacher_dir), data=valid,
                                          protocols=("windows", "stream"), seq_len=128, device="cpu"))
        # RUN/eval.json: the held-out result next to the run's logs (what `goose report` puts in its table),
        # with the teacher's result on the same text and protocol for the ratio
        tmp = root / name / "eval.json.tmp"
        tmp.write_text(json.dumps({**evals[name], "teacher": evals["teacher"]}, indent=2, default=float))
        os.replace(tmp, root / name / "eval.json")
    report = run_report([str(root / n) for n in runs], str(root / "report"))
    ppl = {name: e["perplexity"][0]["ppl"] for name, e in evals.items()}
    summary = {
        "out": str(root), "seconds": time.perf_counter() - t_start, "teacher": teacher,
        "held_out_ppl": ppl, "stream_ppl": {n: evals[n]["perplexity"][1]["ppl"] for n in runs},
        "energy_ratio": {n: evals[n]["energy"]["energy_ratio_vs_dense"] for n in runs},
        "zero_fraction": {n: evals[n]["spikes"]["zero_fraction"] for n in runs},
        "report": report["report"],
    }
    tmp = root / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    os.replace(tmp, root / "summary.json")
    echo(f"[6/6] eval on held-out documents (non-overlapping 128-token windows): perplexity teacher "
         f"{ppl['teacher']:.2f}, KD student {ppl['student_kd']:.2f}, CE-only student {ppl['student_ce']:.2f}")
    files = [p for p in (teacher_dir, store, *(root / n / "best" for n in runs), root / "report" / "report.md")
             if p.exists()]
    echo("      outputs: " + "  ".join(str(p) for p in files))
    return summary

"""`goose` command line: parses arguments and calls into pipeline/ and cache/. No logic lives here.

Uniform options: `--out/-o` names what a command writes, `--device` defaults to auto, `--dtype` takes the same
choices everywhere, every `--seed` says what it seeds, and every command that prints a result takes `--json`
(schemas: docs/CLI.md). Errors are one `error: ...` line on stderr: exit 2 for bad input, 1 for a failed run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import click

from . import __version__
from .errors import GooseError
from .pipeline.stage_one.config import DEVICE_HELP, DTYPES, STORAGE_HELP, CacheTeacherConfig


class _Group(click.Group):
    """Turns a GooseError anywhere below into one 'error: ...' line on stderr and its exit status (2 for bad
    input, 1 for a run that failed); a usage error (missing or bad option) is one such line too, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GooseError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message} (see `{where} --help`)", err=True)
            ctx.exit(2)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def config_options(cls):
    """click options built from a config dataclass's fields, so each default and help text is written once,
    in the config: `--kebab-name` (or the field's `flags`), the field's type, default and `help`, and its
    `choices`, `min`, `metavar` and `required`. `cli` says how the text is read: floats (comma-separated),
    json, shard (I/N), multiple (repeat the option), flag (--x/--no-x, default the config's), off_flag (a
    flag that turns a True field off), nested (a dataclass field: its own fields' options)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    decorators = []
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, f.metadata.get("cli")
        if kind == "nested":
            decorators.append(config_options(hints[f.name]))
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help for its command-line option")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else \
            (None if f.default is dataclasses.MISSING else f.default)
        flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
        kw = {"help": meta["help"], **{k: meta[k] for k in ("metavar", "required") if k in meta}}
        if kind == "flag":
            flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
            kw["default"] = default
        elif kind == "off_flag":
            kw["is_flag"] = True
        elif kind == "multiple":
            kw["multiple"] = True
        elif kind == "floats":
            kw.update(default=",".join(f"{x:g}" for x in default), show_default=True)
        elif kind in ("json", "shard"):
            pass
        else:
            base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            kind_type = base[0] if base[0] in (int, float, str) else str
            if "choices" in meta:
                kind_type = click.Choice(meta["choices"])
            elif "min" in meta:
                kind_type = click.IntRange(min=meta["min"])
            kw.update(type=kind_type, show_default=default is not None)
            if default is not None:  # an explicit None would count as a default (a required option unmet)
                kw["default"] = default
        decorators.append(click.option(*flags, f.name, **kw))

    def apply(fn):
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn

    return apply


def config_from_options(cls, kw: dict):
    """The config dataclass from the values of its `config_options` (popped from `kw`)."""
    import dataclasses
    import typing

    from .pipeline.stage_one.config import parse_shard

    hints = typing.get_type_hints(cls)
    read = {"floats": _floats, "json": _storage_options, "shard": parse_shard, "multiple": tuple,
            "off_flag": lambda on: not on}
    values = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("cli")
        if kind == "nested":
            values[f.name] = config_from_options(hints[f.name], kw)
        else:
            value = kw.pop(f.name)
            values[f.name] = read[kind](value) if kind in read else value
    return cls(**values)


def _storage_options(text: str | None) -> dict | None:
    """--storage-options: a JSON object (fsspec options), or a one-line GooseError."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GooseError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise GooseError(f"--storage-options must be a JSON object (e.g. '{{\"anon\": true}}'), "
                         f"got a JSON {type(options).__name__}")
    return options


def _plain(value):
    """`value` with numpy/torch scalars as Python numbers, tuples as lists and non-finite floats as None (so
    the output is strict JSON); anything else not JSON-native as its string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _plain(value.item())
    return str(value)


def _emit_json(obj) -> None:
    click.echo(json.dumps(_plain(obj), indent=2, allow_nan=False))


def _stdout_to_stderr(as_json: bool):
    """With --json, stdout carries the JSON document alone: progress lines and warnings go to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _examples(*lines: str) -> str:
    """A command's epilog: 'Examples:' and the lines as given (\\b keeps click from rewrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# shared option definitions, so every command spells them the same way (cache-teacher's come from its config)
JSON_HELP = "Print the result as one JSON object on stdout (keys: docs/CLI.md); progress goes to stderr."


def _device_option(default: str | None = "auto", show: str | bool = True):
    return click.option("--device", default=default, show_default=show, help=DEVICE_HELP)


def _dtype_option(help_text: str):
    return click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help=help_text)


def _json_option():
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)


def _storage_option(help_text: str = STORAGE_HELP):
    return click.option("--storage-options", default=None, help=help_text)


@click.group(cls=_Group, epilog=_examples("goose quickstart --out runs/quickstart",
                                          "goose train-from-cache --help"))
@click.version_option(__version__, prog_name="goose")
def main():
    """goose: distil a transformer teacher into a ternary-spiking RWKV-7-style student."""


@main.command("cache-teacher", epilog=_examples(
    "goose cache-teacher --teacher gpt2 --dataset wikitext --dataset-config wikitext-103-raw-v1 --out runs/wt103.zarr",
    "goose cache-teacher --teacher ../shared/teachers/enwiki-tiny --data-files text.txt --seq-len 256 "
    "--max-tokens 262144 --out runs/tiny.zarr"))
@config_options(CacheTeacherConfig)
@_json_option()
def cache_teacher(**kw):
    """Run the teacher once over a corpus and write its targets into a Zarr v3 store (resumable: rerun the
    same command after a crash). Under torchrun, the ranks share the work (docs/SCALING.md). The data is
    read and tokenised once; its packed windows wait in a temporary file (2 bytes a token, in TMPDIR; one
    per torchrun rank; a tmpfs TMPDIR is memory), unlinked from the start so nothing is left behind."""
    from .pipeline.stage_one.cache_teacher import run_cache_teacher

    as_json = kw.pop("as_json")
    cfg = config_from_options(CacheTeacherConfig, kw)
    with _stdout_to_stderr(as_json):
        s = run_cache_teacher(cfg)
    if s["rank"] > 0:  # under torchrun, rank 0 reports for all
        return
    if as_json:
        _emit_json(s)
        return
    if s["shard"] and not s["already_complete"]:
        index, count = s["shard"]
        click.echo(f"shard {index}/{count}: computed {s['blocks_computed']} blocks ({s['tokens_computed']:,} "
                   f"tokens) in {s['seconds']:.1f} s -> {s['output']}; {s['blocks_left']} blocks of the store left "
                   f"in all\n"
                   f"  not finalized: once every shard is done, run `goose cache finalize {s['output']}`")
        return
    if s["already_complete"]:
        click.echo(f"store {s['output']} is already complete; nothing to do")
    click.echo(
        f"cached {s['tokens']:,} tokens ({s['windows']} windows) -> {s['output']}\n"
        f"  computed now: {s['tokens_computed']:,} tokens in {s['seconds']:.1f} s "
        f"({s['tokens_per_s']:,.0f} tokens/s); resumed after {s['blocks_resumed_from']} finished blocks\n"
        f"  on disk: {_human_bytes(s['bytes_on_disk'])}, {s['bytes_per_token']:.1f} bytes/token"
    )


def _from_config(key: str) -> str:
    """The default shown for a train-from-cache flag that overrides a config key: the config's, else
    TrainConfig's own default (read from it, never copied)."""
    from .pipeline.stage_two.config import TrainConfig

    return f"the config's {key}, else {getattr(TrainConfig, key)}"


@main.command("train-from-cache", epilog=_examples(
    "goose train-from-cache --cache runs/tiny.zarr --out runs/kd --config kd --set model.preset=tiny --steps 100",
    "goose train-from-cache --cache runs/tiny.zarr --out runs/kd --resume --steps 200"))
@click.option("--cache", "cache", default=None,
              help="Teacher-cache store to train from (read-only) [required unless the config sets cache].")
@click.option("--out", "-o", default=None,
              help="Run folder (checkpoints, metrics, best model) [required unless the config sets out]. A folder "
                   "that already holds a run needs --resume or --overwrite.")
@click.option("--config", "config_file", default=None,
              help="Run config: a shipped name (kd, ce_only, ...: `goose config list`) or a YAML/JSON file "
                   "[default: built-in defaults, `goose config show`].")
@click.option("--set", "overrides", multiple=True, help="Override a config key: --set optim.lr=1e-3 (repeat).")
@click.option("--val-cache", default=None, help="A second store for validation [default: hold out the store's end].")
@_storage_option("JSON object of fsspec options for --cache and --val-cache (config key storage_options).")
@click.option("--steps", type=int, default=None, show_default=_from_config("steps"), help="Optimizer steps.")
@click.option("--batch-size", type=int, default=None, show_default=_from_config("batch_size"),
              help="Windows per step (the global batch under torchrun).")
@click.option("--seed", type=int, default=None, show_default=_from_config("seed"),
              help="Seeds training: the student's initialisation and the data order.")
@_device_option(default=None, show=_from_config("device"))
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default=None, show_default=_from_config("amp"),
              help="Mixed precision of the student's forward and backward.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the student.")
@click.option("--profile", "profile_steps", type=int, default=None,
              help="Write a torch.profiler trace of N steps to RUN/profile [default: no trace].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--overwrite", is_flag=True,
              help="Delete the run in --out (goose's run files only; refused if the folder holds other files) "
                   "and start afresh.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_json_option()
def train_from_cache(cache, out, config_file, overrides, val_cache, storage_options, steps, batch_size, seed, device,
                     amp, compile_, profile_steps, resume, overwrite, no_progress, as_json):
    """Train the spiking student by streaming a teacher cache (the teacher is never loaded).

    An --out that already holds a run is refused unless --resume (continue it exactly) or --overwrite
    (delete it and start afresh) is given."""
    from .pipeline.stage_two.config import load_config
    from .pipeline.stage_two.run_folder import prepare_run_folder
    from .pipeline.stage_two.train import run_train

    cfg = load_config(config_file, overrides, cache=cache, out=out, val_cache=val_cache,
                      storage_options=_storage_options(storage_options), steps=steps,
                      batch_size=batch_size, seed=seed, device=device, amp=amp, compile=compile_,
                      profile_steps=profile_steps, required={
                          "cache": "no store given: pass --cache STORE (or set cache: in the config)",
                          "out": "no run folder given: pass --out DIR (checkpoints, logs and the best model go "
                                 "there; or set out: in the config)"})
    with _stdout_to_stderr(as_json):
        prepare_run_folder(cfg, resume=resume, overwrite=overwrite)
        s = run_train(cfg, resume=resume, progress=not no_progress)
    if s["rank"] != 0:  # under torchrun rank 0 speaks for the run
        sys.exit(128 + int(s["signal"]) if s["interrupted"] else 0)
    run = s["run"]
    files = {name: os.path.join(run, name) if os.path.exists(os.path.join(run, name)) else None
             for name in ("best", "metrics.jsonl", "events.jsonl")}
    if as_json:
        _emit_json({**s, "files": files})
        if s["interrupted"]:
            sys.exit(128 + int(s["signal"] or 2))
        return
    val = s["last_val"] or {}
    lines = [
        f"{'interrupted' if s['interrupted'] else 'trained'}: {s['steps']} steps, {s['tokens']:,} tokens in "
        f"{s['seconds']:.0f} s -> {s['run']}",
        f"  parameters {s['parameters']['total']:,}; skipped steps {s['skipped_steps']}; rollbacks {s['rollbacks']}",
    ]
    if val:
        lines.append(f"  store validation PPL (held-out windows of the store, {s['val_windows']} x {s['seq_len']} tokens, zero "
                     f"state; for a test figure run `goose eval` on text outside the store): {val['val_ppl']:.2f} (best {s['best_val_ppl']:.2f}; teacher {val['teacher_ppl']:.2f} "
                     f"on the same windows), KL {val['val_kl']:.4f}, top-1 agreement {val['val_top1_agree']:.3f}, "
                     f"spike rate {val['spike_rate'] or 0:.3f}, energy vs dense {val['energy_ratio_vs_dense']:.3f}")
    if s["events"]:
        lines.append("  health events: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["events"].items())))
    if "outputs" in s:  # the files that exist (train.py's run_files), never one a short run did not write
        from .pipeline.stage_two.run_folder import summary_files_line

        lines.append(summary_files_line(s["outputs"]))
    else:
        lines.append("  " + "   ".join(f"{label}: {path}" for label, path in
                                       zip(("best model", "metrics", "events"), files.values()) if path))
    click.echo("\n".join(lines))
    if s["interrupted"]:
        sys.exit(128 + int(s["signal"] or 2))


@main.command("eval", epilog=_examples(
    "goose eval runs/kd --data-files held_out.txt --seq-len 256 --protocol windows --protocol stream",
    "goose eval --teacher gpt2 --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test --json",
    "goose eval runs/kd --data-files held_out.txt --harness goose_text_ppl,goose_mc "
    "--harness-data-files goose_mc=questions.jsonl"))
@click.argument("student", required=False)
@click.option("--teacher", default=None, help="Evaluate a teacher instead (hub name or local folder).")
@click.option("--tokenizer", default=None, help="Tokenizer for a student [default: the one saved with it].")
@click.option("--dataset", default=None, help="Hub dataset name (e.g. wikitext); or use --data-files.")
@click.option("--dataset-config", default=None, help="Hub dataset config (e.g. wikitext-2-raw-v1).")
@click.option("--split", default=None, help="Dataset split [default: train].")
@click.option("--data-files", multiple=True, help="Local txt/json/jsonl/parquet/csv files (repeat the option).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text (json/parquet/csv).")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(["windows", "sliding", "stream"]),
              help="windows (non-overlapping), sliding (--stride), stream (student, carried state). Repeatable "
                   "[default: windows].")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=int, default=None, help="Sliding-window stride [default: seq-len / 2].")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens [default: the whole text].")
@click.option("--cache", default=None, help="Store for KL to the teacher, top-1 agreement and ECE.")
@click.option("--cache-windows", type=int, default=64, show_default=True,
              help="Held-out store windows used with --cache.")
@_storage_option("JSON object of fsspec options for --cache and the student's store.")
@_device_option()
@_dtype_option("Teacher dtype (--teacher); auto = fp32 on CPU, bf16 on CUDA.")
@click.option("--harness", "harness_tasks", default=None, metavar="TASKS",
              help="Also run EleutherAI's lm-evaluation-harness (pip install 'goose-distill[harness]'): "
                   "comma-separated tasks. Offline: goose_text_ppl (perplexity of local text, beside goose's "
                   "windows figure) and goose_mc (multiple choice from a local jsonl); other names are lm-eval's "
                   "own tasks, which download their data. Windows of --seq-len tokens [default: no harness].")
@click.option("--harness-data-files", multiple=True, metavar="TASK=FILE",
              help="Local files of a goose harness task (repeat): goose_text_ppl=FILE (text) or "
                   "goose_mc=FILE (jsonl of question, choices, answer) [default: goose_text_ppl reads "
                   "--data-files].")
@click.option("--harness-limit", type=int, default=None,
              help="Run at most N documents (questions) of each harness task [default: all].")
@click.option("--ternary", is_flag=True,
              help="Score the student on its ternary inference path (CPU; a ternary_weights student): packed "
                   "2-bit weights, only fired spikes' weight rows read; prints the rows it read and its bytes.")
@_json_option()
def eval_cmd(student, teacher, tokenizer, dataset, dataset_config, split, data_files, text_column, protocols,
             seq_len, stride, max_tokens, cache, cache_windows, storage_options, device, dtype, harness_tasks,
             harness_data_files, harness_limit, ternary, as_json):
    """Perplexity of STUDENT (run folder or saved model) or of --teacher, same protocol for both; with
    --harness, EleutherAI's lm-evaluation-harness on the same model, beside goose's figure."""
    from .pipeline.data import DataSpec
    from .pipeline.evaluate import EvalConfig, run_eval
    from .pipeline.harness import HarnessConfig, parse_data_files, parse_tasks

    harness = None
    if harness_tasks is not None:
        harness = HarnessConfig(tasks=parse_tasks(harness_tasks), data_files=parse_data_files(harness_data_files),
                                limit=harness_limit)
    elif harness_data_files or harness_limit is not None:
        raise GooseError("--harness-data-files and --harness-limit need --harness TASKS")
    data = None
    if dataset or data_files:
        data = DataSpec(dataset=dataset, dataset_config=dataset_config, split=split, data_files=tuple(data_files),
                        text_column=text_column)
    with _stdout_to_stderr(as_json):
        r = run_eval(EvalConfig(student=student, teacher=teacher, tokenizer=tokenizer, data=data,
                                protocols=tuple(protocols) or ("windows",), seq_len=seq_len, stride=stride,
                                max_tokens=max_tokens, cache=cache, cache_windows=cache_windows,
                                storage_options=_storage_options(storage_options), device=device, dtype=dtype,
                                harness=harness, ternary=ternary))
    if as_json:
        _emit_json(r)
        return
    for line in r.get("warnings", []):
        click.echo(f"warning: {line}", err=True)
    m = r["model"]
    click.echo(f"{m['kind']} {m.get('path') or m.get('name')}: {m['parameters'] if isinstance(m['parameters'], int) else m['parameters']['total']:,} parameters")
    if "perplexity" in r:
        held = "held out from every store checked" if not r.get("warnings") else "NOT held out (see warning)"
        click.echo(f"  text: {', '.join(r['data'].get('data_files') or [r['data'].get('dataset') or '?'])} "
                   f"({r['data']['tokens']:,} tokens; {held})")
    for p in r.get("perplexity", []):
        extra = f", stride {p['stride']}" if p["stride"] else ""
        click.echo(f"  eval {p['protocol']:<8} PPL (L={p['seq_len']}{extra}): PPL {p['ppl']:.3f} over {p['tokens_scored']:,} tokens "
                   f"({p['tokens_per_s']:,.0f} tokens/s)")
    if "teacher_agreement" in r:
        a = r["teacher_agreement"]
        click.echo(f"  vs teacher (store's held-out validation windows, {a['windows']}): KL {a['kl_to_teacher']:.4f}, top-1 agreement "
                   f"{a['top1_agreement']:.3f}, accuracy {a['accuracy']:.3f}, ECE {a['ece']:.4f}")
    if r.get("harness"):
        from .pipeline.harness import describe

        click.echo(describe(r["harness"]))
    if "spikes" in r:
        sp, e = r["spikes"], r["energy"]
        click.echo(f"  spikes: firing rate {sp['firing_rate']:.3f}, zeros {sp['zero_fraction']:.3f}, dead max "
                   f"{sp['dead_fraction_max']:.3f}, saturated max {sp['saturated_fraction_max']:.3f}")
        click.echo(f"  energy: {e['energy_pj_per_token'] / 1e6:.2f} uJ/token vs dense {e['dense_energy_pj_per_token'] / 1e6:.2f}"
                   f" ({e['energy_ratio_vs_dense']:.3f}x; MAC 4.6 pJ, AC 0.9 pJ at 45 nm)")
        parts = e.get("parts_pj_per_token") or {}
        total = sum(parts.values()) or 1.0
        click.echo("  energy by part: " + ", ".join(f"{name.replace('_', ' ')} {value / total:.0%}"
                                                    for name, value in parts.items() if value))
    if "ternary_path" in r:
        from .pipeline.evaluate import describe_ternary_path

        click.echo(describe_ternary_path(r["ternary_path"]))


@main.command("generate", epilog=_examples(
    'goose generate runs/kd --prompt "The history of" --max-new-tokens 50 --top-p 0.9',
    'goose generate runs/kd --prompt "The history of" --temperature 0 --json'))
@click.argument("student")
@click.option("--prompt", default="", show_default="none: start from the end-of-text token", help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=100, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature; 0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k likeliest tokens (0 = all).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Sample from the smallest set of tokens with this much probability (1 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampling (same seed, same text).")
@click.option("--tokenizer", default=None, help="Tokenizer [default: the one saved with the student].")
@_device_option()
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-text token.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the per-token step: ~3-4x faster tokens after a 10-40 s compilation.")
@click.option("--ternary", is_flag=True,
              help="Generate on the ternary inference path (CPU; a ternary_weights student): packed 2-bit "
                   "weights, only fired spikes' weight rows read; the same greedy tokens as without it (--compile works too).")
@_json_option()
def generate_cmd(student, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, device, ignore_eos,
                 compile_, ternary, as_json):
    """Sample from STUDENT (run folder or saved model) in its recurrent form; text is printed as it comes
    (with --json: once, at the end)."""
    from .pipeline.evaluate import check_tokenizer, load_tokenizer, student_folder
    from .pipeline.generate import TextStream, check_sampling, generate, load_for_generation

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    folder, meta = student_folder(student)
    model, dev = load_for_generation(folder, device, ternary=ternary)
    tok = load_tokenizer(tokenizer, meta, folder)
    check_tokenizer(tok, model.cfg.vocab_size)
    ids = tok(prompt)["input_ids"] if prompt else [tok.eos_token_id]
    pieces: list[str] = []
    if not as_json:
        click.echo(prompt, nl=False)
    out = pieces.append if as_json else (lambda text: click.echo(text, nl=False))
    eos = None if ignore_eos else tok.eos_token_id
    stream = TextStream(tok, out, context=ids, skip_id=eos)
    r = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=seed, device=dev, eos_id=eos, on_token=stream,
                 keep_tokens=False, compile=compile_)
    stream.flush()
    if as_json:
        _emit_json({"student": str(folder), "prompt": prompt, "text": "".join(pieces), "seed": seed,
                    "device": str(dev), **r})
        if r["interrupted"]:
            sys.exit(130)
        return
    click.echo("")
    click.echo(f"\n[{r['n_new']} tokens at {r['tokens_per_s'] or 0:.1f} tokens/s; state "
               f"{r['state_bytes'] / 1024:.1f} KB; RSS {r['rss_mb_first'] or 0:.0f} -> {r['rss_mb_last'] or 0:.0f} MB"
               f"{'; interrupted' if r['interrupted'] else ''}]", err=True)
    if r["interrupted"]:
        sys.exit(130)


@main.command("validate", epilog=_examples("goose validate runs/kd --max-ppl-ratio 10",
                                           "goose validate runs/kd --json"))
@click.argument("run")
@click.option("--max-ppl-ratio", type=float, default=10.0, show_default=True,
              help="Fail if student PPL / teacher PPL on the validation windows is above this.")
@click.option("--max-dead", type=float, default=0.25, show_default=True,
              help="Fail if a spike site has more than this fraction of channels that never fire.")
@click.option("--max-saturated", type=float, default=0.25, show_default=True,
              help="Fail if a spike site has more than this fraction of channels that always fire.")
@click.option("--min-rate", type=float, default=0.01, show_default=True, help="Fail on a mean firing rate below this.")
@click.option("--max-rate", type=float, default=0.95, show_default=True, help="Fail on a mean firing rate above this.")
@_device_option()
@_storage_option("JSON object of fsspec options for the run's store [default: the run's own, as in config.yaml].")
@_json_option()
def validate_cmd(run, max_ppl_ratio, max_dead, max_saturated, min_rate, max_rate, device, storage_options, as_json):
    """Post-training checks of RUN as a pass/fail table; exit 1 if any check fails."""
    from .pipeline.devices import resolve_device
    from .pipeline.validate import ValidateConfig, run_validate

    with _stdout_to_stderr(as_json):
        checks = run_validate(ValidateConfig(run=run, max_ppl_ratio=max_ppl_ratio, max_dead=max_dead,
                                             max_saturated=max_saturated, min_rate=min_rate, max_rate=max_rate,
                                             device=str(resolve_device(device)),
                                             storage_options=_storage_options(storage_options)))
    failed = [c for c in checks if not c.ok]
    if as_json:
        _emit_json({"run": run, "ok": not failed, "passed": len(checks) - len(failed), "total": len(checks),
                    "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        click.echo(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    if failed:
        sys.exit(1)


@main.command("report", epilog=_examples("goose report runs/kd runs/ce --out runs/report"))
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Folder for report.md, summary.json and the PNG plots.")
@_json_option()
def report_cmd(runs, out, as_json):
    """Plots and a markdown comparison table of one or more RUNS (from their logs)."""
    from .pipeline.report import run_report

    with _stdout_to_stderr(as_json):
        r = run_report(list(runs), out)
    if as_json:
        _emit_json(r)
        return
    click.echo(r["table"])
    click.echo(f"report: {r['report']} ({len(r['plots'])} plots)")


@main.command("ablate", epilog=_examples(
    "goose ablate --cache runs/tiny.zarr --grid distill --out runs/ablate --parallel 2 --set steps=200",
    "goose ablate --cache s3://bucket/tiny.zarr --storage-options '{\"anon\": true}' --grid spikes --out runs/spikes"))
@click.option("--cache", required=True, help="The store every run trains from.")
@click.option("--grid", required=True, help="Grid YAML file, or a built-in grid: distill, spikes.")
@click.option("--out", "-o", required=True, help="Folder for the runs, their logs and the report.")
@click.option("--parallel", type=int, default=1, show_default=True, help="Runs at a time.")
@click.option("--set", "overrides", multiple=True, help="Override for every run: --set steps=300 (repeat).")
@_storage_option("JSON object of fsspec options for --cache, passed to every run (on its command line).")
@_json_option()
def ablate_cmd(cache, grid, out, parallel, overrides, storage_options, as_json):
    """Train a grid of student configs against one store (resumable), then write the report."""
    from .pipeline.ablate import run_ablation

    if parallel < 1:
        raise GooseError("--parallel must be >= 1")
    options = _storage_options(storage_options)
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    r = run_ablation(cache, grid, out, parallel=parallel, extra_set=list(overrides), storage_options=options,
                     echo=say)
    if as_json:
        _emit_json(r)
    if r["interrupted"]:
        click.echo(f"interrupted by signal {r['signal']}: the running trainings checkpointed; rerun the same "
                   f"command to resume", err=True)
        sys.exit(128 + int(r["signal"]))
    if r["report"] and not as_json:
        click.echo(r["report"]["table"])
        click.echo(f"report: {r['report']['report']}")
    if r["failed"]:
        click.echo(f"error: {len(r['failed'])} runs failed: {', '.join(r['failed'])}", err=True)
        sys.exit(1)


@main.command("quickstart", epilog=_examples("goose quickstart --out runs/quickstart",
                                             "goose quickstart --out runs/qs-long --teacher-steps 600 --student-steps 300"))
@click.option("--out", "-o", default="runs/quickstart", show_default=True,
              help="A new or empty folder, or an interrupted quickstart's (it continues).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds everything in the quick start: the corpus, the teacher's and the students' training.")
@click.option("--teacher-steps", type=int, default=300, show_default=True, help="Training steps of the teacher.")
@click.option("--student-steps", type=int, default=150, show_default=True, help="Training steps of each student.")
@_json_option()
def quickstart_cmd(out, seed, teacher_steps, student_steps, as_json):
    """Offline end to end: corpus, teacher, cache, KD and CE students, eval, report (~2 min on 2 idle CPUs)."""
    from .pipeline.quickstart import run_quickstart

    if teacher_steps < 1 or student_steps < 1:
        raise GooseError("--teacher-steps and --student-steps must be >= 1")
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    with _stdout_to_stderr(as_json):
        s = run_quickstart(out, seed=seed, teacher_steps=teacher_steps, student_steps=student_steps, echo=say)
    if s.get("interrupted"):
        if as_json:
            _emit_json(s)
        click.echo(f"interrupted by signal {s['signal']}: rerun the same command to continue in {s['out']}", err=True)
        sys.exit(128 + int(s["signal"]))
    if as_json:
        _emit_json(s)
        return
    click.echo(f"done in {s['seconds']:.0f} s. Report: {s['report']}  Summary: {s['out']}/summary.json")


@main.command("export", epilog=_examples("goose export runs/kd --out runs/kd-hf",
                                         "goose export runs/kd --out runs/kd-hf --push-to-hub me/kd-student --private"))
@click.argument("student")
@click.option("--out", "-o", required=True, help="New folder for the transformers model (must not exist or be empty).")
@click.option("--tokenizer", default=None, help="Tokenizer [default: the one saved beside the student, else its teacher's].")
@click.option("--push-to-hub", default=None, metavar="REPO", help="Also upload the folder to this hub repo (network).")
@click.option("--private", is_flag=True, help="Create the hub repo as private (with --push-to-hub).")
@_json_option()
def export_cmd(student, out, tokenizer, push_to_hub, private, as_json):
    """Write STUDENT (run folder or saved model) as a transformers folder that loads without goose:
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from .pipeline.export import describe, run_export

    with _stdout_to_stderr(as_json):
        r = run_export(student, out, tokenizer=tokenizer, push_to_hub=push_to_hub, private=private)
    if as_json:
        _emit_json(r)
        return
    click.echo(describe(r))


@main.group("cache", epilog=_examples("goose cache info runs/tiny.zarr", "goose cache verify runs/tiny.zarr"))
def cache_group():
    """Inspect, check and finalize teacher-cache stores."""


@cache_group.command("info", epilog=_examples("goose cache info runs/tiny.zarr",
                                              "goose cache info runs/tiny.zarr --max-windows 32 --json"))
@click.argument("store")
@click.option("--max-windows", type=int, default=None,
              help="Measure coverage and PPL on the first N windows only [default: all].")
@_json_option()
@_storage_option()
def cache_info(store, max_windows, as_json, storage_options):
    """Schema, provenance, sizes, bytes/token, top-k coverage and teacher perplexity of STORE."""
    from .cache.stats import store_info

    info = store_info(store, storage_options=_storage_options(storage_options), max_windows=max_windows)
    if as_json:
        _emit_json(info)
        return
    spec, prov = info["spec"], info["provenance"]
    lines = [
        f"store        {info['url']}",
        f"schema       v{info['schema_version']}  complete: {info['complete']}  "
        f"blocks {info['blocks_done']}/{info['blocks']}  goose {info['package_version']}",
        f"created      {info['created_at']}  completed {info['completed_at']}",
        f"teacher      {prov.get('teacher')} @ {prov.get('revision')}  config {prov.get('config_hash')}  "
        f"tokenizer {prov.get('tokenizer_hash')}  dtype {prov.get('dtype')}",
        f"data         {json.dumps(prov.get('dataset'))}  fingerprint {prov.get('data_fingerprint')}",
        f"layout       {info['windows']} windows x {spec['seq_len']} tokens = {info['tokens']:,} tokens; "
        f"vocab {spec['vocab_size']}; top-k {spec['top_k']}; T {spec['tail_temperatures']}",
        f"             hidden layers {spec['hidden_layers']} ({spec['hidden_dtype']}); samples {spec['samples']}; "
        f"chunk {spec['chunk_windows']} windows; shard {spec['shard_chunks']} chunks; "
        f"{spec['compression']}-{spec['compression_level']}",
        f"size         {_human_bytes(info['bytes_on_disk'])}, {info['bytes_per_token']:.1f} bytes/token",
    ]
    for name, per_token in info["array_bytes_per_token"].items():
        lines.append(f"  {name:<22} {per_token:10.2f} B/token")
    lines += [
        f"coverage     mean top-{spec['top_k']} teacher mass at T=1: {info['mean_topk_coverage']:.4f}"
        f"  (over {info['windows_measured']} windows)",
        f"teacher PPL over the store's windows (training text, not a test figure)  {info['teacher_ppl']:.3f}  (mean gold NLL {info['teacher_mean_nll']:.4f})",
    ]
    click.echo("\n".join(lines))


@cache_group.command("finalize", epilog=_examples("goose cache finalize runs/wt103.zarr"))
@click.argument("store")
@_storage_option()
@_json_option()
def cache_finalize(store, storage_options, as_json):
    """Mark STORE complete once every block is done (after `cache-teacher --shard I/N` jobs); refuses,
    naming the missing blocks, while some are not."""
    from .cache.writer import finalize_store

    r = finalize_store(store, _storage_options(storage_options))
    if as_json:
        _emit_json(r)
    elif r["already_complete"]:
        click.echo(f"store {store} is already complete; nothing to do")
    else:
        click.echo(f"finalized {store}: all {r['blocks']} blocks done, marked complete")


@cache_group.command("verify", epilog=_examples("goose cache verify runs/tiny.zarr",
                                                "goose cache verify runs/tiny.zarr --json"))
@click.argument("store")
@_storage_option()
@_json_option()
def cache_verify(store, storage_options, as_json):
    """Check STORE: every object present and matching its checksum, every chunk readable and within the
    schema's invariants; exit 2 on any failure (the store is unusable input)."""
    from .cache.stats import verify_store

    report = verify_store(store, storage_options=_storage_options(storage_options))
    if as_json:
        _emit_json({"store": store, "ok": report.ok, "chunks_checked": report.chunks_checked,
                    "failures": report.failures, "warnings": report.warnings})
        if not report.ok:
            sys.exit(2)
        return
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    for failure in report.failures:
        click.echo(f"FAIL {failure}", err=True)
    if not report.ok:
        click.echo(f"verify: {len(report.failures)} failure(s) in {store}", err=True)
        sys.exit(2)
    click.echo(f"verify: OK, {report.chunks_checked} chunks checked in {store}")


@main.group("config", epilog=_examples("goose config list", "goose config show kd --set model.preset=tiny"))
def config_group():
    """List the shipped run configs and print a resolved config with every default."""


@config_group.command("list", epilog=_examples("goose config list", "goose config list --json"))
@_json_option()
def config_list(as_json):
    """The shipped run configs (usable by name from any directory: --config kd)."""
    from .pipeline.stage_two.config import list_configs

    configs = list_configs()
    if as_json:
        _emit_json(configs)
        return
    width = max((len(c["name"]) for c in configs), default=0)
    for c in configs:
        click.echo(f"{c['name']:<{width}}  {c['description']}")


@config_group.command("show", epilog=_examples("goose config show kd",
                                               "goose config show configs/full.yaml --set steps=500 --json"))
@click.argument("name", required=False)
@click.option("--set", "overrides", multiple=True, help="Override a config key: --set optim.lr=1e-3 (repeat).")
@_json_option()
def config_show(name, overrides, as_json):
    """The resolved config NAME (a shipped name or a YAML/JSON file; none: the built-in defaults) with every
    default filled in, as YAML; what train-from-cache would run with the same --config and --set."""
    from .pipeline.stage_two.config import show_config

    resolved = show_config(name, list(overrides))
    if as_json:
        _emit_json(resolved)
        return
    import yaml

    click.echo(yaml.safe_dump(resolved, sort_keys=False).rstrip())


if __name__ == "__main__":
    main()

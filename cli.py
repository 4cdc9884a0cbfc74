"""`goose` command line: parses arguments and calls into pipeline/ and cache/. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import GooseError


class _Group(click.Group):
    """Turns a GooseError anywhere below into one 'error: ...' line on stderr and its exit status (2 for bad
    input, 1 for a run that failed)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GooseError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _storage_options(text: str | None) -> dict | None:
    """--storage-options of the read-side commands: a JSON object (fsspec options), or a one-line GooseError."""
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


_STORAGE_HELP = "JSON dict passed to fsspec for remote URLs."


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="goose")
def main():
    """goose: distil a transformer teacher into a ternary-spiking RWKV-7-style student."""


@main.command("cache-teacher")
@click.option("--output", "-o", required=True, help="Store path or fsspec URL (e.g. runs/wt2.zarr, s3://b/x.zarr).")
@click.option("--teacher", default="gpt2", show_default=True, help="Hub name or local model folder.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Teacher dtype; auto = fp32 on CPU, bf16 on CUDA.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per teacher forward.")
@click.option("--dataset", default=None, help="Hub dataset name (e.g. wikitext).")
@click.option("--dataset-config", default=None, help="Hub dataset config (e.g. wikitext-103-raw-v1).")
@click.option("--split", default=None, help="Dataset split (default train).")
@click.option("--data-files", multiple=True, help="Local txt/json/jsonl/parquet/csv files (repeat the option).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--seq-len", type=int, default=1024, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, default=None, help="Cap on tokens cached.")
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--tail-temperatures", default="1,1.25,1.5,2,3,4", show_default=True,
              help="Temperatures at which the full-vocabulary logsumexp is stored.")
@click.option("--samples", type=int, default=0, show_default=True, help="RS-KD draws per token (0 = none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the RS-KD draws.")
@click.option("--hidden-layers", default=None, help="Teacher layers to store: '0,6,12', '-1', 'all' (0 = embeddings).")
@click.option("--hidden-dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True)
@click.option("--chunk-windows", type=int, default=16, show_default=True, help="Windows per storage chunk.")
@click.option("--shard-chunks", type=int, default=1, show_default=True,
              help="Chunks per shard (1 = no sharding; use for very large stores).")
@click.option("--compression", type=click.Choice(["zstd", "blosc", "none"]), default="zstd", show_default=True)
@click.option("--compression-level", type=int, default=3, show_default=True)
@click.option("--storage-options", default=None, help="JSON dict passed to fsspec for remote URLs.")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute only blocks b with b mod N == I (one job of N sharing the store; no finalize: "
                   "run `goose cache finalize STORE` after all N).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache_teacher(**kw):
    """Run the teacher once over a corpus and write its targets into a Zarr v3 store (resumable).
    Under torchrun, the ranks share the work (docs/SCALING.md)."""
    from .pipeline.cache_teacher import CacheTeacherConfig, parse_shard, run_cache_teacher
    from .pipeline.data import DataSpec

    data = DataSpec(dataset=kw.pop("dataset"), dataset_config=kw.pop("dataset_config"), split=kw.pop("split"),
                    data_files=tuple(kw.pop("data_files")), text_column=kw.pop("text_column"))
    storage = kw.pop("storage_options")
    try:
        storage = json.loads(storage) if storage else None
    except json.JSONDecodeError as exc:
        raise GooseError(f"--storage-options is not valid JSON: {exc}") from None
    cfg = CacheTeacherConfig(
        data=data, tail_temperatures=_floats(kw.pop("tail_temperatures")), storage_options=storage,
        progress=not kw.pop("no_progress"), shard=parse_shard(kw.pop("shard")), **kw,
    )
    s = run_cache_teacher(cfg)
    if s["rank"] > 0:  # under torchrun, rank 0 reports for all
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


@main.command("train-from-cache")
@click.option("--cache", "cache", default=None, help="Teacher-cache store to train from (read-only).")
@click.option("--out", "-o", default=None, help="Run folder (checkpoints, metrics, best model).")
@click.option("--config", "config_file", default=None, help="YAML or JSON run config (see configs/).")
@click.option("--set", "overrides", multiple=True, help="Override a config key: --set optim.lr=1e-3 (repeat).")
@click.option("--val-cache", default=None, help="A second store for validation (default: hold out the end).")
@click.option("--storage-options", default=None,
              help="JSON dict passed to fsspec for --cache and --val-cache (config key storage_options).")
@click.option("--steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default=None)
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the student.")
@click.option("--profile", "profile_steps", type=int, default=None, help="Write a torch.profiler trace of N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--no-progress", is_flag=True)
def train_from_cache(cache, out, config_file, overrides, val_cache, storage_options, steps, batch_size, seed, device,
                     amp, compile_, profile_steps, resume, no_progress):
    """Train the spiking student by streaming a teacher cache (the teacher is never loaded)."""
    from .pipeline.config import load_config
    from .pipeline.train import run_train

    cfg = load_config(config_file, overrides, cache=cache, out=out, val_cache=val_cache,
                      storage_options=_storage_options(storage_options), steps=steps,
                      batch_size=batch_size, seed=seed, device=device, amp=amp, compile=compile_,
                      profile_steps=profile_steps)
    if not cfg.cache:
        raise GooseError("no store given: pass --cache STORE (or set cache: in the config)")
    s = run_train(cfg, resume=resume, progress=not no_progress)
    if s["rank"] != 0:  # under torchrun rank 0 speaks for the run
        sys.exit(128 + int(s["signal"]) if s["interrupted"] else 0)
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
    lines.append(f"  best model: {s['run']}/best   metrics: {s['run']}/metrics.jsonl   events: {s['run']}/events.jsonl")
    click.echo("\n".join(lines))
    if s["interrupted"]:
        sys.exit(128 + int(s["signal"] or 2))


@main.command("eval")
@click.argument("student", required=False)
@click.option("--teacher", default=None, help="Evaluate a teacher instead (hub name or local folder).")
@click.option("--tokenizer", default=None, help="Tokenizer for a student (default: its store's teacher).")
@click.option("--dataset", default=None)
@click.option("--dataset-config", default=None)
@click.option("--split", default=None)
@click.option("--data-files", multiple=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(["windows", "sliding", "stream"]),
              help="windows (non-overlapping), sliding (--stride), stream (student, carried state). Repeatable.")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--stride", type=int, default=None, help="Sliding-window stride (default seq-len / 2).")
@click.option("--max-tokens", type=int, default=None)
@click.option("--cache", default=None, help="Store for KL to the teacher, top-1 agreement and ECE.")
@click.option("--cache-windows", type=int, default=64, show_default=True)
@click.option("--storage-options", default=None, help="JSON dict passed to fsspec for --cache and the student's store.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="Teacher dtype.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(student, teacher, tokenizer, dataset, dataset_config, split, data_files, text_column, protocols,
             seq_len, stride, max_tokens, cache, cache_windows, storage_options, device, dtype, as_json):
    """Perplexity of STUDENT (run folder or saved model) or of --teacher, same protocol for both."""
    from .pipeline.data import DataSpec
    from .pipeline.evaluate import EvalConfig, run_eval

    data = None
    if dataset or data_files:
        data = DataSpec(dataset=dataset, dataset_config=dataset_config, split=split, data_files=tuple(data_files),
                        text_column=text_column)
    r = run_eval(EvalConfig(student=student, teacher=teacher, tokenizer=tokenizer, data=data,
                            protocols=tuple(protocols) or ("windows",), seq_len=seq_len, stride=stride,
                            max_tokens=max_tokens, cache=cache, cache_windows=cache_windows,
                            storage_options=_storage_options(storage_options), device=device, dtype=dtype))
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
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
    if "spikes" in r:
        sp, e = r["spikes"], r["energy"]
        click.echo(f"  spikes: firing rate {sp['firing_rate']:.3f}, zeros {sp['zero_fraction']:.3f}, dead max "
                   f"{sp['dead_fraction_max']:.3f}, saturated max {sp['saturated_fraction_max']:.3f}")
        click.echo(f"  energy: {e['energy_pj_per_token'] / 1e6:.2f} uJ/token vs dense {e['dense_energy_pj_per_token'] / 1e6:.2f}"
                   f" ({e['energy_ratio_vs_dense']:.3f}x; MAC 4.6 pJ, AC 0.9 pJ at 45 nm)")


@main.command("generate")
@click.argument("student")
@click.option("--prompt", default="", help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=100, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", default=None, help="Default: the student's store's teacher tokenizer.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-text token.")
def generate_cmd(student, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, device, ignore_eos):
    """Sample from STUDENT (run folder or saved model) in its recurrent form; text is printed as it comes."""
    from .pipeline.evaluate import check_tokenizer, load_tokenizer, student_folder
    from .pipeline.generate import TextStream, check_sampling, generate
    from .pipeline.teacher import resolve_device
    from .student.model import Student

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    folder, meta = student_folder(student)
    dev = resolve_device(device)
    model = Student.from_pretrained(folder, device=dev)
    tok = load_tokenizer(tokenizer, meta, folder)
    check_tokenizer(tok, model.cfg.vocab_size)
    ids = tok(prompt)["input_ids"] if prompt else [tok.eos_token_id]
    click.echo(prompt, nl=False)
    eos = None if ignore_eos else tok.eos_token_id
    stream = TextStream(tok, lambda text: click.echo(text, nl=False), context=ids, skip_id=eos)
    r = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=seed, device=dev, eos_id=eos, on_token=stream,
                 keep_tokens=False)
    stream.flush()
    click.echo("")
    click.echo(f"\n[{r['n_new']} tokens at {r['tokens_per_s'] or 0:.1f} tokens/s; state "
               f"{r['state_bytes'] / 1024:.1f} KB; RSS {r['rss_mb_first'] or 0:.0f} -> {r['rss_mb_last'] or 0:.0f} MB"
               f"{'; interrupted' if r['interrupted'] else ''}]", err=True)
    if r["interrupted"]:
        sys.exit(130)


@main.command("validate")
@click.argument("run")
@click.option("--max-ppl-ratio", type=float, default=10.0, show_default=True,
              help="Fail if student PPL / teacher PPL on the validation windows is above this.")
@click.option("--max-dead", type=float, default=0.25, show_default=True)
@click.option("--max-saturated", type=float, default=0.25, show_default=True)
@click.option("--min-rate", type=float, default=0.01, show_default=True)
@click.option("--max-rate", type=float, default=0.95, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--storage-options", default=None,
              help="JSON object of fsspec options for the run's store (default: the run's own, as in config.yaml).")
def validate_cmd(run, max_ppl_ratio, max_dead, max_saturated, min_rate, max_rate, device, storage_options):
    """Post-training checks of RUN as a pass/fail table; exit 1 if any check fails."""
    from .pipeline.validate import ValidateConfig, run_validate

    checks = run_validate(ValidateConfig(run=run, max_ppl_ratio=max_ppl_ratio, max_dead=max_dead,
                                         max_saturated=max_saturated, min_rate=min_rate, max_rate=max_rate,
                                         device=device, storage_options=_storage_options(storage_options)))
    width = max(len(c.name) for c in checks)
    for c in checks:
        click.echo(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if not c.ok]
    click.echo(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    if failed:
        sys.exit(1)


@main.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Folder for report.md, summary.json and the PNG plots.")
def report_cmd(runs, out):
    """Plots and a markdown comparison table of one or more RUNS (from their logs)."""
    from .pipeline.report import run_report

    r = run_report(list(runs), out)
    click.echo(r["table"])
    click.echo(f"report: {r['report']} ({len(r['plots'])} plots)")


@main.command("ablate")
@click.option("--cache", required=True, help="The store every run trains from.")
@click.option("--grid", required=True, help="Grid YAML file, or a built-in grid: distill, spikes.")
@click.option("--out", "-o", required=True, help="Folder for the runs, their logs and the report.")
@click.option("--parallel", type=int, default=1, show_default=True, help="Runs at a time.")
@click.option("--set", "overrides", multiple=True, help="Override for every run: --set steps=300 (repeat).")
def ablate_cmd(cache, grid, out, parallel, overrides):
    """Train a grid of student configs against one store (resumable), then write the report."""
    from .pipeline.ablate import run_ablation

    if parallel < 1:
        raise GooseError("--parallel must be >= 1")
    r = run_ablation(cache, grid, out, parallel=parallel, extra_set=list(overrides), echo=click.echo)
    if r["interrupted"]:
        click.echo(f"interrupted by signal {r['signal']}: the running trainings checkpointed; rerun the same "
                   f"command to resume", err=True)
        sys.exit(128 + int(r["signal"]))
    if r["report"]:
        click.echo(r["report"]["table"])
        click.echo(f"report: {r['report']['report']}")
    if r["failed"]:
        click.echo(f"error: {len(r['failed'])} runs failed: {', '.join(r['failed'])}", err=True)
        sys.exit(1)


@main.command("quickstart")
@click.option("--out", "-o", default="runs/quickstart", show_default=True,
              help="A new or empty folder, or an interrupted quickstart's (it continues).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--teacher-steps", type=int, default=300, show_default=True)
@click.option("--student-steps", type=int, default=150, show_default=True)
def quickstart_cmd(out, seed, teacher_steps, student_steps):
    """Offline end to end: corpus, teacher, cache, KD and CE students, eval, report (~2 min on 2 CPUs)."""
    from .pipeline.quickstart import run_quickstart

    if teacher_steps < 1 or student_steps < 1:
        raise GooseError("--teacher-steps and --student-steps must be >= 1")
    s = run_quickstart(out, seed=seed, teacher_steps=teacher_steps, student_steps=student_steps, echo=click.echo)
    if s.get("interrupted"):
        click.echo(f"interrupted by signal {s['signal']}: rerun the same command to continue in {s['out']}", err=True)
        sys.exit(128 + int(s["signal"]))
    click.echo(f"done in {s['seconds']:.0f} s. Report: {s['report']}  Summary: {s['out']}/summary.json")


@main.command("export")
@click.argument("student")
@click.option("--out", "-o", required=True, help="New folder for the transformers model (must not exist or be empty).")
@click.option("--tokenizer", default=None, help="Default: the tokenizer saved beside the student, else its teacher's.")
@click.option("--push-to-hub", default=None, metavar="REPO", help="Also upload the folder to this hub repo (network).")
@click.option("--private", is_flag=True, help="Create the hub repo as private (with --push-to-hub).")
def export_cmd(student, out, tokenizer, push_to_hub, private):
    """Write STUDENT (run folder or saved model) as a transformers folder that loads without goose:
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from .pipeline.export import describe, run_export

    click.echo(describe(run_export(student, out, tokenizer=tokenizer, push_to_hub=push_to_hub, private=private)))


@main.group("cache")
def cache_group():
    """Inspect, check and finalize teacher-cache stores."""


@cache_group.command("info")
@click.argument("store")
@click.option("--max-windows", type=int, default=None, help="Measure coverage and PPL on the first N windows only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--storage-options", default=None, help=_STORAGE_HELP)
def cache_info(store, max_windows, as_json, storage_options):
    """Schema, provenance, sizes, bytes/token, top-k coverage and teacher perplexity of STORE."""
    from .cache.stats import store_info

    info = store_info(store, storage_options=_storage_options(storage_options), max_windows=max_windows)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
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


@cache_group.command("finalize")
@click.argument("store")
@click.option("--storage-options", default=None, help="JSON dict passed to fsspec for remote URLs.")
def cache_finalize(store, storage_options):
    """Mark STORE complete once every block is done (after `cache-teacher --shard I/N` jobs); refuses,
    naming the missing blocks, while some are not."""
    from .cache.writer import finalize_store

    try:
        options = json.loads(storage_options) if storage_options else None
    except json.JSONDecodeError as exc:
        raise GooseError(f"--storage-options is not valid JSON: {exc}") from None
    r = finalize_store(store, options)
    if r["already_complete"]:
        click.echo(f"store {store} is already complete; nothing to do")
    else:
        click.echo(f"finalized {store}: all {r['blocks']} blocks done, marked complete")


@cache_group.command("verify")
@click.argument("store")
@click.option("--storage-options", default=None, help=_STORAGE_HELP)
def cache_verify(store, storage_options):
    """Check STORE: every object present and matching its checksum, every chunk readable and within the
    schema's invariants; exit 2 on any failure (the store is unusable input)."""
    from .cache.stats import verify_store

    report = verify_store(store, storage_options=_storage_options(storage_options))
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    for failure in report.failures:
        click.echo(f"FAIL {failure}", err=True)
    if not report.ok:
        click.echo(f"verify: {len(report.failures)} failure(s) in {store}", err=True)
        sys.exit(2)
    click.echo(f"verify: OK, {report.chunks_checked} chunks checked in {store}")


if __name__ == "__main__":
    main()

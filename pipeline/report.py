"""`goose report RUN... --out DIR`: plots and a comparison table of training runs, from their logs alone."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from ..errors import GooseError


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines log; a torn last line (a run killed mid-write) is dropped, other damage is an error."""
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise GooseError(f"{path} line {i + 1} is not JSON: the log is damaged") from None
        if not isinstance(row, dict):
            raise GooseError(f"{path} line {i + 1} is not a JSON object: the log is damaged")
        rows.append(row)
    return rows


def read_run(path: str) -> dict:
    """A run's train rows, validation rows, events and config (as logged; no model is loaded)."""
    run = Path(path)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise GooseError(f"{path} is not a run folder (no metrics.jsonl)")
    rows = _read_jsonl(metrics)
    events_file = run / "events.jsonl"
    events = _read_jsonl(events_file) if events_file.is_file() else []
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise GooseError(f"cannot parse {run / 'config.yaml'}: {str(exc).splitlines()[0]}") from None
    return {
        "name": run.name, "path": str(run),
        "train": [r for r in rows if r.get("kind") != "val"],
        "val": [r for r in rows if r.get("kind") == "val"],
        "events": events, "config": config,
    }


# events that are neither a health problem nor part of training's course: not counted as health events
_NOT_HEALTH = ("stage", "interrupted")


def read_eval(run: Path) -> list[dict]:
    """RUN/eval.json when present: one `goose eval` result (the dict `run_eval` returns, what `eval --json`
    prints) or a list of them, each optionally with the teacher's result on the same text under "teacher"
    (the quickstart writes it so). A damaged file is an error naming it."""
    path = run / "eval.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise GooseError(f"{path} is not JSON: write it with `goose eval RUN ... --json > RUN/eval.json`") from None
    results = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) for r in results):
        raise GooseError(f"{path} must hold a `goose eval --json` result (an object) or a list of them")
    return results


def eval_rows(run_name: str, results: list[dict]) -> list[dict]:
    """One row per (text, protocol) of a run's held-out eval results, with the teacher's perplexity under
    the same protocol and window length when the result carries it."""
    rows = []
    for r in results:
        data = r.get("data") or {}
        text = ", ".join(Path(f).name for f in data.get("data_files") or []) or data.get("dataset") or "?"
        teacher = {(p.get("protocol"), p.get("seq_len")): p.get("ppl")
                   for p in ((r.get("teacher") or {}).get("perplexity") or [])}
        for p in r.get("perplexity") or []:
            t = teacher.get((p.get("protocol"), p.get("seq_len")))
            ppl = p.get("ppl")
            rows.append({"run": run_name, "text": text, "tokens": data.get("tokens"), "protocol": p.get("protocol"),
                         "seq_len": p.get("seq_len"), "ppl": ppl, "teacher_ppl": t,
                         "ratio": ppl / t if isinstance(ppl, (int, float)) and t else None,
                         "held_out": not r.get("warnings")})
    return rows


def efficiency_rows(run_name: str, results: list[dict]) -> list[dict]:
    """One row per held-out eval result that carries the energy estimate: its op counts next to what the
    ternary path measured (`goose eval --ternary`: weight rows read and skipped, bytes held), when it ran."""
    rows = []
    for r in results:
        energy = r.get("energy")
        if not energy:
            continue
        data = r.get("data") or {}
        measured = (r.get("ternary_path") or {})
        ops = measured.get("measured_ops") or {}
        sizes = measured.get("bytes") or {}
        rows.append({
            "run": run_name, "text": ", ".join(Path(f).name for f in data.get("data_files") or []) or "?",
            "zero_fraction": (r.get("spikes") or {}).get("zero_fraction"),
            "energy_ratio": energy.get("energy_ratio_vs_dense"), "macs": energy.get("macs_per_token"),
            "acs": energy.get("acs_per_token"), "dense_macs": energy.get("dense_macs_per_token"),
            "proj_skipped": (ops.get("projections") or {}).get("rows_skipped_fraction"),
            "head_skipped": (ops.get("head") or {}).get("rows_skipped_fraction"),
            "row_updates": sum(o.get("updates_per_token", 0) for o in ops.values()) if ops else None,
            "bytes_ratio": sizes["total"] / measured["fp32_bytes"] if sizes and measured.get("fp32_bytes") else None,
        })
    return rows


def summarize(run: dict) -> dict:
    val, train = run["val"], run["train"]
    best = min(val, key=lambda r: r["val_loss"]) if val else {}
    last_train = train[-1] if train else {}
    tokens = last_train.get("tokens")
    seconds = last_train.get("elapsed_s")
    return {
        "run": run["name"], "best_val_ppl": best.get("val_ppl"), "teacher_ppl": best.get("teacher_ppl"),
        "ratio": best["val_ppl"] / best["teacher_ppl"] if best else None, "best_step": best.get("step"),
        "kl": best.get("val_kl"), "top1": best.get("val_top1_agree"), "tokens": tokens,
        "train_seconds": seconds, "zero_fraction": best.get("zero_fraction"),
        "energy_ratio": best.get("energy_ratio_vs_dense"),
        "stage_changes": sum(1 for e in run["events"] if e.get("kind") == "stage"),
        "health_events": sum(1 for e in run["events"] if e.get("kind") not in _NOT_HEALTH),
        "event_kinds": sorted({e.get("kind") for e in run["events"] if e.get("kind") not in _NOT_HEALTH}),
        "eval": eval_rows(run["name"], run.get("eval") or []),
        "efficiency": efficiency_rows(run["name"], run.get("eval") or []),
    }


def efficiency_table(summaries: list[dict]) -> str:
    rows = [r for s in summaries for r in s.get("efficiency") or []]
    if not rows:
        return ""
    head = ("| run | text | zeros | energy vs dense (estimate) | MACs / token | ACs / token | dense MACs / token | "
            "rows skipped, projections (measured) | rows skipped, head (measured) | row updates / token (measured) | "
            "bytes vs fp32 (measured) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['run']} | {r['text']} | {_fmt(r['zero_fraction'], '.3f')} | {_fmt(r['energy_ratio'], '.3f')} | "
        f"{_fmt(r['macs'], ',.0f')} | {_fmt(r['acs'], ',.0f')} | {_fmt(r['dense_macs'], ',.0f')} | "
        f"{_fmt(r['proj_skipped'], '.3f')} | {_fmt(r['head_skipped'], '.3f')} | {_fmt(r['row_updates'], ',.0f')} | "
        f"{_fmt(r['bytes_ratio'], '.3f')} |\n" for r in rows)
    note = ("Efficiency on the same held-out text: the energy estimate (`energy_report`: 45 nm MAC 4.6 pJ, AC "
            "0.9 pJ; op counts per token) beside what the ternary inference path executed when the eval ran "
            "with `--ternary`: the fraction of weight rows its kernels skipped because the spike there was 0, the "
            "row element updates done, and the bytes it holds against the fp32 model (`-`: not run with "
            "`--ternary`).\n\n")
    return "## Efficiency: estimated and measured\n\n" + note + head + body


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def markdown_table(summaries: list[dict]) -> str:
    head = ("| run | best val PPL | teacher PPL | ratio | KL to teacher | top-1 agree | tokens | train time | "
            "zeros | energy vs dense | events |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {s['run']} | {_fmt(s['best_val_ppl'], '.2f')} | {_fmt(s['teacher_ppl'], '.2f')} | "
        f"{_fmt(s['ratio'], '.2f')}x | {_fmt(s['kl'], '.4f')} | {_fmt(s['top1'], '.3f')} | "
        f"{_fmt(s['tokens'], ',')} | {_fmt(s['train_seconds'], '.0f')} s | {_fmt(s['zero_fraction'], '.3f')} | "
        f"{_fmt(s['energy_ratio'], '.3f')} | {s['health_events']}"
        f"{' (' + ', '.join(s.get('event_kinds') or []) + ')' if s.get('event_kinds') else ''} |\n"
        for s in summaries
    )
    return head + rows


COLUMNS = """What the columns mean (all from the runs' logs; the best row is the validation with the lowest loss):

- **best val PPL**: the student's perplexity on the store's held-out validation windows (the last 5 % of
  the store, each window from a zero state). It steers checkpointing; it is *not* a test figure (see the
  held-out table below, or `goose eval` on text outside the store).
- **teacher PPL**: the teacher's perplexity on those same windows; **ratio** = student / teacher.
- **KL to teacher**: mean KL(teacher || student) per token at T = 1 over the top-k + tail distribution.
- **top-1 agree**: the fraction of tokens where the student's most likely next token is the teacher's.
- **tokens / train time**: training tokens seen and training seconds (summed over resumes).
- **zeros**: the fraction of the student's spike activations that are 0 (1 - firing rate), averaged over
  every spike site; higher means sparser, cheaper activity.
- **energy vs dense**: the student's estimated energy per token divided by a dense (non-spiking) model of
  the same shape (45 nm figures: multiply-accumulate 4.6 pJ, accumulate 0.9 pJ; a spike input turns a MAC
  into an AC and a zero skips it). Below 1 is cheaper than dense.
- **events**: health warnings the training monitor wrote to the run's `events.jsonl` (loss not dropping,
  persistent gradient clipping, exploding or vanishing gradients, non-finite steps and rollbacks,
  temperature at a bound, dead or saturated spike channels, ...), their kinds in brackets; curriculum stage
  changes and interrupts are not counted. 0 is a healthy run.
"""


def eval_table(summaries: list[dict]) -> str:
    rows = [r for s in summaries for r in s.get("eval") or []]
    if not rows:
        return ""
    head = ("| run | text | tokens | protocol | window | PPL | teacher PPL | ratio |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['run']} | {r['text']}{'' if r['held_out'] else ' (NOT held out)'} | {_fmt(r['tokens'], ',')} | "
        f"{r['protocol']} | {_fmt(r['seq_len'], 'd')} | {_fmt(r['ppl'], '.2f')} | {_fmt(r['teacher_ppl'], '.2f')} | "
        f"{_fmt(r['ratio'], '.2f')}{'x' if r['ratio'] is not None else ''} |\n" for r in rows)
    note = ("Held-out evaluation (`goose eval`, from each run folder's `eval.json`): perplexity on text outside "
            "the training store, the number to quote. `windows`: non-overlapping windows of the given length, "
            "each from a zero state; `stream`: the whole text with the recurrent state carried; the teacher "
            "column is the teacher under the same protocol and window on the same text (`-`: not run, and "
            "the teacher has no `stream`).\n\n")
    return "## Held-out evaluation\n\n" + note + head + body


def _series(rows: list[dict], key: str, where=None):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and (where is None or where(r))]
    return [p[0] for p in pts], [p[1] for p in pts]


LOSS_PARTS = {"loss": "total loss (minimised)", "kd": "KD loss (to the teacher)", "ce": "CE (next token)",
              "align": "hidden-state alignment", "rate": "firing-rate penalty"}


def build_figures(runs: list[dict]) -> dict:
    """The report's figures as matplotlib Figures (not yet saved), by file name: losses.png, val_ppl.png,
    temperature_lr.png, spike_rates.png. No pyplot state is touched."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    color = {run["name"]: colors[i % len(colors)] for i, run in enumerate(runs)}
    any_stage = any(e.get("kind") == "stage" for run in runs for e in run["events"])
    figs = {}

    def stage_lines(ax, run):
        first = True
        for e in run["events"]:
            if e.get("kind") == "stage" and isinstance(e.get("step"), (int, float)):
                ax.axvline(e["step"], color=color[run["name"]], ls=":", lw=1, alpha=0.7,
                           label=f"{run['name']}: curriculum stage change" if first else None)
                first = False

    def empty(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")

    # losses: one panel per loss part, runs overlaid
    parts = [k for k in LOSS_PARTS if any(isinstance(r.get(k), (int, float)) for run in runs for r in run["train"])]
    parts = parts or ["loss"]
    fig = Figure(figsize=(4.2 * len(parts), 3.8))
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts):
        for run in runs:
            x, y = _series(run["train"], part)
            if x:
                ax.plot(x, y, color=color[run["name"]], label=run["name"])
                stage_lines(ax, run)
        ax.set_title(f"{part}: {LOSS_PARTS[part]}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)" if part != "rate" else "penalty")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            empty(ax, "no train rows logged")
    fig.suptitle("training losses per part" + (" (dotted: curriculum stage changes)" if any_stage else ""),
                 fontsize=11)
    fig.tight_layout()
    figs["losses.png"] = fig

    # validation perplexity: one line per student, one dashed line per distinct teacher perplexity
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.subplots()
    teachers: dict = {}  # teacher PPL (rounded) -> runs validated against it
    for run in runs:
        x, y = _series(run["val"], "val_ppl")
        if x:
            ax.plot(x, y, "o-", color=color[run["name"]], label=f"{run['name']} (student)")
        stage_lines(ax, run)
        tx, ty = _series(run["val"], "teacher_ppl")
        if ty:
            key = float(f"{ty[-1]:.6g}")
            teachers.setdefault(key, []).append(run["name"])
    for i, (ppl, names) in enumerate(sorted(teachers.items())):
        who = "" if len(teachers) == 1 else f", {', '.join(names)}"
        ax.axhline(ppl, color="0.3", ls=("--", "-.", (0, (5, 1, 1, 1)))[i % 3], lw=1.2,
                   label=f"teacher ({ppl:.2f}{who})")
    ax.set_title("store validation perplexity, student vs teacher on the same windows"
                 + ("\n(dotted: curriculum stage changes)" if any_stage else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (log scale)")
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        empty(ax, "no validation rows logged")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    figs["val_ppl.png"] = fig

    # KD temperature (only where a KD loss uses it) and GRL lambda (CTKD), and the learning rate
    fig = Figure(figsize=(10.5, 3.9))
    a1, a2 = fig.subplots(1, 2)
    any_lambda = False
    for run in runs:
        c = color[run["name"]]
        x, y = _series(run["train"], "temperature", where=lambda r: (r.get("kd_weight") or 0) > 0)
        if x:
            a1.plot(x, y, color=c, label=f"{run['name']}: T")
        x, y = _series(run["train"], "grl_lambda")
        if x:
            any_lambda = True
            a1.plot(x, y, color=c, ls="--", label=f"{run['name']}: GRL lambda")
        x, y = _series(run["train"], "lr")
        if x:
            a2.plot(x, y, color=c, label=run["name"])
    a1.set_title("KD temperature T (solid)" + (" and CTKD GRL lambda (dashed)" if any_lambda else ""), fontsize=10)
    a1.set_xlabel("step")
    a1.set_ylabel("T" + (" / lambda" if any_lambda else ""))
    a1.grid(alpha=0.3)
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=8)
    else:
        empty(a1, "no run uses a KD temperature\n(CE-only or KD weight 0)")
    a2.set_title("learning rate", fontsize=10)
    a2.set_xlabel("step")
    a2.set_ylabel("learning rate")
    a2.grid(alpha=0.3)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=8)
    fig.tight_layout()
    figs["temperature_lr.png"] = fig

    # spike firing rate per layer at the last validation
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for run in runs:
        if not run["val"] or not run["val"][-1].get("spike_sites"):
            continue
        by_layer: dict = {}
        for key, s in run["val"][-1]["spike_sites"].items():
            by_layer.setdefault(key.split(".")[0], []).append(s["rate"])
        layers = sorted((k for k in by_layer if k.isdigit()), key=int)
        ax.plot([int(k) for k in layers], [sum(by_layer[k]) / len(by_layer[k]) for k in layers], "o-",
                color=color[run["name"]], label=run["name"])
    ax.set_title("spike firing rate per layer (last validation, mean over the layer's spike sites)", fontsize=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("firing rate (fraction of non-zero spikes)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        empty(ax, "no spike statistics logged (dense student?)")
    fig.tight_layout()
    figs["spike_rates.png"] = fig
    return figs


PLOT_CAPTIONS = {
    "losses.png": "Training losses, one panel per part, every run overlaid.",
    "val_ppl.png": "Store validation perplexity over training, each student next to its teacher on the same windows.",
    "temperature_lr.png": "KD temperature (runs whose KD loss uses one) and CTKD's GRL lambda; learning rate.",
    "spike_rates.png": "Mean spike firing rate per layer at the last validation.",
}


def plot_runs(runs: list[dict], out: Path) -> list[Path]:
    written = []
    for name, fig in build_figures(runs).items():
        path = out / name
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def run_report(paths: list[str], out: str) -> dict:
    if not paths:
        raise GooseError("give at least one run folder")
    runs = [read_run(p) for p in paths]
    for run in runs:
        run["eval"] = read_eval(Path(run["path"]))
    out_dir = Path(out)
    summaries = [summarize(r) for r in runs]
    table = markdown_table(summaries)
    try:  # report.md is written last, under a temporary name, so a failed report never looks finished
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = plot_runs(runs, out_dir)
        md = ["# goose report", "", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs), "",
              "## Training (store validation)", "", table, COLUMNS]
        held = eval_table(summaries)
        md += [held] if held else ["No held-out evaluation: no run folder has an `eval.json` (write one with "
                                   "`goose eval RUN --data-files TEXT --json > RUN/eval.json`).", ""]
        efficiency = efficiency_table(summaries)
        md += [efficiency] if efficiency else []
        md += ["## Plots", ""] + [f"{PLOT_CAPTIONS.get(p.name, '')}\n\n![{p.stem}]({p.name})\n" for p in plots]
        (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2, default=float))
        tmp = out_dir / "report.md.tmp"
        tmp.write_text("\n".join(md) + "\n")
        os.replace(tmp, out_dir / "report.md")
    except OSError as exc:
        raise GooseError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return {"out": str(out_dir), "report": str(out_dir / "report.md"), "plots": [str(p) for p in plots],
            "summaries": summaries, "table": table}

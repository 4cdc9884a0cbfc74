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
        "health_events": sum(1 for e in run["events"] if e.get("kind") not in ("stage",)),
    }


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
        f"{_fmt(s['energy_ratio'], '.3f')} | {s['health_events']} |\n"
        for s in summaries
    )
    return head + rows


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def finish(fig, ax, name, ylabel, log=False):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    def stage_lines(ax, run, color):
        for e in run["events"]:
            if e.get("kind") == "stage":
                ax.axvline(e["step"], color=color, ls=":", lw=1, alpha=0.7)

    # loss parts: one panel per part, runs overlaid
    parts = [k for k in ("loss", "kd", "ce", "align", "rate") if any(k in r for run in runs for r in run["train"])]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.6), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for i, run in enumerate(runs):
            x, y = _series(run["train"], part)
            if x:
                ax.plot(x, y, color=colors[i % len(colors)], label=run["name"])
                stage_lines(ax, run, colors[i % len(colors)])
        ax.set_title(part)
    finish(fig, axes[0][-1], "losses.png", "loss")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        x, y = _series(run["val"], "val_ppl")
        ax.plot(x, y, "o-", color=c, label=f"{run['name']} student")
        x, y = _series(run["val"], "teacher_ppl")
        if y:
            ax.axhline(y[-1], color=c, ls="--", lw=1, label=f"{run['name']} teacher ({y[-1]:.1f})")
        stage_lines(ax, run, c)
    ax.set_title("validation perplexity (dotted: curriculum stage changes)")
    finish(fig, ax, "val_ppl.png", "perplexity", log=True)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        x, y = _series(run["train"], "temperature")
        a1.plot(x, y, color=c, label=f"{run['name']} T")
        x, y = _series(run["train"], "grl_lambda")
        if x:
            a1.plot(x, y, color=c, ls="--", label=f"{run['name']} lambda")
        x, y = _series(run["train"], "lr")
        a2.plot(x, y, color=c, label=run["name"])
    a1.set_title("temperature (solid) and GRL lambda (dashed)")
    a1.set_xlabel("step")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_title("learning rate")
    finish(fig, a2, "temperature_lr.png", "learning rate")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        if not run["val"] or not run["val"][-1].get("spike_sites"):
            continue
        by_layer: dict = {}
        for key, s in run["val"][-1]["spike_sites"].items():
            layer = key.split(".")[0]
            by_layer.setdefault(layer, []).append(s["rate"])
        layers = sorted((k for k in by_layer if k.isdigit()), key=int)
        ax.plot([int(k) for k in layers], [sum(by_layer[k]) / len(by_layer[k]) for k in layers], "o-",
                color=colors[i % len(colors)], label=run["name"])
    ax.set_title("spike firing rate per layer (last validation, mean over sites)")
    ax.set_ylim(0, 1)
    finish(fig, ax, "spike_rates.png", "firing rate")
    return written


def run_report(paths: list[str], out: str) -> dict:
    if not paths:
        raise GooseError("give at least one run folder")
    runs = [read_run(p) for p in paths]
    out_dir = Path(out)
    summaries = [summarize(r) for r in runs]
    table = markdown_table(summaries)
    try:  # report.md is written last, under a temporary name, so a failed report never looks finished
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = plot_runs(runs, out_dir)
        md = ["# goose report", "", table, ""] + [f"![{p.stem}]({p.name})" for p in plots]
        (out_dir / "summary.json").write_text(json.dumps(summaries, indent=2, default=float))
        tmp = out_dir / "report.md.tmp"
        tmp.write_text("\n".join(md) + "\n")
        os.replace(tmp, out_dir / "report.md")
    except OSError as exc:
        raise GooseError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return {"out": str(out_dir), "report": str(out_dir / "report.md"), "plots": [str(p) for p in plots],
            "summaries": summaries, "table": table}

"""Every performance benchmark in one command: one table of ratios, written into docs/BENCHMARKS.md.

    python bench/run_all.py --cache runs/enwiki-tiny.zarr       # CPU (one torch thread, then two), ~30-60 min on 2 cores
    python bench/run_all.py --cache STORE --quick                                 # fewer repeats, smaller inputs
    python bench/run_all.py --cache STORE --device cuda

Runs, each as its own process (so one's memory and threads do not colour the next), every bench that prints
JSON figure lines ({"bench", "figure", "value", "target"}): stage one against a bare teacher forward
(enwiki-tiny and a GPT-2-small-shaped teacher, on CPU also at two torch threads, and its per-token
reductions alone, compiled against eager), stage two's step against the same step with its batches in
memory, and the student against a dense GPT-2 of the same size (training throughput, generation at long
context). Each bench takes medians over alternating repeats itself. The table replaces the block between
the `run_all` markers in docs/BENCHMARKS.md (--no-write to only print it); the closing line says which
targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- run_all: begin -->", "<!-- run_all: end -->"


def suites(args) -> list[tuple[str, list[str], dict]]:
    """(name, bench argv, environment overrides) of every bench to run."""
    quick = args.quick
    reps = ["--repeats", "2" if quick else "3"]
    dev = ["--device", args.device]
    tiny = ["bench_cache_teacher.py", *reps, *dev] + (["--max-tokens", "16384"] if quick else [])
    gpt2 = ["bench_cache_teacher.py", "--teacher", "gpt2-small-random", "--seq-len", "1024", "--max-tokens",
            "2048" if quick else "16384", "--batch-size", "1", *reps, *dev]
    # on CPU the first pass is at one torch thread unless OMP_NUM_THREADS says otherwise (torch's own default
    # is every core, which would make it a second copy of the two-thread pass)
    base = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ else {}
    out = [
        ("stage one, enwiki-tiny", tiny + ([] if quick else ["--sizes"]), base),
        ("stage one, GPT-2-small-shaped", gpt2, base),
    ]
    if args.device == "cpu" and os.environ.get("OMP_NUM_THREADS") != "2":
        # at one torch thread cache-teacher has the second core to itself; with both given both cores
        # (two threads each) the comparison is of equal resources
        out += [("stage one, enwiki-tiny, two threads", tiny, {"OMP_NUM_THREADS": "2"}),
                ("stage one, GPT-2-small-shaped, two threads", gpt2, {"OMP_NUM_THREADS": "2"})]
    if args.device == "cpu":
        out.append(("stage one reductions alone", ["bench_teacher_targets.py"] + (["--repeats", "2"] if quick else []),
                    base))
    out += [
        ("student vs dense GPT-2", ["bench_student_vs_dense.py", *reps, *dev, "--new-tokens", "8" if quick else "16"]
         + (["--context", "1024"] if quick else []), base),
    ]
    if args.cache:
        out.append(("stage two streaming overhead (P3)", ["bench_loader_overhead.py", "--cache", args.cache, *dev,
                                                          "--blocks", "2" if quick else "5"], base))
    return out


def run_one(name: str, argv: list[str], env: dict) -> tuple[list[dict], str]:
    cmd = [sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]]
    print(f"$ {' '.join([*(f'{k}={v}' for k, v in env.items()), *cmd[1:]])}", flush=True)
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    rows = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "figure" in row and "value" in row:
                rows.append(row)
    status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
    print(f"  {name}: {len(rows)} figures in {time.time() - t:.0f} s, {status}", flush=True)
    return rows, status


def met(value: float, target: str) -> str:
    m = re.fullmatch(r"\s*(<=|>=)\s*([0-9.]+)\s*", target or "")
    if not m:
        return ""
    ok = value <= float(m.group(2)) if m.group(1) == "<=" else value >= float(m.group(2))
    return "met" if ok else "**missed**"


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| figure | value | target | |", "|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        shown = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        lines.append(f"| {r['figure']} | {shown} | {r.get('target', '')} | {met(v, r.get('target', ''))} |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:  # first run: right after the introduction
        head, sep, rest = doc.partition("\n## ")
        doc = f"{head}\n## Every ratio in one table (`bench/run_all.py`)\n\n{block}\n{sep}{rest}"
    DOC.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="a teacher store for the stage-two bench (skipped without)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows, notes = [], []
    for name, argv, env in suites(args):
        got, status = run_one(name, argv, env)
        rows += got
        if status != "ok":
            notes.append(f"- {name}: {status}")
    threads = os.environ.get("OMP_NUM_THREADS", "1 (set by run_all)" if args.device == "cpu" else "default")
    if args.device == "cpu" and threads != "2":
        threads += " then 2"
    header = (f"`{' '.join(['python bench/run_all.py', *sys.argv[1:]])}` on {args.device}, OMP_NUM_THREADS "
              f"{threads}, {time.strftime('%Y-%m-%d')}; each figure a median over alternating repeats within "
              f"its bench.")
    text = table(rows, header) + ("\n\n" + "\n".join(notes) if notes else "")
    print("\n" + text)
    if not args.no_write:
        write_doc(text)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

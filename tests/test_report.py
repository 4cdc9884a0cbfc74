"""`goose report`: the figures' content (labels, legends, lines) and report.md's explanations and eval table,
from synthetic run logs (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from goose.pipeline.report import build_figures, read_run, run_report


def _write_run(folder: Path, *, kd: bool, ctkd: bool = False, stages: tuple = (), teacher_ppl: float = 50.0,
               events: tuple = (), steps: int = 40, eval_result: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for step in range(10, steps + 1, 10):
        row = {"step": step, "lr": 1e-3 * step / steps, "grad_norm": 1.0, "stage": 0,
               "kd_weight": 0.5 if kd else 0.0, "ce_weight": 0.5 if kd else 1.0, "ce": 5.0 - step / 100,
               "loss": 4.0 - step / 100, "align_weight": 0.0, "tokens": step * 512, "elapsed_s": step / 10.0}
        if kd:
            row.update(kd=3.0 - step / 100, temperature=1.0 + step / 100, kl=1.0)
        if ctkd:
            row["grl_lambda"] = min(1.0, step / 20)
        rows.append(row)
        if step % 20 == 0:
            sites = {f"{layer}.{site}": {"rate": 0.2 + 0.1 * layer, "dead": 0.0, "sat": 0.0}
                     for layer in range(3) for site in ("tm_r", "cm_k")}
            rows.append({"step": step, "val_loss": 3.0, "val_ppl": 60.0 - step / 10, "teacher_ppl": teacher_ppl,
                         "val_kl": 0.5, "val_top1_agree": 0.4, "spike_rate": 0.3, "zero_fraction": 0.7,
                         "energy_ratio_vs_dense": 0.3, "spike_sites": sites, "kind": "val"})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = [{"step": s, "kind": "stage", "message": "stage"} for s in stages] + list(events)
    if ev:
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    (folder / "config.yaml").write_text(f"loss: {{kd: {'topk' if kd else 'none'}}}\n")
    if eval_result is not None:
        (folder / "eval.json").write_text(json.dumps(eval_result))
    return folder


def _eval_result(ppl: float, teacher: float | None) -> dict:
    r = {"model": {"kind": "student"}, "data": {"data_files": ["/x/valid.jsonl"], "tokens": 4096},
         "perplexity": [{"protocol": "windows", "seq_len": 128, "ppl": ppl, "stride": None},
                        {"protocol": "stream", "seq_len": 128, "ppl": ppl * 0.9, "stride": None}]}
    if teacher is not None:
        r["teacher"] = {"perplexity": [{"protocol": "windows", "seq_len": 128, "ppl": teacher, "stride": None}]}
    return r


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


@pytest.fixture()
def runs(tmp_path):
    kd = _write_run(tmp_path / "kd", kd=True, eval_result=_eval_result(20.0, 10.0))
    ce = _write_run(tmp_path / "ce_only", kd=False,
                    events=({"step": 30, "kind": "clipping", "message": "x"},
                            {"step": 40, "kind": "interrupted", "message": "signal 15"}))
    return [kd, ce]


def test_figures_label_their_axes_and_legends(runs):
    figs = build_figures([read_run(str(r)) for r in runs])
    assert set(figs) == {"losses.png", "val_ppl.png", "temperature_lr.png", "spike_rates.png"}

    # losses: every panel has axis labels and a legend naming both runs
    losses = figs["losses.png"].axes
    assert [ax.get_title().split(":")[0] for ax in losses] == ["loss", "kd", "ce"]
    for ax in losses:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
    assert _legend(losses[0]) == ["kd", "ce_only"] and _legend(losses[1]) == ["kd"]  # CE-only has no KD loss

    # val_ppl: one student line per run; one teacher line (same windows, same PPL), not one per run
    (ax,) = figs["val_ppl.png"].axes
    assert ax.get_xlabel() == "step" and "perplexity" in ax.get_ylabel()
    assert _legend(ax) == ["kd (student)", "ce_only (student)", "teacher (50.00)"]
    assert "dotted" not in ax.get_title()  # no curriculum: no promise of dotted lines

    # temperature: only the KD run draws a T; no GRL lambda promised when none was logged
    a1, a2 = figs["temperature_lr.png"].axes
    assert _legend(a1) == ["kd: T"] and "lambda" not in a1.get_title().lower()
    assert a1.get_xlabel() == "step" and a2.get_ylabel() == "learning rate" and _legend(a2) == ["kd", "ce_only"]

    # spikes: layers on the x axis, integer ticks
    (ax,) = figs["spike_rates.png"].axes
    assert ax.get_xlabel() == "layer" and "firing rate" in ax.get_ylabel()
    assert _legend(ax) == ["kd", "ce_only"]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 1, 2]


def test_curriculum_lambda_and_different_teachers_are_drawn_and_named(tmp_path):
    pocl = _write_run(tmp_path / "pocl", kd=True, stages=(15, 30))
    ctkd = _write_run(tmp_path / "ctkd", kd=True, ctkd=True, teacher_ppl=80.0)
    figs = build_figures([read_run(str(pocl)), read_run(str(ctkd))])
    (ax,) = figs["val_ppl.png"].axes
    labels = _legend(ax)
    assert "dotted" in ax.get_title()
    assert "pocl: curriculum stage change" in labels
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert len(dotted) == 2  # one per stage change
    assert [x for x in labels if x.startswith("teacher")] == ["teacher (50.00, pocl)", "teacher (80.00, ctkd)"]
    assert "curriculum" in figs["losses.png"].get_suptitle()
    a1 = figs["temperature_lr.png"].axes[0]
    assert "GRL lambda (dashed)" in a1.get_title()
    assert _legend(a1) == ["pocl: T", "ctkd: T", "ctkd: GRL lambda"]
    assert [ln.get_linestyle() for ln in a1.get_lines()] == ["-", "-", "--"]


def test_ce_only_run_alone_says_it_has_no_temperature(tmp_path):
    ce = _write_run(tmp_path / "ce", kd=False)
    a1 = build_figures([read_run(str(ce))])["temperature_lr.png"].axes[0]
    assert not a1.get_lines() and a1.get_legend() is None
    assert any("no run uses a KD temperature" in t.get_text() for t in a1.texts)


def test_report_md_explains_columns_and_includes_held_out_eval(runs, tmp_path):
    r = run_report([str(p) for p in runs], str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    for term in ("**zeros**", "**energy vs dense**", "**events**", "not* a test figure"):
        assert term in md, term
    assert "## Held-out evaluation" in md
    assert "| kd | valid.jsonl | 4,096 | windows | 128 | 20.00 | 10.00 | 2.00x |" in md
    assert "| kd | valid.jsonl | 4,096 | stream | 128 | 18.00 | - | - |" in md
    # events: the clipping warning counts and is named, the interrupt does not count
    ce_row = next(line for line in md.splitlines() if line.startswith("| ce_only |"))
    assert ce_row.endswith("| 1 (clipping) |")
    for png in ("losses.png", "val_ppl.png", "temperature_lr.png", "spike_rates.png"):
        assert f"({png})" in md and (tmp_path / "report" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary[0]["eval"][0]["ratio"] == pytest.approx(2.0) and summary[1]["eval"] == []
    assert r["plots"] and r["table"].startswith("| run |")


def test_report_without_eval_says_how_to_get_it(tmp_path):
    run = _write_run(tmp_path / "kd", kd=True)
    run_report([str(run)], str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "No held-out evaluation" in md and "--json > RUN/eval.json" in md


def test_damaged_eval_json_is_a_one_line_error(tmp_path):
    from goose.errors import GooseError

    run = _write_run(tmp_path / "kd", kd=True)
    (run / "eval.json").write_text("{not json")
    with pytest.raises(GooseError, match="eval.json is not JSON"):
        run_report([str(run)], str(tmp_path / "report"))

"""`goose validate RUN`: post-training checks as a pass/fail table (non-zero exit on any failure)."""

from __future__ import annotations

import copy

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..errors import GooseError
from ..student.model import Student, config_for_store
from .generate import generate


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ValidateConfig:
    run: str
    max_ppl_ratio: float = 10.0  # student PPL / teacher PPL on the same validation windows
    ppl_rel_tol: float = 1e-3  # reproduction of the logged validation perplexity
    max_dead: float = 0.25
    max_saturated: float = 0.25
    min_rate: float = 0.01
    max_rate: float = 0.95
    forms_min_agreement: float = 0.999  # top-1 agreement of the recurrent and chunked forms
    device: str = "cpu"
    storage_options: dict | None = None  # fsspec options for the run's store; default: the run's own (config.yaml)


def run_validate(cfg: ValidateConfig) -> list[Check]:
    from ..cache.reader import CacheReader
    from .stage_two.config import TrainConfig, from_dict
    from .stage_two.loader import read_windows
    from .stage_two.checks import split_windows
    from .stage_two.validation import validate_model

    run = Path(cfg.run)
    best = run / "best"
    if not (run / "config.yaml").is_file() or not (best / "config.json").is_file():
        raise GooseError(f"{run} is not a finished run folder (needs config.yaml and best/)")
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise GooseError(f"cannot parse {run / 'config.yaml'}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise GooseError(f"{run / 'config.yaml'} is empty or not a mapping: not the config of a finished run")
    raw.pop("_resolved", None)
    tcfg: TrainConfig = from_dict(TrainConfig, raw)
    tcfg.device = cfg.device
    if not (best / "metrics.json").is_file():
        raise GooseError(f"{best / 'metrics.json'} is missing: the best model's logged validation is needed")
    try:
        logged = json.loads((best / "metrics.json").read_text())
        float(logged["val_ppl"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise GooseError(f"{best / 'metrics.json'} is damaged (no readable val_ppl: {exc})") from None
    checks: list[Check] = []

    # 1. the checkpoint loads and reproduces its logged validation perplexity
    try:
        model = Student.from_pretrained(best, device=cfg.device).eval()
        checks.append(Check("loads", True, f"{best}"))
    except Exception as exc:  # noqa: BLE001 - any load failure is a failed check
        checks.append(Check("loads", False, f"{type(exc).__name__}: {exc}"))
        return checks
    options = cfg.storage_options if cfg.storage_options is not None else (tcfg.storage_options or None)
    if options and "REDACTED" in json.dumps(options):
        raise GooseError("the run's store needs credentials that config.yaml does not keep: pass --storage-options")
    reader = CacheReader(tcfg.cache, storage_options=options)
    val_reader = CacheReader(tcfg.val_cache, storage_options=options) if tcfg.val_cache else None
    _, val_url, val_spec, val_windows = split_windows(tcfg, reader, val_reader)
    device = torch.device(cfg.device)
    val, _ = validate_model(model, val_url, val_spec, val_windows, tcfg.batch_size, device, storage_options=options)
    rel = abs(val["val_ppl"] - logged["val_ppl"]) / logged["val_ppl"]
    checks.append(Check("reproduces val PPL", rel <= cfg.ppl_rel_tol,
                        f"{val['val_ppl']:.3f} vs logged {logged['val_ppl']:.3f} (rel diff {rel:.1e})"))

    # 2. perplexity within the bound of the teacher's on the same windows
    ratio = val["val_ppl"] / val["teacher_ppl"]
    checks.append(Check("PPL vs teacher", ratio <= cfg.max_ppl_ratio,
                        f"{val['val_ppl']:.2f} / {val['teacher_ppl']:.2f} = {ratio:.2f}x (bound {cfg.max_ppl_ratio:g}x)"))

    # 3. parameter count and size on disk as configured
    expected = Student(config_for_store(tcfg.model.preset, model.cfg.vocab_size, **tcfg.model.overrides))
    n_exp, n_got = expected.parameter_report()["total"], model.parameter_report()["total"]
    unique_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    disk = (best / "model.safetensors").stat().st_size
    size_ok = unique_bytes <= disk <= unique_bytes * 1.01 + 65536
    checks.append(Check("parameters", n_exp == n_got, f"{n_got:,} (config says {n_exp:,})"))
    checks.append(Check("size on disk", size_ok, f"{disk / 2**20:.2f} MiB for {unique_bytes / 2**20:.2f} MiB of weights"))

    # 4. the recurrent form agrees with the chunked form on the trained weights, in float64: in fp32 the two
    # forms' rounding differs by ~1e-6, enough to flip a spike that sits at its threshold, and one flip
    # fails a correct model (the check is about the algebra, not fp32 rounding)
    batch = next(iter(read_windows(val_url, val_windows[:2], ["input_ids"], 2, storage_options=options)))
    ids = batch["input_ids"][:, : min(64, batch["input_ids"].shape[1])].to(device)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        chunked = model64(ids, mode="chunked").logits
        state, steps = None, []
        for t in range(ids.shape[1]):
            out = model64(ids[:, t : t + 1], state, mode="recurrent")
            state, steps = out.state, steps + [out.logits]
        recurrent = torch.cat(steps, 1)
    agree = float((chunked.argmax(-1) == recurrent.argmax(-1)).float().mean())
    median = float((chunked - recurrent).abs().median())
    checks.append(Check("recurrent == chunked", agree >= cfg.forms_min_agreement and median <= 1e-4,
                        f"top-1 agreement {agree:.4f}, median |diff| {median:.1e}, max |diff| "
                        f"{float((chunked - recurrent).abs().max()):.1e}"))

    # 5. spike health
    rate = val["spike_rate"]
    if rate is None:
        checks.append(Check("spike health", True, "no spike sites"))
    else:
        dead, sat = val["dead_fraction_max"], val["saturated_fraction_max"]
        ok = dead <= cfg.max_dead and sat <= cfg.max_saturated and cfg.min_rate <= rate <= cfg.max_rate
        checks.append(Check("spike health", ok, f"firing rate {rate:.3f} (allowed {cfg.min_rate}-{cfg.max_rate}), "
                            f"dead max {dead:.3f}, saturated max {sat:.3f} (allowed {cfg.max_dead}/{cfg.max_saturated})"))

    # 6. generation runs
    try:
        g = generate(model, ids[0, :8].tolist(), max_new_tokens=16, temperature=1.0, top_k=50, seed=0, device=cfg.device)
        ok = len(g["new_tokens"]) == 16 and all(0 <= t < model.cfg.vocab_size for t in g["new_tokens"])
        checks.append(Check("generation", ok, f"16 tokens at {g['tokens_per_s']:.1f} tokens/s"))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("generation", False, f"{type(exc).__name__}: {exc}"))
    checks.append(Check("finite weights", all(torch.isfinite(p).all() for p in model.parameters()),
                        "all parameters finite"))
    return checks

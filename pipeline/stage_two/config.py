"""Run configuration for train-from-cache: dataclasses, loaded from YAML/JSON with `key.sub=value` overrides.

Configs are data: every field has a default, unknown keys are errors, and the resolved config is saved in
the run folder next to the store's fingerprint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...errors import GooseError
from .curriculum import CurriculumConfig


@dataclass
class TemperatureConfig:
    mode: str = "fixed"  # fixed | linear | cosine | step | stage | ctkd
    value: float = 1.0  # fixed T; CTKD's initial T (the proxy sweep: T = 1 beat T = 2, evaluation is at T = 1)
    start: float = 2.0  # linear/cosine: T at step 0 ...
    end: float = 1.0  # ... and at the last step
    steps: list = field(default_factory=lambda: [[0.0, 2.0]])  # step: [[fraction, T], ...]
    t_min: float = 1.0  # CTKD bounds
    t_max: float = 4.0
    lambda_max: float = 1.0  # CTKD gradient-reversal strength after the warm-up
    lambda_warmup: float = 0.1  # fraction of training over which lambda rises (cosine) from 0
    lr: float = 1e-2  # CTKD's own learning rate (SGD, follows the run's LR schedule)
    momentum: float = 0.9  # CTKD's SGD momentum (the reference's)
    anchor_weight: float = 0.0  # optional L2 anchor lambda_reg * (T - anchor)^2
    anchor: float | None = None  # defaults to `value` (or the POCL stage temperature)

    def __post_init__(self):
        modes = ("fixed", "linear", "cosine", "step", "stage", "ctkd")
        if self.mode not in modes:
            raise ValueError(f"temperature mode must be one of {modes}, got {self.mode!r}")
        pairs_ok = isinstance(self.steps, list) and len(self.steps) > 0 and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
            for pair in self.steps)
        if not pairs_ok:
            raise ValueError(f"temperature.steps must be a list of [fraction, T] pairs of numbers, got {self.steps!r}")
        for name in ("value", "start", "end", "t_min", "t_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"temperature.{name} must be > 0, got {getattr(self, name)!r}")
        if any(t <= 0 for _, t in self.steps):
            raise ValueError(f"temperature.steps temperatures must be > 0, got {self.steps!r}")
        if self.mode == "ctkd" and not self.t_min < self.value < self.t_max:
            raise ValueError(f"CTKD initial T (temperature.value) {self.value} must lie strictly inside "
                             f"({self.t_min}, {self.t_max}): set temperature.value, e.g. 1.25")

    def range(self) -> tuple[float, float]:
        """The lowest and highest T this config can produce (checked against the store's temperatures)."""
        if self.mode == "ctkd":
            return self.t_min, self.t_max
        if self.mode in ("linear", "cosine"):
            return min(self.start, self.end), max(self.start, self.end)
        if self.mode == "step":
            ts = [float(t) for _, t in self.steps]
            return min(ts), max(ts)
        return self.value, self.value


@dataclass
class ModelConfig:
    preset: str = "small"
    overrides: dict = field(default_factory=dict)  # StudentConfig fields, e.g. {n_layer: 4, spike: {lif: true}}
    init_embedding_from_teacher: bool = True


@dataclass
class AlignConfig:
    loss: str = "mse"  # mse (through a learned bias-free projector) | cosine | cka
    layer_map: str = "uniform"  # uniform | explicit | last_k
    pairs: list = field(default_factory=list)  # explicit: [[student_layer, teacher_layer], ...]
    last_k: int = 1
    warmup_steps: int = 100  # alignment weight is 0 until here ...
    ramp_steps: int = 200  # ... then rises linearly to align_weight
    feature_deltas: bool = False  # align layer deltas h[l] - h[l-1] (FDD) instead of states

    def __post_init__(self):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int for v in p)
                   for p in self.pairs):
            raise ValueError(f"loss.align.pairs must be [[student_layer, teacher_layer], ...] integers, "
                             f"got {self.pairs!r}")


@dataclass
class LossConfig:
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    align_weight: float = 0.0
    kd: str = "topk"  # a registered KD loss (losses/registry.py: losses.kd_loss_names()) or none
    kd_options: dict = field(default_factory=dict)  # that loss's own options (e.g. {alpha: 0.1} for skew_kl)
    reverse_kl: bool = False  # topk only: KL(q || p)
    align: AlignConfig = field(default_factory=AlignConfig)
    firing_rate_target: float = 0.3
    firing_rate_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 4e-3  # proxy sweep: 4e-3 beat 2e-3 for CE-only (-11 %) and KD (-16 %) at 250k tokens
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    accumulation: int = 1
    rewarm_steps_at_stage: int = 0  # > 0: short linear LR re-warm-up after each curriculum stage change
    # learning rate of the spike parameters (thresholds, amplitudes, offsets, leaks) as a multiple of lr:
    # LSQ scales its step sizes' gradient for the same reason (their gradients are small and noisy)
    spike_lr_mult: float = 1.0


@dataclass
class MonitorConfig:
    loss_check_steps: int = 50  # the loss must have dropped by this step
    grad_explode_factor: float = 10.0  # grad norm above this x the running median
    grad_vanish: float = 1e-7
    temperature_bound_steps: int = 100
    kl_max: float = 20.0
    clip_window: int = 50
    clip_fraction: float = 0.9
    scaler_min: float = 1.0
    dead_max: float = 0.25
    saturated_max: float = 0.25
    align_window: int = 50
    cooldown_steps: int = 100  # one event of a kind per this many steps


@dataclass
class TrainConfig:
    cache: str = ""
    out: str = "runs/student"
    val_cache: str | None = None
    storage_options: dict = field(default_factory=dict)  # fsspec options for cache and val_cache (remote URLs)
    val_fraction: float = 0.05  # held out from the end of the store when no val_cache
    val_windows: int = 64  # fixed validation subset (speed)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8
    carry_state: bool = False  # stateful training: rows follow consecutive windows, state carried (detached)
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16
    compile: bool = False
    parallel: str = "ddp"  # under torchrun: ddp (replicated student) | fsdp (FSDP2 fully_shard, sharded per block)
    num_workers: int = 0
    buffer_chunks: int = 4
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    nan_patience: int = 3  # consecutive non-finite steps before rolling back
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3  # then the run stops with exit 1, naming the failed steps and windows
    spike_anneal_steps: int = 0  # > 0: spikes blend in from continuous over these steps
    spike_anneal_fraction: float = 0.0  # the same as a fraction of `steps` (used when spike_anneal_steps is 0)
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, more time
    profile_steps: int = 0
    tensorboard: bool = True
    loggers: list = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + wandb, mlflow (pipeline/stage_two/loggers.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_value(value, hint, key: str):
    """`value` as the type `hint` names, or a GooseError naming the key. No silent coercions: a bool field
    takes only true/false, a number field a finite number (YAML reads 3e-3 as a string; that one is read
    as the number it means), a list field a list, a section a mapping."""
    if value is None and (hint is type(None) or type(None) in typing.get_args(hint)):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0] if len(args) == 1 else hint
    if hint is bool:
        if not isinstance(value, bool):
            raise GooseError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise GooseError(f"config key {key!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise GooseError(f"config key {key!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise GooseError(f"config key {key!r} must be a finite number, got {value!r}")
        if hint is int:
            if number != int(number):
                raise GooseError(f"config key {key!r} must be a whole number, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise GooseError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if hint in (list, dict):
        if not isinstance(value, hint):
            raise GooseError(f"config key {key!r} must be a {'list' if hint is list else 'mapping'}, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and values of the wrong type are a GooseError
    naming the key."""
    if not isinstance(data, dict):
        raise GooseError(f"config {where.rstrip('.') or 'root'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = where + str(key)
            hint = nearest_key(full)
            raise GooseError(f"unknown config key {full!r}" + (f"; did you mean {hint!r}?" if hint else
                                                               "; `goose config show` lists every key"))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise GooseError(f"config key {where + key!r} is a section: give a mapping, got {value!r}")
            value = from_dict(hint, value, f"{where}{key}.")
        else:
            value = _check_value(value, hint, where + key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise GooseError(f"bad config {where.rstrip('.') or 'value'}: {exc}") from None


# (key, lowest allowed, highest allowed, whether the lowest itself is allowed); None = no bound
_RANGES = [
    ("val_windows", 1, None, True), ("steps", 1, None, True), ("batch_size", 1, None, True),
    ("log_every", 1, None, True), ("val_every", 1, None, True), ("ckpt_every", 1, None, True),
    ("keep_checkpoints", 1, None, True), ("nan_patience", 1, None, True), ("max_rollbacks", 0, None, True),
    ("num_workers", 0, None, True), ("buffer_chunks", 1, None, True), ("spike_anneal_steps", 0, None, True),
    ("spike_anneal_fraction", 0, 1, True),
    ("profile_steps", 0, None, True), ("val_fraction", 0, 1, False), ("rollback_lr_factor", 0, 1, False),
    ("optim.lr", 0, None, False), ("optim.min_lr_ratio", 0, 1, True), ("optim.warmup_steps", 0, None, True),
    ("optim.weight_decay", 0, None, True), ("optim.beta1", 0, 1, True), ("optim.beta2", 0, 1, True),
    ("optim.eps", 0, None, False), ("optim.grad_clip", 0, None, True), ("optim.accumulation", 1, None, True),
    ("optim.rewarm_steps_at_stage", 0, None, True), ("optim.spike_lr_mult", 0, None, False),
    ("loss.kd_weight", 0, None, True), ("loss.ce_weight", 0, None, True), ("loss.align_weight", 0, None, True),
    ("loss.firing_rate_weight", 0, None, True), ("loss.align.last_k", 1, None, True),
    ("loss.align.warmup_steps", 0, None, True), ("loss.align.ramp_steps", 0, None, True),
]


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Ranges of the numeric keys (types are checked by from_dict): a bad value fails before any work."""
    for key, lo, hi, lo_ok in _RANGES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        below = value < lo if lo_ok else value <= lo
        above = hi is not None and (value >= hi if key.startswith("optim.beta") else value > hi)
        if below or above:
            low = f">= {lo}" if lo_ok else f"> {lo}"
            high = "" if hi is None else (f" and < {hi}" if key.startswith("optim.beta") else f" and <= {hi}")
            raise GooseError(f"config key {key!r} must be {low}{high}, got {value!r}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise GooseError(f"config key 'amp' must be none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise GooseError(f"config key 'parallel' must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.parallel == "fsdp" and cfg.amp == "fp16":
        raise GooseError("parallel: fsdp takes amp none or bf16 (fp16's loss scaler is not wired for sharded "
                         "gradients)")
    from .loggers import check_loggers

    check_loggers(cfg.loggers)  # known names (jsonl, tensorboard, wandb, mlflow), jsonl included, no repeats
    return cfg


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise GooseError(f"override {dotted}: {k} is not a section")
    if not all(keys):
        raise GooseError(f"override {dotted!r}: empty key")
    d[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple = (), *, required: dict | None = None,
                **top) -> TrainConfig:
    """A TrainConfig from an optional YAML/JSON file (a path, or a shipped config's name: see
    resolve_config_path), then `key.sub=value` overrides (YAML values), then keyword arguments for top-level
    fields (CLI flags). `required`: top-level key -> the error raised when neither the file, an override
    nor a keyword argument sets it (a default does not count)."""
    data: dict = {}
    if path:
        p = Path(resolve_config_path(path))
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise GooseError(f"cannot parse config {path}: {str(exc).splitlines()[0]}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise GooseError(f"config {path} must be a mapping of keys at its root, got a {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise GooseError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise GooseError(f"override {item!r}: cannot parse the value: {str(exc).splitlines()[0]}") from None
        _set(data, key.strip(), value)
    for key, value in top.items():
        if value is not None:
            _set(data, key, value)
    cfg = validate_config(from_dict(TrainConfig, data))
    for key, message in (required or {}).items():
        if data.get(key) in (None, ""):
            raise GooseError(message)
    return cfg


# storage_options keys whose values are credentials: written to a run's config.yaml as REDACTED
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def redacted_storage_options(options: dict) -> dict:
    """`options` with the values of credential-like keys (key, secret, token, ...) replaced by 'REDACTED'."""
    return {k: "REDACTED" if any(w in str(k).lower() for w in _SECRET_WORDS) else v for k, v in options.items()}


def dump_config(cfg: TrainConfig, path: Path, extra: dict | None = None) -> None:
    d = cfg.to_dict()
    d["storage_options"] = redacted_storage_options(d.get("storage_options") or {})
    if extra:
        d["_resolved"] = extra
    path.write_text(yaml.safe_dump(d, sort_keys=False))



# ---------------------------------------------------------------------------------------------
# Keys: every valid dotted key, and the nearest one to a mistyped key


def config_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of `cls`, sections included (e.g. 'optim', 'optim.lr', 'loss.align.loss')."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], key + ".")
    return keys


def nearest_key(key: str) -> str | None:
    """The valid key closest to `key` (difflib), preferring one with the same last part in another section
    ('lr' -> 'optim.lr'); None when nothing is close."""
    keys = config_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    if same_leaf:
        return difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


# ---------------------------------------------------------------------------------------------
# Shipped configs (configs/ beside cli.py, package data of the `goose` package): found by name from any
# directory


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config, sorted by name."""
    if not CONFIG_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(CONFIG_DIR.iterdir()) if p.suffix in _CONFIG_SUFFIXES and p.is_file()}


def resolve_config_path(name: str) -> str:
    """The file `--config NAME` means: an existing file as given, else a shipped config named `NAME`,
    `NAME.yaml` or `configs/NAME.yaml` (so `kd`, `kd.yaml` and `configs/kd.yaml` work from any directory);
    a one-line GooseError naming the shipped configs otherwise."""
    p = Path(name).expanduser()
    if p.is_file():
        return str(p)
    shipped = shipped_configs()
    if str(p.parent) in (".", "configs"):
        stem = p.stem if p.suffix in _CONFIG_SUFFIXES else p.name
        if stem in shipped:
            return str(shipped[stem])
    else:
        stem = p.stem
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise GooseError(f"config {name!r} not found: not a file, nor a shipped config (one of: "
                     f"{', '.join(shipped) or 'none'}; `goose config list`){hint}")


def config_description(path: Path) -> str:
    """The first sentence of a config file's leading comment ('' when it has none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def list_configs() -> list[dict]:
    """Every shipped config: name, file and the first sentence of its leading comment."""
    return [{"name": name, "path": str(path), "description": config_description(path)}
            for name, path in shipped_configs().items()]


def show_config(name: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The fully resolved config (every key, defaults included) of a shipped config or file `name` (None:
    the built-in defaults) with `key.sub=value` overrides, as a plain dict."""
    return load_config(name, overrides).to_dict()

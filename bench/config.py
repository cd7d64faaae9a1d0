"""Typed run configuration: frozen dataclasses, validated in full when loaded.

A run is described by one YAML file (or a dict from a sweep). Unknown keys,
type mismatches and values out of range fail at load time with one line naming
the file, the key and the valid keys or the fix, before anything expensive runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from bench.errors import BenchError

# Bump when a change makes old results incomparable (splits, evaluation, training loop semantics).
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    name: str = "TinyCLIP-32"
    # An open_clip pretrained tag ("openai"), a local checkpoint path, "embedded"
    # (the project's own tiny CLIP, shipped in bench/assets) or null for random init.
    pretrained: str | None = "embedded"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "embedded"  # a card name from datasets/ or a path to a card YAML
    root: str = "data"  # folder holding the datasets' folders (not part of a job's identity)
    test_domains: tuple[str, ...] = ("sketch",)
    holdout_fraction: float = 0.2
    # card: the card's own seen/unseen classes. base_to_novel: CoOp's base-to-novel split of the card's classes
    # (sorted; the first ceil(n/2) are base = seen, the rest novel = unseen, evaluated zero-shot in every domain).
    classes: str = "card"
    # Cross-dataset zero-shot: a suite name from datasets/zeroshot/suites.yaml (e.g. coop10) or a list of
    # zero-shot card names or paths, read under `root` in CoOp's layouts (docs/ZEROSHOT_SUITE.md).
    zeroshot_suite: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 64  # examples per step in total, drawn evenly from the training domains (at least one each)
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    augment: bool = True  # open_clip's training transform (RandomResizedCrop 0.9-1); False = eval transform
    eval_every: int = 50
    checkpoint_every: int = 50
    eval_batch_size: int = 256
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each loader worker keeps ready (PyTorch's default); used when num_workers > 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    save_final: bool = True  # keep the final trained weights (needed by post-hoc WiSE-FT)
    suite_every: int = 1  # evaluate data.zeroshot_suite at every k-th evaluation (and always at the last step)
    # gradient accumulation: each step's batch is split into this many micro-batches (batch_size must be a
    # multiple), one optimizer step per batch; the same step with less memory (bench/accumulate.py)
    accum_steps: int = 1
    # another training seed for the same task (data order, augmentation, every draw of the loss): the seed is
    # derived from the job's identity, which holds this key when it is not 0. Post-hoc combiners (soups, Model
    # Stock: bench/combine.py) need several fine-tuned runs of one task; sweeps/embedded_soups.yaml draws them.
    seed_offset: int = 0


@dataclass(frozen=True)
class TrackersConfig:
    """Experiment trackers fed every metric row the run writes (results.jsonl stays the record): off by default,
    not part of a job's identity (bench/trackers.py)."""

    use: tuple[str, ...] = ()  # tensorboard, wandb
    dir: str | None = None  # null: in the run folder; else <dir>/tensorboard/<run folder name> and <dir>/wandb
    project: str = "rft-bench"  # the wandb project
    wandb_mode: str = "auto"  # auto: WANDB_MODE if set, else online when the wandb server answers, else offline


@dataclass(frozen=True)
class RunConfig:
    method: str = "erm"
    hparams: Mapping[str, Any] = field(default_factory=dict)  # the method's own hyperparameters
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trial_seed: int = 0  # decides the data split; the training seed is derived from everything
    plugins: tuple[str, ...] = ()  # Python files that register extra methods
    wise_alphas: tuple[float, ...] = ()  # post-hoc WiSE-FT variants evaluated at the end (e.g. [0, 0.5, 1])
    trackers: TrackersConfig = field(default_factory=TrackersConfig)  # TensorBoard / wandb (where it logs, not what)


# Keys that say where or how a job runs, not what it computes: left out of its identity.
# train.accum_steps is one of them: a method accumulates only by a route that computes the gradient of the
# unsplit step (bench/accumulate.py; tests/test_accumulation.py checks every method), with the same random
# draws, so the step differs by float rounding alone, as it does across devices; a job requeued on a smaller
# GPU with more micro-batches is the same job and resumes its checkpoint.
NOT_IDENTITY = {("data", "root"), ("train", "num_workers"), ("train", "device"), ("train", "eval_batch_size"),
                 ("train", "save_final"), ("train", "accum_steps"), ("train", "prefetch_factor"), ("plugins",),
                 ("trackers",)}


# Keys added after job ids were first pinned: part of a job's identity only when set to a non-default value,
# so that every job id computed before they existed stays the same.
_IDENTITY_IF_SET = {("data", "classes"): "card", ("data", "zeroshot_suite"): [], ("train", "suite_every"): 1,
                    ("train", "seed_offset"): 0}

CLASS_SPLITS = ("card", "base_to_novel")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except BenchError:
                continue
        raise BenchError(f"{source}: key '{where}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{source}: key '{where}' must be a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise BenchError(f"{source}: key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{where}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise BenchError(f"{source}: key '{where}' must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, source: str = "config", prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from a mapping; unknown keys and wrong types raise BenchError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise BenchError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise BenchError(f"{source}: unknown key '{prefix}{key}': {hint}valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    obj = cls(**kwargs)
    check = _VALIDATORS.get(cls)
    if check is not None:  # values checked where they live, with the keys' full dotted names
        check(obj, source, prefix)
    return obj


# ---- value checks: everything a config can get wrong fails at load time, not in every job ----------------
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16")

# train.<key> -> (lower bound, strict, what the value is): every numeric training setting has a floor.
_TRAIN_BOUNDS = {
    "batch_size": (1, False, "examples per step, split evenly over the training domains"),
    "lr": (0, True, "the peak learning rate (to evaluate the pretrained model as is, use method: zeroshot)"),
    "weight_decay": (0, False, "AdamW's decoupled weight decay; 0 disables it"),
    "warmup_steps": (0, False, "linear warmup steps; 0 disables warmup"),
    "grad_clip": (0, False, "the max gradient norm; 0 disables clipping"),
    "eval_every": (1, False, "steps between evaluations"),
    "checkpoint_every": (1, False, "steps between checkpoints"),
    "eval_batch_size": (1, False, "images per evaluation batch"),
    "num_workers": (0, False, "DataLoader worker processes; 0 loads in the main process"),
    "prefetch_factor": (1, False, "batches each DataLoader worker keeps ready"),
    "suite_every": (1, False, "evaluate data.zeroshot_suite at every k-th evaluation"),
    "accum_steps": (1, False, "micro-batches per step (gradient accumulation); 1 disables it"),
    "seed_offset": (0, False, "another training seed for the same task; 0 is the job's own"),
}


def _below(value: float, lo: float, strict: bool) -> bool:
    """True unless lo <= value (lo < value if strict) and value is finite (NaN and inf fail too)."""
    return not (math.isfinite(value) and (value > lo if strict else value >= lo))


def _check_train(t: TrainConfig, source: str, prefix: str) -> None:
    if t.steps < 0:  # 0 is refused in bench.prepare.prepare for a method that trains (it knows which do)
        raise BenchError(f"{source}: {prefix}steps: {t.steps!r} is out of range; set it at least 1 (the number of "
                         f"optimisation steps; 0 only for a method that trains nothing, such as zeroshot)")
    for key, (lo, strict, what) in _TRAIN_BOUNDS.items():
        value = getattr(t, key)
        if _below(value, lo, strict):
            bound = f"{'greater than' if strict else 'at least'} {lo}"
            raise BenchError(f"{source}: {prefix}{key}: {value!r} is out of range; set it {bound} ({what})")
    if t.batch_size % t.accum_steps:
        raise BenchError(f"{source}: {prefix}accum_steps: {t.accum_steps} does not divide {prefix}batch_size "
                         f"{t.batch_size}; set a divisor of it (each micro-batch holds batch_size / accum_steps "
                         f"examples)")
    if not DEVICE_PATTERN.fullmatch(t.device):
        raise BenchError(f"{source}: {prefix}device: {t.device!r} is not a device; set auto, cpu, cuda or cuda:N")
    if t.precision not in PRECISIONS:
        raise BenchError(f"{source}: {prefix}precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}; "
                         f"set one of them (auto: bf16 autocast on CUDA, fp32 on CPU)")


def _check_data(d: DataConfig, source: str, prefix: str) -> None:
    if not d.dataset:
        raise BenchError(f"{source}: {prefix}dataset is empty; name a card (e.g. embedded) or give a card's path")
    if not 0 < d.holdout_fraction < 1:
        raise BenchError(f"{source}: {prefix}holdout_fraction: {d.holdout_fraction!r} is out of range; set it "
                         f"between 0 and 1, both excluded (the share of each domain held out for ID validation, "
                         f"DomainBed: 0.2)")
    if d.classes not in CLASS_SPLITS:
        raise BenchError(f"{source}: {prefix}classes: {d.classes!r} is not one of {', '.join(CLASS_SPLITS)}; "
                         f"set one of them")
    if not d.test_domains:
        raise BenchError(f"{source}: {prefix}test_domains is empty; name at least one held-out domain")


@functools.lru_cache(maxsize=None)
def _model_error(name: str) -> str | None:
    """bench.models.model_config's message for an unknown architecture (None: known), once per name."""
    from bench.models import model_config  # imports open_clip: only when a config is checked in full

    try:
        model_config(name)
    except BenchError as err:
        return str(err)
    return None


def _check_model(m: ModelConfig, source: str, prefix: str) -> None:
    error = _model_error(m.name)
    if error:
        raise BenchError(f"{source}: {prefix}name: {error}")


def _check_run(cfg: RunConfig, source: str, prefix: str) -> None:
    if cfg.trial_seed < 0:
        raise BenchError(f"{source}: {prefix}trial_seed: {cfg.trial_seed} is negative; set 0 or more")
    bad = [a for a in cfg.wise_alphas if not 0 <= a <= 1]
    if bad:
        raise BenchError(f"{source}: {prefix}wise_alphas: {bad[0]!r} is outside [0, 1]; set each alpha in [0, 1] "
                         f"(0: the zero-shot weights, 1: the fine-tuned ones)")


TRACKERS = ("tensorboard", "wandb")
WANDB_MODES = ("auto", "online", "offline")


def _check_trackers(t: TrackersConfig, source: str, prefix: str) -> None:
    for name in t.use:
        if name not in TRACKERS:
            raise BenchError(f"{source}: {prefix}use: {name!r} is not a tracker; list some of {', '.join(TRACKERS)}")
    if len(set(t.use)) != len(t.use):
        raise BenchError(f"{source}: {prefix}use: {list(t.use)} names a tracker twice; list each once")
    if t.wandb_mode not in WANDB_MODES:
        raise BenchError(f"{source}: {prefix}wandb_mode: {t.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}; "
                         f"set one of them (auto: offline when the wandb server does not answer)")


# The dataclass -> its value check, run by from_dict on every instance it builds (RunConfig's own check
# covers its top-level fields; model, data and train are checked as from_dict builds them).
_VALIDATORS = {TrainConfig: _check_train, DataConfig: _check_data, ModelConfig: _check_model, RunConfig: _check_run,
               TrackersConfig: _check_trackers}


def validate_run_config(cfg: RunConfig, source: str = "config") -> None:
    """Check every value of a built config (one made by from_dict already was): cheap, so that prepare can call
    it for each of a sweep's jobs. Raises BenchError naming the source, the key and the fix."""
    _check_model(cfg.model, source, "model.")
    _check_data(cfg.data, source, "data.")
    _check_train(cfg.train, source, "train.")
    _check_trackers(cfg.trackers, source, "trackers.")
    _check_run(cfg, source, "")


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def merge(base: Mapping, override: Mapping, replace: tuple[str, ...] = ("hparams",)) -> dict:
    """Deep-merge two plain dicts (override wins); mappings merge, everything else replaces, and so do the
    mappings under a key in `replace` (a run's hparams are given whole)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in replace:
            out[key] = merge(out[key], value, replace)
        else:
            out[key] = value
    return out


def parse_override(text: str, source: str = "--set") -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}}; the value is parsed as YAML."""
    if "=" not in text:
        raise BenchError(f"{source}: expected KEY=VALUE (e.g. train.steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: no such file; check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise BenchError(f"{path}:{where} malformed YAML ({problem}); fix the syntax") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    for text in overrides:
        data = merge(data or {}, parse_override(text))
    return from_dict(RunConfig, data, source)


def identity(cfg: RunConfig) -> dict:
    """What a job computes, without where or how it runs: the input of its id."""
    d = to_dict(cfg)
    for path in NOT_IDENTITY:
        node = d
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    for (section, key), default in _IDENTITY_IF_SET.items():
        if d[section].get(key) == default:
            d[section].pop(key, None)
    if not cfg.data.zeroshot_suite:
        d["train"].pop("suite_every", None)  # without a suite it changes nothing
    d["protocol_version"] = PROTOCOL_VERSION
    return d


def stable_hash(obj: Any, length: int = 12) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def seed_hash(*args: Any) -> int:
    """A 31-bit seed from any JSON-able arguments (DomainBed's seed_hash, made stable across runs)."""
    return int(stable_hash(args, 16), 16) % (2**31)

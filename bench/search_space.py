"""A sweep's hyperparameter search space: the `search:` key (SearchConfig), the samplers of a space entry
([kind, args...]: log10_uniform, uniform, int_uniform, pow2_int_uniform, choice), the checks of a space's keys
and entries, each method's own space (Hparams.SEARCH), and the draws. Sweep files and their expansion into jobs
are bench.sweep's.

Draw d of key k is drawn from an RNG seeded by (d, k) alone: never by the trial seed, the method or the
dataset, and adding a key never changes the others' draws.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from bench import config
from bench.errors import BenchError

SAMPLERS = {  # kind -> (number of arguments, description)
    "log10_uniform": (2, "10 ** U(lo, hi)"),
    "uniform": (2, "U(lo, hi)"),
    "int_uniform": (2, "an integer in [lo, hi]"),
    "pow2_int_uniform": (2, "int(2 ** U(lo, hi)) (DomainBed's batch size)"),
    "choice": (1, "one of a list"),
}


@dataclass(frozen=True)
class SearchConfig:
    n_draws: int = 1
    draw_0: str = "defaults"  # defaults: draw 0 keeps the configured values | random: draw 0 is drawn too
    space: Mapping[str, Any] = field(default_factory=dict)  # dotted run-config key -> [kind, args...]
    method_spaces: bool = True  # add each method's Hparams.SEARCH entries (hparams.<name>) not named here


# Keys the sweep's grid sets (sweep key in the values): never drawn, never set by base or overrides.
GRID_KEYS = {"method": "methods", "trial_seed": "trial_seeds", "plugins": "plugins", "data.dataset": "datasets",
             "data.test_domains": "test_domains"}


def check_space(space: Mapping, where: str, source: str) -> None:
    if not isinstance(space, Mapping):
        raise BenchError(f"{source}: {where} must map dotted run-config keys to [kind, args...], got {space!r}")
    for key, spec in space.items():
        _check_spec(spec, f"{where}.{key}", source)
        parts = str(key).split(".")
        if key in GRID_KEYS:
            raise BenchError(f"{source}: {where}.{key}: {key} is set by the sweep's '{GRID_KEYS[key]}' key, "
                             f"not drawn; remove it from the space")
        if parts[0] == "hparams":  # hparams.<name> are checked per method by expand
            if len(parts) != 2 or not parts[1]:
                raise BenchError(f"{source}: {where}.{key}: name one hyperparameter, e.g. hparams.lam")
        else:
            _check_key(parts, f"{where}.{key}", source)


def _check_spec(spec: Any, where: str, source: str) -> None:
    kinds = ", ".join(f"[{k}, ...] ({d})" for k, (_, d) in SAMPLERS.items())
    if isinstance(spec, tuple):
        spec = list(spec)
    if not isinstance(spec, list) or not spec or spec[0] not in SAMPLERS:
        raise BenchError(f"{source}: {where}: {spec!r} is not a search space; use one of {kinds}")
    n_args, _ = SAMPLERS[spec[0]]
    args = spec[1:]
    if len(args) != n_args:
        raise BenchError(f"{source}: {where}: {spec[0]} takes {n_args} argument(s), got {args!r}")
    if spec[0] == "choice":
        if not isinstance(args[0], list) or not args[0]:
            raise BenchError(f"{source}: {where}: choice needs a non-empty list, e.g. [choice, [0.1, 1.0]]")
    elif not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) or args[0] > args[1]:
        raise BenchError(f"{source}: {where}: {spec[0]} needs two numbers lo <= hi, got {args!r}")


def _check_key(parts: list[str], where: str, source: str) -> None:
    """A dotted key must name a field of RunConfig (hparams.* excepted)."""
    cls: Any = config.RunConfig
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if fields is None or part not in fields:
            valid = ", ".join(".".join(parts[:i] + [f]) for f in (fields or {}))
            close = difflib.get_close_matches(part, list(fields or {}), n=1)
            hint = f"did you mean '{'.'.join(parts[:i] + [close[0]])}'? " if close else ""
            raise BenchError(f"{source}: {where}: unknown run-config key '{'.'.join(parts)}': {hint}"
                             f"valid keys: {valid or 'none (not a section)'}")
        cls = _field_type(cls, part)


def _field_type(cls, name):
    import typing

    return typing.get_type_hints(cls)[name]


def draw_value(spec: Any, draw: int, key: str) -> Any:
    """Draw `draw` of hyperparameter `key`: a function of (draw, key) alone. Floats keep 4 significant digits."""
    kind, *args = spec
    rng = np.random.default_rng(config.seed_hash("search", draw, key))
    if kind == "choice":
        value = args[0][int(rng.integers(len(args[0])))]
        return value
    if kind == "int_uniform":
        return int(rng.integers(int(args[0]), int(args[1]) + 1))
    u = float(rng.uniform(args[0], args[1]))
    if kind == "uniform":
        return float(f"{u:.4g}")
    if kind == "log10_uniform":
        return float(f"{10 ** u:.4g}")
    if kind == "pow2_int_uniform":
        return int(2 ** u)
    raise AssertionError(kind)


def method_space(method_cls) -> dict:
    search = getattr(getattr(method_cls, "Hparams", None), "SEARCH", None) or {}
    return {f"hparams.{k}": list(v) for k, v in search.items()}

"""Run preparation: a run config checked in full and resolved (plugins, method, hparams, dataset card, domains,
zero-shot suite) into its job id and training seed, before anything expensive happens; the run's Task; the device
and the autocast that the config's train.device and train.precision name.

Everything that starts a run (bench.train.run, a sweep's expansion, bench combine, `bench run`) prepares it here,
so a config has one id wherever it is computed. Values are checked where the config is loaded (bench.config);
what needs the registry or a card (a method's hparams, a card's domains) is checked here, still before any data
or weights are read.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from bench import config
from bench.accumulate import check_accumulation
from bench.cards import DatasetCard, load_card, split_classes
from bench.data import Task, build_task, suite_evalsets
from bench.layouts import ensure_generated
from bench.errors import BenchError
from bench.method import METHODS, hparams_dict, load_builtin_methods, load_plugin, resolve_hparams


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"train.device: {name!r} asked for, but no CUDA device is visible; set train.device: auto")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    if precision not in ("auto", "fp32", "bf16"):
        raise BenchError(f"train.precision: {precision!r} is not one of auto, fp32, bf16")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Prepared:
    """A run's config with everything resolved, before anything expensive happens."""

    cfg: config.RunConfig
    hparams: object
    job_id: str
    seed: int
    source: str


def prepare(cfg: config.RunConfig, source: str = "config", card: DatasetCard | None = None) -> Prepared:
    """Validate a config in full (plugins, method, hparams, dataset card, domains) and compute its id.

    card: the already-loaded card of cfg.data.dataset (a sweep prepares thousands of jobs per card)."""
    config.validate_run_config(cfg, source)  # a few comparisons (the model name is looked up once per name)
    load_builtin_methods()
    for plugin in cfg.plugins:
        load_plugin(plugin)
    if cfg.method not in METHODS:
        raise BenchError(f"{source}: method: {METHODS.unknown_message(cfg.method)}")
    hparams = resolve_hparams(cfg.method, dict(cfg.hparams), source)
    check_accumulation(METHODS.get(cfg.method), cfg.train.accum_steps, source)
    if cfg.train.steps < 1 and METHODS.get(cfg.method).trains:
        raise BenchError(f"{source}: train.steps: {cfg.train.steps} is out of range; set it at least 1 (method "
                         f"{cfg.method} trains; method: zeroshot evaluates the pretrained model without training)")
    try:
        card = card or load_card(cfg.data.dataset)
    except BenchError as err:
        raise BenchError(f"{source}: data.dataset: {err}") from None
    card = split_classes(card, cfg.data.classes, source)
    if cfg.data.zeroshot_suite:
        _suite_names(cfg.data.zeroshot_suite, source)
    bad = [d for d in cfg.data.test_domains if d not in card.domains]
    if bad:
        raise BenchError(f"{source}: data.test_domains: {bad[0]!r} is not a domain of {card.name}; "
                         f"its domains are {', '.join(card.domains)}")
    _check_batch(cfg, card, source)
    ident = config.identity(cfg)
    ident["hparams"] = hparams_dict(hparams)
    seed = config.seed_hash("train", ident)
    return Prepared(cfg, hparams, config.stable_hash(ident), seed, source)


def _check_batch(cfg: config.RunConfig, card: DatasetCard, source: str) -> None:
    """Each step draws batch_size // n images from each of the n training domains (StepSampler): a batch smaller
    than n would leave some domain out of every step, so it is refused (as is holding out every domain)."""
    n = 1 if card.protocol == "shift" else len(set(card.domains) - set(cfg.data.test_domains))
    if n == 0:
        raise BenchError(f"{source}: data.test_domains holds every domain of {card.name}; leave one to train on")
    if cfg.train.batch_size < n:
        raise BenchError(f"{source}: train.batch_size: {cfg.train.batch_size} is fewer than the {n} training domains "
                         f"of {card.name} (each step draws batch_size / {n} images from each); set it to at least {n}")


@functools.lru_cache(maxsize=64)
def _suite_names(value: tuple[str, ...], source: str) -> tuple[str, ...]:
    """data.zeroshot_suite resolved to zero-shot card names, each card loaded once (a sweep has thousands of jobs)."""
    from bench import zeroshot_suite

    names = zeroshot_suite.resolve_suite(list(value), f"{source}: data.zeroshot_suite")
    for name in names:
        try:
            zeroshot_suite.load_zeroshot_card(name)
        except BenchError as err:
            raise BenchError(f"{source}: data.zeroshot_suite: {err}") from None
    return names


def build_run_task(cfg: config.RunConfig, source: str = "config", progress: bool = False) -> Task:
    """The run's Task: its card (with data.classes applied), splits, and the zero-shot suite's eval sets."""
    card = split_classes(load_card(cfg.data.dataset), cfg.data.classes, source)
    ensure_generated(card, cfg.data.root, progress)
    task = build_task(card, cfg.data.root, cfg.data.test_domains, cfg.data.holdout_fraction, cfg.trial_seed, source)
    if cfg.data.zeroshot_suite:
        task.evalsets += suite_evalsets(cfg.data.root, cfg.data.zeroshot_suite, source)
    return task

"""Sweep files: one YAML expands into jobs (methods x datasets x held-out domains x hparams x seeds).

    name: quickstart
    output: runs/quickstart
    base: {train: {steps: 150}}              # RunConfig keys shared by every job
    methods: [zeroshot, erm]
    datasets: [embedded]
    test_domains: default                    # default | all | [[sketch], [photo]]
    trial_seeds: [0, 1]
    overrides: {methods: {erm: {train: {lr: 1e-4}}}, datasets: {embedded: {...}}}
    launcher: {kind: local}
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench import config as C
from bench.data import load_card
from bench.errors import BenchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overrides:
    methods: Mapping[str, Any] = field(default_factory=dict)
    datasets: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LauncherConfig:
    kind: str = "local"


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    output: str = "runs/sweep"
    base: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ("erm",)
    datasets: tuple[str, ...] = ("embedded",)
    test_domains: Any = "default"
    trial_seeds: tuple[int, ...] = (0,)
    plugins: tuple[str, ...] = ()
    overrides: Overrides = field(default_factory=Overrides)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass(frozen=True)
class Job:
    cfg: C.RunConfig
    job_id: str
    run_dir: Path


def load_sweep(path: str | Path) -> SweepConfig:
    return C.from_dict(SweepConfig, C.read_yaml(path), str(path))


def _test_domain_sets(spec: Any, card, source: str) -> list[tuple[str, ...]]:
    if spec == "default":
        return [tuple(card.default_test_domains or card.domains[:1])]
    if spec == "all":
        return [(d,) for d in card.domains]
    if isinstance(spec, list):
        return [tuple(s) if isinstance(s, list) else (s,) for s in spec]
    raise BenchError(f"{source}: test_domains must be default, all or a list of domain lists, got {spec!r}")


def expand(sweep: SweepConfig, source: str = "sweep") -> list[Job]:
    """Every job of a sweep, validated in full (nothing runs or is written here)."""
    from bench.train import prepare

    jobs = []
    for dataset in sweep.datasets:
        card = load_card(dataset)
        for test_domains in _test_domain_sets(sweep.test_domains, card, source):
            for method in sweep.methods:
                for trial_seed in sweep.trial_seeds:
                    d = C.merge(dict(sweep.base), {"method": method, "trial_seed": trial_seed,
                                                   "plugins": list(sweep.plugins),
                                                   "data": {"dataset": dataset, "test_domains": list(test_domains)}})
                    d = C.merge(d, dict(sweep.overrides.datasets.get(dataset, {})))
                    d = C.merge(d, dict(sweep.overrides.methods.get(method, {})))
                    cfg = C.from_dict(C.RunConfig, d, source)
                    prep = prepare(cfg, source)
                    jobs.append(Job(cfg, prep.job_id, Path(sweep.output) / prep.job_id))
    return jobs


def run_local(jobs: list[Job], progress: bool = True) -> None:
    """Run jobs one after another in this process."""
    from bench.train import run

    for i, job in enumerate(jobs, 1):
        log.info("job %d/%d: %s %s seed %d -> %s", i, len(jobs), job.cfg.method, ",".join(job.cfg.data.test_domains),
                 job.cfg.trial_seed, job.run_dir)
        run(job.cfg, job.run_dir, progress=progress)

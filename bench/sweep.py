"""Sweep files: one YAML expands into jobs (methods x datasets x held-out domains x hparam draws x trial seeds).

    name: quickstart
    output: runs/quickstart                  # one folder per job id under it
    base: {train: {steps: 150}}              # RunConfig keys shared by every job
    methods: [zeroshot, erm]
    datasets: [embedded]
    test_domains: all                        # default | all | [[sketch], [photo]] | {dataset: one of these}
    test_domain_pairs: false                 # also every pair (for leave-one-domain-out model selection)
    trial_seeds: [0, 1, 2]                   # decide the data splits
    search:                                  # random hyperparameter search
      n_draws: 20
      draw_0: defaults                       # draw 0 keeps the configured values; or: random
      space: {train.lr: [log10_uniform, -5, -3.5]}   # dotted run-config keys
      method_spaces: true                    # add each method's Hparams.SEARCH (as hparams.<name>)
    overrides:                               # run-config keys (and search.space) per method / per dataset
      methods: {erm: {hparams: {label_smoothing: 0.1}, search: {space: {...}}}}
      datasets: {domainnet: {train: {eval_every: 1000}}}
    launcher: {kind: local}                  # debug | local | slurm (bench/launch.py: LauncherConfig)
    extends: other.yaml                      # optional: this file's keys merged over another sweep file's

Value of a run-config key, last wins: defaults < base < overrides.datasets < overrides.methods < the draw.
Draw d of key k is drawn from an RNG seeded by (d, k) alone: never by the trial seed, the method or the
dataset, and adding a key never changes the others' draws. Methods that train nothing get one draw.
The search space itself (samplers, checks of its keys, the draws) is bench.search_space's.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from bench import config
from bench import results
from bench import search_space
from bench.cards import load_card
from bench.errors import BenchError
from bench.launch import LauncherConfig, check_launcher
from bench.layouts import domain_folder

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Overrides:
    methods: Mapping[str, Any] = field(default_factory=dict)
    datasets: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    output: str = "runs/sweep"
    base: Mapping[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ("erm",)
    datasets: tuple[str, ...] = ("embedded",)
    test_domains: Any = "default"
    test_domain_pairs: bool = False
    trial_seeds: tuple[int, ...] = (0,)
    search: search_space.SearchConfig = field(default_factory=search_space.SearchConfig)
    plugins: tuple[str, ...] = ()
    overrides: Overrides = field(default_factory=Overrides)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass(frozen=True)
class Job:
    cfg: config.RunConfig
    job_id: str
    run_dir: Path
    draw: int
    trains: bool  # False: evaluated as is (no training steps)
    hparams: dict = field(repr=False, compare=False, default_factory=dict)  # resolved (defaults filled in)
    seed: int = field(repr=False, compare=False, default=0)  # the training seed
    meta: dict = field(repr=False, compare=False, default_factory=dict)  # sweep name, versions
    baseline: int | None = field(repr=False, compare=False, default=None)  # the method's (bench.method.baseline_of)

    @property
    def steps(self) -> int:
        return self.cfg.train.steps if self.trains else 0

    @property
    def record(self) -> dict:
        """What <run>/config.json holds (the trainer's record, plus the sweep and draw it came from)."""
        meta = dict(self.meta)
        name = meta.pop("sweep_name", None)
        return results.config_record(self.job_id, self.cfg, self.hparams, self.seed, meta, baseline=self.baseline,
                               sweep={"name": name, "draw": self.draw})


# ---- loading -------------------------------------------------------------------------------------
def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and check a sweep file's structure (jobs are checked by `expand`).

    overrides: `--set KEY=VALUE` edits of the file's own keys, dotted (`base.data.root=/data`,
    `datasets=[pacs]`, `search.n_draws=1`), applied before it is checked, as if written in the file."""
    source = str(path)
    data = _read_extended(Path(path))
    for text in overrides:  # only the named key changes (unlike config.merge, which replaces hparams whole)
        if "=" not in text:
            raise BenchError(f"{source}: --set: expected KEY=VALUE (e.g. base.data.root=/data), got {text!r}")
        key, raw = text.split("=", 1)
        data = _set_dotted(data if isinstance(data, dict) else {}, key.strip(), yaml.safe_load(raw))
    sweep = config.from_dict(SweepConfig, data, source)
    check_launcher(sweep.launcher, source)
    if sweep.search.n_draws < 1:
        raise BenchError(f"{source}: search.n_draws must be at least 1, got {sweep.search.n_draws}")
    if sweep.search.draw_0 not in ("defaults", "random"):
        raise BenchError(f"{source}: search.draw_0 must be defaults (draw 0 keeps the configured values) or random, "
                         f"got {sweep.search.draw_0!r}")
    for key, what in (("name", "the sweep's name, e.g. quickstart"), ("output", "the folder of its job folders, "
                                                                                 "e.g. runs/quickstart")):
        if not getattr(sweep, key).strip():
            raise BenchError(f"{source}: {key} is empty; set it ({what})")
    bad = [s for s in sweep.trial_seeds if s < 0]
    if bad:
        raise BenchError(f"{source}: trial_seeds: {bad[0]} is negative; list seeds of 0 or more")
    for key in ("methods", "datasets", "trial_seeds"):
        values = getattr(sweep, key)
        if not values:
            raise BenchError(f"{source}: {key} is empty; list at least one")
        if len(set(values)) != len(values):
            raise BenchError(f"{source}: {key} lists {_first_duplicate(values)!r} twice; list each once")
    search_space.check_space(sweep.search.space, "search.space", source)
    config.from_dict(config.RunConfig, sweep.base, source, prefix="base.")
    _check_not_grid(sweep.base, "base", source)
    for kind in ("methods", "datasets"):
        listed = getattr(sweep, kind)
        for name, value in getattr(sweep.overrides, kind).items():
            where = f"overrides.{kind}.{name}"
            if name not in listed:
                raise BenchError(f"{source}: {where}: {name!r} is not in {kind} ({', '.join(map(str, listed))}); "
                                 f"add it there or remove the override")
            if not isinstance(value, Mapping):
                raise BenchError(f"{source}: {where} must be a mapping of run-config keys, got {value!r}")
            config.from_dict(config.RunConfig, {k: v for k, v in value.items() if k != "search"}, source,
                             prefix=f"{where}.")
            _check_not_grid(value, where, source)
            extra = value.get("search")
            if extra is not None:
                if not isinstance(extra, Mapping) or set(extra) - {"space"}:
                    raise BenchError(f"{source}: {where}.search may only hold 'space' (a mapping of dotted keys)")
                search_space.check_space(extra.get("space") or {}, f"{where}.search.space", source)
    return sweep


def _read_extended(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A sweep file's keys; with `extends: OTHER.yaml` (relative to the file), the other file's keys with this
    file's merged over them (mappings merge key by key, lists and values replace), e.g. a variant of a shipped
    sweep that changes one key: `extends: domainbed.yaml`, `base: {data: {classes: base_to_novel}}`."""
    data = config.read_yaml(path)
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise BenchError(f"{path}: extends must name one sweep file (relative to {path.parent}), got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise BenchError(f"{path}: extends: {parent} extends itself (a cycle); remove one of the extends keys")
    if not parent_path.is_file():
        raise BenchError(f"{path}: extends: {parent_path} not found; name a sweep file relative to {path.parent}")
    base = _read_extended(parent_path, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise BenchError(f"{parent_path}: a sweep file must be a mapping of keys (it is extended by {path})")
    return config.merge(base, data, replace=())  # hparams merge too: a variant changes one, not all


def _check_not_grid(d: Mapping, where: str, source: str) -> None:
    for key, by in search_space.GRID_KEYS.items():
        head, _, tail = key.partition(".")
        if head in d and (not tail or tail in (d.get(head) or {})):
            raise BenchError(f"{source}: {where}.{key} is set by the sweep's '{by}' key; remove it from {where}")


def _first_duplicate(values):
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)


def _set_dotted(d: dict, key: str, value: Any) -> dict:
    parts = key.split(".")
    out = dict(d)
    node = out
    for part in parts[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value
    return out


# ---- expanding -----------------------------------------------------------------------------------
def _test_domain_sets(spec: Any, card, source: str, pairs: bool) -> list[tuple[str, ...]]:
    where = "test_domains"
    if isinstance(spec, Mapping):
        if card.name not in spec:
            raise BenchError(f"{source}: test_domains has no entry for dataset {card.name}; add one "
                             f"(default, all or a list of domain lists)")
        where, spec = f"test_domains.{card.name}", spec[card.name]
    shift = getattr(card, "protocol", "domainbed") == "shift"  # ImageNet-style: one training, every shift tested
    if spec == "default":
        sets = [tuple(card.default_test_domains or card.domains[:1])]
    elif spec == "all":
        sets = [tuple(card.shifts)] if shift else [(d,) for d in card.domains]
    elif isinstance(spec, list) and spec:
        sets = [tuple(s) if isinstance(s, list) else (s,) for s in spec]
    else:
        raise BenchError(f"{source}: {where} must be default, all or a list of domain lists (e.g. [[sketch], "
                         f"[photo]]), got {spec!r}")
    for s in sets:
        bad = [d for d in s if d not in card.domains]
        if bad:
            raise BenchError(f"{source}: {where}: {bad[0]!r} is not a domain of {card.name}; "
                             f"its domains are {', '.join(card.domains)}")
        if not shift and len(set(s)) >= len(card.domains):
            raise BenchError(f"{source}: {where}: {list(s)} holds every domain of {card.name}; leave one to train on")
    if pairs and not shift and len(card.domains) > 2:
        sets += [p for p in itertools.combinations(card.domains, 2) if p not in sets]
    return sets


def _check_data(card, root: str, dataset: str, test_domains: set[str], source: str) -> None:
    """The images must be there before any job is launched (the embedded benchmark is drawn on first use)."""
    if card.generator is not None:
        return
    if getattr(card, "protocol", "domainbed") == "shift":
        needed = [card.train_domain, card.id_test_domain, *sorted(test_domains)]
    else:
        needed = list(card.domains)
    missing = [d for d in needed if d and not domain_folder(root, card, d).is_dir()]
    if missing:
        folder = domain_folder(root, card, missing[0])
        how = (getattr(card, "sets", {}).get(missing[0]) or {}).get("download") or card.download
        raise BenchError(f"{source}: datasets: {dataset}: data folder {folder} not found; download it "
                         f"({how or 'see datasets/' + dataset + '.yaml'}) or set the data root "
                         f"(base.data.root, or overrides.datasets.{dataset}.data.root)")


def expand(sweep: SweepConfig, source: str = "sweep", check_data: bool = True) -> list[Job]:
    """Every job of a sweep, validated in full (nothing runs or is written here)."""
    from bench.method import METHODS, baseline_of, hparams_dict, load_builtin_methods, load_plugin
    from bench.prepare import prepare

    load_builtin_methods()
    plugins = [str(Path(p).resolve()) for p in sweep.plugins]
    for p in plugins:
        try:
            load_plugin(p)
        except BenchError as err:
            raise BenchError(f"{source}: plugins: {err}") from None
    for m in sweep.methods:
        if m not in METHODS:
            raise BenchError(f"{source}: methods: {METHODS.unknown_message(m)}")
    output = Path(sweep.output).resolve()
    meta = {**results.versions(), "sweep_name": sweep.name}
    jobs: dict[str, Job] = {}
    cards = {}
    for dataset in sweep.datasets:
        try:
            cards[dataset] = card = load_card(dataset)
        except BenchError as err:
            raise BenchError(f"{source}: datasets: {err}") from None
        ds_over = dict(sweep.overrides.datasets.get(dataset) or {})
        ds_space = dict((ds_over.pop("search", None) or {}).get("space") or {})
        domain_sets = _test_domain_sets(sweep.test_domains, card, source, sweep.test_domain_pairs)
        checked_roots = set()
        for method in sweep.methods:
            cls = METHODS.get(method)
            m_over = dict(sweep.overrides.methods.get(method) or {})
            m_space = dict((m_over.pop("search", None) or {}).get("space") or {})
            space = {**(search_space.method_space(cls) if sweep.search.method_spaces else {}),
                     **sweep.search.space, **ds_space, **m_space}
            trains = getattr(cls, "trains", True)
            hparam_fields = {f.name for f in dataclasses.fields(cls.Hparams)} if dataclasses.is_dataclass(
                cls.Hparams) else set()
            for key in space:
                if key.startswith("hparams.") and key.split(".", 1)[1] not in hparam_fields:
                    raise BenchError(f"{source}: search space key {key!r} is not a hyperparameter of method {method} "
                                     f"(its hparams: {', '.join(sorted(hparam_fields)) or 'none'}); put it under "
                                     f"overrides.methods.<method>.search.space")
            draws = range(sweep.search.n_draws) if trains else range(1)
            for draw in draws:
                values = {} if (draw == 0 and (sweep.search.draw_0 == "defaults" or not trains)) else {
                    k: search_space.draw_value(spec, draw, k) for k, spec in sorted(space.items())}
                d = config.merge(dict(sweep.base), {"method": method, "trial_seed": sweep.trial_seeds[0],
                                               "data": {"dataset": dataset, "test_domains": list(domain_sets[0])}})
                d = config.merge(d, ds_over)
                d = config.merge(d, m_over)
                for key, value in values.items():
                    d = _set_dotted(d, key, value)
                d["plugins"] = plugins
                d = _set_dotted(d, "data.root", str(Path((d.get("data") or {}).get("root", "data")).resolve()))
                # Validated once per draw; held-out domains and trial seeds (checked above) only replace fields.
                try:
                    cfg0 = config.from_dict(config.RunConfig, d, source)
                except BenchError as err:
                    raise _drawn(err, values, draw, method) from None
                if (dataset, cfg0.data.root) not in checked_roots and check_data:
                    _check_data(card, cfg0.data.root, dataset, {d for ds in domain_sets for d in ds}, source)
                    checked_roots.add((dataset, cfg0.data.root))
                for test_domains in domain_sets:
                    data = dataclasses.replace(cfg0.data, test_domains=tuple(test_domains))
                    for trial_seed in sweep.trial_seeds:
                        cfg = dataclasses.replace(cfg0, data=data, trial_seed=trial_seed)
                        try:
                            prep = prepare(cfg, source, card=card)
                        except BenchError as err:
                            raise _drawn(err, values, draw, method) from None
                        if prep.job_id in jobs:
                            continue  # two draws that agree (a choice space, or a method that ignores a key)
                        jobs[prep.job_id] = Job(cfg, prep.job_id, output / prep.job_id, draw, trains,
                                                hparams_dict(prep.hparams), prep.seed, meta, baseline_of(cls))
    if check_data:
        problems = check_resources(list(jobs.values()), source, first_only=True)
        if problems:
            raise BenchError(problems[0][1])
    return list(jobs.values())


def check_resources(jobs: list[Job], source: str = "sweep", first_only: bool = False) -> list[tuple[str, str | None]]:
    """Method.check_resources of every distinct (method, hparams, data root) of these jobs, not once per job:
    [(what was checked, the one-line error or None)]."""
    from bench.method import METHODS, resolve_hparams

    out, seen = [], set()
    for job in jobs:
        ident = (job.cfg.method, config.stable_hash(job.hparams), job.cfg.data.root)
        if ident in seen:
            continue
        seen.add(ident)
        cls = METHODS.get(job.cfg.method)
        label = f"{job.cfg.method} (draw {job.draw}, {job.cfg.data.dataset})"
        try:
            cls.check_resources(resolve_hparams(job.cfg.method, job.hparams, source), job.cfg)
        except BenchError as err:
            out.append((label, f"{source}: methods: {job.cfg.method}: {err}"))
            if first_only:
                break
            continue
        out.append((label, None))
    return [o for o in out if o[1] is not None] if first_only else out


def _drawn(err: BenchError, values: dict, draw: int, method: str) -> BenchError:
    """An error of a drawn config says so (the value came from the search space, not from the file's keys)."""
    if not values:
        return err
    named = {k: v for k, v in values.items() if k in str(err)} or values  # the drawn keys the error is about
    drawn = ", ".join(f"{k}={v!r}" for k, v in sorted(named.items()))
    return BenchError(f"{err} [draw {draw} of method {method}: {drawn} came from the search space: narrow its range]")


# ---- filters (--only key=value[,value]) -----------------------------------------------------------
FILTER_KEYS = {
    "method": lambda j: {j.cfg.method},
    "dataset": lambda j: {j.cfg.data.dataset},
    "test_domains": lambda j: {"+".join(j.cfg.data.test_domains)},
    "draw": lambda j: {str(j.draw)},
    "trial_seed": lambda j: {str(j.cfg.trial_seed)},
    "job": lambda j: {j.job_id},
}


def parse_only(only: list[str], source: str = "--only") -> list[tuple[str, set[str]]]:
    out = []
    for text in only or ():
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or key not in FILTER_KEYS or not values:
            raise BenchError(f"--only {text}: expected KEY=VALUE[,VALUE] with KEY one of {', '.join(FILTER_KEYS)} "
                             f"(e.g. --only method=erm)")
        out.append((key, {v.strip() for v in values.split(",")}))
    return out


def _matches(job: Job, filters) -> bool:
    return all(FILTER_KEYS[key](job) & values for key, values in filters)


def select(all_jobs: list[Job], only: list[str], source: str) -> list[Job]:
    """The jobs that pass every --only filter. A value that no job of the sweep has is an error naming the
    values it could take (so a typo never silently selects nothing)."""
    filters = parse_only(only, source)
    for key, values in filters:
        known = set().union(*(FILTER_KEYS[key](j) for j in all_jobs)) if all_jobs else set()
        unknown = sorted(values - known)
        if unknown and key != "job":
            raise BenchError(f"--only {key}={unknown[0]}: no job of {source} has it; its {key} values: "
                             f"{', '.join(sorted(known, key=_natural))}")
    return [j for j in all_jobs if _matches(j, filters)]


def _natural(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)

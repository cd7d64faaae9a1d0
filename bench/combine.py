"""Post-hoc combiners: weights made from finished runs of one task, evaluated like a run, reported as rows.

A combiner takes the trained weights (`final.pt`) of one or more finished runs of the same task and yields
weights, each under a variant name; every variant is evaluated on the runs' eval sets and its rows carry
"variant": "<name>", so the collector shows it as a row of its own (`erm+soup:greedy`, `erm+wise:0.5`).

    @register_combiner("soup")
    class Soup(Combiner):
        min_members = 1
        def variants(self): return ["soup:uniform", "soup:greedy"]
        def combine(self, ctx):                        # ctx: theta0, members (job id, state, step), score
            yield Combined("soup:uniform", average([m.state for m in ctx.members]), [m.job_id for m in ctx.members])

Members. `bench combine --runs DIR --combiner NAME` groups the done runs under DIR that kept their weights by
task: the same method, model, data (dataset, classes, held-out domains, holdout fraction, zero-shot suite) and
trial seed (--group-by method: any hparams and training seeds, model soups' setting), or also the same hparams
and training settings but train.seed_offset (--group-by hp: training seeds only, Model Stock's setting). No
member ever comes from another held-out set or trial seed.

Where results go. A per-run combiner (`per_run = True`: WiSE-FT) writes its rows into the run's own
results.jsonl, replacing earlier rows of the same variants (`bench wise`). Any other combiner writes one new
run folder per group, <out>/<job id> (default out: <runs>/combined): config.json is the first member's (by job
id: method, data, trial seed, so the collector puts it in the members' table cells) plus "combined" (combiner,
options, group-by, members, and per variant the members it holds and what it measured to choose them);
results.jsonl holds the variants' rows at the members' last step; `done` last. Its job id is a hash of the
combiner, its options and the members' job ids: rerunning is a no-op, and a group with another member set
(a seed finished since) gets a folder of its own.

Honest selection. The evaluation model is built from the first member's config (its seed, as bench.train.run
does); `ctx.score(state)` is the mean accuracy over the ID validation sets (role id_val: the training domains'
held-out 20 %, the collector's `id`), the only number a combiner may choose by. Never OOD.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from bench import config
from bench import results
from bench.errors import BenchError
from bench.registry import Registry

log = logging.getLogger(__name__)

COMBINED_DIR = "combined"  # default output folder, under --runs
GROUP_BY = ("method", "hp")


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass
class Member:
    """A finished run's trained weights."""

    job_id: str
    run_dir: Path
    state: dict[str, torch.Tensor]  # final.pt's "method": the trained parameters
    step: int  # final.pt's step
    record: dict = field(repr=False, default_factory=dict)  # its config.json


@dataclass
class Combined:
    """One variant a combiner made: its weights and the members they come from (in the order used)."""

    variant: str
    state: dict[str, torch.Tensor]
    members: list[str]
    info: dict = field(default_factory=dict)  # recorded in config.json (e.g. the id_val scores that chose)


@dataclass
class Context:
    theta0: dict[str, torch.Tensor]  # the trained parameters before training (the pretrained / zero-shot weights)
    members: list[Member]  # sorted by job id
    score: Callable[[dict[str, torch.Tensor]], float]  # mean ID validation accuracy (role id_val) of a state


class Combiner:
    """Base class. Subclasses set `Options` (a frozen dataclass of their settings) and define `variants`
    (the names of the variants they write) and `combine` (yield Combined)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    min_members: ClassVar[int] = 2  # groups with fewer members are skipped (logged)
    per_run: ClassVar[bool] = False  # True: one run at a time, its rows go into that run's own results.jsonl

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def variants(self) -> list[str]:
        raise NotImplementedError

    def combine(self, ctx: Context) -> Iterator[Combined]:
        raise NotImplementedError


COMBINERS: Registry[type[Combiner]] = Registry("combiner")
register_combiner = COMBINERS.register


def load_builtin_combiners() -> None:
    """Import the shipped combiners (the explicit list in combiners/__init__.py)."""
    importlib.import_module("combiners")


def build_combiner(name: str, options: dict | None = None, source: str = "--combiner") -> Combiner:
    load_builtin_combiners()
    if name not in COMBINERS:
        raise BenchError(f"{source}: {COMBINERS.unknown_message(name)}")
    cls = COMBINERS.get(name)
    if options and not dataclasses.fields(cls.Options):
        raise BenchError(f"combiner {name} takes no options; drop --opt {', '.join(sorted(options))}")
    return cls(config.from_dict(cls.Options, options or {}, f"combiner {name}", prefix="options."))


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts, key by key (a sum then one division: one state comes back as is)."""
    if not states:
        raise BenchError("average of no states; give at least one run")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise BenchError(f"runs differ in trained parameters ({sorted(set(s) ^ set(keys))[:3]}); combine runs "
                             f"of one method")
    out = {}
    for k in keys:
        if not states[0][k].is_floating_point():
            out[k] = states[0][k]
            continue
        total = states[0][k].clone()
        for s in states[1:]:
            total += s[k]
        out[k] = total / len(states) if len(states) > 1 else total
    return out


# ---- members -----------------------------------------------------------------------------------------------
def _record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / results.CONFIG).read_text())
    except (OSError, ValueError):
        return None


def group_key(record: dict, group_by: str) -> str:
    """The task a run belongs to, as a hash: runs with equal keys may be combined. `method`: same method, model,
    data (held-out domains included) and trial seed; `hp`: also the same hparams and training settings, so that
    only train.seed_offset (the training seed) differs."""
    if group_by not in GROUP_BY:
        raise BenchError(f"--group-by: {group_by!r} is not one of {', '.join(GROUP_BY)}")
    ident = config.identity(config.from_dict(config.RunConfig, record["config"], "config.json"))
    ident.pop("wise_alphas", None)  # what the run evaluated at its end, not what it trained
    if group_by == "method":
        ident.pop("hparams", None)
        ident.pop("train", None)
    else:
        ident["hparams"] = record.get("hparams") or ident.get("hparams")
        ident["train"].pop("seed_offset", None)
    return config.stable_hash(ident)


def find_runs(root: str | Path, methods: Iterable[str] = ()) -> list[tuple[Path, dict]]:
    """Done runs under root that kept their weights (final.pt) and are not combinations themselves."""
    from bench.collect import find_run_dirs

    methods = set(methods)
    out = []
    for folder, names in find_run_dirs(root):
        if not {results.DONE, results.FINAL, results.CONFIG} <= names:
            continue
        rec = _record(Path(folder))
        if rec is None or "combined" in rec or "config" not in rec:
            continue
        if methods and rec["config"].get("method") not in methods:
            continue
        out.append((Path(folder), rec))
    return out


# ---- evaluation ----------------------------------------------------------------------------------------------
class _Evaluator:
    """The method of a run's config, built as bench.train.run builds it, and its eval data (all sets, and the
    id_val sets alone for scoring)."""

    def __init__(self, run_dir: Path, record: dict, device: str):
        from bench.evaluate import EvalData
        from bench.method import build_method
        from bench.models import load_clip
        from bench.prepare import autocast_for, build_run_task, prepare, resolve_device

        source = str(run_dir / results.CONFIG)
        cfg = config.from_dict(config.RunConfig, record["config"], source)
        prep = prepare(cfg, source)
        self.device = resolve_device(device)
        task = build_run_task(cfg, source)
        torch.manual_seed(prep.seed)  # as in bench.train.run, so a random-init model starts from the same weights
        clip = load_clip(cfg.model.name, cfg.model.pretrained, self.device)
        self.method = build_method(cfg.method, clip, task, dict(cfg.hparams)).to(self.device)
        self.theta0 = self.method.checkpoint_state()
        self.autocast = autocast_for(cfg.train.precision, self.device)
        tc = cfg.train
        self.data = EvalData(task, clip.preprocess_val, tc.eval_batch_size, tc.num_workers)
        id_task = dataclasses.replace(task, evalsets=[es for es in task.evalsets if es.role == "id_val"])
        self.id_data = EvalData(id_task, clip.preprocess_val, tc.eval_batch_size, tc.num_workers)

    def load(self, path: Path) -> tuple[dict, int]:
        final = torch.load(path, map_location=self.device, weights_only=True)
        return final["method"], int(final["step"])

    def rows(self, state: dict, step: int, variant: str) -> list[dict]:
        from bench.evaluate import evaluate

        self.method.load_checkpoint_state(state)
        return [{**row, "variant": variant} for row in evaluate(self.method, self.data, step, self.device,
                                                                 self.autocast)]

    def score(self, state: dict) -> float:
        """Mean accuracy over the id_val sets (the collector's `id`)."""
        from bench.evaluate import evaluate

        self.method.load_checkpoint_state(state)
        accs = [r["value"] for r in evaluate(self.method, self.id_data, 0, self.device, self.autocast)
                if r["metric"] == "acc" and r["role"] == "id_val"]
        if not accs:
            raise BenchError("the task has no ID validation set (role id_val); a combiner cannot choose without one")
        return sum(accs) / len(accs)

    def close(self) -> None:
        self.data.close()
        self.id_data.close()


def _check_finished(run_dir: Path) -> None:
    if not (run_dir / results.DONE).is_file() or not (run_dir / results.FINAL).is_file():
        raise BenchError(f"{run_dir}: not a finished run with saved weights (final.pt); run it to the end first "
                         f"(with train.save_final: true)")


def apply_to_run(combiner: Combiner, run_dir: str | Path, device: str = "cpu") -> int:
    """A per-run combiner (WiSE-FT) on one finished run: its variants' rows replace earlier rows of the same
    variants in the run's results.jsonl. Returns the number of rows written."""
    run_dir = Path(run_dir)
    _check_finished(run_dir)
    record = json.loads((run_dir / results.CONFIG).read_text())
    ev = _Evaluator(run_dir, record, device)
    try:
        state, step = ev.load(run_dir / results.FINAL)
        member = Member(str(record.get("job_id") or run_dir.name), run_dir, state, step, record)
        rows: list[dict] = []
        for out in combiner.combine(Context(ev.theta0, [member], ev.score)):
            rows += ev.rows(out.state, step, out.variant)
    finally:
        ev.close()
    names = set(combiner.variants())
    kept = [r for r in results.read_rows(run_dir / results.RESULTS) if r.get("variant") not in names]
    results.atomic_write_text(run_dir / results.RESULTS, "".join(json.dumps(r) + "\n" for r in kept + rows))
    log.info("%s: wrote %d %s rows", run_dir, len(rows), combiner.name)
    return len(rows)


def combined_job_id(combiner: Combiner, member_ids: list[str]) -> str:
    return config.stable_hash({"combiner": combiner.name, "options": config.to_dict(combiner.options),
                          "members": sorted(member_ids), "protocol_version": config.PROTOCOL_VERSION})


def combine_group(combiner: Combiner, runs: list[tuple[Path, dict]], out: str | Path, group_by: str = "method",
                  device: str = "cpu") -> Path:
    """One multi-run combiner on one group of runs (one task): a new run folder <out>/<job id>, done."""

    runs = sorted(runs, key=lambda r: str(r[1].get("job_id")))
    ids = [str(rec.get("job_id")) for _, rec in runs]
    if len(set(group_key(rec, group_by) for _, rec in runs)) != 1:
        raise BenchError(f"runs {', '.join(ids)} are not one task (group-by {group_by}); combine runs of one "
                         f"method, dataset, held-out set and trial seed")
    job_id = combined_job_id(combiner, ids)
    folder = Path(out) / job_id
    if (folder / results.DONE).is_file():
        log.info("%s is done already", folder)
        return folder
    first_dir, first = runs[0]
    ev = _Evaluator(first_dir, first, device)
    try:
        members = []
        for run_dir, rec in runs:
            state, step = ev.load(run_dir / results.FINAL)
            members.append(Member(str(rec.get("job_id")), run_dir, state, step, rec))
        step = max(m.step for m in members)
        rows: list[dict] = []
        variants: dict[str, dict] = {}
        for made in combiner.combine(Context(ev.theta0, members, ev.score)):
            rows += ev.rows(made.state, step, made.variant)
            variants[made.variant] = {"members": made.members, **made.info}
    finally:
        ev.close()
    record = {"job_id": job_id, "config": first["config"], "hparams": first.get("hparams") or {},
              "seed": first.get("seed"), "protocol_version": config.PROTOCOL_VERSION, **results.versions(),
              **({"baseline": first["baseline"]} if "baseline" in first else {}),  # older members: collect's fallback
              "combined": {"combiner": combiner.name, "options": config.to_dict(combiner.options), "group_by": group_by,
                           "members": [{"job_id": m.job_id, "run_dir": str(m.run_dir), "step": m.step,
                                        "hparams": m.record.get("hparams") or {},
                                        "seed_offset": m.record["config"].get("train", {}).get("seed_offset", 0)}
                                       for m in members],
                           "variants": variants}}
    folder.mkdir(parents=True, exist_ok=True)
    results.atomic_write_text(folder / results.CONFIG, json.dumps(record, indent=2, sort_keys=True))
    results.atomic_write_text(folder / results.RESULTS, "".join(json.dumps(r) + "\n" for r in rows))
    results.atomic_write_text(folder / results.DONE, "")
    log.info("%s: %s of %d runs (%s)", folder, combiner.name, len(members), ", ".join(variants))
    return folder


def combine_runs(root: str | Path, combiner: Combiner, out: str | Path | None = None, group_by: str = "method",
                 methods: Iterable[str] = (), device: str = "cpu") -> list[Path]:
    """Every group of done runs under root (bench combine). Per-run combiners write into each run; the others
    write one folder per group under `out` (default <root>/combined). Returns the folders written to."""
    runs = find_runs(root, methods)
    if not runs:
        raise BenchError(f"{root}: no finished runs with saved weights (final.pt) to combine"
                         f"{' for method ' + ', '.join(sorted(set(methods))) if methods else ''}; run a sweep first")
    if combiner.per_run:
        for run_dir, _ in runs:
            apply_to_run(combiner, run_dir, device)
        return [run_dir for run_dir, _ in runs]
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for run_dir, rec in runs:
        groups.setdefault(group_key(rec, group_by), []).append((run_dir, rec))
    out = Path(out) if out else Path(root) / COMBINED_DIR
    written, small = [], []
    for key in sorted(groups, key=lambda k: min(str(r.get("job_id")) for _, r in groups[k])):
        members = groups[key]
        if len(members) < combiner.min_members:
            small.append(", ".join(str(r.get("job_id")) for _, r in members))
            continue
        written.append(combine_group(combiner, members, out, group_by, device))
    for ids in small:
        log.warning("%s needs at least %d runs of a task; skipped the group of %s", combiner.name,
                    combiner.min_members, ids)
    if not written:
        raise BenchError(f"{root}: no task has {combiner.min_members} finished runs to combine with "
                         f"{combiner.name} (group-by {group_by}); train more seeds (train.seed_offset, "
                         f"sweeps/embedded_soups.yaml)")
    return written

"""Collecting run folders: discovery, job records and states, result rows, and what a collection holds.

    coll = load(root)                        every run folder under root: jobs (one row each), result rows of done jobs

Parsed result rows are kept in <root>/.bench-table-cache.npz (bench.table_cache): a later call parses only the
results files whose size or modification time changed. Model selection over a collection and the aggregation over
trial seeds: bench.model_selection; the metrics: bench.metrics.

Only `done` jobs count; the other jobs of a cell are named, with their states, in the notes (bench/tables.py
writes them).

Held-out sets. A run holds out `config.data.test_domains`. For a dataset, a held-out set is *primary*
(it gets table columns) unless the dataset also has held-out sets one domain smaller: DomainBed's pair runs
{a, b} next to its single-domain runs exist only for leave-one-domain-out selection. So single-domain runs
(DomainBed), single-source runs holding out every other domain, and ImageNet-style runs holding out all
shift sets at once are all primary, with no per-dataset code.

This module imports no torch: `bench table` over 10,000 jobs must start fast.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import jobs as job_states
from bench import metrics
from bench import results
from bench import table_cache
from bench.cards import card_file, read_ood_averages
from bench.config import NOT_IDENTITY
from bench.errors import BenchError

log = logging.getLogger(__name__)

CONFIG, RESULTS, DONE = results.CONFIG, results.RESULTS, results.DONE
# a folder holding any of these is a run
RUN_FILES = {CONFIG, RESULTS, DONE, job_states.FAILED, job_states.HEARTBEAT, job_states.SUBMITTED}


def _card_averages(dataset: str) -> dict | None:
    """`ood_averages` of a dataset's card (name -> shift sets; bench.cards.read_ood_averages); None if it has
    none."""
    path = card_file(dataset)
    try:
        return read_ood_averages(path)
    except Exception as err:  # no card (a fixture's dataset) or a broken one: bench.cards.load_card reports those
        log.debug("%s: no card averages (%s)", path, err)
        return None


# ---------------------------------------------------------------------------------------------- job states

def job_state(run_dir: str | Path, names: set[str] | None = None) -> str:
    """bench.jobs' state of a run folder (missing | submitted | running | stale | done | failed); `names`, its
    file names when the caller has listed them already, saves listing it again."""
    if names is None:
        return job_states.job_state(run_dir)
    return job_states.state_of(Path(run_dir), names)


# ---------------------------------------------------------------------------------------------- loading

def find_run_dirs(root: str | Path) -> list[tuple[str, set[str]]]:
    """Every folder under root (as a path string) holding a run file (config, results or a state marker), with
    its file names. Hidden folders are skipped; a run folder's subfolders are not searched."""
    found, stack = [], [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        names = {e.name for e in entries}
        if names & RUN_FILES:
            found.append((folder, names))
            continue
        stack.extend(e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    found.sort(key=lambda x: x[0])
    return found



def _not_hp() -> dict:
    """Config keys that do not make a hyperparameter setting: the held-out set, the trial seed, the given hparams
    (the resolved ones stand in) and every key left out of a job's identity (bench.config.NOT_IDENTITY).
    section -> None (the whole section) or the set of its keys left out."""
    out: dict = {"data": {"test_domains"}, "trial_seed": None, "hparams": None}
    for path in NOT_IDENTITY:
        if len(path) == 1:
            out[path[0]] = None
        else:
            out.setdefault(path[0], set()).add(path[1])
    return out


_NOT_HP = _not_hp()


def _hp_key(config: dict, hparams: dict) -> str:
    """What a run computes, less its held-out set and trial seed: runs with equal keys are one hyperparameter
    setting (DomainBed's hparams_seed). The keys left out are the held-out set, the trial seed, the given
    hparams (the resolved ones stand in) and bench.config's keys that are not part of a job's identity."""
    d = {}
    for key, value in config.items():
        drop = _NOT_HP.get(key, ())
        if drop is None:
            continue
        d[key] = {k: v for k, v in value.items() if k not in drop} if drop and isinstance(value, dict) else value
    if isinstance(d.get("train"), dict) and not d["train"].get("seed_offset"):  # 0 = absent (configs before it)
        d["train"] = {k: v for k, v in d["train"].items() if k != "seed_offset"}
    d["resolved_hparams"] = hparams
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_label(data: dict) -> str:
    """The collector's name of a run's dataset: the card, and the class split when it is not the card's own
    (`pacs:base_to_novel`), so that runs on other classes never share a table cell or a model selection."""
    classes = data.get("classes") or "card"
    return data["dataset"] if classes == "card" else f"{data['dataset']}:{classes}"


def set_key(domains) -> str:
    """A held-out set as one string: its domains, sorted, joined by '+'."""
    return "+".join(sorted(domains))


@dataclass
class Collection:
    """Everything under a results folder.

    jobs: one row per job folder: job (index), job_id, path, state, method, dataset, test_set (set_key),
          test_domains (tuple, config order), n_test, trial_seed, hp, protocol, primary (bool), config, hparams,
          baseline (the record's: Method.baseline, NaN if none; see record_baseline)
    rows: result rows of done jobs, deduplicated (a requeued job's repeated rows count once, the last kept):
          job, variant ('' = the method itself), step, role, domain, split, metric, value, n
    problems: notes on folders that are not jobs of any cell (no or unreadable config.json)
    """

    root: Path
    jobs: pd.DataFrame
    rows: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)  # file:line of corrupt results lines
    primary_sets: dict[str, list[str]] = field(default_factory=dict)  # dataset -> primary held-out sets
    seeds: dict[str, list[int]] = field(default_factory=dict)  # dataset -> trial seeds seen
    domains: dict[str, list[str]] = field(default_factory=dict)  # dataset -> domains, in evaluation order
    duplicates: int = 0
    _suites: dict = field(default_factory=dict, repr=False)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.jobs["dataset"].dropna().unique()) if len(self.jobs) else []

    def suite(self, dataset: str) -> dict | None:
        """The shift suite of a dataset: its card's `ood_averages` (protocol: shift cards) if it has them, else
        the metrics.SHIFT_SUITES entry its held-out domains belong to; None for DomainBed-style datasets."""
        if dataset not in self._suites:
            held = {d for s in self.primary_sets.get(dataset, []) for d in s.split("+")}
            found = None
            card = _card_averages(dataset)
            if card:
                found = {"sets": tuple(dict.fromkeys(d for sets in card.values() for d in sets)),
                         "averages": {name: (metrics.SUITE_AVERAGES.get(name, (name,))[0], tuple(sets))
                                      for name, sets in card.items()}}
            else:
                found = next((spec for spec in metrics.SHIFT_SUITES.values() if held & set(spec["sets"])), None)
            self._suites[dataset] = found
        return self._suites[dataset]


def load(root: str | Path, datasets: list[str] | None = None, cache: bool = True) -> Collection:
    """Every run folder under `root`; result rows are read for done jobs only (only they count).

    cache: keep the parsed rows in <root>/.bench-table-cache.npz, so a later call parses only the results
    files that changed (size or modification time) since."""
    root = Path(root)
    if not root.exists():
        raise BenchError(f"{root}: no such folder; give the results folder with --runs (e.g. runs/quickstart)")
    jobs, problems, done, skipped = [], [], [], []
    for run_dir, names in find_run_dirs(root):
        state = job_state(run_dir, names)
        rec = None
        if CONFIG in names:
            try:
                with open(os.path.join(run_dir, CONFIG), "rb") as f:
                    rec = json.loads(f.read())
                cfg = rec["config"]
                method, dataset = cfg["method"], dataset_label(cfg["data"])
                test_domains = tuple(cfg["data"]["test_domains"])
                trial_seed = int(cfg.get("trial_seed", 0))
                baseline = record_baseline(rec, method)
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("%s: unreadable run config (%s); the folder is left out",
                            os.path.join(run_dir, CONFIG), err)
                problems.append(f"{run_dir}: unreadable config.json ({state}); left out")
                continue
        if rec is None:
            problems.append(f"{os.path.basename(run_dir)}: {state}, no config.json yet, so not counted in any cell")
            continue
        if datasets and dataset not in datasets:
            continue
        j = len(jobs)
        hparams = rec.get("hparams") or {}
        jobs.append((j, str(rec.get("job_id") or os.path.basename(run_dir)), run_dir, state, method, dataset,
                     set_key(test_domains), test_domains, len(set(test_domains)), trial_seed,
                     _hp_key(cfg, hparams), rec.get("protocol_version"), cfg, hparams, baseline))
        if state == "done":
            done.append((j, run_dir))
    jobs_df = pd.DataFrame(jobs, columns=["job", "job_id", "path", "state", "method", "dataset", "test_set",
                                          "test_domains", "n_test", "trial_seed", "hp", "protocol", "config",
                                          "hparams", "baseline"])
    jobs_df = _drop_copies(jobs_df, problems)
    keep = set(jobs_df.loc[jobs_df["state"] == "done", "job"])
    # a --dataset filter reads from the cache but does not rewrite it (it would drop the other datasets' files)
    rows_df = table_cache.load_rows(root, [(j, d) for j, d in done if j in keep], skipped, cache, write=not datasets)
    dup = _duplicated(rows_df)
    n_dup = int(dup.sum())
    if n_dup:
        rows_df = rows_df[~dup].reset_index(drop=True)
    coll = Collection(root, jobs_df, rows_df, problems, skipped)
    coll.duplicates = n_dup
    _index_datasets(coll)
    return coll


def _duplicated(rows: pd.DataFrame) -> np.ndarray:
    """Rows repeated (same job, variant, step, role, domain, split, metric) but for the last: one int64 key per
    row when the codes fit (fast on millions of rows), else pandas on the seven columns."""
    cols = ["job", "variant", "step", "role", "domain", "split", "metric"]
    codes = [pd.factorize(rows[c].to_numpy())[0] if c in ("job", "step") else rows[c].cat.codes.to_numpy() + 1
             for c in cols]
    dims = [int(c.max()) + 1 if len(c) else 1 for c in codes]
    if math.prod(dims) >= 2**62:
        return rows.duplicated(cols, keep="last").to_numpy()
    key = np.ravel_multi_index([c.astype(np.int64) for c in codes], dims)
    return pd.Series(key).duplicated(keep="last").to_numpy()


def _drop_copies(jobs: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """The same job id in two folders (a copied run): keep one, the done one if any."""
    if not len(jobs) or not jobs["job_id"].duplicated().any():
        return jobs
    order = jobs.assign(_rank=(jobs["state"] != "done").astype(int)).sort_values(["_rank", "path"], kind="stable")
    dropped = order[order["job_id"].duplicated()]
    for _, r in dropped.iterrows():
        problems.append(f"{r['path']}: job {r['job_id']} has another folder; this copy is left out")
    return jobs[~jobs["job"].isin(dropped["job"])]


def _index_datasets(coll: Collection) -> None:
    """Per dataset: the primary held-out sets, the trial seeds and the domains trained on or held out (in
    evaluation order; not an ID test set such as ImageNet val)."""
    jobs = coll.jobs
    for ds, g in jobs.groupby("dataset", sort=True):
        sets = {s: frozenset(s.split("+")) for s in g["test_set"].unique()}
        sizes = {len(dom) for dom in sets.values()}
        primary = sorted(s for s, dom in sets.items() if len(dom) - 1 not in sizes or len(dom) == 1)
        coll.primary_sets[ds] = primary
        coll.seeds[ds] = sorted(int(s) for s in g["trial_seed"].unique())
    jobs["primary"] = [t in coll.primary_sets.get(ds, ()) for ds, t in zip(jobs["dataset"], jobs["test_set"])]
    rows = coll.rows
    if len(rows):
        acc = rows[(rows["metric"] == "acc") & rows["role"].isin(["id_val", "ood", "ood_val"])]
        ds_of = jobs.set_index("job")["dataset"]
        seen = pd.DataFrame({"dataset": ds_of.reindex(acc["job"].to_numpy()).to_numpy(),
                             "domain": acc["domain"].astype(object).to_numpy()}).dropna().drop_duplicates()
        for ds, g in seen.groupby("dataset", sort=False):
            coll.domains[ds] = list(g["domain"])  # first appearance = the card's order (the trainer's eval order)
    for ds, spec in ((d, coll.suite(d)) for d in coll.primary_sets):
        doms = coll.domains.setdefault(ds, [])
        for d in sorted({d for s in coll.primary_sets[ds] for d in s.split("+")} - set(doms)):
            doms.append(d)
        if spec:  # a suite's sets in its own order
            order = {d: i for i, d in enumerate(spec["sets"])}
            doms.sort(key=lambda d: order.get(d, len(order)))

# ---------------------------------------------------------------------------------------------- baselines

# Methods whose records predate the "baseline" key of config.json (issue 13): the values their classes declare.
LEGACY_BASELINES = {"zeroshot": 0, "erm": 1}


def record_baseline(rec: dict, method: str) -> int | None:
    """A run's baseline rank (Method.baseline, recorded by bench.results.config_record): None if it is no baseline.
    Records written before the key existed get LEGACY_BASELINES' value of their method."""
    if "baseline" not in rec:
        return LEGACY_BASELINES.get(method)
    return None if rec["baseline"] is None else int(rec["baseline"])


def baselines(coll: Collection) -> dict[str, int]:
    """Method -> baseline rank, for the methods some of whose runs record one (the lowest if they disagree)."""
    b = coll.jobs.dropna(subset=["baseline"])
    return {m: int(v) for m, v in b.groupby("method")["baseline"].min().items()}


def method_order(method: str, ranks: dict[str, int]) -> tuple:
    """Sort key of a method's rows (ranks: `baselines(coll)`): baselines first, in their rank's order, then the
    other methods by name. A post-hoc variant row ("erm+wise:0.5") is no baseline; it follows its method."""
    rank = ranks.get(method)
    return (0, rank, method) if rank is not None else (1, 0, method)


def reference_method(ranks: dict[str, int]) -> str | None:
    """The method of rank 0, the zero-shot model (plots draw it as the reference point); the first by name if
    several are."""
    return min((m for m, r in ranks.items() if r == 0), default=None)


# ---------------------------------------------------------------------------------------------- costs

def job_costs(coll: Collection) -> pd.DataFrame:
    """Per done job: train steps, train seconds (step_time x steps), mean step time, peak memory (MB), and
    evaluation seconds (the eval_time rows; NaN for runs written before they were logged)."""
    rows = coll.rows
    tr = rows[(rows["role"] == "train") & (rows["variant"] == "")]
    st = tr[tr["metric"] == "step_time"]
    sec = (st["value"] * st["n"].fillna(0)).groupby(st["job"]).sum()
    n = st["n"].fillna(0).groupby(st["job"]).sum()
    mem = tr.loc[tr["metric"] == "peak_mem_mb", "value"].groupby(tr.loc[tr["metric"] == "peak_mem_mb", "job"]).max()
    ev = tr[tr["metric"] == "eval_time"]
    eval_sec = ev["value"].groupby(ev["job"]).sum()
    done = coll.jobs[coll.jobs["state"] == "done"].set_index("job")[["method", "dataset"]]
    out = done.assign(steps=n.reindex(done.index).fillna(0), seconds=sec.reindex(done.index).fillna(0),
                      peak_mem_mb=mem.reindex(done.index), eval_seconds=eval_sec.reindex(done.index))
    return out.reset_index()


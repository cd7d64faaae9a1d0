"""Collecting run folders: discovery, loading, job states, and DomainBed's three model-selection rules.

    coll = load(root)                        every run folder under root: jobs (one row each), result rows of done jobs
    chosen = select(coll, rule)              one chosen (run, step) per (row, dataset, held-out set, trial seed)
    values = chosen_values(coll, chosen)     id, id_test, zs_avg, ood:<domain>, ece_id, ece_ood:<domain>, ... at
                                             each chosen (run, step)
    per_seed(coll, values, metric, dataset)  a metric per (row, trial seed): what a cell's mean ± SE is over

Parsed result rows are kept in <root>/.bench-table-cache.npz (numpy arrays and JSON; no pickle): a later call
parses only the results files whose size or modification time changed.

A table row is a (method, variant) pair: rows without a `variant` key are the method itself ("erm"),
rows with one are e.g. post-hoc WiSE-FT of the same job ("erm+wise:0.5"). Only `done` jobs count;
the other jobs of a cell are named, with their states, in the notes (bench/tables.py prints them).

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
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import jobs as job_states
from bench import results
from bench.cards import card_file, read_ood_averages
from bench.config import NOT_IDENTITY
from bench.errors import BenchError

log = logging.getLogger(__name__)

CONFIG, RESULTS, DONE = results.CONFIG, results.RESULTS, results.DONE
# a folder holding any of these is a run
RUN_FILES = {CONFIG, RESULTS, DONE, job_states.FAILED, job_states.HEARTBEAT, job_states.SUBMITTED}

# ImageNet-style benchmarks: one run holds out several shift sets at once. Per-set numbers are always kept;
# these are the averages each suite reports (data, not code: add a suite here).
SHIFT_SUITES: dict[str, dict] = {
    "imagenet": {
        "sets": ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"),
        "averages": {  # metric name -> (column label, shift sets averaged)
            "ood_avg4": ("Avg (4)", ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a")),
            "ood_avg5": ("Avg (5)", ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet")),
        },
    },
}
SUITE_AVERAGES = {name: spec for suite in SHIFT_SUITES.values() for name, spec in suite["averages"].items()}

SELECTIONS = {
    "train_val": ("training-domain validation (DomainBed): per run the checkpoint with the best mean accuracy "
                  "on the training domains' 20 % held-out split (early stopping allowed), then the "
                  "hyperparameters with the best such accuracy"),
    "lodo": ("leave-one-domain-out cross-validation (DomainBed): per checkpoint step, the mean accuracy on each "
             "training domain v of the run that also held out v; the best step, then the best hyperparameters"),
    "oracle": ("test-domain validation, the oracle (DomainBed): the last checkpoint of each run; the hyperparameters "
               "with the best accuracy on the held-out domains' 20 % split"),
}

METRICS = {
    "id": "ID accuracy: the training domains' 20 % held-out split",
    "id_test": "ID test accuracy (e.g. ImageNet val: protocol shift cards; never used to select)",
    "ood_avg": "OOD accuracy: mean over held-out domains",
    "ood": "OOD accuracy per held-out domain (one table per dataset)",
    "zs_avg": "zero-shot accuracy on the unseen classes, mean over domains",
    "hm": "harmonic mean of ID (base classes) and zero-shot (novel classes) accuracy, per trial seed (CoCoOp)",
    "xd": "cross-dataset zero-shot accuracy per suite dataset (one table per fine-tuning dataset)",
    "xd_avg": ("cross-dataset zero-shot accuracy: mean over the zero-shot suite's datasets (data.zeroshot_suite; "
               "never used to select)"),
    **{name: f"OOD accuracy: mean over {', '.join(sets)}" for name, (_, sets) in SUITE_AVERAGES.items()},
    # beyond accuracy (bench.calibration; issue 11): at the checkpoint selected on accuracy, as every column
    "worst_ood": "worst held-out domain accuracy, per trial seed (DomainBed-style worst case)",
    "hm_id_ood": "harmonic mean of ID accuracy and OOD accuracy (mean over held-out domains), per trial seed",
    "ece_id": "ID expected calibration error (15 equal-width bins of top-1 confidence, as torchmetrics), mean over "
              "the training domains' held-out splits",
    "ece_ood": "OOD expected calibration error (15 bins, as torchmetrics), mean over held-out domains",
    "ece_ts_id": "ID ECE after temperature scaling (T fitted on the ID validation split only), mean over domains",
    "ece_ts_ood": "OOD ECE after temperature scaling (T fitted on the ID validation split only), mean over held-out "
                  "domains",
    "nll_id": "ID negative log-likelihood (nats, not %), mean over domains",
    "nll_ood": "OOD negative log-likelihood (nats, not %), mean over held-out domains",
    "macro_f1_id": "ID macro-F1 over the classes present (cards with metrics: [macro_f1]), mean over domains",
    "macro_f1_ood": "OOD macro-F1 over the classes present (cards with metrics: [macro_f1]), mean over held-out domains",
}
EXTRA_METRICS = ("ece", "ece_ts", "nll", "macro_f1")  # per-set rows beyond acc that get _id and _ood columns
NATS = ("nll_id", "nll_ood")  # shown as they are (nats), not as percentages


def _card_averages(dataset: str) -> dict | None:
    """`ood_averages` of a dataset's card (name -> shift sets; bench.cards.read_ood_averages); None if it has
    none."""
    path = card_file(dataset)
    try:
        return read_ood_averages(path)
    except Exception as err:  # no card (a fixture's dataset) or a broken one: bench.cards.load_card reports those
        log.debug("%s: no card averages (%s)", path, err)
        return None


# Column headers when a table shows several metrics side by side (--metric id,ood_avg,zs_avg).
METRIC_HEADERS = {"id": "ID", "id_test": "ID test", "ood_avg": "OOD avg", "zs_avg": "zero-shot", "hm": "HM",
                  "xd_avg": "zero-shot (cross-dataset)", "worst_ood": "OOD worst", "hm_id_ood": "HM (ID, OOD)",
                  "ece_id": "ID ECE", "ece_ood": "OOD ECE", "ece_ts_id": "ID ECE (TS)", "ece_ts_ood": "OOD ECE (TS)",
                  "nll_id": "ID NLL", "nll_ood": "OOD NLL", "macro_f1_id": "ID macro-F1", "macro_f1_ood": "OOD macro-F1",
                  **{name: f"OOD {label.lower()}" for name, (label, _) in SUITE_AVERAGES.items()}}


def check_metric(metric: str) -> list[str]:
    """A metric, or several separated by commas (one table, a column each); returns them as a list."""
    names = [m.strip() for m in metric.split(",")]
    for m in names:
        if not (m in METRICS or (m.startswith(("ood:", "xd:")) and len(m) > 3 + 1)):
            raise BenchError(f"--metric: unknown metric {m!r}; choose one of {', '.join(METRICS)}, ood:<domain> or "
                             f"xd:<zero-shot suite dataset> "
                             f"(or several, comma-separated: id,ood_avg,zs_avg)")
    for wide in ("ood", "xd"):
        if len(names) > 1 and wide in names:
            raise BenchError(f"--metric: {wide} (a table per dataset, a column per "
                             f"{'held-out domain' if wide == 'ood' else 'suite dataset'}) cannot be combined with "
                             f"other metrics; ask for it alone")
    if len(set(names)) != len(names):
        raise BenchError(f"--metric: {metric!r} names a metric twice; name each once")
    return names


def check_selection(rule: str) -> str:
    if rule not in SELECTIONS:
        raise BenchError(f"--selection: unknown rule {rule!r}; choose one of {', '.join(SELECTIONS)}")
    return rule


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


def read_results(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Rows of a results file. Fast path: the whole file parsed as one JSON array; any doubt (a corrupt,
    truncated or blank line, a non-object) falls back to the line-by-line reader, which warns."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    try:
        body = data.decode("utf-8").strip()
        if not body:
            return []
        rows = json.loads("[" + body.replace("\n", ",") + "]")  # raw newlines never occur inside JSON strings
        if set(map(type, rows)) == {dict}:
            return rows
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        pass
    return results.read_rows(path, skipped)


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
        the SHIFT_SUITES entry its held-out domains belong to; None for DomainBed-style datasets."""
        if dataset not in self._suites:
            held = {d for s in self.primary_sets.get(dataset, []) for d in s.split("+")}
            found = None
            card = _card_averages(dataset)
            if card:
                found = {"sets": tuple(dict.fromkeys(d for sets in card.values() for d in sets)),
                         "averages": {name: (SUITE_AVERAGES.get(name, (name,))[0], tuple(sets))
                                      for name, sets in card.items()}}
            else:
                found = next((spec for spec in SHIFT_SUITES.values() if held & set(spec["sets"])), None)
            self._suites[dataset] = found
        return self._suites[dataset]


# ---------------------------------------------------------------------------------------------- result rows

TEXT_COLS = ("role", "domain", "split", "metric", "variant")
CACHE = ".bench-table-cache.npz"  # in the results folder; a hidden file, so no scan ever reads it as a run
CACHE_VERSION = 1


class _Parsed:
    """Rows of freshly read results files, as columns."""

    def __init__(self):
        self.rows: list[dict] = []
        self.files: list[tuple[str, int, int, int, list[str]]] = []  # (key, size, mtime_ns, rows, skipped lines)

    def add(self, key: str, path: str, size: int, mtime_ns: int) -> None:
        skipped: list[str] = []
        rows = read_results(path, skipped)
        self.rows += rows
        self.files.append((key, size, mtime_ns, len(rows), skipped))

    def column(self, key: str) -> list:
        try:
            return list(map(operator.itemgetter(key), self.rows))  # C speed; a row without the key raises
        except KeyError:
            return list(map(operator.methodcaller("get", key), self.rows))

    def columns(self) -> dict[str, np.ndarray | tuple[np.ndarray, list]]:
        """Numeric columns as arrays; text columns as (int32 codes, -1 = null; their strings)."""
        out = {"step": _numeric(self.column("step"), np.int64, -1), "value": _numeric(self.column("value"), np.float64,
               np.nan), "n": _numeric(self.column("n"), np.float64, np.nan)}
        for name in TEXT_COLS:
            codes, uniques = pd.factorize(np.array(self.column(name), dtype=object))
            out[name] = (codes.astype(np.int32), [str(u) for u in uniques])
        return out


def _numeric(values, dtype, fill) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)
    except (TypeError, ValueError):  # a null or a string in a numeric field
        num = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        return num.fillna(fill).to_numpy(dtype=dtype)


def _read_cache(root: Path) -> tuple[dict, dict] | None:
    """(meta, arrays) of the results cache of a folder, or None. No pickle: numpy arrays and a JSON string."""
    path = root / CACHE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != CACHE_VERSION:
                return None
            arrays = {k: z[k] for k in ("step", "value", "n", *TEXT_COLS)}
        return meta, arrays
    except Exception as err:  # a cache is never worth an error: read the files instead
        log.debug("%s: unreadable cache (%s); ignored", path, err)
        return None


def _write_cache(root: Path, files: list, arrays: dict, strings: dict) -> None:
    meta = {"version": CACHE_VERSION, "files": files, "strings": strings}
    try:
        results.atomic_write(root / CACHE, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    except OSError as err:  # a read-only results folder: no cache, same table
        log.debug("%s: cache not written (%s)", root, err)


def _load_rows(root: Path, done: list[tuple[int, str]], skipped: list[str], use_cache: bool,
               write: bool = True) -> pd.DataFrame:
    """The result rows of done jobs [(job index, run folder)]. Files unchanged since the last call (same size
    and modification time) come from the folder's cache; the others are parsed, and the cache is rewritten."""
    cached = _read_cache(root) if use_cache else None
    cfiles = {f[0]: f for f in cached[0]["files"]} if cached else {}  # key -> [key, size, mtime, start, count, skipped]
    fresh = _Parsed()
    hits, misses = [], []  # (job, cache entry), (job, fresh row count)
    prefix = len(str(root).rstrip(os.sep)) + 1
    for j, run_dir in done:
        key = run_dir[prefix:]  # the folder relative to root (find_run_dirs joins onto str(root))
        try:
            st = os.stat(os.path.join(run_dir, RESULTS))
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        hit = cfiles.get(key)
        if hit and hit[1] == size and hit[2] == mtime:
            hits.append((j, hit))
            for where in hit[5]:
                log.warning("%s: skipping a corrupt results line", where)
            skipped += hit[5]
        else:
            fresh.add(key, os.path.join(run_dir, RESULTS), size, mtime)
            misses.append((j, fresh.files[-1][3]))
            skipped += fresh.files[-1][4]
    fcols = fresh.columns()
    strings: dict[str, list[str]] = {c: [""] if c == "variant" else [] for c in TEXT_COLS}
    index = {c: {t: i for i, t in enumerate(strings[c])} for c in TEXT_COLS}

    def remap(col: str, codes: np.ndarray, table: list[str]) -> np.ndarray:
        """Codes into `table` -> codes into the combined table (-1, null, stays -1)."""
        lut = np.full(len(table) + 1, -1, dtype=np.int32)
        for i, text in enumerate(table):
            lut[i] = index[col].setdefault(text, len(strings[col]))
            if lut[i] == len(strings[col]):
                strings[col].append(text)
        return lut[codes]

    take = (np.concatenate([np.arange(h[3], h[3] + h[4], dtype=np.int64) for _, h in hits])
            if hits else np.zeros(0, dtype=np.int64))
    out = {}
    for col in ("step", "value", "n"):
        old = cached[1][col][take].astype(fcols[col].dtype) if hits else fcols[col][:0]
        out[col] = np.concatenate([old, fcols[col]])
    for col in TEXT_COLS:
        old = remap(col, cached[1][col][take], cached[0]["strings"][col]) if hits else np.zeros(0, dtype=np.int32)
        out[col] = np.concatenate([old, remap(col, *fcols[col])])
    counts = [h[4] for _, h in hits] + [n for _, n in misses]
    job = np.repeat(np.array([j for j, _ in hits + misses], dtype=np.int64), counts)
    if use_cache and write and (misses or len(hits) != len(cfiles)):
        entries = [h[:3] + [h[5]] for _, h in hits] + [[k, sz, mt, sk] for k, sz, mt, _, sk in fresh.files]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        files = [[k, sz, mt, int(starts[i]), int(counts[i]), sk] for i, (k, sz, mt, sk) in enumerate(entries)]
        _write_cache(root, files, out, strings)
    variant = np.where(out["variant"] < 0, 0, out["variant"])  # no variant key = "" (the method itself)
    frame = {"job": job, "variant": pd.Categorical.from_codes(variant, strings["variant"]), "step": out["step"]}
    for col in ("role", "domain", "split", "metric"):
        frame[col] = pd.Categorical.from_codes(out[col], strings[col])
    frame["value"], frame["n"] = out["value"], out["n"]
    return pd.DataFrame(frame)


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
    rows_df = _load_rows(root, [(j, d) for j, d in done if j in keep], skipped, cache, write=not datasets)
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


# ---------------------------------------------------------------------------------------------- selection

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


def label_of(method: str, variant: str) -> str:
    return method if not variant else f"{method}+{variant}"


@dataclass
class Units:
    """A unit is one (job, variant): the thing selection picks. Per unit and step: the role means."""

    table: pd.DataFrame  # unit -> job, variant, label, method, dataset, test_set, trial_seed, hp, job_id, primary
    steps: pd.DataFrame  # unit, step, id_val, id_test, ood_val, zeroshot, zeroshot_xd (means over domains)
    ood: pd.DataFrame  # unit, step, domain, value (acc of role ood)
    xd: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["unit", "step", "domain", "value"]))
    extra: pd.DataFrame = field(  # EXTRA_METRICS rows of roles id_val and ood: unit, step, role, domain, metric, value
        default_factory=lambda: pd.DataFrame(columns=["unit", "step", "role", "domain", "metric", "value"]))


def units(coll: Collection) -> Units:
    rows = coll.rows
    acc = rows[rows["metric"] == "acc"]
    pairs = acc[["job", "variant"]].drop_duplicates().sort_values(["job", "variant"]).reset_index(drop=True)
    pairs["unit"] = np.arange(len(pairs))
    jobs = coll.jobs.set_index("job")
    table = pairs.join(jobs[["job_id", "method", "dataset", "test_set", "trial_seed", "hp", "primary"]], on="job")
    table["variant"] = table["variant"].astype(str)
    table["label"] = [label_of(m, v) for m, v in zip(table["method"], table["variant"])]
    unit_of = acc[["job", "variant"]].merge(pairs, on=["job", "variant"], how="left")["unit"].to_numpy()
    acc = acc.assign(unit=unit_of)
    means = acc.groupby(["unit", "step", "role"], observed=True)["value"].mean().unstack("role")
    for role in ("id_val", "id_test", "ood_val", "zeroshot", "zeroshot_xd", "ood"):
        if role not in means:
            means[role] = np.nan
    steps = means[["id_val", "id_test", "ood_val", "zeroshot", "zeroshot_xd"]].reset_index()
    per_domain = []
    for role in ("ood", "zeroshot_xd"):
        part = acc.loc[acc["role"] == role, ["unit", "step", "domain", "value"]].copy()
        part["domain"] = part["domain"].astype(str)
        per_domain.append(part.reset_index(drop=True))
    ex = rows[rows["metric"].isin(EXTRA_METRICS) & rows["role"].isin(["id_val", "ood"])]
    ex = ex[["job", "variant", "step", "role", "domain", "metric", "value"]].merge(pairs, on=["job", "variant"])
    extra = pd.DataFrame({"unit": ex["unit"].to_numpy(), "step": ex["step"].to_numpy(),
                          **{c: ex[c].astype(str).to_numpy() for c in ("role", "domain", "metric")},
                          "value": ex["value"].to_numpy()})
    return Units(table, steps, *per_domain, extra)


GROUP = ["label", "dataset", "test_set", "trial_seed"]


def _attach(frame: pd.DataFrame, table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    t = table.set_index("unit")
    return frame.assign(**{c: t[c].reindex(frame["unit"].to_numpy()).to_numpy() for c in cols})


def _pick(cand: pd.DataFrame) -> pd.DataFrame:
    """Per group the candidate with the best val; ties: the earlier step, then the smaller job id."""
    cand = cand.dropna(subset=["val"]).sort_values(GROUP + ["val", "job_id", "step"],
                                                   ascending=[True] * 4 + [False, True, True], kind="stable")
    return cand.drop_duplicates(GROUP, keep="first").reset_index(drop=True)


def select(coll: Collection, rule: str, u: Units | None = None) -> pd.DataFrame:
    """One chosen (unit, step) per (label, dataset, primary held-out set, trial seed) with a value.

    Columns: GROUP, unit, job, job_id, hp, step, val, val_jobs (job ids the rule validated on)."""
    check_selection(rule)
    u = u or units(coll)
    cols = ["label", "method", "variant", "dataset", "test_set", "trial_seed", "hp", "job", "job_id", "primary"]
    out_cols = GROUP + ["method", "variant", "unit", "job", "job_id", "hp", "step", "val", "val_jobs"]
    if not len(u.steps):
        return pd.DataFrame(columns=out_cols)
    steps = _attach(u.steps, u.table, cols)
    # A run evaluating a zero-shot suite only every train.suite_every-th evaluation is selected among those steps,
    # so that every column comes from one checkpoint; the suite's values are never what selects.
    has_suite = steps["zeroshot_xd"].notna().groupby(steps["unit"]).transform("any")
    steps = steps[~has_suite | steps["zeroshot_xd"].notna()]
    prim = steps[steps["primary"].astype(bool)]
    if rule == "train_val":
        cand = prim.assign(val=prim["id_val"])
        chosen = _pick(cand)
        chosen["val_jobs"] = chosen["job_id"].map(lambda j: [j])
    elif rule == "oracle":
        last = prim.loc[prim.groupby("unit")["step"].idxmax()]
        chosen = _pick(last.assign(val=last["ood_val"]))
        chosen["val_jobs"] = chosen["job_id"].map(lambda j: [j])
    else:
        chosen = _select_lodo(coll, u, prim)
    return chosen[out_cols].reset_index(drop=True)


def _lodo_aux(coll: Collection) -> pd.DataFrame:
    """Runs that serve leave-one-domain-out: job, the primary set they validate for, and their extra domain v."""
    out = []
    for job, ds, t in coll.jobs.loc[~coll.jobs["primary"], ["job", "dataset", "test_set"]].itertuples(index=False):
        dom = t.split("+")
        prim = set(coll.primary_sets.get(ds, ()))
        for v in dom:
            s = set_key(d for d in dom if d != v)
            if s in prim:
                out.append((job, s, v))
    return pd.DataFrame(out, columns=["job", "for_set", "v"])


def train_domains(coll: Collection, dataset: str, test_set: str) -> list[str]:
    held = set(test_set.split("+"))
    return [d for d in coll.domains.get(dataset, []) if d not in held]


def _select_lodo(coll: Collection, u: Units, prim: pd.DataFrame) -> pd.DataFrame:
    aux = _lodo_aux(coll)
    empty = prim.iloc[:0].assign(val=pd.Series(dtype=float), val_jobs=pd.Series(dtype=object))
    if not len(aux):
        return empty
    # the aux runs' accuracy on their extra domain v (the `in` split of v, held out), per step
    ood = _attach(u.ood, u.table, ["job", "label", "dataset", "trial_seed", "hp"])
    ood = ood.merge(aux, left_on=["job", "domain"], right_on=["job", "v"])
    if not len(ood):
        return empty
    keys = ["label", "dataset", "for_set", "trial_seed", "hp", "step"]
    val = ood.groupby(keys, sort=False).agg(val=("value", "mean"), n_v=("v", "nunique")).reset_index()
    need = {(ds, s): len(train_domains(coll, ds, s)) for ds, s in set(zip(val["dataset"], val["for_set"]))}
    val = val[val["n_v"].to_numpy() == np.array([need[k] for k in zip(val["dataset"], val["for_set"])], dtype=int)]
    cand = prim.drop(columns=["val"], errors="ignore").merge(
        val.rename(columns={"for_set": "test_set"}), on=["label", "dataset", "test_set", "trial_seed", "hp", "step"])
    if not len(cand):
        return empty
    chosen = _pick(cand)
    # the runs each choice was validated on: the chosen run and its one-more-domain runs
    jobs = coll.jobs.set_index("job")
    aux = aux.join(jobs[["method", "dataset", "trial_seed", "hp", "job_id", "state"]], on="job")
    aux = aux[aux["state"] == "done"]
    by = {k: sorted(g["job_id"]) for k, g in aux.groupby(["method", "dataset", "for_set", "trial_seed", "hp"])}
    keys = chosen[["job_id", "method", "dataset", "test_set", "trial_seed", "hp"]].itertuples(index=False)
    chosen["val_jobs"] = [[j] + by.get((m, ds, t, s, h), []) for j, m, ds, t, s, h in keys]
    return chosen


# ---------------------------------------------------------------------------------------------- values

def chosen_values(coll: Collection, chosen: pd.DataFrame, u: Units | None = None) -> pd.DataFrame:
    """Long values at each chosen (unit, step): GROUP, job_id, key, value, for key in id, zs_avg, ood:<domain>."""
    u = u or units(coll)
    cols = GROUP + ["job_id", "key", "value"]
    if not len(chosen):
        return pd.DataFrame(columns=cols)
    at = chosen[GROUP + ["job_id", "unit", "step"]]
    st = at.merge(u.steps, on=["unit", "step"], how="left")
    parts = [st[GROUP + ["job_id"]].assign(key="id", value=st["id_val"]),
             st[GROUP + ["job_id"]].assign(key="id_test", value=st["id_test"]),
             st[GROUP + ["job_id"]].assign(key="zs_avg", value=st["zeroshot"]),
             st[GROUP + ["job_id"]].assign(key="xd_avg", value=st["zeroshot_xd"])]
    for prefix, frame in (("ood:", u.ood), ("xd:", u.xd)):
        od = at.merge(frame, on=["unit", "step"])
        parts.append(od[GROUP + ["job_id"]].assign(key=prefix + od["domain"], value=od["value"]))
    ex = at.merge(u.extra, on=["unit", "step"])
    if len(ex):  # <metric>_id: the mean over the ID domains, as id; <metric>_ood:<domain>, as ood:<domain>
        idv = ex[ex["role"] == "id_val"].groupby(GROUP + ["job_id", "metric"], as_index=False)["value"].mean()
        parts.append(idv[GROUP + ["job_id"]].assign(key=idv["metric"] + "_id", value=idv["value"]))
        od = ex[ex["role"] == "ood"]
        parts.append(od[GROUP + ["job_id"]].assign(key=od["metric"] + "_ood:" + od["domain"], value=od["value"]))
    return pd.concat(parts, ignore_index=True)[cols]


def required(coll: Collection, metric: str, dataset: str) -> pd.DataFrame:
    """The (held-out set, value key) pairs a metric needs in one trial seed of one dataset."""
    pairs = []
    for t in coll.primary_sets.get(dataset, []):
        held = t.split("+")
        if metric in ("id", "id_test", "zs_avg", "xd_avg") or metric.startswith("xd:"):
            pairs.append((t, metric))
        elif metric == "hm":
            pairs += [(t, "id"), (t, "zs_avg")]
        elif metric in ("ood_avg", "worst_ood"):
            pairs += [(t, f"ood:{d}") for d in held]
        elif metric == "hm_id_ood":
            pairs += [(t, "id")] + [(t, f"ood:{d}") for d in held]
        elif metric.endswith("_id") and metric[:-3] in EXTRA_METRICS:
            pairs.append((t, metric))
        elif metric.endswith("_ood") and metric[:-4] in EXTRA_METRICS:
            pairs += [(t, f"{metric}:{d}") for d in held]
        else:
            pairs += [(t, f"ood:{d}") for d in _metric_domains(coll, metric, dataset) if d in held]
    return pd.DataFrame(pairs, columns=["test_set", "key"])


def per_seed(coll: Collection, values: pd.DataFrame, metric: str, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (label, trial seed) the metric on one dataset, for the seeds that have every value it needs
    (DomainBed averages over held-out domains within a trial seed, then takes mean ± SE over seeds).

    Returns (values: label, trial_seed, value; gaps: label, trial_seed, test_set, job_id, key) where gaps
    are needed values missing from a chosen run (e.g. a run without ObjectNet rows)."""
    need = required(coll, metric, dataset)
    mine = values[values["dataset"] == dataset]
    v = mine.merge(need, on=["test_set", "key"])
    empty = pd.DataFrame(columns=["label", "trial_seed", "value"])
    no_gaps = pd.DataFrame(columns=["label", "trial_seed", "test_set", "job_id", "key"])
    if not len(need) or not len(mine):
        return empty, no_gaps
    groups = mine.loc[mine["test_set"].isin(need["test_set"]), ["label", "trial_seed", "test_set", "job_id"]]
    groups = groups.drop_duplicates()
    expect = groups.merge(need, on="test_set")
    have = v.dropna(subset=["value"])
    gaps = expect.merge(have[["label", "trial_seed", "test_set", "key"]], how="left", indicator=True)
    gaps = gaps[gaps["_merge"] == "left_only"].drop(columns="_merge")
    count = have.groupby(["label", "trial_seed"]).size()
    full = count[count == len(need)].index
    have = have.set_index(["label", "trial_seed"])
    have = have[have.index.isin(full)].reset_index()
    by_key = have.groupby(["label", "trial_seed", "key"])["value"].mean()
    if metric == "hm" and not len(by_key):
        return empty, gaps.reset_index(drop=True)
    if metric == "hm":  # per trial seed: the harmonic mean of base (ID) and novel (zero-shot) accuracy
        wide = by_key.unstack("key")
        out = 2 * wide["id"] * wide["zs_avg"] / (wide["id"] + wide["zs_avg"])
    elif metric == "worst_ood":  # per trial seed: the held-out domain with the lowest accuracy
        out = by_key.groupby(["label", "trial_seed"]).min()
    elif metric == "hm_id_ood" and len(by_key):  # per trial seed: of ID and OOD average accuracy
        is_id = by_key.index.get_level_values("key") == "id"
        idv = by_key[is_id].droplevel("key")
        ood = by_key[~is_id].groupby(["label", "trial_seed"]).mean()
        out = 2 * idv * ood / (idv + ood)
    else:
        out = by_key.groupby(["label", "trial_seed"]).mean()
    return out.rename("value").reset_index(), gaps.reset_index(drop=True)


def _metric_domains(coll: Collection, metric: str, dataset: str) -> list[str]:
    held = {d for s in coll.primary_sets.get(dataset, []) for d in s.split("+")}
    if metric.startswith("ood:"):
        d = metric[4:]
        return [d] if d in held else []
    spec = coll.suite(dataset)
    if spec and metric in spec["averages"]:
        return list(spec["averages"][metric][1])
    return []


def mean_se(values) -> tuple[float, float, int]:
    """DomainBed's format_mean: mean and std(ddof=0)/sqrt(n)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std() / math.sqrt(len(v))), len(v)


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


# ---------------------------------------------------------------------------------------------- export

def export_best(coll: Collection, rule: str, datasets: list[str] | None = None) -> list[dict]:
    """The run chosen for every (row, dataset, held-out set, trial seed), with its hyperparameters and full
    run config: enough to rerun exactly the table's runs (`bench run <config>`)."""
    chosen = select(coll, rule)
    jobs = coll.jobs.set_index("job")
    out = []
    for r in chosen.sort_values(GROUP).itertuples(index=False):
        if datasets and r.dataset not in datasets:
            continue
        j = jobs.loc[r.job]
        out.append({"row": r.label, "method": r.method, "variant": r.variant or None, "dataset": r.dataset,
                    "test_domains": list(j["test_domains"]), "trial_seed": int(r.trial_seed), "selection": rule,
                    "job_id": r.job_id, "run_dir": j["path"], "step": int(r.step), "val_acc": float(r.val),
                    "validated_on": list(r.val_jobs), "hparams": j["hparams"], "config": j["config"]})
    return out

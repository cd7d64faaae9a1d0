"""DomainBed's three model-selection rules over a collection (bench.collect), and the aggregation of the chosen
checkpoints over trial seeds.

    chosen = select(coll, rule)              one chosen (run, step) per (row, dataset, held-out set, trial seed)
    values = chosen_values(coll, chosen)     id, id_test, zs_avg, ood:<domain>, ece_id, ece_ood:<domain>, ... at
                                             each chosen (run, step)
    per_seed(coll, values, metric, dataset)  a metric per (row, trial seed): what a cell's mean ± SE is over
    export_best(coll, rule)                  the chosen runs with their configs, to rerun them

A table row is a (method, variant) pair: rows without a `variant` key are the method itself ("erm"),
rows with one are e.g. post-hoc WiSE-FT of the same job ("erm+wise:0.5"). Selection picks among units, one
(job, variant) each, by accuracy only, whatever metric is shown (bench.metrics lists those).

This module imports no torch: `bench table` over 10,000 jobs must start fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench import collect
from bench import metrics
from bench.errors import BenchError

SELECTIONS = {
    "train_val": ("training-domain validation (DomainBed): per run the checkpoint with the best mean accuracy "
                  "on the training domains' 20 % held-out split (early stopping allowed), then the "
                  "hyperparameters with the best such accuracy"),
    "lodo": ("leave-one-domain-out cross-validation (DomainBed): per checkpoint step, the mean accuracy on each "
             "training domain v of the run that also held out v; the best step, then the best hyperparameters"),
    "oracle": ("test-domain validation, the oracle (DomainBed): the last checkpoint of each run; the hyperparameters "
               "with the best accuracy on the held-out domains' 20 % split"),
}


def check_selection(rule: str) -> str:
    if rule not in SELECTIONS:
        raise BenchError(f"--selection: unknown rule {rule!r}; choose one of {', '.join(SELECTIONS)}")
    return rule


# ---------------------------------------------------------------------------------------------- units

def label_of(method: str, variant: str) -> str:
    return method if not variant else f"{method}+{variant}"


@dataclass
class Units:
    """A unit is one (job, variant): the thing selection picks. Per unit and step: the role means."""

    table: pd.DataFrame  # unit -> job, variant, label, method, dataset, test_set, trial_seed, hp, job_id, primary
    steps: pd.DataFrame  # unit, step, id_val, id_test, ood_val, zeroshot, zeroshot_xd (means over domains)
    ood: pd.DataFrame  # unit, step, domain, value (acc of role ood)
    xd: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["unit", "step", "domain", "value"]))
    extra: pd.DataFrame = field(  # EXTRA_METRICS rows of roles id_val, ood, zeroshot: unit, step, role, domain, metric, value
        default_factory=lambda: pd.DataFrame(columns=["unit", "step", "role", "domain", "metric", "value"]))


def units(coll: collect.Collection) -> Units:
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
    ex = rows[rows["metric"].isin(metrics.EXTRA_METRICS) & rows["role"].isin(["id_val", "ood", "zeroshot"])]
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


def select(coll: collect.Collection, rule: str, u: Units | None = None) -> pd.DataFrame:
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


def _lodo_aux(coll: collect.Collection) -> pd.DataFrame:
    """Runs that serve leave-one-domain-out: job, the primary set they validate for, and their extra domain v."""
    out = []
    for job, ds, t in coll.jobs.loc[~coll.jobs["primary"], ["job", "dataset", "test_set"]].itertuples(index=False):
        dom = t.split("+")
        prim = set(coll.primary_sets.get(ds, ()))
        for v in dom:
            s = collect.set_key(d for d in dom if d != v)
            if s in prim:
                out.append((job, s, v))
    return pd.DataFrame(out, columns=["job", "for_set", "v"])


def train_domains(coll: collect.Collection, dataset: str, test_set: str) -> list[str]:
    held = set(test_set.split("+"))
    return [d for d in coll.domains.get(dataset, []) if d not in held]


def _select_lodo(coll: collect.Collection, u: Units, prim: pd.DataFrame) -> pd.DataFrame:
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

def chosen_values(coll: collect.Collection, chosen: pd.DataFrame, u: Units | None = None) -> pd.DataFrame:
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
    if len(ex):  # <metric>_id (_zs): the mean over the domains, as id (zs_avg); <metric>_ood:<domain>, as ood:<domain>
        for role, suffix in (("id_val", "_id"), ("zeroshot", "_zs")):
            mean = ex[ex["role"] == role].groupby(GROUP + ["job_id", "metric"], as_index=False)["value"].mean()
            parts.append(mean[GROUP + ["job_id"]].assign(key=mean["metric"] + suffix, value=mean["value"]))
        od = ex[ex["role"] == "ood"]
        parts.append(od[GROUP + ["job_id"]].assign(key=od["metric"] + "_ood:" + od["domain"], value=od["value"]))
    return pd.concat(parts, ignore_index=True)[cols]


def required(coll: collect.Collection, metric: str, dataset: str) -> pd.DataFrame:
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
        elif metrics.extra_split(metric) and metrics.extra_split(metric)[1] in ("_id", "_zs"):
            pairs.append((t, metric))
        elif metrics.extra_split(metric):  # _ood: per held-out domain
            pairs += [(t, f"{metric}:{d}") for d in held]
        else:
            pairs += [(t, f"ood:{d}") for d in _metric_domains(coll, metric, dataset) if d in held]
    return pd.DataFrame(pairs, columns=["test_set", "key"])


def per_seed(coll: collect.Collection, values: pd.DataFrame, metric: str,
             dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def _metric_domains(coll: collect.Collection, metric: str, dataset: str) -> list[str]:
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


# ---------------------------------------------------------------------------------------------- export

def export_best(coll: collect.Collection, rule: str, datasets: list[str] | None = None) -> list[dict]:
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

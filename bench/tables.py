"""Building a table (a Report) from collected runs: cells (mean ± standard error over trial seeds) and notes that
say why a cell is empty or partial. bench/table_formats.py renders a Report (markdown, latex, csv, json).

    report = build(load("runs/quickstart"), metric="ood_avg", selection="train_val", cost=True)
    print(table_formats.render(report, "markdown"))
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field

import pandas as pd

from bench import collect
from bench import metrics
from bench import model_selection

MAX_LISTED = 6  # jobs or groups named in one note before "and N more"

COST_COLUMNS = {  # key -> (header, unit, digits)
    "cost:step_time": ("step time (s)", "mean seconds per training step", 3),
    "cost:peak_mem": ("peak mem (MB)", "largest peak memory of a job", 0),
    "cost:compute": ("compute (h)", "training time of all the row's jobs, summed", 2),
    "cost:eval_share": ("eval (%)", "share of its jobs' time spent evaluating: evaluation / (training + evaluation)",
                        1),
}


@dataclass
class Cell:
    mean: float | None = None  # a fraction for accuracies, the value itself for costs
    se: float | None = None
    n: int = 0  # trial seeds (accuracies) or jobs (costs)
    notes: list[int] = field(default_factory=list)
    nats: bool = False  # an NLL: shown as it is, not as a percentage


@dataclass
class Section:
    title: str | None
    columns: list[str]  # keys: a dataset, ood:<domain>, a metric name, Avg, cost:*
    headers: dict[str, str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)


@dataclass
class Report:
    metric: str
    selection: str
    sections: list[Section]
    notes: list[str]  # note i is notes[i - 1]; cells refer to them by number
    footer: list[str]  # printed last: job counts, duplicates, corrupt lines, folders that are no job
    header_lines: list[str]  # printed first under the table: the metric and the selection rule


class _Notes:
    def __init__(self):
        self.texts: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self.index:
            self.texts.append(text)
            self.index[text] = len(self.texts)
        return self.index[text]


def _listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"; and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "; ".join(shown) + more


def _row_key(label: str, ranks: dict[str, int]):
    """Baselines first (collect.method_order; ranks: collect.baselines), then methods by name; a method's variants
    after it."""
    method, _, variant = label.partition("+")
    parts = []
    for p in re.split(r"[:=]", variant):
        try:
            parts.append((0, float(p), ""))
        except ValueError:
            parts.append((1, 0.0, p))
    return collect.method_order(method, ranks), bool(variant), parts


class _Explainer:
    """Why a (row, dataset) cell is missing trial seeds, and which of its jobs are not done."""

    def __init__(self, coll: collect.Collection, u: model_selection.Units, chosen: pd.DataFrame, rule: str):
        self.coll, self.u, self.rule = coll, u, rule
        self.jobs_at: dict[tuple, list[tuple[str, str]]] = {}
        for m, ds, t, s, j, st in coll.jobs[["method", "dataset", "test_set", "trial_seed", "job_id",
                                             "state"]].itertuples(index=False):
            self.jobs_at.setdefault((m, ds, t, int(s)), []).append((j, st))
        groups = lambda f: set(zip(f["label"], f["dataset"], f["test_set"], f["trial_seed"].astype(int)))
        self.units_at = groups(u.table)
        self.labels_at = set(zip(u.table["label"], u.table["dataset"]))
        self.have = groups(chosen)
        self.not_done: dict[tuple, list[tuple[str, str, str]]] = {}
        for m, ds, t, j, st in coll.jobs.loc[coll.jobs["state"] != "done", ["method", "dataset", "test_set", "job_id",
                                                                             "state"]].itertuples(index=False):
            self.not_done.setdefault((m, ds), []).append((t, j, st))

    def _matters(self, test_set: str, needed_sets: list[str]) -> bool:
        """Whether a job holding out test_set can change a cell that needs needed_sets under this rule."""
        if test_set in needed_sets:
            return True
        held = set(test_set.split("+"))
        return self.rule == "lodo" and any(len(held) == len(n.split("+")) + 1 and set(n.split("+")) < held
                                           for n in needed_sets)

    def rule_reason(self, ds: str) -> str | None:
        """Why the selection rule cannot work on a dataset at all."""
        coll = self.coll
        if self.rule == "lodo" and not (~coll.jobs.loc[coll.jobs["dataset"] == ds, "primary"].astype(bool)).any():
            return (f"{ds}: no runs hold out one domain more than the table's held-out sets (DomainBed's pair "
                    f"runs), so leave-one-domain-out selection cannot be made; use --selection train_val.")
        if self.rule == "oracle":
            units = self.u.table.loc[self.u.table["dataset"] == ds, "unit"]
            if len(units) and self.u.steps.loc[self.u.steps["unit"].isin(units), "ood_val"].isna().all():
                return (f"{ds}: no ood_val rows (a held-out split of the test domains), so the oracle rule cannot "
                        f"be applied; use --selection train_val.")
        return None

    def _where(self, ds: str, test_set: str, seed: int) -> str:
        if len(self.coll.primary_sets.get(ds, ())) == 1:
            return f"trial seed {seed}"
        return f"held out {test_set.replace('+', ', ')}, trial seed {seed}"

    @staticmethod
    def _jobs(jobs) -> str:
        return ", ".join(f"job {j} {st}" for j, st in jobs)

    def reason(self, label: str, ds: str, test_set: str, seed: int) -> tuple[str, str, set[str]]:
        """(kind, detail, job ids named) for one (held-out set, trial seed) without a chosen run."""
        method, _, variant = label.partition("+")
        where = self._where(ds, test_set, seed)
        jobs = self.jobs_at.get((method, ds, test_set, seed), [])
        named = {j for j, _ in jobs}
        if not jobs:
            return "no job folder", where, named
        done = [j for j, st in jobs if st == "done"]
        if not done:
            return "no finished run", f"{where}: {self._jobs(jobs)}", named
        ids = ", ".join(done)
        if (label, ds, test_set, seed) not in self.units_at:
            return (f"no {variant!r} rows in the finished runs" if variant else "no accuracy rows in the finished runs",
                    f"{where}: {ids}", named)
        if self.rule == "train_val":
            return "no id_val rows", f"{where}: {ids}", named
        if self.rule == "oracle":
            return "no ood_val rows at the last step", f"{where}: {ids}", named
        missing, no_variant = [], []
        for v in model_selection.train_domains(self.coll, ds, test_set):
            t = collect.set_key(test_set.split("+") + [v])
            aux = self.jobs_at.get((method, ds, t, seed), [])
            named |= {j for j, _ in aux}
            if not any(st == "done" for _, st in aux):
                missing.append(f"{t} ({self._jobs(aux) or 'no job folder'})")
            elif (label, ds, t, seed) not in self.units_at:
                no_variant.append(t)
        if missing:
            return ("leave-one-domain-out needs a finished run holding out each training domain too",
                    f"{where}: missing {'; '.join(missing)}", named)
        if no_variant:
            return (f"leave-one-domain-out needs {variant!r} rows in the runs holding out one more domain too "
                    f"(bench wise them)", f"{where}: none in {', '.join(no_variant)}", named)
        return ("no step and hyperparameters with results in the runs holding out one more domain"
                + (f" ({variant} rows)" if variant else ""), where, named)

    def cell_note(self, label: str, ds: str, needed_sets: list[str], n_seeds: int,
                  gaps: pd.DataFrame | None = None) -> str | None:
        method, _, variant = label.partition("+")
        seeds = self.coll.seeds.get(ds, [])
        done_jobs = any(st == "done" for (m, d, _, _), js in self.jobs_at.items() if m == method and d == ds
                        for _, st in js)
        by_kind: dict[str, list[str]] = {}
        named: set[str] = set()
        if variant and done_jobs and (label, ds) not in self.labels_at:
            by_kind[f"no {variant!r} rows in any finished {method} run on {ds}"] = []
        else:
            for s in seeds:
                for t in needed_sets:
                    if (label, ds, t, s) not in self.have:
                        kind, detail, jobs = self.reason(label, ds, t, s)
                        by_kind.setdefault(kind, []).append(detail)
                        named |= jobs
        if gaps is not None and len(gaps):
            for (s, t, j), g in gaps.groupby(["trial_seed", "test_set", "job_id"], sort=True):
                lacking = ", ".join(k.split(":", 1)[-1] if k.startswith(("ood:", "xd:")) else k.replace(":", " on ")
                                    for k in g["key"])
                where = self._where(ds, t, int(s))
                by_kind.setdefault("a selected run lacks results", []).append(
                    f"{where}: job {j} lacks {lacking}")
        others = [(j, st) for t, j, st in self.not_done.get((method, ds), [])
                  if j not in named and self._matters(t, needed_sets)]
        if not by_kind and not others:
            return None
        parts = [f"{kind} ({_listing(details)})" if details else kind for kind, details in by_kind.items()]
        if others:
            parts.append("not done, so not counted: " + _listing([f"job {j} {st}" for j, st in others]))
        if by_kind and seeds:
            parts.append(f"{n_seeds} of {len(seeds)} trial seeds complete")
        return f"{method} on {ds}: " + "; ".join(parts) + "."


def _empty_reason(coll: collect.Collection, metric: str, ds: str, values: pd.DataFrame, expl: _Explainer) -> str | None:
    """Why a metric has no value on a dataset for any row, when the cause is the dataset or the rule."""
    if metric.startswith("ood:") and not model_selection._metric_domains(coll, metric, ds):
        return f"{ds} has no held-out domain {metric[4:]}."
    base = (metrics.extra_split(metric) or ("", ""))[0]
    if base:
        mine = values.loc[values["dataset"] == ds, "key"].astype(str)
        if not (mine.str.startswith(metric + ":") | (mine == metric)).any():
            if base == "macro_f1":
                return (f"{ds}: no macro_f1 rows in the selected runs (logged only where the dataset card asks for "
                        f"it: metrics: [macro_f1]).")
            return (f"{ds}: no {base} rows in the selected runs (evaluated before the harness logged calibration "
                    f"metrics; a rerun of those jobs logs them).")
    if metric in metrics.SUITE_AVERAGES and not model_selection._metric_domains(coll, metric, ds):
        return f"{metric} is defined for ImageNet-style shift suites only; {ds} is not one."
    if metric == "id_test":
        v = values[(values["dataset"] == ds) & (values["key"] == "id_test")]["value"]
        if len(v) and v.isna().all():
            return f"{ds} has no id_test rows (an ID test set such as ImageNet val: protocol shift cards only)."
    rule = expl.rule_reason(ds)
    if rule:
        return rule
    if metric in ("zs_avg", "hm"):
        v = values[(values["dataset"] == ds) & (values["key"] == "zs_avg")]["value"]
        if len(v) and v.isna().all():
            return (f"{ds} has no zero-shot rows (no unseen classes in its card: data.classes: base_to_novel gives a "
                    f"DomainBed card some; xd_avg is the cross-dataset zero-shot column).")
    if metric == "xd_avg" or metric.startswith("xd:"):
        v = values[(values["dataset"] == ds) & (values["key"] == metric)]["value"]
        if len(v) and v.isna().all():
            what = "zero-shot suite rows" if metric == "xd_avg" else f"rows for suite dataset {metric[3:]}"
            return f"{ds} runs have no {what} (set data.zeroshot_suite, e.g. coop10; docs/ZEROSHOT_SUITE.md)."
    if metric in metrics.SUITE_AVERAGES:
        have = {k[4:] for k in values.loc[values["dataset"] == ds, "key"] if k.startswith("ood:")}
        lacking = [d for d in model_selection._metric_domains(coll, metric, ds) if d not in have]
        if lacking:
            return f"{metric} on {ds} needs results on {', '.join(lacking)}."
    return None


def _describe(metric: str) -> str:
    if metric.startswith("xd:"):
        return f"zero-shot accuracy on {metric[3:]} (cross-dataset, never used to select)"
    return f"OOD accuracy on {metric[4:]}"


def build(coll: collect.Collection, metric: str = "ood_avg", selection: str = "train_val", cost: bool = False,
          datasets: list[str] | None = None, rows: list[str] | None = None) -> Report:
    metric_names = metrics.check_metric(metric)
    model_selection.check_selection(selection)
    u = model_selection.units(coll)
    chosen = model_selection.select(coll, selection, u)
    values = model_selection.chosen_values(coll, chosen, u)
    expl = _Explainer(coll, u, chosen, selection)
    notes = _Notes()
    all_ds = [d for d in coll.datasets if not datasets or d in datasets]
    labels = (set(u.table.loc[u.table["dataset"].isin(all_ds), "label"])
              | set(coll.jobs.loc[coll.jobs["dataset"].isin(all_ds), "method"]))
    labels = sorted((lab for lab in labels if not rows or any(fnmatch.fnmatchcase(lab, p) for p in rows)),
                    key=functools.partial(_row_key, ranks=collect.baselines(coll)))
    costs = collect.job_costs(coll) if cost else None

    def fill(section: Section, col: str, ds: str, m: str) -> None:
        ps, gaps = model_selection.per_seed(coll, values, m, ds)
        needed = sorted(set(model_selection.required(coll, m, ds)["test_set"]))
        empty = _empty_reason(coll, m, ds, values, expl)
        for lab in section.rows:
            mean, se, n = model_selection.mean_se(ps.loc[ps["label"] == lab, "value"])
            cell = Cell(None if n == 0 else mean, None if n == 0 else se, n, nats=m in metrics.NATS)
            if n == 0 and empty:
                cell.notes.append(notes.add(empty))
            else:
                text = expl.cell_note(lab, ds, needed, n, gaps[gaps["label"] == lab])
                if text:
                    cell.notes.append(notes.add(text))
                elif n == 0:
                    cell.notes.append(notes.add(f"{lab} on {ds}: no selected run for {m}."))
            section.cells[(lab, col)] = cell

    def average(section: Section, cols: list[str], key: str = "Avg") -> None:
        live = [c for c in cols if any(section.cells[(lab, c)].mean is not None for lab in section.rows)]
        for lab in section.rows:
            means = [section.cells[(lab, c)].mean for c in live]
            if live and all(m is not None for m in means):
                section.cells[(lab, key)] = Cell(sum(means) / len(means), None, len(means),
                                                 nats=all(section.cells[(lab, c)].nats for c in live))
            else:
                why = "Avg: no column has a value." if not live else "Avg is left empty while a cell of its row is."
                section.cells[(lab, key)] = Cell(notes=[notes.add(why)])

    def add_costs(section: Section, dss: list[str]) -> None:
        for key, (header, _, _) in COST_COLUMNS.items():
            section.columns.append(key)
            section.headers[key] = header
        for lab in section.rows:
            method = lab.partition("+")[0]
            c = costs[(costs["method"] == method) & costs["dataset"].isin(dss)]
            trained = c[c["steps"] > 0]
            steps, secs = trained["steps"].sum(), trained["seconds"].sum()
            if not len(c):
                note = [notes.add(f"{method}: no finished jobs, so no costs.")]
                for key in COST_COLUMNS:
                    section.cells[(lab, key)] = Cell(notes=note)
                continue
            section.cells[(lab, "cost:compute")] = Cell(secs / 3600, None, len(c))
            timed = c.dropna(subset=["eval_seconds"])
            if len(timed):
                ev = timed["eval_seconds"].sum()
                section.cells[(lab, "cost:eval_share")] = Cell(100 * ev / max(ev + timed["seconds"].sum(), 1e-12),
                                                               None, len(timed))
            else:
                section.cells[(lab, "cost:eval_share")] = Cell(notes=[notes.add(
                    f"{method}: no evaluation times in its results (runs written before they were logged).")])
            if not len(trained):
                note = [notes.add(f"{method}: its jobs train no steps (no step time or training memory).")]
                section.cells[(lab, "cost:step_time")] = Cell(notes=note)
                section.cells[(lab, "cost:peak_mem")] = Cell(notes=note)
                continue
            mem = trained["peak_mem_mb"].dropna()
            section.cells[(lab, "cost:step_time")] = Cell(secs / steps, None, len(trained))
            section.cells[(lab, "cost:peak_mem")] = Cell(float(mem.max()) if len(mem) else None, None, len(mem))

    sections = []
    if metric == "ood":
        for ds in all_ds:
            doms = [d for d in coll.domains.get(ds, []) if any(d in t.split("+") for t in coll.primary_sets[ds])]
            sec = Section(ds, [], {}, labels)
            for d in doms:
                sec.columns.append(f"ood:{d}")
                sec.headers[f"ood:{d}"] = d
                fill(sec, f"ood:{d}", ds, f"ood:{d}")
            sec.columns.append("ood_avg")
            sec.headers["ood_avg"] = "Avg"
            fill(sec, "ood_avg", ds, "ood_avg")
            spec = coll.suite(ds)
            for name, (head, _) in (spec["averages"].items() if spec else []):
                sec.columns.append(name)
                sec.headers[name] = head
                fill(sec, name, ds, name)
            if cost:
                add_costs(sec, [ds])
            sections.append(sec)
    elif metric == "xd":
        for ds in all_ds:
            units_of = set(u.table.loc[u.table["dataset"] == ds, "unit"])
            suite = list(dict.fromkeys(u.xd.loc[u.xd["unit"].isin(units_of), "domain"]))
            sec = Section(ds, [], {}, labels)
            for d in suite:
                sec.columns.append(f"xd:{d}")
                sec.headers[f"xd:{d}"] = d
                fill(sec, f"xd:{d}", ds, f"xd:{d}")
            sec.columns.append("xd_avg")
            sec.headers["xd_avg"] = "Avg"
            fill(sec, "xd_avg", ds, "xd_avg")
            if cost:
                add_costs(sec, [ds])
            sections.append(sec)
    elif len(metric_names) > 1:  # one column per (dataset, metric): ID / OOD / zero-shot side by side
        sec = Section(None, [], {}, labels)
        for ds in all_ds:
            for m in metric_names:
                key = f"{m}@{ds}"
                head = (metrics.METRIC_HEADERS.get(m)
                        or (f"zero-shot {m[3:]}" if m.startswith("xd:") else f"OOD {m[4:]}"))
                sec.columns.append(key)
                sec.headers[key] = head if len(all_ds) == 1 else f"{ds} {head}"
                fill(sec, key, ds, m)
        if cost:
            add_costs(sec, all_ds)
        sections.append(sec)
    else:
        sec = Section(None, list(all_ds), {d: d for d in all_ds}, labels)
        for ds in all_ds:
            fill(sec, ds, ds, metric)
        if len(all_ds) > 1:
            sec.columns.append("Avg")
            sec.headers["Avg"] = "Avg"
            average(sec, all_ds)
        if cost:
            add_costs(sec, all_ds)
        sections.append(sec)

    described = "; ".join(f"{m}, {metrics.METRICS.get(m) or _describe(m)}" for m in metric_names)
    unit = "%" if not any(m in metrics.NATS for m in metric_names) else "%; NLL in nats"
    header = [f"Metric{'s' if len(metric_names) > 1 else ''}: {described} ({unit}); "
              f"cells: mean ± standard error over trial seeds (std/sqrt(n), as DomainBed).",
              f"Selection: {selection}, {model_selection.SELECTIONS[selection]}."]
    jobs = coll.jobs
    footer = [f"{int((jobs['state'] == 'done').sum())} of {len(jobs)} jobs done under {coll.root}."]
    if any(s.headers.get("Avg") for s in sections):
        footer.append("Avg: the mean of the row's cells.")
    if cost:
        footer.append("Costs over the row's finished jobs: " + "; ".join(
            f"{h}: {desc}" for h, desc, _ in COST_COLUMNS.values()) + ".")
    if coll.duplicates:
        footer.append(f"{coll.duplicates} repeated result rows (requeued jobs) counted once.")
    if coll.skipped_lines:
        footer.append(f"{len(coll.skipped_lines)} corrupt results lines skipped: {_listing(coll.skipped_lines)}.")
    footer += coll.problems
    return Report(metric, selection, sections, notes.texts, footer, header)


"""Collecting results into tables: DomainBed-style model selection, mean +- standard error over trial seeds."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from bench import results as R

log = logging.getLogger(__name__)

METRICS = {"id": "id_val", "ood_avg": "ood", "zs_avg": "zeroshot"}


def load_runs(root: str | Path) -> pd.DataFrame:
    """All result rows under `root`, with each run's method, dataset, test domains and seed beside them."""
    frames = []
    for cfg_path in sorted(Path(root).rglob(R.CONFIG)):
        run_dir = cfg_path.parent
        rows = R.read_rows(run_dir / R.RESULTS)
        if not rows:
            continue
        record = json.loads(cfg_path.read_text())
        cfg = record["config"]
        df = pd.DataFrame(rows)
        df["job_id"] = record["job_id"]
        df["method"] = cfg["method"]
        df["dataset"] = cfg["data"]["dataset"]
        df["test_domains"] = ",".join(cfg["data"]["test_domains"])
        df["trial_seed"] = cfg["trial_seed"]
        df["hparams"] = json.dumps(record["hparams"], sort_keys=True)
        df["done"] = (run_dir / R.DONE).is_file()
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates(subset=["job_id", "step", "role", "domain", "split", "metric"], keep="last")


def role_means(df: pd.DataFrame) -> pd.DataFrame:
    """Per job and step: the mean accuracy over domains of each role (id_val, ood, zeroshot, ...)."""
    acc = df[df["metric"] == "acc"]
    keys = ["job_id", "method", "dataset", "test_domains", "trial_seed", "hparams", "step"]
    return acc.pivot_table(index=keys, columns="role", values="value", aggfunc="mean").reset_index()


def select_train_val(wide: pd.DataFrame) -> pd.DataFrame:
    """Training-domain validation: per run the step with the best id_val; per (method, dataset, test
    domains, seed) the hparams with the best selected id_val."""
    best_step = wide.loc[wide.groupby("job_id")["id_val"].idxmax()]
    keys = ["method", "dataset", "test_domains", "trial_seed"]
    return best_step.loc[best_step.groupby(keys)["id_val"].idxmax()]


def mean_se(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna().astype(float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=0) / math.sqrt(n)), n


def summary(root: str | Path) -> pd.DataFrame:
    df = load_runs(root)
    if df.empty:
        return pd.DataFrame()
    sel = select_train_val(role_means(df))
    # Average over held-out domains within a seed, then mean +- SE over seeds (DomainBed).
    per_seed = sel.groupby(["method", "dataset", "trial_seed"])[[c for c in METRICS.values() if c in sel]].mean()
    out = []
    for (method, dataset), g in per_seed.groupby(level=[0, 1]):
        row = {"method": method, "dataset": dataset}
        for name, role in METRICS.items():
            if role in g:
                row[name], row[f"{name}_se"], row["n_seeds"] = mean_se(g[role])
        out.append(row)
    return pd.DataFrame(out)


def format_markdown(tab: pd.DataFrame) -> str:
    from tabulate import tabulate

    order = {"zeroshot": 0, "erm": 1}
    tab = tab.sort_values(["dataset", "method"], key=lambda s: s.map(lambda m: (order.get(m, 9), m)) if s.name == "method" else s)
    headers = ["method", "dataset", "ID", "OOD avg", "zero-shot avg", "seeds"]
    body = []
    for _, r in tab.iterrows():
        cells = [f"{100 * r[m]:.1f} ± {100 * r[m + '_se']:.1f}" if m in r and not math.isnan(r[m]) else "n/a"
                 for m in METRICS]
        body.append([r["method"], r["dataset"], *cells, int(r["n_seeds"])])
    return tabulate(body, headers=headers, tablefmt="github")

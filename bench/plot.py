"""ID-vs-OOD scatter (and reliability diagrams, `reliability`): one panel per dataset; each method (mean ± standard error over trial seeds, after model
selection), the zero-shot model, and WiSE-FT curves over alpha (the variants wise:<alpha> of a method). A dataset
with unseen classes gets a second panel beside it, ID vs unseen-class zero-shot accuracy (what fine-tuning forgets).

    paths = plot(load("runs/quickstart"), "runs/quickstart/id_vs_ood")   # -> [...png, ...pdf]
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from bench import collect
from bench import model_selection
from bench import results
from bench import table_cache
from bench.errors import BenchError

WISE = re.compile(r"^wise:([0-9.]+)$")
REF = " reference"  # the legend key of the reference star (no row label has a space)


def points(coll: collect.Collection, selection: str = "train_val", datasets: list[str] | None = None) -> pd.DataFrame:
    """Per (dataset, row label): id, ood_avg and zs_avg means and standard errors (fractions; zs NaN where the
    dataset has no unseen classes), trial seeds used."""
    u = model_selection.units(coll)
    values = model_selection.chosen_values(coll, model_selection.select(coll, selection, u), u)
    out = []
    for ds in coll.datasets:
        if datasets and ds not in datasets:
            continue
        ids, _ = model_selection.per_seed(coll, values, "id", ds)
        oods, _ = model_selection.per_seed(coll, values, "ood_avg", ds)
        zss, _ = model_selection.per_seed(coll, values, "zs_avg", ds)
        both = ids.merge(oods, on=["label", "trial_seed"], suffixes=("_id", "_ood"))
        both = both.merge(zss.rename(columns={"value": "value_zs"}), on=["label", "trial_seed"], how="left")
        for label, g in both.groupby("label"):
            (x, xe, n), (y, ye, _) = model_selection.mean_se(g["value_id"]), model_selection.mean_se(g["value_ood"])
            z, ze, _ = model_selection.mean_se(g["value_zs"])
            method, _, variant = label.partition("+")
            m = WISE.match(variant)
            out.append({"dataset": ds, "label": label, "method": method, "variant": variant,
                        "alpha": float(m.group(1)) if m else math.nan, "id": x, "id_se": xe,
                        "ood": y, "ood_se": ye, "zs": z, "zs_se": ze, "n": n})
    return pd.DataFrame(out, columns=["dataset", "label", "method", "variant", "alpha", "id", "id_se", "ood",
                                      "ood_se", "zs", "zs_se", "n"])


def plot(coll: collect.Collection, out: str | Path, selection: str = "train_val",
         datasets: list[str] | None = None) -> list[Path]:
    """Writes <out>.png and <out>.pdf; returns their paths."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pts = points(coll, selection, datasets)
    if not len(pts):
        raise BenchError(f"{coll.root}: no finished run has both ID and OOD results under --selection "
                           f"{selection}; see `bench table --selection {selection}` for why")
    dss = list(dict.fromkeys(pts["dataset"]))
    # a panel per (dataset, y): OOD always, zero-shot on unseen classes where the dataset has them
    panels = [(ds, y) for ds in dss for y in ("ood", "zs") if y == "ood" or pts.loc[pts["dataset"] == ds, "zs"].notna().any()]
    ncol = min(len(panels), 4 if len(panels) > len(dss) else 3)  # a dataset's two panels side by side
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(5.2 * ncol + 0.6, 4.4 * nrow + 0.9), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    ranks = collect.baselines(coll)
    ref = collect.reference_method(ranks)  # the zero-shot model (baseline 0): drawn as the reference star
    by_rank = sorted(pts["method"], key=lambda m: collect.method_order(m, ranks))
    methods = [m for m in dict.fromkeys(by_rank) if m != ref]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    handles: dict[str, object] = {}
    ylabel = {"ood": "OOD accuracy (%), mean of held-out domains",
              "zs": "zero-shot accuracy (%), unseen classes"}
    for ax, (ds, y) in zip(axes, panels):
        p = pts[(pts["dataset"] == ds) & pts[y].notna()]
        ye = f"{y}_se"
        for method in methods:
            curve = p[(p["method"] == method) & p["alpha"].notna()].sort_values("alpha")
            if len(curve) >= 2:
                ax.plot(100 * curve["id"], 100 * curve[y], "-", color=color[method], alpha=0.55, lw=1.8, zorder=2,
                        marker="o", ms=3.5, mfc="white")
                handles.setdefault(f"{method}+wise", Line2D(
                    [], [], color=color[method], alpha=0.55, lw=1.8, marker="o", ms=3.5, mfc="white",
                    label=f"{method} + WiSE-FT, α 0 → 1"))
                for _, r in curve.iterrows():
                    if r["alpha"] in (0.0, 0.5, 1.0):
                        ax.annotate(f"α={r['alpha']:g}", (100 * r["id"], 100 * r[y]), textcoords="offset points",
                                    xytext=(4, -11), fontsize=7.5, color=color[method])
            others = p[(p["method"] == method) & p["alpha"].isna()]
            for _, r in others.iterrows():
                marker = "o" if not r["variant"] else "D"
                ax.errorbar(100 * r["id"], 100 * r[y], xerr=100 * r["id_se"], yerr=100 * r[ye],
                            fmt=marker, color=color[method], ms=7, capsize=2.5, zorder=4, mec="black", mew=0.6)
                handles.setdefault(r["label"], Line2D([], [], ls="", marker=marker, color=color[method], ms=7,
                                                      mec="black", mew=0.6, label=r["label"]))
        zs = p[p["method"] == ref]
        if not len(zs):  # WiSE-FT at alpha 0 is the zero-shot model
            zs = p[p["alpha"] == 0.0].head(1)
        for _, r in zs.iterrows():
            ax.errorbar(100 * r["id"], 100 * r[y], xerr=100 * r["id_se"], yerr=100 * r[ye], fmt="*",
                        color="black", ms=13, capsize=2.5, zorder=5)
            handles.setdefault(REF, Line2D([], [], ls="", marker="*", color="black", ms=13,
                                           label="zero-shot" if ref in (None, "zeroshot") else f"{ref} (zero-shot)"))
        lo, hi = int(p["n"].min()), int(p["n"].max())
        seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
        ax.set_title(f"{ds}: ID vs {'OOD' if y == 'ood' else 'zero-shot'} ({seeds} trial seed{'s' if hi != 1 else ''})",
                     fontsize=11)
        ax.set_xlabel("ID accuracy (%)")
        ax.set_ylabel(ylabel[y])
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    order = [REF] + [k for k in handles if k != REF]
    shown = [handles[k] for k in order if k in handles]
    fig.legend(handles=shown, loc="outside lower center", ncol=min(len(shown), 2 if ncol == 1 else 4), fontsize=9,
               frameon=False)
    rule = model_selection.SELECTIONS[selection].split(" (")[0]
    fig.suptitle(f"Selection: {rule}; mean ± standard error over trial seeds", fontsize=10.5)
    return save_figure(fig, out)


def reliability_bins(coll: collect.Collection, selection: str = "train_val", datasets: list[str] | None = None
                     ) -> pd.DataFrame:
    """Per (dataset, row label, side: ID or OOD): the rel_bins slots (bench.calibration: count, correct, confidence
    sum per confidence bin) at the selected checkpoint, summed over trial seeds, held-out sets and domains (ID: the
    id_val sets; OOD: the held-out domains). Methods only, no post-hoc variants. Read from the selected runs'
    results files (the collector's rows leave the bins out)."""
    from bench.calibration import decode_bins

    u = model_selection.units(coll)
    chosen = model_selection.select(coll, selection, u)
    chosen = chosen[(chosen["variant"] == "") & (chosen["dataset"].isin(datasets) if datasets else True)]
    paths = coll.jobs.set_index("job")["path"]
    sums: dict[tuple[str, str, str], list[list[float]]] = {}
    for r in chosen.itertuples(index=False):
        held = set(r.test_set.split("+"))
        for row in table_cache.read_results(Path(paths[r.job]) / results.RESULTS):
            if (row.get("metric") != "rel_bins" or row.get("step") != r.step or row.get("variant", "")
                    or row.get("role") not in ("id_val", "ood") or (row["role"] == "ood" and row.get("domain") not in held)):
                continue
            key = (r.dataset, r.label, "ID" if row["role"] == "id_val" else "OOD")
            bins = decode_bins(row["bins"])
            sums[key] = bins if key not in sums else [[a + b for a, b in zip(x, y)] for x, y in zip(sums[key], bins)]
    out = []
    for (ds, label, side), (count, correct, conf) in sums.items():
        count, correct, conf = count[:-2] + [count[-2] + count[-1]], correct[:-2] + [correct[-2] + correct[-1]], \
            conf[:-2] + [conf[-2] + conf[-1]]  # the slot of confidence exactly 1.0 drawn in the last bin
        total = sum(count)
        ece = sum(abs(c - s) for c, s in zip(correct, conf)) / total if total else math.nan
        for k, (n, c, s) in enumerate(zip(count, correct, conf)):
            out.append({"dataset": ds, "label": label, "side": side, "bin": k, "n": n, "acc": c / n if n else math.nan,
                        "conf": s / n if n else math.nan, "share": n / total if total else math.nan, "ece": ece})
    return pd.DataFrame(out, columns=["dataset", "label", "side", "bin", "n", "acc", "conf", "share", "ece"])


def reliability(coll: collect.Collection, out: str | Path, selection: str = "train_val",
                datasets: list[str] | None = None) -> list[Path]:
    """Reliability diagrams (accuracy vs mean confidence per confidence bin), a panel per (dataset, ID / OOD), a
    curve per method at its selected checkpoint; writes <out>.png and <out>.pdf and returns their paths."""
    from matplotlib.figure import Figure

    bins = reliability_bins(coll, selection, datasets)
    if not len(bins):
        raise BenchError(f"{coll.root}: no selected run has rel_bins rows (calibration bins, logged since "
                                 f"issue 11) under --selection {selection}; rerun the jobs, or see "
                                 f"`bench table --metric ece_ood`")
    panels = list(dict.fromkeys(zip(bins["dataset"], bins["side"])))
    panels.sort(key=lambda p: (p[0], p[1] != "ID"))
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(5.4 * ncol + 0.6, 5.0 * nrow + 1.0), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    ranks = collect.baselines(coll)  # the labels are methods (no post-hoc variants)
    labels = sorted(dict.fromkeys(bins["label"]), key=lambda m: collect.method_order(m, ranks))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    ref = collect.reference_method(ranks)
    color = {m: "black" if m == ref else palette[i % len(palette)] for i, m in enumerate(labels)}
    for ax, (ds, side) in zip(axes, panels):
        ax.plot([0, 100], [0, 100], ls="--", color="grey", lw=1, zorder=1, label="perfect calibration")
        p = bins[(bins["dataset"] == ds) & (bins["side"] == side) & (bins["n"] > 0)]
        for label in labels:
            b = p[p["label"] == label].sort_values("bin")
            if not len(b):
                continue
            ax.plot(100 * b["conf"], 100 * b["acc"], "-", color=color[label], lw=1.4, alpha=0.8, zorder=2,
                    label=f"{label} (ECE {100 * b['ece'].iloc[0]:.1f})")
            ax.scatter(100 * b["conf"], 100 * b["acc"], s=12 + 300 * b["share"], color=color[label], alpha=0.75,
                       edgecolors="white", linewidths=0.5, zorder=3)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_aspect("equal")
        where = "the training domains' held-out split" if side == "ID" else "the held-out domains"
        ax.set_title(f"{ds}: {side} ({where})", fontsize=11)
        ax.set_xlabel("mean confidence in bin (%)")
        ax.set_ylabel("accuracy in bin (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    rule = model_selection.SELECTIONS[selection].split(" (")[0]
    fig.suptitle(f"Reliability: 15 confidence bins, pooled over trial seeds and domains; marker area ~ share of "
                 f"samples; the diagonal is perfect calibration.\nSelection: {rule}", fontsize=10)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> list[Path]:
    """`out`.png (150 dpi) and `out`.pdf, the folder made if missing; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(out.name + ".png"), out.with_name(out.name + ".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths

"""The metric registry: what `bench table --metric` accepts, what each metric means and its column header,
and the shift suites whose averages are metrics (ImageNet-style benchmarks).

Which values a metric needs and how they are averaged over trial seeds: bench.model_selection (per_seed).
This module imports no pandas and no torch.
"""
from __future__ import annotations

import yaml

from bench import cards
from bench.errors import BenchError

# ImageNet-style benchmarks: one run holds out several shift sets at once. Per-set numbers are always kept; the
# averages each suite reports are its card's `ood_averages` (datasets/imagenet.yaml): defined there only, read
# here once (torch-free, the YAML alone) so that they are metrics, columns ("Avg (4)": the number of sets) and the
# collector's fallback for runs whose card is not at hand.
def _shipped_suites() -> dict[str, dict]:
    suites = {}
    for name in cards.list_cards():
        try:
            averages = cards.read_ood_averages(name)
        except (OSError, yaml.YAMLError):  # a broken card fails where it is loaded, with its own message
            continue
        if averages:
            sets = tuple(dict.fromkeys(d for group in averages.values() for d in group))
            suites[name] = {"sets": sets,
                            "averages": {m: (f"Avg ({len(group)})", group) for m, group in averages.items()}}
    return suites


SHIFT_SUITES: dict[str, dict] = _shipped_suites()
SUITE_AVERAGES = {name: spec for suite in SHIFT_SUITES.values() for name, spec in suite["averages"].items()}

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
    "ece_zs": "zero-shot ECE on the unseen classes (15 bins, as torchmetrics), mean over domains",
    "ece_ts_zs": "zero-shot ECE after temperature scaling (T fitted on the ID validation split only), mean over domains",
    "nll_zs": "zero-shot negative log-likelihood on the unseen classes (nats, not %), mean over domains",
    "macro_f1_zs": "zero-shot macro-F1 on the unseen classes (cards with metrics: [macro_f1]), mean over domains",
}
EXTRA_METRICS = ("ece", "ece_ts", "nll", "macro_f1")  # per-set rows beyond acc that get _id, _ood and _zs columns
EXTRA_SUFFIXES = ("_id", "_ood", "_zs")  # ID domains, held-out domains, unseen classes
NATS = ("nll_id", "nll_ood", "nll_zs")  # shown as they are (nats), not as percentages


def extra_split(metric: str) -> tuple[str, str] | None:
    """'ece_ts_ood' -> ('ece_ts', '_ood'); None for a metric that is not an EXTRA_METRICS column."""
    for suffix in EXTRA_SUFFIXES:
        if metric.endswith(suffix) and metric[:-len(suffix)] in EXTRA_METRICS:
            return metric[:-len(suffix)], suffix
    return None

# Column headers when a table shows several metrics side by side (--metric id,ood_avg,zs_avg).
METRIC_HEADERS = {"id": "ID", "id_test": "ID test", "ood_avg": "OOD avg", "zs_avg": "zero-shot", "hm": "HM",
                  "xd_avg": "zero-shot (cross-dataset)", "worst_ood": "OOD worst", "hm_id_ood": "HM (ID, OOD)",
                  "ece_id": "ID ECE", "ece_ood": "OOD ECE", "ece_ts_id": "ID ECE (TS)", "ece_ts_ood": "OOD ECE (TS)",
                  "nll_id": "ID NLL", "nll_ood": "OOD NLL", "macro_f1_id": "ID macro-F1", "macro_f1_ood": "OOD macro-F1",
                  "ece_zs": "zero-shot ECE", "ece_ts_zs": "zero-shot ECE (TS)", "nll_zs": "zero-shot NLL",
                  "macro_f1_zs": "zero-shot macro-F1",
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

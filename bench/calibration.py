"""Metrics beyond accuracy, from the logits evaluation computes anyway: ECE, NLL, temperature scaling, macro-F1.

Pure functions (unit-tested alone in tests/test_calibration.py) and `SetMetrics`, the per-eval-set accumulator that
bench.evaluate feeds batch by batch: a few tensor ops per batch on logits already computed, no per-batch sync.

Definitions (the logits are a set's class logits, scaled as the model predicts them; docs/METHODS.md "Metrics"):
- ECE: torchmetrics' multiclass calibration error with n_bins=15, norm l1. The confidence of a sample is its top-1
  softmax probability; boundaries linspace(0, 1, 16); a sample goes to slot bucketize(conf, boundaries, right=True)
  - 1, i.e. bin k holds [k/15, (k+1)/15) and a 16th slot holds conf == 1.0 exactly (torchmetrics keeps it apart
  too; in fp32 it is common once logits are scaled by CLIP's 100). ECE = sum over slots of |acc - conf| x n / N.
- NLL: mean over samples of -log softmax(logits)[label] (natural log, nats).
- temperature: the T in [T_MIN, T_MAX] that minimises the NLL of logits / T on the ID validation sets (role id_val,
  pooled). The NLL is convex in beta = 1/T, so its minimiser is the root of a monotone derivative: safeguarded
  Newton on beta (bisection in log beta whenever a step leaves the bracket), in float64; deterministic.
- ECE after temperature scaling (ece_ts): the ECE of logits / T, T fitted as above, on every set.
- macro-F1: WILDS' (iWildCam): the mean over the classes present in the labels of 2 tp / (n_pred + n_true)
  (sklearn's f1_score(average='macro', labels=unique(y_true))).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.results import row

N_BINS = 15
T_MIN, T_MAX = 1e-3, 1e3
_EDGES: dict[torch.device, torch.Tensor] = {}


def _edges(device: torch.device) -> torch.Tensor:
    if device not in _EDGES:
        _EDGES[device] = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float32, device=device)  # as torchmetrics
    return _EDGES[device]


def confidence_bins(conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """(3, N_BINS + 1) float64: per slot the sample count, the correct count and the sum of confidences."""
    idx = torch.bucketize(conf.float(), _edges(conf.device), right=True) - 1
    src = torch.stack([torch.ones_like(conf, dtype=torch.float64), correct.double(), conf.double()])
    return torch.zeros(3, N_BINS + 1, dtype=torch.float64, device=conf.device).index_add_(1, idx, src)


def ece_from_bins(bins) -> float:
    """ECE from confidence_bins (summed over batches): sum over slots of |acc - conf| x count / total."""
    count, correct, conf = (torch.as_tensor(b, dtype=torch.float64) for b in bins)
    total = float(count.sum())
    if total == 0:
        return math.nan
    return float((correct - conf).abs().sum() / total)  # |acc - conf| x count = |correct - conf sum|


def top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, prediction): the top-1 softmax probability and its class, as torchmetrics takes them."""
    return logits.float().softmax(-1).max(-1)


def ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    conf, pred = top1(logits)
    return ece_from_bins(confidence_bins(conf, pred == labels))


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.double(), labels, reduction="mean"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T in [T_MIN, T_MAX] minimising nll(logits / T, labels); T_MIN or T_MAX when the minimum lies beyond."""
    z, y = logits.double(), labels

    def grad(beta: float) -> tuple[float, float]:  # d/dbeta and d2/dbeta2 of the mean NLL of beta * z
        p = (beta * z).softmax(-1)
        mean = (p * z).sum(-1)
        var = (p * (z - mean[:, None]) ** 2).sum(-1)
        return float((mean - z.gather(1, y[:, None])[:, 0]).mean()), float(var.mean())

    lo, hi = 1 / T_MAX, 1 / T_MIN
    if grad(lo)[0] >= 0:
        return T_MAX
    if grad(hi)[0] <= 0:
        return T_MIN
    beta = 1.0
    for _ in range(max_iter):
        g, h = grad(beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = beta - g / h if h > 0 else math.nan
        new = step if lo < step < hi else math.sqrt(lo * hi)
        if abs(new - beta) <= 1e-12 * beta or hi / lo <= 1 + 1e-12:
            beta = new
            break
        beta = new
    return 1 / beta


def f1_counts(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(3, n_classes) int64: per class the true positives, the predictions and the labels (summed over batches)."""
    return torch.stack([torch.bincount(labels[pred == labels], minlength=n_classes),
                        torch.bincount(pred, minlength=n_classes), torch.bincount(labels, minlength=n_classes)])


def macro_f1_from_counts(counts) -> float:
    tp, n_pred, n_true = (torch.as_tensor(c, dtype=torch.float64) for c in counts)
    present = n_true > 0
    if not present.any():
        return math.nan
    return float((2 * tp[present] / (n_pred[present] + n_true[present])).mean())


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    return macro_f1_from_counts(f1_counts(pred, labels, n_classes))


def encode_bins(bins) -> str:
    """The slots of confidence_bins as one compact string (a rel_bins row): 'counts|corrects|conf sums', each a
    comma list of N_BINS + 1 numbers (the last slot: confidence exactly 1.0)."""
    count, correct, conf = (torch.as_tensor(b, dtype=torch.float64).tolist() for b in bins)
    return "|".join([",".join(str(round(v)) for v in count), ",".join(str(round(v)) for v in correct),
                     ",".join(f"{v:.6g}" for v in conf)])


def decode_bins(text: str) -> list[list[float]]:
    """encode_bins' string back into [counts, corrects, conf sums] (no torch needed: bench.plot reads it)."""
    parts = [[float(v) for v in p.split(",")] for p in text.split("|")]
    if len(parts) != 3 or len({len(p) for p in parts}) != 1:
        raise ValueError(f"not a rel_bins encoding: {text[:60]!r}")
    return parts


class SetMetrics:
    """Accuracy, ECE bins, NLL (and macro-F1 counts, ECE bins after temperature scaling) of one eval set,
    accumulated on the device from batches of its class logits.

    keep: hold the logits (fp32, on their device) for fitting the temperature (the id_val sets) and, once it is
    fitted, for their own ece_ts; the other sets get the temperature before their first batch and need no logits."""

    def __init__(self, device: torch.device, f1: bool = False, keep: bool = False):
        self.n, self.want_f1 = 0, f1
        self.bins = torch.zeros(3, N_BINS + 1, dtype=torch.float64, device=device)
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.f1: torch.Tensor | None = None  # (3, classes) once the first batch says how many
        self.temperature: float | None = None
        self.ts_bins: torch.Tensor | None = None
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep else None

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z = z.float()
        conf, pred = top1(z)
        correct = pred == y
        self.n += len(y)
        self.bins += confidence_bins(conf, correct)
        self.nll_sum += F.cross_entropy(z, y, reduction="sum").double()
        if self.want_f1:
            counts = f1_counts(z.argmax(-1), y, z.shape[1])
            self.f1 = counts if self.f1 is None else self.f1 + counts
        if self.kept is not None:
            self.kept.append((z, y))
        if self.temperature is not None:
            self._add_ts(z, y)

    def _add_ts(self, z: torch.Tensor, y: torch.Tensor) -> None:
        conf, pred = top1(z / self.temperature)
        bins = confidence_bins(conf, pred == y)
        self.ts_bins = bins if self.ts_bins is None else self.ts_bins + bins

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([z for z, _ in self.kept]), torch.cat([y for _, y in self.kept])

    def set_temperature(self, t: float) -> None:
        """Before the set's batches; or after them for a set that kept its logits (an id_val set)."""
        self.temperature = t
        if self.kept:
            self._add_ts(*self.logits())
        self.kept = None

    def rows(self, base: dict) -> list[dict]:
        """ece, nll, ece_ts (once a temperature is set), macro_f1 (when asked for), rel_bins: rows like base
        (step, role, domain, split); none for an empty set."""
        if not self.n:
            return []
        bins = self.bins.cpu()
        out = [row(**base, metric="ece", value=ece_from_bins(bins), n=self.n),
               row(**base, metric="nll", value=float(self.nll_sum) / self.n, n=self.n)]
        if self.ts_bins is not None:
            out.append(row(**base, metric="ece_ts", value=ece_from_bins(self.ts_bins.cpu()), n=self.n))
        if self.f1 is not None:
            out.append(row(**base, metric="macro_f1", value=macro_f1_from_counts(self.f1.cpu()), n=self.n))
        out.append(row(**base, metric="rel_bins", value=N_BINS, n=self.n, bins=encode_bins(bins)))
        return out

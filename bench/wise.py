"""Post-hoc WiSE-FT: weight-space ensembles of any finished run with its zero-shot start, no retraining.

For each alpha the trained weights become (1 - alpha) theta_0 + alpha theta_final (bench.losses.interpolate)
and the run is evaluated again; the rows go into the run's results.jsonl with "variant": "wise:<alpha>",
so FLYP + WiSE, CAR-FT + WiSE, ... are rows of their own in every table.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from bench import results
from bench.errors import BenchError
from bench.evaluate import EvalData, evaluate
from bench.losses import interpolate
from bench.method import Method

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def variant_name(alpha: float) -> str:
    return f"wise:{alpha:g}"


def wise_rows(method: Method, theta0: dict, theta1: dict, alphas: Sequence[float], data: EvalData, step: int,
              device: torch.device, autocast) -> list[dict]:
    """Evaluate the interpolated models; leaves the method holding theta1."""
    rows = []
    for alpha in alphas:
        method.load_checkpoint_state(interpolate(theta0, theta1, alpha))
        for row in evaluate(method, data, step, device, autocast):
            rows.append({**row, "variant": variant_name(alpha)})
    method.load_checkpoint_state(theta1)
    return rows


def posthoc(run_dir: str | Path, alphas: Sequence[float] = DEFAULT_ALPHAS, device: str = "cpu") -> int:
    """Add (or replace) the WiSE-FT variants of a finished run; returns the number of rows written.

    The combiner `wise` (combiners/wise.py) through bench.combine: one post-hoc combiner among several."""
    from bench.combine import apply_to_run, build_combiner

    run_dir = Path(run_dir)
    if not (run_dir / results.DONE).is_file() or not (run_dir / results.FINAL).is_file():
        raise BenchError(f"{run_dir}: not a finished run with saved weights (final.pt); run it to the end first "
                         f"(with train.save_final: true)")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise BenchError(f"--alphas: {bad[0]} is outside [0, 1]")
    n = apply_to_run(build_combiner("wise", {"alphas": list(alphas)}), run_dir, device)
    log.info("%s: wrote %d WiSE-FT rows (alphas %s)", run_dir, n, ", ".join(f"{a:g}" for a in alphas))
    return n

"""Experiment trackers: TensorBoard and Weights & Biases, fed every metric row a run writes.

results.jsonl stays the record (the collector reads it alone); a tracker is a live view of the same rows, one
scalar per row, named role/metric[/domain][/split] (prefixed by the WiSE-FT variant where a row has one), at the
row's step. Configured by the run config's `trackers` section (bench.config.TrackersConfig), off by default and
not part of a job's identity. Each package is imported only when a run asks for it.

    trackers: {use: [tensorboard, wandb]}            # <run>/tensorboard (event files), <run>/wandb (wandb's folder)
    trackers: {use: [tensorboard], dir: /scratch/tb}  # <dir>/tensorboard/<run folder name>: one logdir, every run

A resumed run continues where its checkpoint was: TensorBoard discards what the earlier attempt logged after the
checkpoint's step (purge_step), as ResultsWriter does; wandb resumes the run whose id is the job id.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from bench.config import TrackersConfig
from bench.errors import BenchError

log = logging.getLogger(__name__)

# tracker -> (the module it imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_SERVER = "https://api.wandb.ai"


def scalar_name(row: dict) -> str:
    """'id_val/acc/photo/out', 'train/loss', 'wise:0.5/ood/acc/sketch/in'."""
    parts = [row.get("variant"), row.get("role"), row.get("metric"), row.get("domain"), row.get("split")]
    return "/".join(str(p) for p in parts if p not in (None, ""))


def scalars(rows: Iterable[dict]) -> list[tuple[str, float, int]]:
    """(name, value, step) of every row with a finite number as its value; not the reliability histograms
    (metric rel_bins: their value is the bin count, their content is in "bins"; bench plot --kind reliability)."""
    out = []
    for row in rows:
        if "bins" in row:
            continue
        value = row.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((scalar_name(row), float(value), int(row.get("step", 0))))
    return out


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(cfg: TrackersConfig, source: str = "config") -> None:
    """Fail at once, in one line, if a tracker asked for is not installed (before anything expensive runs)."""
    for name in cfg.use:
        module, package = PACKAGES[name]
        if not _installed(module):
            raise BenchError(f"{source}: trackers.use: {name} needs the {package} package, which is not installed; "
                             f"pip install {package} (or remove {name} from trackers.use)")


def wandb_mode(cfg: TrackersConfig, timeout: float = 3.0) -> str | None:
    """The mode wandb.init gets: None (wandb reads WANDB_MODE, which wins when set), 'online' or 'offline'.
    auto: online when the wandb server (WANDB_BASE_URL or api.wandb.ai) accepts a connection within `timeout`,
    else offline (a Slurm node without internet; `wandb sync <dir>/wandb/offline-run-*` uploads it later)."""
    if os.environ.get("WANDB_MODE"):
        return None
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    url = urlparse(os.environ.get("WANDB_BASE_URL") or WANDB_SERVER)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return "online"
    except OSError:
        log.info("wandb: %s does not answer; logging offline (wandb sync uploads it later)", url.hostname)
        return "offline"


class Trackers:
    """The trackers of one run. log(rows) after each write of results rows; close() at the end of the run."""

    def __init__(self, sinks: list[tuple[Callable[[list], None], Callable[[], None]]]):
        self._sinks = sinks

    def __bool__(self) -> bool:
        return bool(self._sinks)

    def log(self, rows: Iterable[dict]) -> None:
        values = scalars(rows)
        if values:
            for log_fn, _ in self._sinks:
                log_fn(values)

    def close(self) -> None:
        for _, close_fn in self._sinks:
            close_fn()
        self._sinks = []


def open_trackers(cfg: TrackersConfig, run_dir: Path, job_id: str, config: dict, resume_step: int | None,
                  source: str = "config") -> Trackers:
    """The run's trackers (none: an empty Trackers). resume_step: the checkpoint's step when resuming, else None."""
    require(cfg, source)
    run_dir = Path(run_dir)
    sinks = []
    if "tensorboard" in cfg.use:
        sinks.append(_tensorboard(cfg, run_dir, resume_step))
    if "wandb" in cfg.use:
        sinks.append(_wandb(cfg, run_dir, job_id, config))
    return Trackers(sinks)


def _tensorboard(cfg: TrackersConfig, run_dir: Path, resume_step: int | None):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (checked by require)

    logdir = Path(cfg.dir) / "tensorboard" / run_dir.name if cfg.dir else run_dir / "tensorboard"
    writer = SummaryWriter(str(logdir), purge_step=resume_step)
    log.info("tensorboard: logging to %s", logdir)

    def write(values):
        for name, value, step in values:
            writer.add_scalar(name, value, step)
        writer.flush()  # a preempted job loses nothing it wrote to results.jsonl

    return write, writer.close


def _wandb(cfg: TrackersConfig, run_dir: Path, job_id: str, config: dict):
    import wandb  # checked by require

    folder = Path(cfg.dir) if cfg.dir else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, name=run_dir.name, id=job_id, dir=str(folder), config=config,
                     resume="allow", mode=wandb_mode(cfg))

    def write(values):
        by_step: dict[int, dict] = {}
        for name, value, step in values:
            by_step.setdefault(step, {})[name] = value
        for step in sorted(by_step):
            run.log(by_step[step], step=step)

    return write, run.finish

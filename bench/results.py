"""Run folders on disk: config, long-format results (one metric per row), checkpoints, markers.

The one owner of a run folder's files: their names, the atomic write every file others read goes through, the
config.json record (written by the trainer, or by a sweep before launch) and the check that a folder is this job's,
and the result-row schema (`row`).

    <run>/config.json      the resolved config, job id, versions
    <run>/results.jsonl    {"step", "role", "domain", "split", "metric", "value", "n"} per line, flushed per eval
    <run>/checkpoint.pt    the latest training state (atomic), for resume
    <run>/final.pt         the trained weights at the last step (for post-hoc WiSE-FT)
    <run>/done             written last
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from bench.errors import BenchError

log = logging.getLogger(__name__)

CONFIG, RESULTS, CHECKPOINT, FINAL, DONE = "config.json", "results.jsonl", "checkpoint.pt", "final.pt", "done"


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb", fsync: bool = False) -> None:
    """`write(file)` into a hidden temporary file beside `path` (its folder made if missing), then one rename:
    a reader sees the old file or the new one, never half of one. The project's one way to write a file that
    others read (run folders, caches, checkpoints); fsync=True also flushes it to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # write failed: leave no temporary file behind
            tmp.unlink()


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    """atomic_write of a text; fsync=False for small markers rewritten often."""
    atomic_write(path, lambda f: f.write(text), "w", fsync)


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: the collector and job states read run folders without torch

    atomic_write(path, lambda f: torch.save(obj, f))


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, the line's JSON value, or None if it is not JSON) of each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except ValueError:
            yield lineno, None


def read_rows(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Rows of a results file (none if it is missing); a corrupt or truncated line is skipped with a warning
    naming the file and the line, and listed in `skipped`."""
    rows = []
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    with f:
        for lineno, row in json_lines(f):
            if not isinstance(row, dict):
                log.warning("%s:%d: skipping a corrupt results line", path, lineno)
                if skipped is not None:
                    skipped.append(f"{path}:{lineno}")
                continue
            rows.append(row)
    return rows


# ---- config.json: the run's record, and whose folder it is -----------------------------------------------------
def git_commit() -> str | None:
    """The commit of this checkout (None outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """What the run ran with: the commit, torch and python (a sweep computes it once for all its jobs)."""
    import platform

    import torch

    return {"git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version()}


def config_record(job_id: str, cfg, hparams: dict, seed: int, versions: dict, *, baseline: int | None,
                  **extra: Any) -> dict:
    """What <run>/config.json holds: the job id, the config, its resolved hparams, the training seed, the protocol
    version, `versions()`, the pretrained weights' sha256, the method's `baseline` (bench.method.baseline_of: the
    collector orders table rows by it without importing methods) and `extra` (a sweep's name and draw). Not part of
    the job id."""
    from bench import config
    from bench.models import pretrained_sha256  # cached per file version: hashed once per sweep, not per job

    return {"job_id": job_id, "config": config.to_dict(cfg), "hparams": hparams, "seed": seed,
            "protocol_version": config.PROTOCOL_VERSION, "baseline": baseline, **versions, **extra,
            "pretrained_sha256": pretrained_sha256(cfg.model.name, cfg.model.pretrained)}


def write_record(run_dir: Path, record: dict, fsync: bool = True) -> None:
    atomic_write_text(run_dir / CONFIG, json.dumps(record, indent=2, sort_keys=True), fsync=fsync)


def recorded_job(run_dir: Path) -> tuple[bool, str | None]:
    """(whether run_dir has a config.json, the job id it names: None if it names none or is unreadable)."""
    path = run_dir / CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError):
        return True, None
    return True, data.get("job_id") if isinstance(data, dict) else None


def check_owner(run_dir: Path, job_id: str, fix: str, record_must_name_it: bool = False) -> None:
    """BenchError if run_dir's config.json names another job: `<run_dir> holds another job (<id>); <fix>`.

    record_must_name_it: a config.json that names no job (or cannot be read) counts as another job's too."""
    present, other = recorded_job(run_dir)
    if present and other != job_id and (other is not None or record_must_name_it):
        raise BenchError(f"{run_dir} holds another job ({other}); {fix}")


# ---- results.jsonl: one metric per row ---------------------------------------------------------------------------
def row(step: int, role: str, metric: str, value: float, n: int, domain: str | None = None,
        split: str | None = None, **extra: Any) -> dict:
    """One result row (the schema of results.jsonl; `extra`: a variant, a calibration row's bins)."""
    return {"step": step, "role": role, "domain": domain, "split": split, "metric": metric, "value": value, "n": n,
            **extra}


class ResultsWriter:
    """Appends result rows; on resume from step s, drops rows logged after s so the file equals an unbroken run's.

    on_write: called with every batch of rows once they are on disk (bench.trackers.Trackers.log)."""

    def __init__(self, path: Path, resume_step: int | None, on_write: Callable[[list[dict]], None] | None = None):
        self.path = path
        self.on_write = on_write
        if resume_step is None:
            atomic_write_text(path, "")
        else:
            kept = [r for r in read_rows(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.on_write is not None:
            self.on_write(rows)

"""Run folders on disk: config, long-format results (one metric per row), checkpoints, markers.

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
from typing import Any, Callable, Iterable

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


def read_rows(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Rows of a results file (none if it is missing); a corrupt or truncated line is skipped with a warning
    naming the file and the line, and listed in `skipped`."""
    rows = []
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                log.warning("%s:%d: skipping a corrupt results line", path, lineno)
                if skipped is not None:
                    skipped.append(f"{path}:{lineno}")
                continue
            rows.append(row)
    return rows


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

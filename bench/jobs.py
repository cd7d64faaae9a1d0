"""Job folders and their states: the files on disk are the only source of truth.

A job folder (one per job id, see bench.results) holds, besides what the trainer writes:

    <run>/submitted   JSON {"launcher", "time", "slurm_job_id" | the local sweep's "host", "pid", "start", "log"}:
                      written by the launcher before the job starts
    <run>/heartbeat   JSON {"host", "pid", "start", "time"}: written when the job starts, touched every ~30 s
    <run>/failed      the traceback of the exception that ended the job

job_state(run_dir) reads them:

    done       `done` is there (written by the trainer, last)
    failed     `failed` is there
    running    a heartbeat younger than `stale_after` seconds (and, on this host, its process is alive)
    stale      a heartbeat, but older than that or its process is gone: the job died without a word
    submitted  `submitted` but no heartbeat yet (queued, or requeued after a preemption)
    missing    none of these (no folder, or a folder a launcher never touched)

(A job launched by a local or debug sweep that is gone before the job started reads stale too: it never will.)

A relaunch removes `failed` and `heartbeat` before writing `submitted` again, so no file's age is compared with
another's. This module imports no torch: a job's process unpickles JobTask from here and sets its thread count
before torch is imported.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench.results import CONFIG, DONE, atomic_write_text


log = logging.getLogger(__name__)

SUBMITTED, HEARTBEAT, FAILED = "submitted", "heartbeat", "failed"
STATES = ("missing", "submitted", "running", "stale", "done", "failed")
HEARTBEAT_S = 30.0  # how often a running job touches its heartbeat
STALE_AFTER_S = 300.0  # a heartbeat older than this (10 missed beats) means the job died
OWNER_ENV = "BENCH_SWEEP_OWNER"  # "pid:start" of a local sweep: its jobs end when it ends

_HOST = socket.gethostname()


# ---- states ------------------------------------------------------------------------------------
def job_state(run_dir: str | Path, stale_after: float = STALE_AFTER_S, now: float | None = None) -> str:
    """One of STATES, from the files in `run_dir` alone."""
    try:
        names = set(os.listdir(run_dir))
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    return state_of(Path(run_dir), names, stale_after, now)


def state_of(run_dir: Path, names: set[str], stale_after: float = STALE_AFTER_S, now: float | None = None) -> str:
    """job_state of a folder whose file names are listed already."""
    now = time.time() if now is None else now
    if DONE in names:
        return "done"
    if FAILED in names:
        return "failed"
    if HEARTBEAT in names:
        path = run_dir / HEARTBEAT
        try:
            age = now - path.stat().st_mtime
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return "running"  # being rewritten right now
        if age > stale_after or not _process_alive(info):
            return "stale"
        return "running"
    if SUBMITTED in names:
        # A local or debug launch names its sweep's process: a job whose sweep is gone before it started never
        # will (local jobs end with their sweep). Slurm's queue holds its jobs: no process is named for them.
        info = read_json(run_dir / SUBMITTED)
        return "submitted" if _process_alive(info) else "stale"
    return "missing"


def states(run_dirs: list[Path], stale_after: float = STALE_AFTER_S) -> list[str]:
    """job_state of many folders of one output folder, listing the output folder once (fast for 10,000 jobs)."""
    now = time.time()
    parents = {p.parent for p in run_dirs}
    present: set[Path] = set()
    for parent in parents:
        try:
            present |= {parent / name for name in os.listdir(parent)}
        except FileNotFoundError:
            pass
    out = []
    for d in run_dirs:
        if d not in present:
            out.append("missing")
            continue
        try:
            out.append(state_of(d, set(os.listdir(d)), stale_after, now))
        except (FileNotFoundError, NotADirectoryError):
            out.append("missing")
    return out


def _proc_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot) or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(info: dict) -> bool:
    """False only when the process is known to be gone: it ran on this host and its pid is dead or reused."""
    if info.get("host") != _HOST or not info.get("pid") or not os.path.isdir("/proc"):
        return True
    return _proc_start(int(info["pid"])) == info.get("start")


def owner_token() -> str:
    return f"{os.getpid()}:{_proc_start(os.getpid())}"


def this_process() -> dict:
    """What `submitted` records of a local sweep (or `heartbeat` of a job): host, pid and start time."""
    return {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid())}


def _owner_alive(token: str) -> bool:
    pid, start = token.split(":", 1)
    return _proc_start(int(pid)) == start


# ---- files ---------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    """Atomic (rename), without fsync: these are small markers, rewritten often, 10,000 at a time."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True), fsync=False)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def mark_submitted(run_dir: Path, launcher: str, **info: Any) -> None:
    """Before (re)launching: clear the previous attempt's heartbeat and failure, then write `submitted`."""
    for name in (FAILED, HEARTBEAT):
        (run_dir / name).unlink(missing_ok=True)
    write_submitted(run_dir, {"launcher": launcher, "time": time.time(), **info})


def write_submitted(run_dir: Path, info: dict) -> None:
    _write_json(run_dir / SUBMITTED, info)


def update_submitted(run_dir: Path, **info: Any) -> None:
    path = run_dir / SUBMITTED
    _write_json(path, {**read_json(path), **info})


def unmark(run_dir: Path) -> None:
    """A job cancelled by its own launcher (Ctrl-C of a local sweep) goes back to 'missing' (its checkpoint stays)."""
    for name in (SUBMITTED, HEARTBEAT):
        (run_dir / name).unlink(missing_ok=True)


class Heartbeat:
    """Touches <run>/heartbeat every `every` seconds from a daemon thread while the job runs.

    owner: a local sweep's token; when that process is gone, the job kills itself (a local sweep's jobs
    end with it, as they would on a cluster whose scheduler died)."""

    def __init__(self, run_dir: Path, every: float = HEARTBEAT_S, owner: str | None = None, write: bool = True):
        self.path = Path(run_dir) / HEARTBEAT
        self.every = every
        self.owner = owner
        self.write = write  # False: only watch the owner (the other ranks of a multi-process job)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        if self.write:
            _write_json(self.path, {**this_process(), "time": time.time(), "slurm_job_id": _slurm_job_id()})
        self._thread.start()
        return self

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(1.0, self.every)):
            if self.owner and not _owner_alive(self.owner):
                log.error("the sweep that launched this job is gone; stopping")
                os.kill(os.getpid(), 9)
            if self.write and time.monotonic() - last >= self.every:
                try:
                    os.utime(self.path)
                except FileNotFoundError:  # removed by a relaunch: this attempt is no longer the job's
                    return
                last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _export_distributed_env() -> int:
    """A job running as several tasks (launcher.slurm gpus, tasks_per_node or nodes > 1; launcher.local.processes
    > 1): torch's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from Slurm's or submitit's
    local one, through submitit; -> this task's rank."""
    local = os.environ.get("SUBMITIT_EXECUTOR") == "local"  # a local sweep's job, even inside a Slurm allocation
    ntasks = os.environ.get("SUBMITIT_LOCAL_NTASKS" if local else "SLURM_NTASKS", "1")
    if int(ntasks or 1) > 1 and ("SUBMITIT_LOCAL_GLOBALID" if local else "SLURM_PROCID") in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if local:  # every rank on this machine: loopback, not the host name (which may not resolve)
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        return env.rank
    return int(os.environ.get("RANK", "0") or 0)


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


# ---- the job itself --------------------------------------------------------------------------
try:  # submitit is a dependency; the fallback keeps this module importable without it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover
    _Checkpointable = object


class JobTask(_Checkpointable):
    """What a launcher runs: given only a job folder, train/evaluate/resume the job whose config.json is there.

    Checkpointable: on preemption or timeout submitit calls `checkpoint` and requeues the same call; the run
    resumes from <run>/checkpoint.pt."""

    def __init__(self, threads: int | None = None, heartbeat_s: float = HEARTBEAT_S, owner: str | None = None):
        self.threads = threads
        self.heartbeat_s = heartbeat_s
        self.owner = owner

    def __call__(self, run_dir: str) -> str:
        run_dir = Path(run_dir)
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0) or None
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(threads)
        if not logging.getLogger().handlers:  # a job's own process: its log file shows the trainer's progress
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("bench").addHandler(handler)
            logging.getLogger("bench").setLevel(logging.INFO)
            logging.getLogger("bench").propagate = False  # a library's logging.info() may configure the root
        rank = _export_distributed_env()
        # one heartbeat file per job (rank 0's); every rank of a local job watches its sweep, to end with it
        beat = Heartbeat(run_dir, self.heartbeat_s, self.owner, write=rank == 0) if rank == 0 or self.owner else None
        if beat is not None:
            beat.start()
        try:
            import torch

            if threads:
                torch.set_num_threads(threads)
            from bench import config
            from bench.train import run

            record = json.loads((run_dir / CONFIG).read_text())
            cfg = config.from_dict(config.RunConfig, record["config"], str(run_dir / CONFIG))
            run(cfg, run_dir, progress=False, source=str(run_dir / CONFIG))
        except Exception:
            if self.owner and not _owner_alive(self.owner):  # a rank whose peer ended with the sweep: not a failure
                log.error("the sweep that launched this job is gone; stopping")
                raise
            atomic_write_text(run_dir / FAILED, traceback.format_exc())
            raise
        finally:  # KeyboardInterrupt / SystemExit (cancel, requeue): neither done nor failed
            if beat is not None:
                beat.stop()
        return str(run_dir)

    def checkpoint(self, run_dir: str) -> Any:
        """Called by submitit before it requeues this job: the job is 'submitted' again, not 'stale'."""
        update_submitted(Path(run_dir), requeued=time.time())
        try:
            os.unlink(Path(run_dir) / HEARTBEAT)
        except FileNotFoundError:
            pass
        return super().checkpoint(run_dir)

"""Launching a sweep's jobs through submitit: debug (in this process), local (local processes), slurm (job arrays).

Every launcher does the same three things: plan from the job folders' states (bench.jobs), write each job's
folder (config.json, `submitted`) and hand the job its folder alone (bench.jobs.JobTask reads the rest there).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from bench import jobs as job_states
from bench import results
from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.sweep import Job, SweepConfig

log = logging.getLogger(__name__)

SHOWN_STATES = ("done", "running", "submitted", "failed", "stale", "missing")


# ---- configuration (a sweep file's `launcher:` section) ---------------------------------------------
@dataclass(frozen=True)
class LocalLauncher:
    workers: Any = "auto"  # jobs at once; auto: one per `processes` GPUs, else one per `processes` cores
    threads: Any = "auto"  # torch threads per process; auto: cores // (workers x processes)
    processes: int = 1  # per job; more than 1: a distributed job of that many ranks, one GPU each where there are GPUs


@dataclass(frozen=True)
class SlurmLauncher:
    partition: str | None = None
    gpus: int = 1  # per job and node; more than 1: one Slurm task per GPU, a distributed job (bench/distributed.py)
    nodes: int = 1  # per job; more than 1: a distributed job over tasks_per_node x nodes tasks
    tasks_per_node: int | None = None  # null: one per GPU (1 for a CPU job); a CPU job (gpus 0) may set more (gloo)
    cpus: int = 8  # per task, i.e. per process (also its torch threads)
    mem_gb: float = 32  # per task: --mem (per node) asks for mem_gb x tasks_per_node
    time_min: int = 240  # per attempt; a job that times out is requeued and resumes
    array_parallelism: int = 256  # array tasks running at once
    max_array_size: int | None = None  # null: Slurm's MaxArraySize; bigger sweeps go out as several arrays
    signal_delay_s: int = 120  # USR2 this long before the time limit: submitit requeues the job
    job_name: str | None = None  # default: the sweep's name
    sbatch: Mapping[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {account: x, qos: y}
    setup: tuple[str, ...] = ()  # shell lines run before each job, e.g. "module load cuda"


@dataclass(frozen=True)
class LauncherConfig:
    kind: str = "local"  # debug (in this process) | local (local processes) | slurm (job arrays)
    heartbeat_s: float = 30.0
    stale_after_s: float = 300.0
    local: LocalLauncher = field(default_factory=LocalLauncher)
    slurm: SlurmLauncher = field(default_factory=SlurmLauncher)


LAUNCHERS = ("debug", "local", "slurm")


# launcher.slurm's numbers: key -> (lowest allowed, what it is); max_array_size may also be null
_SLURM_BOUNDS = {"gpus": (0, "GPUs per job and node; 0 for a CPU job"), "nodes": (1, "nodes per job"),
                 "tasks_per_node": (1, "processes per node; null: one per GPU"),
                 "cpus": (1, "CPU cores per task"), "mem_gb": (0, "memory per task, GiB"),
                 "time_min": (1, "minutes per attempt"), "array_parallelism": (1, "array tasks running at once"),
                 "max_array_size": (1, "tasks per job array; null: Slurm's MaxArraySize"),
                 "signal_delay_s": (0, "seconds between the requeue signal and the time limit")}


def _check_slurm(sc: SlurmLauncher, source: str) -> None:
    """Every number of launcher.slurm in range (their types are checked at load), before anything is written or
    submitted: sbatch would refuse some only after the job folders exist, and take others (0 nodes, no memory)."""
    for key, (lo, what) in _SLURM_BOUNDS.items():
        value = getattr(sc, key)
        if value is None and key in ("max_array_size", "tasks_per_node"):
            continue
        if value < lo or (key == "mem_gb" and value <= 0):
            bound = "above 0" if key == "mem_gb" else f"at least {lo}"
            raise BenchError(f"{source}: launcher.slurm.{key}: {value!r} is out of range; set it {bound} ({what})")
    if sc.gpus and sc.tasks_per_node not in (None, sc.gpus):
        raise BenchError(f"{source}: launcher.slurm.tasks_per_node: {sc.tasks_per_node} with gpus: {sc.gpus}; each "
                         f"task drives one GPU, so leave tasks_per_node null or set it to {sc.gpus}")


def tasks_per_node(sc: SlurmLauncher) -> int:
    """Slurm tasks (one process, one rank each) per node of a job: one per GPU, or tasks_per_node on a CPU job."""
    return sc.tasks_per_node or max(1, sc.gpus)


def processes(sc: SlurmLauncher) -> int:
    """Processes (ranks) of one job on Slurm: tasks per node x nodes."""
    return tasks_per_node(sc) * sc.nodes


def check_processes(jobs, lc: LauncherConfig, kind: str, source: str) -> None:
    """Where the launcher runs each job as several processes (launcher.slurm's tasks, launcher.local.processes),
    every job can be split over them (a method with an accumulation route, a batch of at least processes x
    accum_steps): checked for the plan, not discovered by each job once it runs."""
    from bench import distributed
    from bench.method import METHODS

    world = {"slurm": processes(lc.slurm), "local": lc.local.processes}.get(kind, 1)
    where = "launcher.slurm" if kind == "slurm" else "launcher.local"
    if world == 1:
        return
    seen = set()
    for job in jobs:
        tc = job.cfg.train
        key = (job.cfg.method, tc.batch_size, tc.accum_steps)
        if key not in seen:
            seen.add(key)
            distributed.check(METHODS.get(job.cfg.method), tc.batch_size, tc.accum_steps, world,
                              f"{source}: {where} runs each job as {world} processes")


def check_launcher(lc: LauncherConfig, source: str) -> None:
    """The launcher section of a sweep file, checked at load (types by bench.config.from_dict, values here)."""
    if lc.kind not in LAUNCHERS:
        raise BenchError(f"{source}: launcher.kind: {lc.kind!r} is not one of {', '.join(LAUNCHERS)}")
    for key in ("workers", "threads"):
        value = getattr(lc.local, key)
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BenchError(f"{source}: launcher.local.{key} must be auto or a positive integer, got {value!r}")
    if lc.local.processes < 1:
        raise BenchError(f"{source}: launcher.local.processes: {lc.local.processes} is out of range; set it at least 1 "
                         f"(processes per job)")
    _check_slurm(lc.slurm, source)


# ---- planning ------------------------------------------------------------------------------------
@dataclass
class Plan:
    jobs: list[Job]
    states: list[str]
    retry: bool = False
    notes: list[str] = field(default_factory=list)  # what the plan learnt beyond the job folders (Slurm's queue)

    @property
    def counts(self) -> collections.Counter:
        return collections.Counter(self.states)

    @property
    def to_launch(self) -> list[Job]:
        wanted = {"missing", "failed", "stale"} if self.retry else {"missing"}
        return [j for j, s in zip(self.jobs, self.states) if s in wanted]


def make_plan(jobs: list[Job], retry: bool = False, stale_after: float = job_states.STALE_AFTER_S) -> Plan:
    plan = Plan(jobs, job_states.states([j.run_dir for j in jobs], stale_after), retry)
    if "submitted" in plan.states:  # jobs in a Slurm queue: asked there whether they still are
        from bench import slurm

        slurm.reconcile(plan, stale_after)
    return plan


def _job_seconds(job: Job) -> float | None:
    """Wall time of a done job's last attempt: from its heartbeat's start to its `done`."""
    try:
        start = json.loads((job.run_dir / job_states.HEARTBEAT).read_text())["time"]
        return max(0.0, (job.run_dir / results.DONE).stat().st_mtime - start)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate(plan: Plan, jobs: list[Job], gpus_per_job: int = 0, max_timed: int = 30) -> str:
    """Compute to launch: training steps, and job time from finished jobs of the same method and dataset."""
    todo = jobs
    steps = sum(j.steps for j in todo)
    timed: dict[tuple, list[float]] = collections.defaultdict(list)
    for j, s in zip(plan.jobs, plan.states):
        key = (j.cfg.method, j.cfg.data.dataset)
        if s == "done" and len(timed[key]) < max_timed:
            sec = _job_seconds(j)
            if sec is not None:
                timed[key].append(sec / max(1, j.steps) if j.trains else sec)
    text = f"{len(todo):,} jobs, {steps:,} training steps"
    if not todo:
        return text
    by_method: dict[str, list[float]] = collections.defaultdict(list)
    for (m, _), v in timed.items():
        by_method[m] += v
    seconds, n_unknown = 0.0, 0
    for j in todo:
        v = timed.get((j.cfg.method, j.cfg.data.dataset)) or by_method.get(j.cfg.method)
        if not v:
            n_unknown += 1
            continue
        rate = sum(v) / len(v)
        seconds += rate * (max(1, j.steps) if j.trains else 1)
    n_timed = sum(len(v) for v in timed.values())
    if n_unknown == len(todo):
        return text + " (no finished job of these methods yet to time them)"
    text += f"; ~{fmt_hours(seconds)} of job time"
    if gpus_per_job:
        text += f" (~{seconds * gpus_per_job / 3600:,.1f} GPU-h)"
    text += f", timed on {n_timed} finished job{'s' if n_timed != 1 else ''} of the same method and dataset"
    if n_unknown:
        text += f"; {n_unknown:,} jobs of untimed methods not counted"
    return text


def status_text(source: str, sweep: SweepConfig, plan: Plan, kind: str) -> str:
    counts = plan.counts
    lines = [f"{source}: {len(plan.jobs):,} jobs in {sweep.output} ({describe(sweep, plan.jobs)})",
             "  " + " · ".join(f"{s} {counts.get(s, 0):,}" for s in SHOWN_STATES)]
    methods = sorted({j.cfg.method for j in plan.jobs})
    if len(methods) > 1:
        per = collections.defaultdict(collections.Counter)
        for j, s in zip(plan.jobs, plan.states):
            per[j.cfg.method][s] += 1
        width = max(len(m) for m in methods + ["method"])
        lines.append("  " + "method".ljust(width) + "".join(f"{s:>10s}" for s in SHOWN_STATES))
        for m in methods:
            lines.append("  " + m.ljust(width) + "".join(f"{per[m].get(s, 0):>10,}" for s in SHOWN_STATES))
    todo = plan.to_launch
    again = counts.get("failed", 0) + counts.get("stale", 0)
    line = f"  to launch: {len(todo):,}"
    if again and not plan.retry:
        line += f" (and {again:,} failed or stale: add --retry to relaunch them)"
    lines.append(line)
    sc = sweep.launcher.slurm
    gpus = sc.gpus * sc.nodes if kind == "slurm" else 0  # a multi-node job holds gpus on each of its nodes
    lines.append(f"  compute to launch ({kind}): {estimate(plan, todo, gpus)}")
    failed = [j for j, s in zip(plan.jobs, plan.states) if s == "failed"][:3]
    for j in failed:
        lines.append(f"  failed: {j.run_dir / job_states.FAILED}: {last_line(j.run_dir / job_states.FAILED)}")
    lines += [f"  {note}" for note in plan.notes]
    return "\n".join(lines)


def last_line(path: Path) -> str:
    """The last non-blank line of a text file (a failure's traceback ends with its message); "" if unreadable."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


# ---- writing job folders -------------------------------------------------------------------------
def write_folder(job: Job, launcher: str) -> dict:
    """config.json (once: a relaunch keeps the first) and `submitted`; returns what `submitted` holds.
    Few file operations: a sweep of 10,000 jobs writes 10,000 folders."""
    try:
        job.run_dir.mkdir(parents=True)
        fresh = True
    except FileExistsError:
        fresh = False
    path = job.run_dir / results.CONFIG
    if not fresh and path.is_file():
        results.check_owner(job.run_dir, job.job_id, "move it away, it is not this sweep's")
    else:
        results.write_record(job.run_dir, job.record, fsync=False)
    info = {"launcher": launcher, "time": time.time()}
    if launcher in ("local", "debug"):  # the jobs end with this process (see bench.jobs)
        info.update(job_states.this_process())
    if fresh:
        job_states.write_submitted(job.run_dir, info)
    else:
        job_states.mark_submitted(job.run_dir, **info)
    return info


# ---- launchers ------------------------------------------------------------------------------------
@dataclass
class Report:
    launched: int = 0
    done: int = 0
    failed: list[Path] = field(default_factory=list)
    died: list[Path] = field(default_factory=list)  # ended without done or failed (killed, out of memory)
    slurm_ids: list[str] = field(default_factory=list)


def launch(jobs: list[Job], sweep: SweepConfig, kind: str | None = None, progress: bool = True,
           workers: int | None = None, task: Callable | None = None) -> Report:
    kind = kind or sweep.launcher.kind
    if not jobs:
        return Report()
    _draw_generated_data(jobs, progress)
    if kind == "debug":
        return _launch_debug(jobs, sweep, task)
    if kind == "local":
        from bench import local

        return local.launch_local(jobs, sweep, progress, workers, task)
    if kind == "slurm":
        from bench import slurm

        return slurm.launch_slurm(jobs, sweep, task)
    raise BenchError(f"launcher {kind!r} is not one of debug, local, slurm")


def _draw_generated_data(jobs: list[Job], progress: bool) -> None:
    """The embedded benchmark is drawn on first use: once, here, not by parallel jobs racing to write it."""
    from bench.cards import load_card
    from bench.layouts import ensure_generated

    for dataset, root in sorted({(j.cfg.data.dataset, j.cfg.data.root) for j in jobs}):
        card = load_card(dataset)
        if card.generator is not None:
            ensure_generated(card, root, progress)


def submitit_folder(sweep: SweepConfig) -> Path:
    """Where submitit keeps a sweep's pickles and (Slurm) logs: one folder for the whole sweep."""
    return Path(sweep.output).resolve() / ".submitit"


def _launch_debug(jobs: list[Job], sweep: SweepConfig, task) -> Report:
    """In this process, one job after the other (submitit's DebugExecutor: pdb on failure when interactive)."""
    import submitit

    task = task or job_states.JobTask(heartbeat_s=sweep.launcher.heartbeat_s)
    executor = submitit.DebugExecutor(folder=submitit_folder(sweep) / "debug")
    report = Report()
    for job in jobs:
        write_folder(job, "debug")
        report.launched += 1
        sub = executor.submit(task, str(job.run_dir))
        try:
            if sys.stdin is not None and sys.stdin.isatty():
                sub.result()
            else:
                sub.submission().result()
        except KeyboardInterrupt:
            job_states.unmark(job.run_dir)
            raise
        report.done += 1
    return report


# ---- describing a plan ---------------------------------------------------------------------------
def describe(sweep: SweepConfig, jobs: list[Job]) -> str:
    """'2 methods x 1 dataset x 4 held-out domain sets x 20 draws x 3 trial seeds'."""
    def n(count, word):
        return f"{count} {word}{'' if count == 1 else 's'}"
    domain_sets = {(j.cfg.data.dataset, j.cfg.data.test_domains) for j in jobs}
    draws = {j.draw for j in jobs}
    return " x ".join([n(len({j.cfg.method for j in jobs}), "method"),
                       n(len({j.cfg.data.dataset for j in jobs}), "dataset"),
                       n(len(domain_sets), "held-out domain set"), n(len(draws), "draw"),
                       n(len({j.cfg.trial_seed for j in jobs}), "trial seed")])


def fmt_hours(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"

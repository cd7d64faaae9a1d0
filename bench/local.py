"""Sweeps on this machine: local processes through submitit's LocalExecutor, a job per GPU (or per
`processes` GPUs) or per core, ending with the sweep that launched them.

The launcher.local section itself is configuration: bench.launch."""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from bench import jobs as job_states
from bench.errors import BenchError
from bench.launch import Report, last_line, write_folder

if TYPE_CHECKING:
    from bench.sweep import Job, SweepConfig

log = logging.getLogger(__name__)


def local_resources(n_jobs: int, workers: int | str | None, threads: int | str | None,
                    processes: int = 1) -> tuple[int, int, list[int]]:
    """(workers, torch threads per process, GPU ids): one job per `processes` GPUs, else per `processes` cores;
    threads = cores // (workers x processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus: list[int] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = list(range(torch.cuda.device_count()))
    except ImportError:  # pragma: no cover
        pass
    if gpus and processes > len(gpus):
        raise BenchError(f"launcher.local.processes: {processes} processes a job, one GPU each, but this machine has "
                         f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}; set it to at most {len(gpus)}")
    if workers in (None, "auto"):
        workers = len(gpus) // processes if gpus else cores // processes
    workers = max(1, min(int(workers), n_jobs))
    if gpus:  # every running job holds its own GPUs
        workers = min(workers, len(gpus) // processes)
    if threads in (None, "auto"):
        threads = max(1, cores // (workers * processes))
    return workers, int(threads), gpus


@contextlib.contextmanager
def _master_port(processes: int):
    """For a job of several local processes: MASTER_PORT, a port free now, in the environment that submitit's
    LocalExecutor hands to the job (copied at submission); the sweep's own environment is restored after."""
    if processes == 1:
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = str(port)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MASTER_PORT", None)
        else:
            os.environ["MASTER_PORT"] = before


def launch_local(jobs: list[Job], sweep: SweepConfig, progress: bool, workers: int | None, task) -> Report:
    """Local processes (submitit's LocalExecutor), `workers` at once, with a progress bar.

    The jobs end with this process (a killed sweep leaves no orphans; its jobs read 'stale' and --retry
    resumes them); Ctrl-C cancels the running jobs and returns them to 'missing' (their checkpoints stay)."""
    import submitit
    from tqdm.auto import tqdm

    lc = sweep.launcher.local
    workers, threads, gpus = local_resources(len(jobs), workers or lc.workers, lc.threads, lc.processes)
    task = task or job_states.JobTask(threads=threads, heartbeat_s=sweep.launcher.heartbeat_s,
                                      owner=job_states.owner_token())
    log.info("local launcher: %d jobs, %d at once, %s%d torch threads each%s", len(jobs), workers,
             f"{lc.processes} processes a job, " if lc.processes > 1 else "", threads, f", GPUs {gpus}" if gpus else "")
    pending = collections.deque(jobs)
    running: dict[str, tuple[Job, object, list[int]]] = {}
    free_gpus = list(gpus)
    report = Report()
    bar = tqdm(total=len(jobs), disable=not progress, unit="job", desc=sweep.name, dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                group = [free_gpus.pop(0) for _ in range(lc.processes)] if free_gpus else []
                executor = submitit.LocalExecutor(folder=job.run_dir / "logs")
                executor.update_parameters(timeout_min=60 * 24 * 365, gpus_per_node=len(group), visible_gpus=group,
                                           tasks_per_node=lc.processes)
                write_folder(job, "local")
                with _master_port(lc.processes):  # the job's ranks meet on a port that was free
                    sub = executor.submit(task, str(job.run_dir))
                job_states.update_submitted(job.run_dir, local_pid=sub.job_id, log=str(sub.paths.stdout),
                                   err=str(sub.paths.stderr))
                running[job.job_id] = (job, sub, group)
                report.launched += 1
            time.sleep(0.2)
            for key in [k for k, (_, sub, _) in running.items() if sub.done()]:
                job, sub, group = running.pop(key)
                free_gpus.extend(group)
                state = job_states.job_state(job.run_dir)
                if state == "done":
                    report.done += 1
                elif state == "failed":
                    report.failed.append(job.run_dir)
                    log.error("job %s failed: %s", job.run_dir, last_line(job.run_dir / job_states.FAILED))
                else:
                    report.died.append(job.run_dir)
                    log.error("job %s ended without a result (%s); see %s", job.run_dir, state, sub.paths.stderr)
                bar.update(1)
                bar.set_postfix(done=report.done, failed=len(report.failed) + len(report.died))
    except BaseException:
        for job, sub, _ in running.values():
            sub.cancel()
        deadline = time.time() + 15
        for job, sub, _ in running.values():
            while not sub.done() and time.time() < deadline:
                time.sleep(0.1)
            if job_states.job_state(job.run_dir) not in ("done", "failed"):
                job_states.unmark(job.run_dir)
        raise
    finally:
        bar.close()
    return report

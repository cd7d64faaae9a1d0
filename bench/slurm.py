"""Sweeps on Slurm: job arrays through submitit, and sbatch's own check of a sweep's settings before it is queued.

The launcher.slurm section itself (its fields and range checks) is configuration: bench.launch."""
from __future__ import annotations

import collections
import getpass
import logging
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

from bench import jobs as job_states
from bench.errors import BenchError
from bench.launch import Plan, Report, submitit_folder, tasks_per_node, write_folder

if TYPE_CHECKING:
    from bench.sweep import Job, SweepConfig

log = logging.getLogger(__name__)


def slurm_max_array_size() -> int:
    """Slurm's MaxArraySize (array indices run 0 .. MaxArraySize - 1)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if line.strip().startswith("MaxArraySize"):
                return int(line.split("=", 1)[1].strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return 1001  # Slurm's default


def executor_for(sweep: SweepConfig):
    """submitit's SlurmExecutor with launcher.slurm's parameters (nothing is submitted or written)."""
    import submitit

    sc = sweep.launcher.slurm
    # One folder for the whole sweep's logs and pickles (a folder per job would cost 10,000 mkdirs).
    executor = submitit.SlurmExecutor(folder=submitit_folder(sweep), max_num_timeout=3)
    tasks = tasks_per_node(sc)  # --mem is per node: mem_gb is per task
    params = dict(time=sc.time_min, cpus_per_task=sc.cpus, mem=f"{int(round(sc.mem_gb * 1024 * tasks))}M",
                  array_parallelism=sc.array_parallelism, signal_delay_s=sc.signal_delay_s,
                  job_name=sc.job_name or sweep.name, setup=list(sc.setup),
                  additional_parameters=dict(sc.sbatch) or None)
    if sc.partition:
        params["partition"] = sc.partition
    if sc.gpus:
        params["gpus_per_node"] = sc.gpus
    if tasks > 1 or sc.nodes > 1:  # one task per GPU (or tasks_per_node), each one rank (bench/distributed.py)
        params.update(ntasks_per_node=tasks, nodes=sc.nodes)
    try:
        executor.update_parameters(**params)
    except ValueError as err:
        raise BenchError(f"launcher.slurm: {str(err).splitlines()[0]}; fix launcher.slurm") from None
    return executor


def check_submission(sweep: SweepConfig, n_jobs: int, source: str) -> str:
    """Ask this cluster's sbatch whether it would take the sweep's job arrays (`sbatch --test-only` on the script
    submitit would submit: partition, GPUs, memory, CPUs, tasks, account, ...), before any job folder is written.
    Raises a one-line BenchError naming the file when it would not; returns what was checked, for the plan."""
    if shutil.which("sbatch") is None:
        return "launcher.slurm not checked: sbatch is not on PATH here (sbatch checks it when the sweep is submitted)"
    try:
        from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor submits (not public API)
    except ImportError:
        return "launcher.slurm not checked: this submitit has no _make_sbatch_string (sbatch checks it at submission)"
    executor = executor_for(sweep)
    size = sweep.launcher.slurm.max_array_size or slurm_max_array_size()
    text = _make_sbatch_string(command="true", folder=executor.folder, map_count=max(1, min(n_jobs, size)),
                               **executor.parameters)
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="bench-sbatch-") as script:
        script.write(text)
        script.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            return f"launcher.slurm not checked: sbatch --test-only did not answer ({type(err).__name__})"
    lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    if done.returncode != 0:
        why = lines[-1].removeprefix("sbatch: error: ") if lines else f"exit status {done.returncode}"
        raise BenchError(f"{source}: launcher.slurm: this cluster's sbatch would refuse the jobs ({why}); fix "
                         f"launcher.slurm (partition, gpus, tasks_per_node, cpus, mem_gb, time_min, sbatch) for it")
    return "launcher.slurm checked: sbatch --test-only accepts the job array" + (
        f" ({lines[-1].removeprefix('sbatch: ')})" if lines else "")


def launch_slurm(jobs: list[Job], sweep: SweepConfig, task) -> Report:
    """Job arrays through submitit; returns once they are queued. Each array task gets one job folder."""
    if shutil.which("sbatch") is None:
        raise BenchError("launcher slurm: sbatch not found on PATH; run on a Slurm login node (or start the test "
                         "cluster: scripts/slurm-local.sh start), or use --launcher local")
    sc = sweep.launcher.slurm
    executor = executor_for(sweep)
    task = task or job_states.JobTask(threads=sc.cpus, heartbeat_s=sweep.launcher.heartbeat_s)
    size = sc.max_array_size or slurm_max_array_size()
    report = Report()
    for start in range(0, len(jobs), size):
        chunk = jobs[start:start + size]
        infos = [write_folder(job, "slurm") for job in chunk]
        try:
            subs = executor.map_array(task, [str(j.run_dir) for j in chunk])
        except Exception as err:  # noqa: BLE001  (sbatch refused: nothing of this chunk is queued)
            for job in chunk:
                job_states.unmark(job.run_dir)
            first = str(err).strip().splitlines()
            raise BenchError(f"sbatch refused the array ({first[-1] if first else type(err).__name__}); "
                             f"check launcher.slurm (partition, gpus, mem, time, sbatch)") from None
        folder = str(submitit_folder(sweep))
        for job, sub, info in zip(chunk, subs, infos):  # submitit's file names, without its slow path helpers
            job_states.write_submitted(job.run_dir, {**info, "slurm_job_id": sub.job_id,
                                            "log": f"{folder}/{sub.job_id}_0_log.out",
                                            "err": f"{folder}/{sub.job_id}_0_log.err"})
        report.launched += len(chunk)
        array_id = subs[0].job_id.split("_")[0]
        report.slurm_ids.append(array_id)
        log.info("slurm array %s: %d jobs", array_id, len(chunk))
    return report


# ---- the queue -----------------------------------------------------------------------------------
def queue() -> dict[str, tuple[str, str]] | None:
    """This user's jobs in Slurm's queue: job id ('123_4' for an array task) -> (state, reason); None where
    squeue cannot be asked (not on PATH, no cluster answering)."""
    if shutil.which("squeue") is None:
        return None
    try:
        user = ["-u", getpass.getuser()]
    except (KeyError, OSError):  # no name for this uid (a container): every user's jobs, which hold ours
        user = []
    try:
        done = subprocess.run(["squeue", "-h", "-r", *user, "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    out = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def reconcile(plan: Plan, stale_after: float) -> None:
    """The plan's `submitted` Slurm jobs against Slurm's queue. One that the queue no longer holds and that never
    started (no heartbeat, no result) is lost, not waiting: cancelled while pending, or failed before the harness
    ran (a broken `setup` line, a bad environment); it becomes `stale`, which --retry relaunches. A note says how
    the queued ones wait (pending reasons) and where a lost one's log is."""
    ids = {}
    for i, (job, state) in enumerate(zip(plan.jobs, plan.states)):
        if state == "submitted":
            info = job_states.read_json(job.run_dir / job_states.SUBMITTED)
            if info.get("launcher") == "slurm" and info.get("slurm_job_id"):
                ids[i] = info
    if not ids:
        return
    queued = queue()
    if queued is None:
        plan.notes.append("slurm: squeue did not answer here; submitted jobs are counted from their folders alone")
        return
    waiting = collections.Counter()
    lost = []
    for i, info in ids.items():
        entry = queued.get(info["slurm_job_id"])
        if entry is not None:
            state, reason = entry
            waiting[state.lower() + (f" ({reason})" if state == "PENDING" and reason not in ("", "None") else "")] += 1
        elif job_states.job_state(plan.jobs[i].run_dir, stale_after) == "submitted":  # not started meanwhile
            plan.states[i] = "stale"
            lost.append(info)
    if waiting:
        plan.notes.append("slurm queue: " + ", ".join(f"{n:,} {what}" for what, n in waiting.most_common()))
    if lost:
        plan.notes.append(f"slurm: {len(lost):,} submitted job{'s are' if len(lost) > 1 else ' is'} no longer in "
                          f"Slurm's queue and never started (cancelled, or failed before the job ran: see "
                          f"{lost[0].get('log', 'its log')}); counted stale: --retry relaunches them")

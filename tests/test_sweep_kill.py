"""A local sweep killed with SIGKILL half-way: its jobs die with it, and a re-run runs only the unfinished ones,
which resume from their checkpoints and end as an uninterrupted sweep's jobs do."""
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import jobs as job_states
from bench import results
from bench import sweep
from bench.cli import main
from bench.train import run
from tests.test_sweep import acc_rows, one_thread, slow_plugin, sweep_yaml  # noqa: F401 (fixtures)


def _checkpoint_step(run_dir) -> int:
    """The step of a run's checkpoint (half-way: well before the end), 0 when there is none (yet)."""
    import torch

    try:
        return torch.load(run_dir / results.CHECKPOINT, weights_only=False)["step"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.slow
def test_a_sigkilled_local_sweep_reruns_only_its_unfinished_jobs(embedded_root, slow_plugin, tmp_path,
                                                                  one_thread):
    path = sweep_yaml(tmp_path, embedded_root, methods=["slow_erm"], plugins=[str(slow_plugin)],
                      test_domains=[["sketch"], ["photo"], ["cartoon"]], train={"steps": 24, "eval_every": 8},
                      launcher={"kind": "local", "heartbeat_s": 1, "local": {"workers": 2, "threads": 1}})
    jobs = sweep.expand(sweep.load_sweep(path), str(path))
    env = {**os.environ, "SLOW_ERM_SLEEP": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "sweep", str(path), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            states = [job_states.job_state(j.run_dir) for j in jobs]
            half = [s == "running" and 0 < _checkpoint_step(j.run_dir) <= 12 for j, s in zip(jobs, states)]
            if "done" in states and any(half):
                break
            assert proc.poll() is None, "the sweep ended before it could be killed half-way"
            time.sleep(0.1)
        else:
            raise AssertionError(f"no job done and another half-way after 240 s: {states}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20  # the jobs notice that their sweep is gone within a second
    while time.time() < deadline and {"running", "submitted"} & {job_states.job_state(j.run_dir) for j in jobs}:
        time.sleep(0.2)
    states = [job_states.job_state(j.run_dir) for j in jobs]
    assert set(states) <= {"done", "stale", "missing"} and "done" in states and "stale" in states, states
    finished = {j.job_id: (j.run_dir / results.DONE).stat().st_mtime_ns for j, s in zip(jobs, states) if s == "done"}
    unfinished = [j for j, s in zip(jobs, states) if s != "done"]

    os.environ["SLOW_ERM_SLEEP"] = "0"
    try:
        assert main(["sweep", str(path), "--no-progress"]) == 0  # without --retry, a stale job waits
        assert [job_states.job_state(j.run_dir) for j in jobs if j.job_id in finished] == ["done"] * len(finished)
        assert main(["sweep", str(path), "--retry", "--no-progress"]) == 0
    finally:
        del os.environ["SLOW_ERM_SLEEP"]
    assert [job_states.job_state(j.run_dir) for j in jobs] == ["done"] * len(jobs)
    assert {j.job_id: (j.run_dir / results.DONE).stat().st_mtime_ns for j in jobs if j.job_id in finished} == finished
    resumed = [j for j in unfinished if "resuming from step" in open(job_states.read_json(j.run_dir / job_states.SUBMITTED)["log"]).read()]
    assert resumed, "no unfinished job resumed from its checkpoint"
    for job in jobs:  # the final results equal an uninterrupted sweep's
        assert acc_rows(job.run_dir) == acc_rows(run(job.cfg, tmp_path / "ref" / job.job_id, progress=False))


@pytest.mark.slow
def test_a_preempted_job_is_requeued_by_submitit_and_resumes(embedded_root, slow_plugin, tmp_path, monkeypatch,
                                                           one_thread):
    """USR2 (what Slurm sends before a time limit, or on preemption): submitit calls JobTask.checkpoint, the job
    reads 'submitted' again, is requeued, resumes from its checkpoint and ends as an unbroken run."""
    import submitit

    from bench import launch

    path = sweep_yaml(tmp_path, embedded_root, methods=["slow_erm"], plugins=[str(slow_plugin)],
                      train={"steps": 24, "eval_every": 8})
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    monkeypatch.setenv("SLOW_ERM_SLEEP", "0.2")
    launch.write_folder(job, "local")
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=30)
    sub = executor.submit(job_states.JobTask(threads=1, heartbeat_s=1), str(job.run_dir))
    deadline = time.time() + 120
    while time.time() < deadline and not (job.run_dir / results.CHECKPOINT).is_file():
        time.sleep(0.1)
    assert job_states.job_state(job.run_dir) == "running"
    os.kill(job_states.read_json(job.run_dir / job_states.HEARTBEAT)["pid"], signal.SIGUSR2)  # to the job's own process
    assert sub.result() == str(job.run_dir)
    assert job_states.job_state(job.run_dir) == "done"
    assert "requeued" in job_states.read_json(job.run_dir / job_states.SUBMITTED)
    assert "resuming from step" in sub.stdout()
    monkeypatch.setenv("SLOW_ERM_SLEEP", "0")
    assert acc_rows(job.run_dir) == acc_rows(run(job.cfg, tmp_path / "ref", progress=False))


@pytest.mark.slow
def test_every_process_of_a_multi_process_local_job_dies_with_its_sweep(embedded_root, slow_plugin, tmp_path):
    """launcher.local.processes: 2: rank 1 writes no heartbeat but watches the sweep too, so a SIGKILLed sweep
    leaves no rank waiting at a barrier (for its 2 h timeout)."""
    path = sweep_yaml(tmp_path, embedded_root, methods=["slow_erm"], plugins=[str(slow_plugin)],
                      train={"steps": 200, "eval_every": 50}, launcher={
                          "kind": "local", "heartbeat_s": 1, "local": {"workers": 1, "threads": 1, "processes": 2}})
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    proc = subprocess.Popen([sys.executable, "-m", "bench", "sweep", str(path), "--no-progress"],
                            env={**os.environ, "SLOW_ERM_SLEEP": "0.1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def job_processes():
        out = subprocess.run(["pgrep", "-f", str(job.run_dir)], capture_output=True, text=True).stdout
        return out.split()

    try:
        deadline = time.time() + 120
        while time.time() < deadline and _checkpoint_step(job.run_dir) == 0:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        assert len(job_processes()) >= 2  # the controller and its 2 ranks
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20  # each rank notices within a second that its sweep is gone
    while time.time() < deadline and job_processes():
        time.sleep(0.2)
    assert not job_processes()
    assert job_states.job_state(job.run_dir) == "stale"

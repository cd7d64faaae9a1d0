"""Sweeps on a real Slurm cluster (a one-node one on this machine: scripts/slurm-local.sh start).

Without a cluster that answers, these tests skip and say why. .ci/run installs Slurm, starts the cluster,
runs the suite and stops the cluster.
"""
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bench import jobs as job_states
from bench import results
from bench import sweep
from bench.cli import main
from bench.train import run
from tests.test_sweep import acc_rows, one_thread, slow_plugin, sweep_yaml  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm

SLURM = {"kind": "slurm", "heartbeat_s": 1,
         "slurm": {"cpus": 1, "gpus": 0, "mem_gb": 1, "time_min": 10, "array_parallelism": 2}}


@pytest.fixture(scope="module")
def slurm_cluster():
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        pytest.skip("Slurm is not installed (scripts/slurm-local.sh install, then start)")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"sinfo failed ({err}): no Slurm cluster answers")
    states = out.stdout.split()
    if out.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        pytest.skip(f"no Slurm node is up ({(out.stderr or out.stdout).strip()[:200] or 'no nodes'}); "
                    f"start one with scripts/slurm-local.sh start")


def wait_for(jobs, states=("done", "failed"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = [job_states.job_state(j.run_dir) for j in jobs]
        if all(s in states for s in now):
            return now
        time.sleep(0.5)
    logs = [job_states.read_json(j.run_dir / job_states.SUBMITTED).get("log") for j in jobs]
    tails = [open(p).read()[-2000:] for p in logs if p and open(p)]
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    raise AssertionError(f"jobs not finished after {timeout} s: {now}\n{squeue}\n" + "\n".join(tails))


def wait_until_dequeued(slurm_id: str, timeout: float) -> None:
    """Until Slurm's queue (bench.slurm.queue, as `bench status` reads it) no longer holds this job."""
    from bench import slurm

    deadline = time.time() + timeout
    while time.time() < deadline and slurm_id in (slurm.queue() or {}):
        time.sleep(0.5)


def test_a_sweep_through_slurm_equals_the_same_sweep_run_locally(slurm_cluster, embedded_root, tmp_path):
    grid = dict(methods=["zeroshot", "erm"], test_domains=[["sketch"]])
    on_slurm = sweep_yaml(tmp_path / "a", embedded_root, launcher=SLURM, **grid)
    assert main(["sweep", str(on_slurm), "--no-progress"]) == 0  # returns once queued
    jobs = sweep.expand(sweep.load_sweep(on_slurm), str(on_slurm))
    submitted = [job_states.read_json(j.run_dir / job_states.SUBMITTED) for j in jobs]
    assert all(s["launcher"] == "slurm" and "_" in s["slurm_job_id"] for s in submitted)  # one array
    assert len({s["slurm_job_id"].split("_")[0] for s in submitted}) == 1

    local = sweep_yaml(tmp_path / "b", embedded_root, launcher={"kind": "local", "local": {"workers": 2, "threads": 1}}, **grid)
    assert main(["sweep", str(local), "--no-progress"]) == 0
    assert wait_for(jobs) == ["done"] * len(jobs)
    local_jobs = sweep.expand(sweep.load_sweep(local), str(local))
    assert [j.job_id for j in local_jobs] == [j.job_id for j in jobs]
    for a, b in zip(jobs, local_jobs):
        assert acc_rows(a.run_dir) == acc_rows(b.run_dir) and acc_rows(a.run_dir)
    assert main(["sweep", str(on_slurm), "--no-progress"]) == 0  # all done: nothing is submitted again
    assert [job_states.read_json(j.run_dir / job_states.SUBMITTED) for j in jobs] == submitted



@pytest.mark.parametrize("slurm, says", [
    ({"partition": "no_such_partition"}, "Invalid partition name specified"),
    ({"mem_gb": 4096}, "Requested node configuration is not available"),
    ({"gpus": 1}, "Invalid generic resource (gres) specification"),  # this cluster's node has no GPUs
])
def test_the_dry_run_asks_sbatch_and_a_refused_sweep_writes_nothing(slurm_cluster, embedded_root, tmp_path, capsys,
                                                                   slurm, says):
    """sbatch --test-only on the script submitit would submit: what this cluster would refuse is one line naming
    the file, at the dry run and before a real run writes any job folder."""
    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"],
                      launcher={**SLURM, "slurm": {**SLURM["slurm"], **slurm}})
    for dry in (["--dry-run"], []):
        assert main(["sweep", str(path), "--no-progress", *dry]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: launcher.slurm: this cluster's sbatch would "
                                                       f"refuse the jobs") and says in lines[0], lines
        assert not (tmp_path / "runs").exists()
    good = sweep_yaml(tmp_path / "good", embedded_root, methods=["erm"], launcher=SLURM)
    assert main(["sweep", str(good), "--no-progress", "--dry-run"]) == 0
    assert "launcher.slurm checked: sbatch --test-only accepts the job array" in capsys.readouterr().err
    assert not (tmp_path / "good" / "runs").exists()



def test_a_job_of_two_slurm_tasks_equals_the_one_process_run(slurm_cluster, embedded_root, tmp_path, one_thread):
    """launcher.slurm.tasks_per_node: 2 on a CPU job: one job, two Slurm tasks, two gloo ranks (torch's
    environment exported from Slurm's by submitit), the same global batch: the one-process run's results."""
    from tests.test_distributed import assert_same_run

    grid = dict(methods=["flyp"], test_domains=[["sketch"]],
                train={"steps": 4, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2})
    two = {**SLURM, "slurm": {**SLURM["slurm"], "tasks_per_node": 2}}
    path = sweep_yaml(tmp_path / "a", embedded_root, launcher=two, **grid)
    assert main(["sweep", str(path), "--no-progress"]) == 0
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    assert wait_for([job]) == ["done"], open(job_states.read_json(job.run_dir / job_states.SUBMITTED)["log"]).read()
    slurm_id = job_states.read_json(job.run_dir / job_states.SUBMITTED)["slurm_job_id"]
    folder = Path(job_states.read_json(job.run_dir / job_states.SUBMITTED)["log"]).parent
    logs = "".join(p.read_text() for p in folder.glob(f"{slurm_id}_*_log.out"))  # one log per task
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs, logs[-3000:]
    one = run(job.cfg, tmp_path / "one", progress=False)
    assert_same_run(job.run_dir, one)




# 2 tasks: every rank of a requeued 2-process job loads the checkpoint (~1 min more: slow)
@pytest.mark.parametrize("tasks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_job_requeued_half_way_resumes_and_ends_as_an_unbroken_run(slurm_cluster, embedded_root, slow_plugin,
                                                                     tmp_path, monkeypatch, one_thread, tasks):
    launcher = {**SLURM, "slurm": {**SLURM["slurm"], "tasks_per_node": tasks}}
    path = sweep_yaml(tmp_path, embedded_root, methods=["slow_erm"], plugins=[str(slow_plugin)], launcher=launcher,
                      train={"steps": 96, "eval_every": 8, "checkpoint_every": 2})
    # ~0.25 s a step: the requeue at step 8 leaves ~20 s of work. Slurm's kill lands ~7 s after a requeue here
    # (KillWait=2, then slurmstepd's own delays); with fewer steps the job could finish first (then the requeued
    # task finds it done and never resumes, which is right, but tests nothing).
    assert main(["sweep", str(path), "--no-progress"]) == 0
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    slurm_id = job_states.read_json(job.run_dir / job_states.SUBMITTED)["slurm_job_id"]
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and step < 8:
        assert job_states.job_state(job.run_dir) != "done", "the job ended before it could be requeued"
        try:
            step = torch.load(job.run_dir / results.CHECKPOINT, weights_only=False)["step"]
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.2)
    assert 8 <= step < 96, step
    subprocess.run(["scontrol", "requeue", slurm_id], check=True, capture_output=True, text=True)
    # Slurm holds a requeued job back for 120 s (BeginTime); let it start as soon as it is pending again.
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%T"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now"], check=True)
            break
        time.sleep(0.5)
    assert wait_for([job], timeout=300) == ["done"]
    log = Path(job_states.read_json(job.run_dir / job_states.SUBMITTED)["log"])
    logs = [(log.parent / f"{slurm_id}_{rank}_log.out").read_text() for rank in range(tasks)]  # one per task
    assert all("resuming from step" in text for text in logs), logs[0][-3000:]

    monkeypatch.setenv("SLOW_ERM_SLEEP", "0")  # the reference need not take its time
    unbroken = tmp_path / "unbroken"
    if tasks == 1:
        run(job.cfg, unbroken, progress=False)
    else:  # the same 2 gloo ranks, unbroken, outside Slurm: the same sums in the same order
        from tests.test_distributed import run_processes

        run_processes(job.cfg, unbroken, world=tasks)
    assert acc_rows(job.run_dir) == acc_rows(unbroken)
    a = torch.load(job.run_dir / results.FINAL)["method"]
    b = torch.load(unbroken / results.FINAL)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_status_asks_slurm_how_submitted_jobs_wait_and_which_are_lost(slurm_cluster, embedded_root, tmp_path, capsys):
    """A pending job is shown with its reason; one that the queue no longer holds and that never started (here
    cancelled while pending; also a job whose setup line failed) is stale, which --retry relaunches."""
    later = {**SLURM, "slurm": {**SLURM["slurm"], "sbatch": {"begin": "now+1hour"}}}
    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"], launcher=later)
    assert main(["sweep", str(path), "--no-progress"]) == 0
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    slurm_id = job_states.read_json(job.run_dir / job_states.SUBMITTED)["slurm_job_id"]
    try:
        capsys.readouterr()
        assert main(["status", str(path)]) == 0
        out = capsys.readouterr().out
        assert "submitted 1" in out and "slurm queue: 1 pending (BeginTime)" in out, out
    finally:
        subprocess.run(["scancel", slurm_id.split("_")[0]], check=True)
    wait_until_dequeued(slurm_id, timeout=30)
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stale 1" in out and "1 submitted job is no longer in Slurm's queue and never started" in out, out
    assert "to launch: 0 (and 1 failed or stale: add --retry to relaunch them)" in out

    broken = {**SLURM, "slurm": {**SLURM["slurm"], "setup": ["exit 3"]}}  # the job dies before the harness runs
    path = sweep_yaml(tmp_path / "b", embedded_root, methods=["erm"], launcher=broken)
    assert main(["sweep", str(path), "--no-progress"]) == 0
    (job,) = sweep.expand(sweep.load_sweep(path), str(path))
    slurm_id = job_states.read_json(job.run_dir / job_states.SUBMITTED)["slurm_job_id"]
    wait_until_dequeued(slurm_id, timeout=60)
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    assert "stale 1" in capsys.readouterr().out

"""Sweeps: expansion, hyperparameter draws, job ids, validation, job states, and the debug/local launchers."""
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from bench import config
from bench import jobs as job_states
from bench import results
from bench import search_space
from bench import sweep as sweeps
from bench.cli import main
from bench.errors import BenchError
from bench.prepare import prepare

TINY_TRAIN = {"steps": 6, "batch_size": 12, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "checkpoint_every": 2,
              "eval_batch_size": 64}


def sweep_yaml(tmp_path, root, name="s", train=None, **top):
    """A sweep file over the tiny random-init CLIP of conftest (jobs take a few seconds)."""
    d = {"name": name, "output": str(tmp_path / "runs"),
         "base": {"model": {"name": "TinyCLIP-32", "pretrained": str(root / "tiny.pt")}, "data": {"root": str(root)},
                  "train": {**TINY_TRAIN, **(train or {})}},
         "methods": ["zeroshot", "erm"], "datasets": ["embedded"], "test_domains": [["sketch"]], "trial_seeds": [0],
         "launcher": {"kind": "debug", "heartbeat_s": 1}}
    d.update(top)
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    return path


SLOW_PLUGIN = """
import os
import time
from bench.method import register_method
from methods.erm import ERM

@register_method("slow_erm")
class SlowERM(ERM):
    '''ERM that takes its time, so that a test can stop it half-way.'''
    loss_is_mean = True  # ERM's mean loss, later: a step may be split over processes

    def loss(self, batch):
        time.sleep(float(os.environ.get('SLOW_ERM_SLEEP', '0.2')))
        return super().loss(batch)
"""


@pytest.fixture
def one_thread():
    """Jobs run with 1 torch thread here; a reference run in this process must too (float sums depend on it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def slow_plugin(tmp_path_factory):
    """One file for the whole session (whichever module asks): a method name registers once per process."""
    path = tmp_path_factory.getbasetemp() / "slow_erm_plugin" / "slow_erm.py"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SLOW_PLUGIN)
    return path


def acc_rows(run_dir):
    return [(r["step"], r["role"], r["domain"], r["value"]) for r in results.read_rows(run_dir / results.RESULTS)
            if r["metric"] == "acc"]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- job identity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d, job_id", [
    ({}, "c79a0f8b3a33"),
    ({"method": "zeroshot"}, "b66ee20833a2"),
    ({"data": {"dataset": "pacs", "test_domains": ["sketch"]}, "train": {"lr": 3e-5}, "trial_seed": 2}, "b806041c7524"),
    ({"hparams": {"label_smoothing": 0.1}, "model": {"name": "ViT-B-16", "pretrained": "openai"},
      "data": {"dataset": "domainnet", "test_domains": ["clipart", "real"]}}, "8c90b53073d2"),
    # where and how a job runs is not what it computes:
    ({"data": {"root": "/elsewhere"}, "train": {"device": "cpu", "num_workers": 3}}, "c79a0f8b3a33"),
])
def test_pinned_job_ids(d, job_id):
    """Job ids name folders of finished results: they must never change by accident. If a change to what a job
    computes is deliberate, bump config.PROTOCOL_VERSION and update these pins."""
    assert prepare(config.from_dict(config.RunConfig, d)).job_id == job_id


def test_sweep_ids_are_prepare_ids_and_survive_config_json(embedded_root, tmp_path):
    sw = sweeps.load_sweep(sweep_yaml(tmp_path, embedded_root, search={"n_draws": 2, "space": {"train.lr": [
        "log10_uniform", -4, -2]}}))
    jobs = sweeps.expand(sw, "s")
    assert len(jobs) == 3  # zeroshot: one draw; erm: two
    for job in jobs:
        assert job.job_id == prepare(job.cfg).job_id
        again = config.from_dict(config.RunConfig, json.loads(json.dumps(job.record))["config"])
        assert prepare(again).job_id == job.job_id
        assert job.record["baseline"] == {"zeroshot": 0, "erm": 1}[job.cfg.method]  # recorded, not in the id
        assert job.run_dir == (tmp_path / "runs" / job.job_id)
        # The launcher's settings are not part of a job's identity.
    sw2 = sweeps.load_sweep(sweep_yaml(tmp_path, embedded_root, name="s2", search={"n_draws": 2, "space": {"train.lr": [
        "log10_uniform", -4, -2]}}, launcher={"kind": "slurm", "slurm": {"gpus": 4}}))
    assert [j.job_id for j in sweeps.expand(sw2, "s2")] == [j.job_id for j in jobs]


# ---- expansion and draws ------------------------------------------------------------------------
def test_draws_depend_on_the_draw_and_the_name_only(embedded_root, tmp_path):
    space = {"train.lr": ["log10_uniform", -5, -3.5], "train.weight_decay": ["choice", [0.0, 0.01, 0.1]]}
    sw = sweeps.load_sweep(sweep_yaml(tmp_path, embedded_root, methods=["erm"], test_domains="all", trial_seeds=[0, 1],
                                 search={"n_draws": 4, "draw_0": "defaults", "space": space}))
    jobs = sweeps.expand(sw, "s")
    assert len(jobs) == 4 * 4 * 2
    by_draw = {}
    for j in jobs:
        by_draw.setdefault(j.draw, set()).add((j.cfg.train.lr, j.cfg.train.weight_decay))
    assert all(len(v) == 1 for v in by_draw.values())  # same across trial seeds and held-out domains
    assert by_draw[0] == {(1e-3, 0.1)}  # draw 0: the configured values, explicitly
    lrs = [next(iter(by_draw[d]))[0] for d in (1, 2, 3)]
    assert len(set(lrs)) == 3 and all(1e-5 <= lr <= 10 ** -3.5 for lr in lrs)
    assert lrs == [search_space.draw_value(space["train.lr"], d, "train.lr") for d in (1, 2, 3)]
    # Adding a hyperparameter to the space never changes the draws of the others.
    sw2 = sweeps.load_sweep(sweep_yaml(tmp_path, embedded_root, name="s2", methods=["erm"], search={
        "n_draws": 4, "draw_0": "random", "space": {**space, "train.warmup_steps": ["int_uniform", 0, 5]}}))
    lrs2 = {j.draw: j.cfg.train.lr for j in sweeps.expand(sw2, "s2")}
    assert [lrs2[d] for d in (1, 2, 3)] == lrs and lrs2[0] == search_space.draw_value(space["train.lr"], 0, "train.lr")


def test_method_spaces_overrides_pairs_and_dedup(embedded_root, tmp_path):
    plugin = tmp_path / "toy.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import torch.nn.functional as F\n"
        "from bench.method import Method, register_method\n"
        "@register_method('toy_sweep')\n"
        "class Toy(Method):\n"
        "    @dataclass(frozen=True)\n"
        "    class Hparams:\n"
        "        lam: float = 1.0\n"
        "        SEARCH = {'lam': ('choice', [0.5, 2.0])}\n"
        "    def __init__(self, clip, task, hparams):\n"
        "        super().__init__(clip, task, hparams)\n"
        "        self.train_only(self.model.visual)\n"
        "    def loss(self, batch):\n"
        "        return self.hparams.lam * F.cross_entropy(self.predict(batch['images']), batch['labels'])\n")
    sw = sweeps.load_sweep(sweep_yaml(
        tmp_path, embedded_root, methods=["zeroshot", "toy_sweep", "erm"], plugins=[str(plugin)],
        test_domains="all", test_domain_pairs=True, search={"n_draws": 6, "draw_0": "random"},
        overrides={"datasets": {"embedded": {"train": {"steps": 4, "eval_every": 2}}},
                   "methods": {"erm": {"train": {"steps": 8}, "search": {"space": {
                       "hparams.label_smoothing": ["uniform", 0, 0.2]}}}}}))
    jobs = sweeps.expand(sw, "s")
    sets = {j.cfg.data.test_domains for j in jobs}
    assert len(sets) == 4 + 6 and ("photo", "sketch") in sets
    toy = [j for j in jobs if j.cfg.method == "toy_sweep"]
    assert {j.cfg.hparams["lam"] for j in toy} == {0.5, 2.0}
    assert len(toy) == 10 * 2  # six draws of a two-value choice: duplicates are one job
    assert {j.cfg.train.steps for j in toy} == {4}  # the dataset override
    erm = [j for j in jobs if j.cfg.method == "erm"]
    assert len(erm) == 10 * 6 and {j.cfg.train.steps for j in erm} == {8}  # the method override wins
    assert len([j for j in jobs if j.cfg.method == "zeroshot"]) == 10  # trains nothing: one draw
    assert len({j.job_id for j in jobs}) == len(jobs)
    only = sweeps.select(jobs, ["method=erm,toy_sweep", "test_domains=photo+sketch", "draw=1"], "s")
    assert {(j.cfg.method, j.draw) for j in only} == {("erm", 1), ("toy_sweep", 1)}


# ---- bad input: one line naming the file, the key and the fix; nothing written or removed --------------------
BAD = [
    ({"raw": "methods: [erm\n"}, "malformed YAML"),
    ({"methods": ["ermm"]}, "methods: unknown method 'ermm': did you mean 'erm'"),
    ({"trial_seedz": [0]}, "unknown key 'trial_seedz': did you mean 'trial_seeds'? valid keys: name, output"),
    ({"train": {"stepz": 3}}, "unknown key 'base.train.stepz': did you mean 'base.train.steps'?"),
    ({"datasets": ["pacs"], "test_domains": "all"}, "data folder"),
    ({"test_domains": [["clipart"]]}, "test_domains: 'clipart' is not a domain of embedded"),
    ({"search": {"n_draws": 2, "space": {"train.lrr": ["log10_uniform", -5, -3]}}},
     "search.space.train.lrr: unknown run-config key 'train.lrr': did you mean 'train.lr'?"),
    ({"search": {"n_draws": 2, "space": {"train.lr": ["loguniform", -5, -3]}}}, "is not a search space; use one of"),
    ({"launcher": {"kind": "slurmm"}}, "launcher.kind: 'slurmm' is not one of debug, local, slurm"),
    ({"overrides": {"methods": {"flyp": {"train": {"lr": 1e-5}}}}}, "overrides.methods.flyp: 'flyp' is not in methods"),
    ({"only": "method=car_ft"}, "--only method=car_ft: no job of"),
]


@pytest.mark.parametrize("bad, pattern", BAD, ids=[p for _, p in BAD])
def test_bad_sweep_one_line_and_nothing_touched(embedded_root, tmp_path, capsys, bad, pattern):
    runs = tmp_path / "runs"
    existing = runs / "0123456789ab"
    existing.mkdir(parents=True)
    (existing / results.CONFIG).write_text('{"job_id": "0123456789ab"}')
    (existing / job_states.HEARTBEAT).write_text("{}")
    before = snapshot(runs)
    bad = dict(bad)
    only = bad.pop("only", None)
    raw = bad.pop("raw", None)
    train = bad.pop("train", None)
    path = sweep_yaml(tmp_path, embedded_root, train=train, **bad)
    if raw:
        path.write_text(raw)
    for argv in (["sweep", str(path)], ["sweep", str(path), "--dry-run"], ["status", str(path)]):
        code = main(argv + (["--only", only] if only else []))
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert pattern in lines[0] and (str(path) in lines[0] or "--only" in lines[0]), lines[0]
    assert snapshot(runs) == before


# ---- job states -------------------------------------------------------------------------------------
def test_job_states_from_files_alone(tmp_path):
    d = tmp_path / "job"
    assert job_states.job_state(d) == "missing"
    d.mkdir()
    assert job_states.job_state(d) == "missing"
    job_states.mark_submitted(d, "local", **job_states.this_process())
    assert job_states.job_state(d) == "submitted"
    job_states.mark_submitted(d, "local", host=job_states._HOST, pid=2**22 + 7, start="1")  # its sweep is gone: it never starts
    assert job_states.job_state(d) == "stale"
    job_states.mark_submitted(d, "slurm", slurm_job_id="12_3")
    assert job_states.job_state(d) == "submitted"
    beat = job_states.Heartbeat(d, every=0.05).start()
    assert job_states.job_state(d) == "running"
    time.sleep(0.3)
    assert time.time() - (d / job_states.HEARTBEAT).stat().st_mtime < 0.2  # touched while the job runs
    beat.stop()
    old = time.time() - 400
    os.utime(d / job_states.HEARTBEAT, (old, old))
    assert job_states.job_state(d) == "stale" and job_states.job_state(d, stale_after=1000) == "running"
    # A process of this host that is gone is stale at once, whatever the heartbeat's age.
    (d / job_states.HEARTBEAT).write_text(json.dumps({"host": job_states._HOST, "pid": 2**22 + 7, "start": "1"}))
    assert job_states.job_state(d) == "stale"
    (d / job_states.FAILED).write_text("Traceback ...")
    assert job_states.job_state(d) == "failed"
    job_states.mark_submitted(d, "local")  # a relaunch clears the last attempt's failure and heartbeat
    assert job_states.job_state(d) == "submitted" and not (d / job_states.FAILED).exists()
    (d / results.DONE).write_text("")
    assert job_states.job_state(d) == "done"
    assert job_states.states([d, tmp_path / "nope"]) == ["done", "missing"]
    assert (job_states.DONE, job_states.CONFIG) == (results.DONE, results.CONFIG)


def test_job_states_import_no_torch():
    """The collector calls job_state to explain empty cells; it must not pay for importing torch."""
    import subprocess
    import sys

    code = "import sys, bench.jobs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_failing_job_writes_its_traceback(embedded_root, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    (d / results.CONFIG).write_text(json.dumps({"job_id": "x", "config": {"method": "erm", "train": {"lr": "oops"}}}))
    with pytest.raises(Exception):
        job_states.JobTask()(str(d))
    assert job_states.job_state(d) == "failed" and "train.lr" in (d / job_states.FAILED).read_text()


# ---- launchers --------------------------------------------------------------------------------------
def test_debug_sweep_runs_what_is_missing_only(embedded_root, tmp_path, capsys):
    path = sweep_yaml(tmp_path, embedded_root)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "missing 2" in err and "to launch: 2" in err and not (tmp_path / "runs").exists()
    assert main(["sweep", str(path), "--no-progress"]) == 0
    jobs = sweeps.expand(sweeps.load_sweep(path), str(path))
    assert [job_states.job_state(j.run_dir) for j in jobs] == ["done", "done"]
    record = json.loads((jobs[1].run_dir / results.CONFIG).read_text())
    assert record["sweep"] == {"name": "s", "draw": 0} and record["job_id"] == jobs[1].job_id
    assert json.loads((jobs[1].run_dir / job_states.SUBMITTED).read_text())["launcher"] == "debug"
    stamps = {j.job_id: (j.run_dir / results.DONE).stat().st_mtime_ns for j in jobs}
    capsys.readouterr()
    assert main(["sweep", str(path), "--no-progress"]) == 0  # again: nothing to launch
    assert "to launch: 0" in capsys.readouterr().err
    assert {j.job_id: (j.run_dir / results.DONE).stat().st_mtime_ns for j in jobs} == stamps
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "done 2" in out and "compute to launch (debug): 0 jobs" in out
    # A failed job is relaunched by --retry only.
    (jobs[1].run_dir / results.DONE).unlink()
    (jobs[1].run_dir / job_states.FAILED).write_text("Traceback\nRuntimeError: boom\n")
    main(["status", str(path)])
    out = capsys.readouterr().out
    assert "failed 1" in out and "add --retry" in out and "RuntimeError: boom" in out
    assert main(["sweep", str(path), "--retry", "--no-progress", "--only", "method=erm"]) == 0
    assert job_states.job_state(jobs[1].run_dir) == "done"


def test_local_sweep_equals_in_process_runs(embedded_root, tmp_path, one_thread):
    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"], test_domains=[["sketch"], ["photo"]],
                      launcher={"kind": "local", "heartbeat_s": 1, "local": {"workers": 2, "threads": 1}})
    assert main(["sweep", str(path), "--no-progress"]) == 0
    from bench.train import run

    for job in sweeps.expand(sweeps.load_sweep(path), str(path)):
        assert job_states.job_state(job.run_dir) == "done"
        assert json.loads((job.run_dir / job_states.SUBMITTED).read_text())["launcher"] == "local"
        ref = run(job.cfg, tmp_path / "ref" / job.job_id, progress=False)
        assert acc_rows(job.run_dir) == acc_rows(ref)


def test_extends_merges_over_the_parent_and_refuses_cycles(embedded_root, tmp_path):
    parent = sweep_yaml(tmp_path, embedded_root, name="parent", trial_seeds=[0, 1])
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nname: child\nbase: {train: {steps: 4}}\ntrial_seeds: [2]\n")
    sw = sweeps.load_sweep(child)
    assert sw.name == "child" and sw.trial_seeds == (2,) and sw.methods == ("zeroshot", "erm")
    assert sw.base["train"] == {**TINY_TRAIN, "steps": 4} and sw.base["model"]["name"] == "TinyCLIP-32"
    assert sweeps.load_sweep(child, ["base.train.lr=0.5"]).base["train"]["lr"] == 0.5  # --set applies after the merge
    for text, pattern in [("extends: parent.yaml\nextends_typo: 1\n", "unknown key 'extends_typo'"),
                          ("extends: nowhere.yaml\n", "extends: .*nowhere.yaml not found"),
                          ("extends: child.yaml\n", "extends itself"),
                          ("extends: [parent.yaml]\n", "extends must name one sweep file")]:
        child.write_text(text)
        with pytest.raises(BenchError, match=pattern) as err:
            sweeps.load_sweep(child)
        assert "\n" not in str(err.value) and str(err.value).startswith(str(child))
    assert parent.is_file()


# ---- the shipped sweep files ------------------------------------------------------------------------
SHIPPED_SWEEPS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))


def test_the_main_sweeps_are_shipped():
    assert {"quickstart", "embedded", "domainbed", "domainbed_b2n", "imagenet"} <= set(SHIPPED_SWEEPS)


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweeps_expand(name):
    """Every job of the shipped sweeps validates (their data need not be here for that)."""
    path = Path(__file__).resolve().parent.parent / "sweeps" / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is not shipped")
    sw = sweeps.load_sweep(path)
    jobs = sweeps.expand(sw, str(path), check_data=False)
    per_method = {m: sum(j.cfg.method == m for j in jobs) for m in sw.methods}
    if name == "domainbed":  # DomainBed's protocol: 22 held-out domains x 20 draws x 3 trials, 5,000 steps
        assert sw.search.n_draws == 20 and sw.trial_seeds == (0, 1, 2) and sw.search.draw_0 == "defaults"
        assert {m: n for m, n in per_method.items() if m != "zeroshot"} == {
            m: 22 * 20 * 3 for m in sw.methods if m != "zeroshot"}
        assert {j.cfg.train.steps for j in jobs} == {5000}
        assert {(j.cfg.model.name, j.cfg.model.pretrained) for j in jobs} == {("ViT-B-16", "openai")}
    if name == "domainbed_b2n":  # domainbed.yaml with CoOp's base-to-novel class split, in its own folder
        parent = sweeps.expand(sweeps.load_sweep(path.parent / "domainbed.yaml"), "domainbed", check_data=False)
        assert sw.output == "runs/domainbed_b2n" and {j.cfg.data.classes for j in jobs} == {"base_to_novel"}
        assert sorted((j.cfg.method, j.cfg.data.dataset, j.cfg.data.test_domains, j.draw, j.cfg.trial_seed)
                      for j in jobs) == sorted((j.cfg.method, j.cfg.data.dataset, j.cfg.data.test_domains, j.draw,
                                                j.cfg.trial_seed) for j in parent)
        assert not {j.job_id for j in jobs} & {j.job_id for j in parent}
    if name == "quickstart":
        assert sw.output == "runs/quickstart" and {j.cfg.data.dataset for j in jobs} == {"embedded"}
    if name == "embedded":  # leave-one-domain-out over the 4 domains, 3 trials, the quick start's runs but longer
        quick = sweeps.load_sweep(path.parent / "quickstart.yaml")
        assert {j.cfg.data.test_domains for j in jobs} == {("photo",), ("sketch",), ("cartoon",), ("painting",)}
        assert len(jobs) == len(sw.methods) * 4 * 3 and sw.methods[:len(quick.methods)] == quick.methods
        assert sw.methods[len(quick.methods):] == ("l2sp", "carot", "spd", "lora")  # issue 11's methods: embedded only
        longer = {**quick.base, "train": {**quick.base["train"], "steps": 600}}
        assert sw.base == longer
    if "zeroshot" in per_method:
        assert per_method["zeroshot"] == len({(j.cfg.data.dataset, j.cfg.data.test_domains) for j in jobs}) * len(
            sw.trial_seeds)


def test_compute_estimate_times_jobs_by_their_finished_siblings_and_counts_every_gpu(embedded_root, tmp_path):
    """The dry run's estimate: the mean time per step of finished jobs of the same method and dataset, times the
    steps to launch; GPU-hours count gpus x nodes of each job (a 2-node job of 4 GPUs holds 8)."""
    from bench import launch

    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"], trial_seeds=[0, 1, 2],
                      launcher={"kind": "slurm", "slurm": {"gpus": 4, "nodes": 2}})
    sweep = sweeps.load_sweep(path)
    jobs = sweeps.expand(sweep, str(path))
    done = jobs[0]
    done.run_dir.mkdir(parents=True)
    (done.run_dir / job_states.HEARTBEAT).write_text(json.dumps({"time": time.time() - 600}))
    (done.run_dir / results.DONE).write_text("")
    plan = launch.make_plan(jobs)
    text = launch.status_text(str(path), sweep, plan, "slurm")
    line = next(ln for ln in text.splitlines() if "compute to launch" in ln)
    seconds = 2 * 600  # two jobs left, each as long as the finished one (same steps)
    assert f"2 jobs, {2 * done.steps:,} training steps" in line, line
    assert f"~{seconds * 8 / 3600:,.1f} GPU-h" in line and "timed on 1 finished job" in line, line
    assert "GPU-h" not in launch.status_text(str(path), sweep, plan, "local")


def test_a_slurm_dry_run_without_sbatch_says_what_it_could_not_check(embedded_root, tmp_path, capsys, monkeypatch):
    """Planning a Slurm sweep on a laptop: the plan, and one line saying that sbatch will check launcher.slurm
    (tests/test_slurm.py asks a real cluster's sbatch --test-only)."""
    from bench import slurm

    real_which = slurm.shutil.which
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None if name == "sbatch" else real_which(name))
    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"], launcher={"kind": "slurm", "slurm": {"gpus": 4}})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "launcher.slurm not checked: sbatch is not on PATH here" in err and "to launch: 1" in err
    assert not (tmp_path / "runs").exists()


def test_a_local_job_of_two_processes_equals_the_one_process_run(embedded_root, tmp_path, one_thread):
    """launcher.local.processes: 2: each job runs as 2 ranks (submitit's local tasks, gloo on the CPU; one GPU
    each on a GPU machine), the same global batch: the one-process run's results."""
    from bench.train import run
    from tests.test_distributed import assert_same_run

    local = {"kind": "local", "heartbeat_s": 1, "local": {"workers": 1, "threads": 1, "processes": 2}}
    path = sweep_yaml(tmp_path, embedded_root, methods=["flyp"], launcher=local,
                      train={"steps": 4, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2})
    assert main(["sweep", str(path), "--no-progress"]) == 0
    (job,) = sweeps.expand(sweeps.load_sweep(path), str(path))
    logs = "".join(p.read_text() for p in (job.run_dir / "logs").glob("*_log.out"))  # one log per process
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs, logs[-3000:]
    assert "MASTER_PORT" not in os.environ  # the port went to the job, not into this process for good
    assert_same_run(job.run_dir, run(job.cfg, tmp_path / "one", progress=False))


def test_local_processes_that_a_job_cannot_split_are_refused_at_the_dry_run(embedded_root, tmp_path, capsys):
    local = {"kind": "local", "local": {"processes": 16}}
    path = sweep_yaml(tmp_path, embedded_root, methods=["erm"], launcher=local)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: launcher.local runs each job as 16 processes: train.batch_size: 12 is fewer than "
                   f"16 processes x train.accum_steps 1; set it to at least 16"]


def test_local_resources_share_gpus_and_cores_between_multi_process_jobs(monkeypatch):
    """(workers, threads per process, GPUs): a job of N processes holds N GPUs; on the CPU, N processes' threads."""
    import torch

    from bench import local

    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local.local_resources(10, "auto", "auto", 1) == (8, 1, [])
    assert local.local_resources(10, "auto", "auto", 2) == (4, 1, [])
    assert local.local_resources(10, 1, "auto", 2) == (1, 4, [])
    assert local.local_resources(1, "auto", "auto", 1) == (1, 8, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local.local_resources(10, "auto", "auto", 1) == (4, 2, [0, 1, 2, 3])
    assert local.local_resources(10, "auto", "auto", 2) == (2, 2, [0, 1, 2, 3])
    assert local.local_resources(10, "auto", "auto", 3) == (1, 2, [0, 1, 2, 3])
    assert local.local_resources(10, 8, "auto", 1)[0] == 4  # no job without its GPU
    with pytest.raises(BenchError, match=r"^launcher.local.processes: 5 processes a job, one GPU each, but this "
                                         r"machine has 4 GPUs; set it to at most 4$"):
        local.local_resources(10, "auto", "auto", 5)

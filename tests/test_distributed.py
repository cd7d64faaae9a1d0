"""Multi-process jobs (bench/distributed.py): a run over 2 processes (gloo, CPU) is the 1-process run.

Same global batch, same seeds: the final weights agree to float rounding and the results rows to tolerance, for a
loss-mean method (erm) and a contrastive one (flyp, features gathered across ranks; also with accumulation inside
each rank); a 2-process run stopped and resumed equals the unbroken one; the refusals are one line."""
import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bench import config as run_config
from bench import distributed
from bench import results
from bench.errors import BenchError
from bench.method import METHODS, load_builtin_methods
from bench.train import run
from tests.conftest import tiny_config

load_builtin_methods()
VOLATILE = {"step_time", "peak_mem_mb", "eval_time"}  # rows that measure the machine, not the run
LR, STEPS = 1e-3, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg: dict, run_dir: str, stop_after) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(run_config.from_dict(run_config.RunConfig, cfg, "test"), run_dir, progress=False, stop_after=stop_after)


def run_processes(cfg, run_dir, world=2, stop_after=None):
    mp.spawn(_rank, args=(world, free_port(), run_config.to_dict(cfg), str(run_dir), stop_after), nprocs=world, join=True)


def config(root, method, **over):
    hparams = {"arf": {"pool_size": 400, "top_k": 64, "retrieval_batch": 2}}.get(method, {})
    return tiny_config(root, method=method, **{"train.steps": STEPS, "train.lr": LR, "train.eval_every": 2, "train.checkpoint_every": 2,
                                               "hparams": hparams, **over})


_REFERENCE: dict = {}


def reference(root, tmp_path_factory, method):
    """The 1-process run (once per method)."""
    if method not in _REFERENCE:
        out = tmp_path_factory.mktemp(f"one-{method}")
        torch.set_num_threads(1)
        run(config(root, method), out, progress=False)
        _REFERENCE[method] = out
    return _REFERENCE[method]


def weights(run_dir):
    return torch.load(run_dir / results.FINAL, weights_only=True)["method"]


def assert_same_run(got_dir, want_dir, rtol=1e-5):
    assert (got_dir / results.DONE).is_file() and not (got_dir / results.CHECKPOINT).exists()
    got, want = weights(got_dir), weights(want_dir)
    assert got.keys() == want.keys()
    # AdamW divides each gradient by its own size: where a gradient is float noise (the key bias of attention,
    # whose gradient is 0 in exact arithmetic), rounding moves a weight by up to 2 lr a step, whatever the
    # harness does; everywhere else the weights agree to rounding (the gradients are compared exactly in
    # test_a_step_over_two_processes_has_the_one_process_gradient)
    close = total = 0
    for name in want:
        diff = (got[name] - want[name]).abs()
        assert diff.max().item() <= 2 * LR * STEPS + 1e-7, name
        close += int((diff <= rtol * want[name].abs().max() + 1e-7).sum())
        total += diff.numel()
    assert close >= 0.99 * total, f"{total - close} of {total} weights differ"

    def rows(d):
        return [r for r in results.read_rows(d / results.RESULTS) if r["metric"] not in VOLATILE]

    got_rows, want_rows = rows(got_dir), rows(want_dir)
    key = ("step", "role", "domain", "split", "metric", "n")
    assert [tuple(r[k] for k in key) for r in got_rows] == [tuple(r[k] for k in key) for r in want_rows]
    for g, w in zip(got_rows, want_rows):
        assert g["value"] == pytest.approx(w["value"], rel=1e-4, abs=1e-6), (g, w)
    assert json.loads((got_dir / results.CONFIG).read_text())["job_id"] == json.loads((want_dir / results.CONFIG).read_text())[
        "job_id"]


# ~20 s each on 2 cores: slow (the resume test below runs flyp over 2 processes in the default set)
@pytest.mark.slow
@pytest.mark.parametrize("method,accum", [("erm", 1), ("erm", 2), ("flyp", 1), ("flyp", 2), ("arf", 1)])
def test_two_processes_equal_one(embedded_root, tmp_path, tmp_path_factory, method, accum):
    want = reference(embedded_root, tmp_path_factory, method)
    run_processes(config(embedded_root, method, **{"train.accum_steps": accum}), tmp_path / "two")
    assert_same_run(tmp_path / "two", want)


def test_two_processes_resume_equals_unbroken(embedded_root, tmp_path, tmp_path_factory):
    """Stopped after 2 of 4 steps and resumed over 2 processes: the 1-process unbroken run."""
    want = reference(embedded_root, tmp_path_factory, "flyp")
    cfg = config(embedded_root, "flyp")
    run_processes(cfg, tmp_path / "two", stop_after=2)
    assert (tmp_path / "two" / results.CHECKPOINT).is_file() and not (tmp_path / "two" / results.DONE).exists()
    run_processes(cfg, tmp_path / "two")
    assert_same_run(tmp_path / "two", want)


def test_bench_run_under_torchrun_equals_one_process(embedded_root, tmp_path, tmp_path_factory):
    """The documented local multi-process command, `torchrun --nproc_per_node 2 -m bench.cli run run.yaml`, as a
    user types it (torchrun's rendezvous, the CLI, gloo on the CPU): the one-process run."""
    import subprocess
    import sys

    import yaml

    want = reference(embedded_root, tmp_path_factory, "erm")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config.to_dict(config(embedded_root, "erm"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "bench.cli", "run", str(path), "--out", str(tmp_path / "two"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "two")]  # rank 0 prints the run folder
    assert_same_run(tmp_path / "two", want)


def _grads_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist, _ = distributed.setup(torch.device("cpu"), "cpu")
    grads = {}
    for name in GRAD_METHODS:
        method, batch, labels_of, domain_of = method_and_batch(root, name)
        lo, hi = distributed.bounds(len(batch["labels"]), world, rank)
        local = {**batch, **{k: batch[k][lo:hi] for k in ("images", "labels", "index", "domains")}}
        torch.manual_seed(1234)
        local = distributed.rank_batch(method, local, batch["index"], labels_of, domain_of, dist, contextlib.nullcontext)
        loss, _ = distributed.step(method, local, 1, contextlib.nullcontext, dist)
        grads[name] = (loss, {n: p.grad.clone() for n, p in method.trainable_parameters() if p.grad is not None})
    if dist.main:
        torch.save(grads, out)
    dist.close()


GRAD_METHODS = ("erm", "flyp")


def method_and_batch(root, name):
    from bench.cards import load_card
    from bench.data import build_task
    from bench.method import build_method
    from bench.models import load_clip
    from tests.test_accumulation import trainer_batch

    task = build_task(load_card("embedded"), root, ("sketch",), 0.2, 0)
    clip = load_clip("TinyCLIP-32", str(Path(root) / "tiny.pt"))
    method = build_method(name, clip, task, {})
    method.train()
    torch.manual_seed(0)  # the batch's augmentations: the same in every process
    items = task.train_items()
    labels_of = torch.tensor([y for _, y in items])
    domain_of = torch.tensor([i for i, d in enumerate(task.train_domains) for _ in task.train[d]])
    return method, trainer_batch(task, clip), labels_of, domain_of


def test_a_step_over_two_processes_has_the_one_process_gradient(embedded_root, tmp_path):
    """The gradient itself (AdamW's update would hide a factor): the logit scale counted once, every rank's
    features in the contrastive batch, each slice's loss weighted by its share."""
    out = tmp_path / "grads.pt"
    mp.spawn(_grads_rank, args=(2, free_port(), str(embedded_root), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for name in GRAD_METHODS:
        method, batch, _, _ = method_and_batch(embedded_root, name)
        torch.manual_seed(1234)
        loss = method.loss(batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        want = {n: p.grad for n, p in method.trainable_parameters() if p.grad is not None}
        assert got[name][0] == pytest.approx(loss.item(), rel=1e-6), name
        assert got[name][1].keys() == want.keys(), name
        for n in want:
            err = (got[name][1][n] - want[n]).abs().max().item()
            assert err <= 1e-5 * want[n].abs().max().item() + 1e-9, f"{name} {n}: max error {err:.3g}"


def test_rank_slices_are_tensor_split():
    for n in (1, 5, 12, 13):
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            rows = torch.arange(n)
            want = [t.tolist() for t in torch.tensor_split(rows, world)]
            assert [rows[slice(*distributed.bounds(n, world, r))].tolist() for r in range(world)] == want


def test_refusals_are_one_line(monkeypatch):
    erm = METHODS.get("erm")
    with pytest.raises(BenchError, match=r"train.batch_size: 3 is fewer than 2 processes x train.accum_steps 2; "
                                         r"set it to at least 4"):
        distributed.check(erm, 3, 2, 2, "run.yaml")
    distributed.check(erm, 3, 2, 1, "run.yaml")  # one process: nothing to split

    class NoRoute(erm):
        name = "no_route"

        def loss(self, batch):  # neither loss_is_mean nor features: a step cannot be split
            return super().loss(batch)

    with pytest.raises(BenchError, match="method 'no_route' has no accumulation route"):
        distributed.check(NoRoute, 12, 1, 2, "run.yaml")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(BenchError, match="WORLD_SIZE='two' is not an integer"):
        distributed.env_world()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(BenchError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(BenchError, match="MASTER_ADDR is not set; launch with torchrun"):
        distributed.setup(torch.device("cpu"), "cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.env_world() == (0, 1, 0)

"""Data-loading knobs (worker processes kept between evaluations, prefetching, pinned memory) change how batches
arrive, never which: results equal those of loading in the main process."""
import torch

from bench import results
from bench.cards import load_card
from bench.data import build_task
from bench.evaluate import EvalData
from bench.models import load_clip
from bench.train import run
from tests.conftest import tiny_config


def all_batches(data: EvalData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for i, es in enumerate(data.task.evalsets) for x, y in data.batches(i, es)]


def test_eval_workers_yield_the_same_batches_and_persist_between_evaluations(embedded_root):
    task = build_task(load_card("embedded"), embedded_root, ("sketch",), 0.2, trial_seed=0)
    transform = load_clip("TinyCLIP-32", None).preprocess_val
    alone = all_batches(EvalData(task, transform, batch_size=7))
    data = EvalData(task, transform, batch_size=7, num_workers=2, prefetch_factor=3)
    data._cacheable = False  # as for a set too large to keep in memory: every evaluation loads it again
    try:
        first = all_batches(data)
        pids = [w.pid for w in data._pool._iterator._workers]
        second = all_batches(data)
        assert [w.pid for w in data._pool._iterator._workers] == pids  # the same processes served both
    finally:
        data.close()
    assert data._pool is None
    assert len(first) == len(alone) == len(second)
    for (xa, ya), (x1, y1), (x2, y2) in zip(alone, first, second):
        assert torch.equal(xa, x1) and torch.equal(xa, x2)
        assert torch.equal(ya, y1) and torch.equal(ya, y2)


def test_a_run_with_loader_workers_equals_one_without(embedded_root, tmp_path):
    plain = run(tiny_config(embedded_root), tmp_path / "a", progress=False)
    workers = run(tiny_config(embedded_root, **{"train.num_workers": 2, "train.prefetch_factor": 3}), tmp_path / "b",
                  progress=False)
    acc = lambda d: [(r["step"], r["role"], r["domain"], r["value"]) for r in results.read_rows(d / results.RESULTS)
                     if r["metric"] == "acc"]
    assert acc(plain) == acc(workers)
    a, b = (torch.load(d / results.FINAL)["method"] for d in (plain, workers))
    for k in a:
        assert torch.equal(a[k], b[k]), k

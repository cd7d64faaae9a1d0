import json

import pytest
import torch

from bench import results
from bench.cards import load_card
from bench.data import build_task
from bench.prepare import prepare
from bench.train import run
from tests.conftest import tiny_config


def acc_rows(run_dir):
    return [(r["step"], r["role"], r["domain"], r["value"]) for r in results.read_rows(run_dir / results.RESULTS)
            if r["metric"] == "acc"]


def test_same_trial_seed_gives_same_split_whatever_the_method(embedded_root):
    card = load_card("embedded")
    a = build_task(card, embedded_root, ("sketch",), 0.2, trial_seed=0)
    b = build_task(card, embedded_root, ("sketch",), 0.2, trial_seed=0)
    c = build_task(card, embedded_root, ("sketch",), 0.2, trial_seed=1)
    assert a.train == b.train
    assert a.train != c.train
    # The split of a domain does not depend on which domain is held out either.
    d = build_task(card, embedded_root, ("photo",), 0.2, trial_seed=0)
    assert d.train["cartoon"] == a.train["cartoon"]
    # ... nor on the method: the seed of the split is not the training seed.
    erm, zs = prepare(tiny_config(embedded_root)), prepare(tiny_config(embedded_root, method="zeroshot"))
    assert erm.seed != zs.seed


def test_roles_cover_id_ood_and_zeroshot(embedded_root):
    task = build_task(load_card("embedded"), embedded_root, ("sketch",), 0.2, trial_seed=0)
    roles = {(e.role, e.domain) for e in task.evalsets}
    assert ("ood", "sketch") in roles and ("id_val", "photo") in roles and ("zeroshot", "sketch") in roles
    assert "sketch" not in task.train


def test_zeroshot_run_evaluates_once_and_equals_erm_at_step_zero(embedded_root, tmp_path):
    zs = run(tiny_config(embedded_root, method="zeroshot"), tmp_path / "zs", progress=False)
    erm = run(tiny_config(embedded_root), tmp_path / "erm", progress=False)
    zs_rows = acc_rows(zs)
    assert {r[0] for r in zs_rows} == {0} and (zs / results.DONE).is_file()
    assert zs_rows == [r for r in acc_rows(erm) if r[0] == 0]
    assert {r[0] for r in acc_rows(erm)} == {0, 3, 6}


def test_resumed_run_equals_unbroken_run(embedded_root, tmp_path):
    cfg = tiny_config(embedded_root)
    unbroken = run(cfg, tmp_path / "a", progress=False)
    broken = run(cfg, tmp_path / "b", progress=False, stop_after=4)  # "crash" after step 4 (checkpoint at 4)
    assert not (broken / results.DONE).is_file() and (broken / results.CHECKPOINT).is_file()
    run(cfg, broken, progress=False)
    a = torch.load(unbroken / results.FINAL)["method"]
    b = torch.load(broken / results.FINAL)["method"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert acc_rows(unbroken) == acc_rows(broken)


def test_a_crash_between_eval_and_checkpoint_does_not_duplicate_rows(embedded_root, tmp_path):
    cfg = tiny_config(embedded_root, **{"train.checkpoint_every": 4})
    broken = run(cfg, tmp_path / "b", progress=False, stop_after=5)  # evaluated at 3, checkpoint at 4
    run(cfg, broken, progress=False)
    unbroken = run(cfg, tmp_path / "a", progress=False)
    assert acc_rows(unbroken) == acc_rows(broken)


def test_a_done_run_is_not_rerun_and_another_job_cannot_reuse_its_folder(embedded_root, tmp_path):
    from bench.errors import BenchError

    out = run(tiny_config(embedded_root, method="zeroshot"), tmp_path / "zs", progress=False)
    before = (out / results.RESULTS).read_text()
    run(tiny_config(embedded_root, method="zeroshot"), out, progress=False)
    assert (out / results.RESULTS).read_text() == before
    (out / results.DONE).unlink()
    with pytest.raises(BenchError, match="holds another job"):
        run(tiny_config(embedded_root, **{"train.lr": 0.5}), out, progress=False)
    assert (out / results.RESULTS).read_text() == before
    assert json.loads((out / results.CONFIG).read_text())["config"]["method"] == "zeroshot"


def test_every_evaluation_logs_its_time_and_the_cost_table_shows_the_evaluation_share(embedded_root, tmp_path):
    from bench import collect
    from bench import tables

    run_dir = run(tiny_config(embedded_root), tmp_path / "runs" / "erm", progress=False)
    rows = results.read_rows(run_dir / results.RESULTS)
    evals = {r["step"]: r["value"] for r in rows if r["metric"] == "eval_time"}
    assert sorted(evals) == [0, 3, 6] and all(v > 0 for v in evals.values())  # step 0, every eval_every, the last
    train = sum(r["value"] * r["n"] for r in rows if r["metric"] == "step_time")
    section = tables.build(collect.load(tmp_path / "runs"), "ood_avg", cost=True).sections[0]
    share = section.cells[("erm", "cost:eval_share")].mean
    assert share == pytest.approx(100 * sum(evals.values()) / (sum(evals.values()) + train))

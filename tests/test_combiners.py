"""Post-hoc combiners (bench/combine.py, combiners/): the registry, each combiner's defining property, the run
folders `bench combine` writes, and the collector's rows of them."""
import json
import shutil

import pytest
import torch

from bench import collect
from bench import model_selection
from bench import config
from bench import results
from bench import table_formats
from bench import tables
from bench.combine import (COMBINERS, Combiner, average, build_combiner, combine_group, combine_runs, find_runs,
                           group_key, load_builtin_combiners, register_combiner)
from bench.errors import BenchError
from bench.prepare import prepare
from bench.train import run
from combiners.model_stock import merge_ratio, model_stock
from combiners.soup import greedy_soup
from tests.conftest import tiny_config

load_builtin_combiners()


# ---- the registry ------------------------------------------------------------------------------------------
def test_shipped_combiners_are_registered():
    assert {"soup", "model_stock", "wise"} <= set(COMBINERS)


def test_duplicate_combiner_names_raise_and_unknown_ones_list_the_known():
    with pytest.raises(BenchError, match="combiner 'soup' is already registered"):
        @register_combiner("soup")
        class Other(Combiner):
            pass
    with pytest.raises(BenchError, match="unknown combiner 'soop': did you mean 'soup'.*known: model_stock, soup, wise"):
        build_combiner("soop")
    with pytest.raises(BenchError, match="unknown key 'options.alpha': did you mean 'options.alphas'"):
        build_combiner("wise", {"alpha": [0.5]})
    with pytest.raises(BenchError, match="outside"):
        build_combiner("wise", {"alphas": [1.5]})
    with pytest.raises(BenchError, match="combiner soup takes no options; drop --opt x"):
        build_combiner("soup", {"x": 1})


# ---- the arithmetic, alone ---------------------------------------------------------------------------------
def states(*values):
    return [{"w": torch.tensor(v, dtype=torch.float32), "b": torch.tensor([v[0] * 2.0])} for v in values]


def test_uniform_soup_of_one_is_that_run_and_of_two_their_average():
    (a,), (b, c) = states([1.0, 2.0]), states([0.5, -1.0], [3.0, 7.0])
    assert all(torch.equal(average([a])[k], a[k]) for k in a)
    two = average([b, c])
    assert all(torch.equal(two[k], (b[k] + c[k]) / 2) for k in b)
    with pytest.raises(BenchError, match="differ in trained parameters"):
        average([a, {"w": a["w"]}])


def test_greedy_soup_orders_by_id_val_and_never_keeps_a_member_that_lowers_it():
    # score: ID accuracy as a function of the weights; the best single run is r2, then r0, r3, r1
    runs = {f"r{i}": {"w": torch.tensor([float(v)])} for i, v in enumerate([2.0, 9.0, 3.0, 5.0])}
    target = 3.0

    def score(state):
        return 1.0 - abs(float(state["w"][0]) - target) / 10

    soup, kept, info = greedy_soup(runs, score)
    assert info["order"] == ["r2", "r0", "r3", "r1"]  # by each run's own ID validation accuracy, best first
    # r2 alone (3.0) is the best possible; adding r0 gives 2.5 (lower: refused), r3 gives 4.0 (refused), r1 too
    assert kept == ["r2"] and torch.equal(soup["w"], runs["r2"]["w"])
    assert [t["kept"] for t in info["tried"]] == [False, False, False]
    # a member that keeps the accuracy (>=, the paper's Recipe 1) is added, one that raises it too
    runs = {"a": {"w": torch.tensor([2.0])}, "b": {"w": torch.tensor([4.0])}, "c": {"w": torch.tensor([20.0])}}
    soup, kept, info = greedy_soup(runs, score)
    assert info["order"] == ["a", "b", "c"] and kept == ["a", "b"] and float(soup["w"][0]) == 3.0
    assert all(t["soup_id_val"] <= info["soup_id_val"] for t in info["tried"])


def test_model_stock_ratio_is_the_papers():
    assert merge_ratio(2, 1.0) == 1.0 and merge_ratio(5, 0.0) == 0.0
    assert merge_ratio(2, 0.5) == pytest.approx(2 / 3) and merge_ratio(3, 0.5) == pytest.approx(0.75)


def test_model_stock_of_identical_task_vectors_is_those_weights_and_of_orthogonal_ones_the_pretrained():
    theta0 = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([0.5])}
    same = [{"w": torch.tensor([2.0, 0.0, 3.0, 1.5]), "b": torch.tensor([0.7])} for _ in range(3)]
    merged, t = model_stock(theta0, same)
    assert t == {"w": 1.0, "b": 1.0}
    assert all(torch.allclose(merged[k], same[0][k], atol=1e-6) for k in theta0)
    ortho = [{"w": theta0["w"] + torch.tensor(e), "b": theta0["b"] + d} for e, d in
             (([1.0, 0, 0, 0], 1.0), ([0, 2.0, 0, 0], -1.0), ([0, 0, 0, -3.0], 1.0))]
    merged, t = model_stock(theta0, ortho)  # b: cosines 1, -1, -1 -> mean -1/3, clamped to 0
    assert t == {"w": 0.0, "b": 0.0}
    assert all(torch.equal(merged[k], theta0[k]) for k in theta0)
    # two task vectors at 60 degrees: t = 2 * 0.5 / 1.5, merged = t * w_avg + (1 - t) * w0
    two = [{"w": theta0["w"] + torch.tensor([1.0, 0, 0, 0]), "b": theta0["b"]},
           {"w": theta0["w"] + torch.tensor([0.5, 0.75 ** 0.5, 0, 0]), "b": theta0["b"]}]
    merged, t = model_stock(theta0, two)
    assert t["w"] == pytest.approx(2 / 3)
    assert torch.allclose(merged["w"], 2 / 3 * (two[0]["w"] + two[1]["w"]) / 2 + 1 / 3 * theta0["w"])
    with pytest.raises(BenchError, match="at least 2"):
        model_stock(theta0, same[:1])


# ---- training seeds ----------------------------------------------------------------------------------------
def test_seed_offset_changes_the_training_seed_and_id_but_not_the_task(embedded_root):
    base = prepare(tiny_config(embedded_root))
    zero = prepare(tiny_config(embedded_root, **{"train.seed_offset": 0}))
    other = prepare(tiny_config(embedded_root, **{"train.seed_offset": 3}))
    assert zero.job_id == base.job_id and zero.seed == base.seed  # 0 is not part of the identity
    assert other.job_id != base.job_id and other.seed != base.seed
    rec = {"config": config.to_dict(base.cfg), "hparams": {}}
    rec3 = {"config": config.to_dict(other.cfg), "hparams": {}}
    assert group_key(rec, "hp") == group_key(rec3, "hp") == group_key(rec3, "hp")
    lr = {"config": config.to_dict(tiny_config(embedded_root, **{"train.lr": 3e-4})), "hparams": {}}
    assert group_key(lr, "method") == group_key(rec, "method") and group_key(lr, "hp") != group_key(rec, "hp")
    for change in ({"trial_seed": 1}, {"data.test_domains": ["photo"]}, {"method": "flyp"}):
        moved = {"config": config.to_dict(tiny_config(embedded_root, **change)), "hparams": {}}
        assert group_key(moved, "method") != group_key(rec, "method"), change


def test_shipped_soup_sweep_trains_four_seeds_per_task_and_its_first_is_embedded_yamls_erm():
    from bench import sweep

    jobs = sweep.expand(sweep.load_sweep("sweeps/embedded_soups.yaml"), "soups", check_data=False)
    tasks = {}
    for j in jobs:
        tasks.setdefault((j.cfg.data.test_domains, j.cfg.trial_seed), set()).add((j.cfg.train.seed_offset, j.seed))
    assert len(tasks) == 12 and all(len(v) == 4 and len({s for _, s in v}) == 4 for v in tasks.values())
    erm = {j.job_id for j in sweep.expand(sweep.load_sweep("sweeps/embedded.yaml"), "e", check_data=False)
           if j.cfg.method == "erm"}
    assert {j.job_id for j in jobs if j.draw == 0} == erm


# ---- on runs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(embedded_root, tmp_path_factory):
    """Two ERM runs of one task (training seeds 0 and 1), one of another trial seed, one zero-shot run."""
    root = tmp_path_factory.mktemp("runs")
    short = {"train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3}
    for name, over in (("a", {"wise_alphas": [0.0, 0.5, 1.0]}), ("b", {"train.seed_offset": 1}),
                       ("c", {"trial_seed": 1}), ("zs", {"method": "zeroshot"})):
        run(tiny_config(embedded_root, **short, **over), root / name, progress=False)
    return root


def accs(rows):
    return sorted((r["role"], r["domain"], r["value"]) for r in rows if r["metric"] == "acc")


def last_rows(run_dir):
    rows = [r for r in results.read_rows(run_dir / results.RESULTS) if "variant" not in r]
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last and r["role"] != "train"]


def test_find_runs_takes_done_runs_with_weights_only(runs):
    found = {p.name for p, _ in find_runs(runs)}
    assert found == {"a", "b", "c"}  # zeroshot trains nothing and keeps no final.pt
    assert {p.name for p, _ in find_runs(runs, ["flyp"])} == set()


def test_a_soup_of_one_run_is_that_run(runs, tmp_path):
    one = [(runs / "a", json.loads((runs / "a" / results.CONFIG).read_text()))]
    folder = combine_group(build_combiner("soup"), one, tmp_path)
    rows = results.read_rows(folder / results.RESULTS)
    for variant in ("soup:uniform", "soup:greedy"):
        assert accs(r for r in rows if r["variant"] == variant) == accs(last_rows(runs / "a"))


def test_bench_combine_writes_a_run_per_task_that_the_collector_and_table_show(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    (soup,) = combine_runs(root, build_combiner("soup"))  # the trial-seed-1 run is alone: no soup of it...
    (stock,) = combine_runs(root, build_combiner("model_stock"), group_by="hp")
    assert soup.parent == stock.parent == root / "combined"
    name_of = {json.loads((root / n / results.CONFIG).read_text())["job_id"]: n for n in ("a", "b")}
    ids = sorted(name_of)
    for folder, name, variants in ((soup, "soup", ["soup:greedy", "soup:uniform"]),
                                   (stock, "model_stock", ["model_stock"])):
        rec = json.loads((folder / results.CONFIG).read_text())
        assert rec["job_id"] == folder.name and (folder / results.DONE).is_file()
        assert rec["combined"]["combiner"] == name and [m["job_id"] for m in rec["combined"]["members"]] == ids
        assert sorted(rec["combined"]["variants"]) == variants
        assert rec["config"]["trial_seed"] == 0 and rec["config"]["data"]["test_domains"] == ["sketch"]
        assert "baseline" in rec and rec["baseline"] == json.loads((root / "a" / results.CONFIG).read_text())["baseline"]
        rows = results.read_rows(folder / results.RESULTS)
        assert sorted({r["variant"] for r in rows}) == variants
        assert {r["role"] for r in rows} >= {"id_val", "ood", "zeroshot"}
    greedy = json.loads((soup / results.CONFIG).read_text())["combined"]["variants"]["soup:greedy"]
    # scored on ID validation only: each member's score is its own last-step ID accuracy (the collector's `id`)
    for job in ids:
        own = [r["value"] for r in last_rows(root / name_of[job]) if r["role"] == "id_val" and r["metric"] == "acc"]
        assert greedy["id_val"][job] == pytest.approx(sum(own) / len(own))
    assert greedy["order"] == sorted(ids, key=lambda j: (-greedy["id_val"][j], j))
    assert greedy["members"][0] == greedy["order"][0]
    # again: nothing new (the same members give the same job id)
    assert combine_runs(root, build_combiner("soup")) == [soup]
    # the collector: rows of their own, in the members' cells (dataset, held-out set, trial seed)
    coll = collect.load(root, cache=False)
    labels = set(model_selection.units(coll).table["label"])
    assert {"erm", "erm+soup:uniform", "erm+soup:greedy", "erm+model_stock", "erm+wise:0.5"} <= labels
    chosen = model_selection.select(coll, "train_val")
    assert set(chosen.loc[chosen["label"] == "erm+model_stock", "job_id"]) == {stock.name}
    text = table_formats.render(tables.build(coll, "id,ood_avg", "train_val"), "markdown")
    for label in ("erm+soup:greedy", "erm+soup:uniform", "erm+model_stock"):
        assert f"| {label} " in text


def test_too_few_runs_or_mixed_tasks_are_refused(runs, tmp_path):
    with pytest.raises(BenchError, match="no task has 2 finished runs to combine with model_stock"):
        combine_runs(runs / "c", build_combiner("model_stock"), out=tmp_path)
    mixed = [(runs / n, json.loads((runs / n / results.CONFIG).read_text())) for n in ("a", "c")]
    with pytest.raises(BenchError, match="not one task"):
        combine_group(build_combiner("soup"), mixed, tmp_path)
    with pytest.raises(BenchError, match="no finished runs with saved weights"):
        combine_runs(runs / "zs", build_combiner("soup"))


def test_wise_through_the_registry_reproduces_the_rows_written_at_the_end_of_training(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs / "a", root / "a")
    before = results.read_rows(root / "a" / results.RESULTS)
    combine_runs(root, build_combiner("wise", {"alphas": [0.0, 0.5, 1.0]}))
    after = results.read_rows(root / "a" / results.RESULTS)

    def key(rows):
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    assert key(after) == key(before)  # every row, calibration metrics included, identical
    assert not (root / "combined").exists()  # a per-run combiner writes into the run itself


def test_the_documented_plugin_combiner_registers_and_runs(runs, tmp_path):
    from pathlib import Path

    from bench.method import load_plugin

    doc = (Path(__file__).resolve().parent.parent / "docs" / "ADDING_A_METHOD.md").read_text()
    code = doc.split("# my_combiner.py\n", 1)[1].split("```", 1)[0]
    plugin = tmp_path / "my_combiner.py"
    plugin.write_text(code)
    try:
        load_plugin(plugin)
        combiner = build_combiner("scaled_soup", {"scale": 1.0})
        pair = [(runs / n, json.loads((runs / n / results.CONFIG).read_text())) for n in ("a", "b")]
        folder = combine_group(combiner, pair, tmp_path / "out")
        uniform = combine_group(build_combiner("soup"), pair, tmp_path / "out")
        mine = results.read_rows(folder / results.RESULTS)
        assert {r["variant"] for r in mine} == {"scaled_soup:1"}
        # scale 1 is the uniform soup
        assert accs(mine) == accs(r for r in results.read_rows(uniform / results.RESULTS) if r["variant"] == "soup:uniform")
    finally:
        COMBINERS.unregister("scaled_soup")


def test_seed_offset_0_keeps_the_collectors_hp_key_of_configs_written_before_it(embedded_root):
    new = config.to_dict(tiny_config(embedded_root))
    old = json.loads(json.dumps(new))
    del old["train"]["seed_offset"]
    seeded = config.to_dict(tiny_config(embedded_root, **{"train.seed_offset": 2}))
    assert collect._hp_key(new, {}) == collect._hp_key(old, {}) != collect._hp_key(seeded, {})

"""data.classes: base_to_novel (CoOp / CoCoOp's base-to-novel protocol) on DomainBed-layout cards."""
from __future__ import annotations

import json
import math

import pytest

from bench import config
from bench.cards import load_card, split_classes
from bench.data import build_task
from bench.errors import BenchError
from bench.prepare import prepare
from bench.train import run
from tests.conftest import tiny_config
from tests.domainbed_fixture import make_domainbed_fixture


@pytest.mark.parametrize("name", ["pacs", "vlcs", "officehome", "terraincognita", "domainnet"])
def test_coop_rule_on_every_real_card(name):
    card = load_card(name)
    split = split_classes(card, "base_to_novel")
    ordered = sorted(card.classes)
    m = math.ceil(len(ordered) / 2)
    assert split.seen_classes == tuple(c for c in card.classes if c in ordered[:m])
    assert split.unseen_classes == tuple(ordered[m:])
    assert len(split.seen_classes) == m and set(split.seen_classes).isdisjoint(split.unseen_classes)
    assert split_classes(card, "card") is card


def test_task_has_novel_classes_in_every_domain(tmp_path):
    make_domainbed_fixture(tmp_path, ["pacs"], per_class=2)
    card = split_classes(load_card("pacs"), "base_to_novel")  # 7 classes: 4 base, 3 novel
    assert card.unseen_classes == ("horse", "house", "person")
    task = build_task(card, tmp_path, ("sketch",), 0.5, trial_seed=0)
    zs = [e for e in task.evalsets if e.role == "zeroshot"]
    assert [e.domain for e in zs] == list(card.domains)
    assert all(len(e.items) == 3 * 2 and e.classes == "unseen" for e in zs)
    trained = {p for items in task.train.values() for p, _ in items}
    assert not trained & {p for e in zs for p, _ in e.items}  # novel classes are never fine-tuned on
    assert task.unseen_names == ["horse", "house", "person"]


def test_split_is_part_of_the_identity_and_default_ids_stay():
    base = config.from_dict(config.RunConfig, {"data": {"dataset": "pacs", "test_domains": ["sketch"]}})
    b2n = config.from_dict(config.RunConfig, {"data": {"dataset": "pacs", "test_domains": ["sketch"], "classes": "base_to_novel"}})
    assert "classes" not in config.identity(base)["data"] and config.identity(b2n)["data"]["classes"] == "base_to_novel"
    assert prepare(base).job_id != prepare(b2n).job_id


@pytest.mark.parametrize("dataset,classes,pattern", [
    ("imagenet", "base_to_novel", "shift card"),
    ("embedded", "base_to_novel", "lists unseen_classes of its own"),
    ("pacs", "novel_only", "is not one of card, base_to_novel"),
])
def test_refusals_name_the_key(dataset, classes, pattern):
    with pytest.raises(BenchError, match=pattern) as err:  # an unknown split already fails at load (from_dict)
        prepare(config.from_dict(config.RunConfig, {"data": {"dataset": dataset, "classes": classes}}, "x.yaml"), "x.yaml")
    assert str(err.value).startswith("x.yaml: data.classes") and "\n" not in str(err.value)


def test_fewer_than_two_novel_classes_is_refused(tmp_path):
    card = tmp_path / "three.yaml"
    card.write_text("name: three\nfolder: three\ndomains: [a, b]\nclasses: [x, y, z]\ntemplates: ['a {}.']\n")
    with pytest.raises(BenchError, match="leaves 1 novel class .* at least 2"):
        split_classes(load_card(str(card)), "base_to_novel", "x.yaml")


def test_run_reports_novel_zero_shot_and_the_table_has_hm(embedded_root, tmp_path):
    from bench import collect
    from bench import table_formats
    from bench import tables

    make_domainbed_fixture(tmp_path / "data", ["pacs"], per_class=2)
    cfg = tiny_config(embedded_root, **{"data.dataset": "pacs", "data.root": str(tmp_path / "data"),
                                        "data.classes": "base_to_novel", "train.steps": 2, "train.eval_every": 2,
                                        "train.batch_size": 6})
    run_dir = run(cfg, tmp_path / "runs" / "r", progress=False)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    zs = [r for r in rows if r["role"] == "zeroshot"]
    assert {r["domain"] for r in zs} == set(load_card("pacs").domains) and {r["n"] for r in zs} == {6}
    report = tables.build(collect.load(tmp_path / "runs"), "id,ood_avg,zs_avg,hm")
    text = table_formats.render(report, "markdown")
    assert "HM" in text.splitlines()[0]
    sec = report.sections[0]
    cells = {c: sec.cells[("erm", c)] for c in sec.columns}
    idv, zsv, hm = (cells[f"{m}@pacs:base_to_novel"].mean for m in ("id", "zs_avg", "hm"))
    assert hm == pytest.approx(2 * idv * zsv / (idv + zsv))


def test_collector_keeps_a_class_split_apart_from_the_card(embedded_root, tmp_path):
    """Runs of one dataset on other classes are another dataset for the collector: never one cell, never one
    model selection (base-to-novel runs score higher ID on half the classes)."""
    from bench import collect

    make_domainbed_fixture(tmp_path / "data", ["pacs"], per_class=2)
    common = {"data.dataset": "pacs", "data.root": str(tmp_path / "data"), "train.steps": 2, "train.eval_every": 2,
              "train.batch_size": 6}
    run(tiny_config(embedded_root, **common), tmp_path / "runs" / "card", progress=False)
    run(tiny_config(embedded_root, **common, **{"data.classes": "base_to_novel"}), tmp_path / "runs" / "b2n",
        progress=False)
    coll = collect.load(tmp_path / "runs")
    assert coll.datasets == ["pacs", "pacs:base_to_novel"]
    assert collect.dataset_label({"dataset": "pacs"}) == "pacs" == collect.dataset_label({"dataset": "pacs", "classes": "card"})

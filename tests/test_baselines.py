"""Baseline rows (issue 13): a method class says whether it is a reference row (Method.baseline), runs record it in
config.json, and the torch-free collector orders table rows and picks the plot's reference point from the record."""
import json
import shutil
from pathlib import Path

import pytest

from bench import collect
from bench import plot
from bench import tables

FIXTURE = Path(__file__).parent / "fixtures" / "runs"


def test_only_the_declaring_class_is_a_baseline():
    from bench.method import METHODS, Method, baseline_of, load_builtin_methods
    from methods.erm import ERM

    load_builtin_methods()
    assert baseline_of(Method) is None
    assert baseline_of(METHODS.get("zeroshot")) == 0 and baseline_of(METHODS.get("erm")) == 1
    others = {n: cls for n, cls in METHODS.items() if n not in ("zeroshot", "erm")}
    assert any(issubclass(cls, ERM) for cls in others.values())  # wise_ft, l2sp, lp_ft, ...: they inherit ERM's
    assert {n: baseline_of(cls) for n, cls in others.items()} == dict.fromkeys(others)  # but are ordinary rows


def _copy(tmp_path, edit) -> Path:
    """The fixture sweep with edit(record) applied to every config.json (records written before issue 13: no
    "baseline" key)."""
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    for path in root.glob("*/config.json"):
        rec = json.loads(path.read_text())
        edit(rec)
        path.write_text(json.dumps(rec))
    return root


def test_records_without_the_key_fall_back_to_the_shipped_baselines():
    coll = collect.load(FIXTURE, cache=False)
    assert "baseline" not in json.loads(next(FIXTURE.glob("*/config.json")).read_text())
    assert collect.baselines(coll) == collect.LEGACY_BASELINES == {"zeroshot": 0, "erm": 1}
    assert collect.reference_method(collect.baselines(coll)) == "zeroshot"


def test_the_record_says_which_rows_are_baselines(tmp_path, monkeypatch):
    def edit(rec):
        if rec["config"]["method"] == "zeroshot":  # another name, rank 0 from the record: sorts last by name
            rec["config"]["method"] = "zz_reference"
            rec["baseline"] = 0
        else:  # erm, recorded as no baseline: an ordinary row
            rec["baseline"] = None

    coll = collect.load(_copy(tmp_path, edit), cache=False)
    assert collect.baselines(coll) == {"zz_reference": 0}
    (sec,) = tables.build(coll, "ood_avg", "train_val", datasets=["embedded"]).sections
    assert sec.rows == ["zz_reference", "erm", "erm+wise:0", "erm+wise:0.5", "erm+wise:1"]

    figs = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: figs.append(fig) or [])
    plot.plot(coll, tmp_path / "p", "train_val", datasets=["embedded"])
    (legend,) = figs[0].legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "zz_reference (zero-shot)" and "zz_reference" not in texts[1:]
    assert legend.legend_handles[0].get_marker() == "*"


def test_a_plugin_rank_orders_rows_between_and_after_the_shipped_ones(tmp_path):
    def edit(rec):
        if rec["config"]["method"] == "erm" and rec["config"]["train"]["lr"] == 1e-4:
            rec["config"]["method"] = "aaa"  # a plugin that is no baseline: after the baselines, by name
        elif rec["config"]["method"] == "erm":
            rec["config"]["method"] = "mine"
            rec["baseline"] = 2

    coll = collect.load(_copy(tmp_path, edit), cache=False)
    assert collect.baselines(coll) == {"zeroshot": 0, "mine": 2}
    (sec,) = tables.build(coll, "ood_avg", "oracle", datasets=["embedded"]).sections
    wise = ["+wise:0", "+wise:0.5", "+wise:1"]  # post-hoc variants: no baselines, they follow their method
    assert sec.rows == ["zeroshot", "mine", *("mine" + w for w in wise), "aaa", *("aaa" + w for w in wise)]


@pytest.mark.parametrize("value", ["x", [1]])
def test_a_malformed_baseline_leaves_the_folder_out(tmp_path, value):
    def edit(rec):
        if rec["config"]["method"] == "zeroshot":
            rec["baseline"] = value

    coll = collect.load(_copy(tmp_path, edit), cache=False)
    assert "zeroshot" not in set(coll.jobs["method"])
    assert any("unreadable config.json" in p for p in coll.problems)

"""`bench plot` (ID-vs-OOD scatter with WiSE-FT curves) and `bench export-best` on the fixture sweep."""
import json
import shutil
from pathlib import Path

import pytest

from bench import collect
from bench.errors import BenchError
from bench.cli import main
from bench.plot import plot, points

FIXTURE = Path(__file__).parent / "fixtures" / "runs"


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot") / "runs"
    shutil.copytree(FIXTURE, root)
    return collect.load(root, cache=False)


def test_points_hold_methods_zero_shot_and_the_wise_curve(coll):
    pts = points(coll, "train_val", ["embedded"])
    assert set(pts["label"]) == {"zeroshot", "erm", "erm+wise:0", "erm+wise:0.5", "erm+wise:1"}
    curve = pts[pts["alpha"].notna()].sort_values("alpha")
    assert list(curve["alpha"]) == [0.0, 0.5, 1.0] and (curve["n"] == 2).all()
    # WiSE-FT at alpha 0 is the zero-shot model: its OOD accuracy is the zero-shot model's, not the fine-tuned one's
    erm = pts.set_index("label").loc["erm"]
    assert curve.iloc[0]["ood"] > erm["ood"] and curve.iloc[0]["id"] < erm["id"]
    assert ((pts["id"] > 0) & (pts["id"] < 1) & (pts["ood"] > 0) & (pts["ood"] < 1)).all()
    # the unseen-class zero-shot accuracy (the second panel): the zero-shot model's is the table's zs_avg cell
    assert pts["zs"].between(0, 1).all()
    (sec,) = __import__("bench.tables", fromlist=["build"]).build(coll, "zs_avg", "train_val").sections
    assert pts.set_index("label").loc["zeroshot", "zs"] == sec.cells[("zeroshot", "embedded")].mean
    assert points(coll, "train_val", ["imagenet"])["zs"].isna().all()  # no unseen classes: no zero-shot panel


def test_plot_writes_png_and_pdf(coll, tmp_path):
    paths = plot(coll, tmp_path / "fig" / "id_vs_ood", "lodo")
    assert [p.name for p in paths] == ["id_vs_ood.png", "id_vs_ood.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert paths[0].stat().st_size > 20_000


def test_plot_with_nothing_to_draw_says_why(coll, tmp_path):
    with pytest.raises(BenchError, match="see `bench table --selection lodo`"):
        plot(coll, tmp_path / "x", "lodo", datasets=["imagenet"])


def test_cli_plot_and_export_best(coll, tmp_path, capsys):
    assert main(["plot", "--runs", str(coll.root), "--out", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "p.png"), str(tmp_path / "p.pdf")]
    assert main(["export-best", "--runs", str(coll.root), "--selection", "oracle", "--dataset", "embedded",
                 "--out", str(tmp_path / "best.json"), "--configs", str(tmp_path / "configs")]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert {b["row"] for b in best} == {"zeroshot", "erm", "erm+wise:0", "erm+wise:0.5", "erm+wise:1"}
    assert all(b["selection"] == "oracle" and b["dataset"] == "embedded" for b in best)
    for b in best:  # each selected job's config, ready for `bench run`
        from bench import config

        cfg = config.load_run_config(tmp_path / "configs" / f"{b['job_id']}.yaml")
        assert list(cfg.data.test_domains) == b["test_domains"] and cfg.trial_seed == b["trial_seed"]
        assert b["rerun"].startswith("bench run ")

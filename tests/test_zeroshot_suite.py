"""The cross-dataset zero-shot suite (bench/zeroshot_suite.py, datasets/zeroshot/): cards, CoOp's layouts and split
files (tests/coop_fixture.py writes a tiny one), errors, a run with data.zeroshot_suite, train.suite_every, the
xd_avg column, model selection that never looks at the suite, and job ids that stay without a suite."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bench import config
from bench import zeroshot_suite
from bench.errors import BenchError
from tests.conftest import tiny_config
from tests.coop_fixture import make_coop_fixture

COOP10 = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
          "eurosat", "ucf101")
N_CLASSES = {"caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102, "food101": 101,
             "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101}


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- cards and suites --------------------------------------------------------------------------------------------
def test_coop10_is_the_ten_and_every_card_loads():
    assert zeroshot_suite.list_suites()["coop10"] == COOP10
    assert set(zeroshot_suite.list_zeroshot_cards()) == set(COOP10)
    total = 0
    for name in COOP10:
        card = zeroshot_suite.load_zeroshot_card(name)
        assert card.name == name and len(card.class_names) == N_CLASSES[name] == len(card.coop_names)
        assert len(set(card.class_names)) == len(card.class_names)
        assert card.templates and all("{}" in t for t in card.templates)
        assert card.download and card.class_names_source and card.templates_source
        assert card.split_format == ("fgvc_aircraft" if name == "fgvc_aircraft" else "coop_json")
        total += card.test_count
    assert total == 83696  # CoOp's ten test splits: the images of one suite evaluation


def test_coop_classnames_map_to_clip_prompt_names():
    cal, euro, sun = (zeroshot_suite.load_zeroshot_card(n) for n in ("caltech101", "eurosat", "sun397"))
    assert cal.class_names[cal.class_index("face")] == "off-center face"
    assert cal.class_names[cal.class_index("yin_yang")] == "yin and yang symbol"
    assert euro.class_names[euro.class_index("Herbaceous Vegetation Land")] == "brushland or shrubland"
    assert sun.class_names[sun.class_index("outdoor apartment_building")] == "apartment building outdoor"
    cars = zeroshot_suite.load_zeroshot_card("stanford_cars")  # CoOp moves the year to the front
    assert cars.class_names[cars.class_index("2012 Tesla Model S Sedan")] == "Tesla Model S Sedan 2012"
    ucf = zeroshot_suite.load_zeroshot_card("ucf101")
    assert ucf.class_names[ucf.class_index("Handstand_Pushups")] == "Hand Stand Pushups"
    assert cal.class_index("background") is None and cal.class_index("centered face") is None  # not in CoOp's split


def test_resolve_suite_names_cards_and_paths(tmp_path):
    card = tmp_path / "mine.yaml"
    shutil.copy(zeroshot_suite.ZEROSHOT_DIR / "dtd.yaml", card)
    assert zeroshot_suite.resolve_suite(["coop10"]) == COOP10
    assert zeroshot_suite.resolve_suite(["dtd", "coop10", str(card)]) == ("dtd",) + tuple(c for c in COOP10 if c != "dtd") + (str(card),)
    assert zeroshot_suite.load_zeroshot_card(str(card)).class_names == zeroshot_suite.load_zeroshot_card("dtd").class_names


@pytest.mark.parametrize("values,pattern", [
    (["coop11"], r"x.yaml: unknown zero-shot suite or card 'coop11': did you mean 'coop10'.*\? suites: coop10; cards: caltech101, "),
    (["eurosta"], r"did you mean 'eurosat'"),
    (["nope/mine.yaml"], r"nope/mine.yaml: no such zero-shot card"),
    ([], r"empty; name a suite \(coop10\)"),
])
def test_resolve_suite_errors_list_the_known_names(values, pattern):
    with pytest.raises(BenchError, match=pattern) as err:
        zeroshot_suite.resolve_suite(values, "x.yaml")
    _one_line(err)


@pytest.mark.parametrize("edit,pattern", [
    ({"colour": 1}, r"unknown key 'colour'; valid keys: "),
    ({"templates": ["a photo of a cat."]}, r"template 'a photo of a cat.' has no '\{\}'"),
    ({"split_format": "csv"}, r"split_format 'csv' is not one of coop_json, fgvc_aircraft"),
    ({"classes": ["banded", "Banded"]}, r"classes\[1\] \('Banded'\) matches the same split-file classname as classes\[0\]"),
    ({"classes": None}, r"missing key 'classes'"),
    ({"test_count": -3}, r"test_count must be a positive integer"),
])
def test_bad_cards_are_refused_in_one_line(tmp_path, edit, pattern):
    data = yaml.safe_load((zeroshot_suite.ZEROSHOT_DIR / "dtd.yaml").read_text())
    data.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BenchError, match=pattern) as err:
        zeroshot_suite.load_zeroshot_card(str(path))
    assert _one_line(err).startswith(str(path))


# ---- CoOp's layouts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COOP10)
def test_split_file_labels_map_to_the_cards_names(tmp_path, name):
    make_coop_fixture(tmp_path, [name], n_classes=3, per_class=2)
    card = zeroshot_suite.load_zeroshot_card(name)
    rows = zeroshot_suite.read_split(tmp_path, card, "test")
    items = zeroshot_suite.scan_zeroshot(tmp_path, card, "test")
    assert len(items) == len(rows) == 6 and all(Path(p).is_file() for p, _ in items)
    for (path, k), (_, label, cname) in zip(items, rows):
        assert card.coop_names[k] == cname  # matched by classname ...
    if name != "fgvc_aircraft":  # ... not by order: the fixture's labels are 0..2, the classes the card's last three
        assert {label for _, label, _ in rows} == {0, 1, 2}
    assert {k for _, k in items} == set(range(len(card.class_names) - 3, len(card.class_names)))


def test_fgvc_aircraft_reads_coops_txt_format(tmp_path):
    make_coop_fixture(tmp_path, ["fgvc_aircraft"], n_classes=2, per_class=2)
    card = zeroshot_suite.load_zeroshot_card("fgvc_aircraft")
    lines = (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").read_text().splitlines()
    assert lines[0].split(" ", 1)[1] == "Yak-42"
    rows = zeroshot_suite.read_split(tmp_path, card, "test")
    assert rows[0] == (lines[0].split(" ")[0] + ".jpg", 99, "Yak-42")  # label: line of variants.txt, as CoOp
    assert {card.class_names[k] for _, k in zeroshot_suite.scan_zeroshot(tmp_path, card)} == {"Yak-42", "Tu-154"}
    # a variant with a space (CoOp joins the rest of the line)
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").write_text(lines[0].split(" ")[0] + " BAE 146-200\n")
    assert card.class_names[zeroshot_suite.scan_zeroshot(tmp_path, card)[0][1]] == "BAE 146-200"
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").write_text("1234567 Concorde\n")
    with pytest.raises(BenchError, match=r"images_variant_test.txt: line 1 '1234567 Concorde' is not") as err:
        zeroshot_suite.scan_zeroshot(tmp_path, card)
    _one_line(err)


def test_missing_folder_and_split_file_name_the_download(tmp_path):
    card = zeroshot_suite.load_zeroshot_card("eurosat")
    with pytest.raises(BenchError, match=r"data folder .*eurosat not found \(zero-shot dataset EuroSAT\); download it "
                                         r"as CoOp's DATASETS.md says \(mkdir -p \$DATA/eurosat; .*EuroSAT.zip") as err:
        zeroshot_suite.scan_zeroshot(tmp_path, card)
    _one_line(err)
    make_coop_fixture(tmp_path, ["eurosat"])
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(BenchError, match=r"split file .*split_zhou_EuroSAT.json not found .*drive.google.com") as err:
        zeroshot_suite.scan_zeroshot(tmp_path, card)
    _one_line(err)
    make_coop_fixture(tmp_path, ["eurosat"])
    shutil.rmtree(tmp_path / "eurosat" / "2750")
    with pytest.raises(BenchError, match=r"image folder .*2750 not found") as err:
        zeroshot_suite.scan_zeroshot(tmp_path, card)
    _one_line(err)


def test_unknown_classname_names_the_split_file(tmp_path):
    make_coop_fixture(tmp_path, ["dtd"])
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(path.read_text())
    split["test"][0][2] = "zigzaggy"
    path.write_text(json.dumps(split))
    with pytest.raises(BenchError, match=r"split_zhou_DescribableTextures.json: classname 'zigzaggy' \(label 0\) is "
                                         r"not a class of zero-shot card dtd \(closest: 'zigzagged'\)") as err:
        zeroshot_suite.scan_zeroshot(tmp_path, zeroshot_suite.load_zeroshot_card("dtd"))
    _one_line(err)
    split["test"][0] = ["a.jpg", 0]
    path.write_text(json.dumps(split))
    with pytest.raises(BenchError, match=r"test\[0\] is \['a.jpg', 0\], not \[image path, label, classname\]"):
        zeroshot_suite.scan_zeroshot(tmp_path, zeroshot_suite.load_zeroshot_card("dtd"))


def test_datasets_check_lists_the_suite(tmp_path, capsys):
    from bench.cli import main

    make_coop_fixture(tmp_path, ["dtd", "fgvc_aircraft"], n_classes=2, per_class=3)
    (tmp_path / "dtd" / "images" / zeroshot_suite.read_split(tmp_path, zeroshot_suite.load_zeroshot_card("dtd"))[0][0]).unlink()
    main(["datasets", "--root", str(tmp_path), "--check"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: i for i, line in enumerate(out.splitlines()) if line and not line.startswith(" ")}
    text = out.splitlines()
    assert "zero-shot suites (coop10: 10 datasets" in out
    assert "[5/6 images]" in text[lines["dtd"]] and "suite coop10" in text[lines["dtd"]]
    assert "test split: 6 listed in split_zhou_DescribableTextures.json, 5 found  (CoOp's test split has 1692)" in out
    assert "[6/3333 test images]" in text[lines["fgvc_aircraft"]]
    assert "test split: 6 listed in images_variant_test.txt, 6 found  (CoOp's test split has 3333)" in out
    assert "[missing]" in text[lines["sun397"]]


# ---- runs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite_run(embedded_root, tmp_path_factory):
    """One short run (erm, 6 steps, eval every 2) with a two-dataset suite evaluated every 2nd evaluation."""
    from bench.train import run

    tmp = tmp_path_factory.mktemp("xd")
    data = tmp / "data"
    data.mkdir()
    (data / "embedded").symlink_to(embedded_root / "embedded", target_is_directory=True)
    make_coop_fixture(data, ["dtd", "fgvc_aircraft"], n_classes=3, per_class=2)
    cfg = tiny_config(embedded_root, **{"data.root": str(data), "data.zeroshot_suite": ["dtd", "fgvc_aircraft"],
                                        "train.steps": 6, "train.eval_every": 2, "train.suite_every": 2})
    run_dir = run(cfg, tmp / "runs" / "a", progress=False)
    return cfg, run_dir


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_run_writes_suite_rows_at_the_suite_steps(suite_run):
    cfg, run_dir = suite_run
    rows = _rows(run_dir)
    xd = [r for r in rows if r["role"] == "zeroshot_xd" and r["metric"] == "acc"]
    assert {r["domain"] for r in xd} == {"dtd", "fgvc_aircraft"} and {r["n"] for r in xd} == {6}
    # evaluations at 0, 2, 4, 6; suite_every 2: the 0th and 2nd evaluation, and always the last step
    assert sorted({r["step"] for r in xd}) == [0, 4, 6]
    assert sorted({r["step"] for r in rows if r["role"] == "id_val"}) == [0, 2, 4, 6]
    assert all(0.0 <= r["value"] <= 1.0 for r in xd)


def test_table_has_the_xd_avg_column(suite_run):
    from bench import collect
    from bench import model_selection
    from bench import table_formats
    from bench import tables

    _, run_dir = suite_run
    report = tables.build(collect.load(run_dir.parent), "id,xd_avg")
    text = table_formats.render(report, "markdown")
    assert "zero-shot (cross-dataset)" in text.splitlines()[0]
    sec = report.sections[0]
    cell = sec.cells[("erm", next(c for c in sec.columns if c.startswith("xd_avg")))]
    chosen = model_selection.select(collect.load(run_dir.parent), "train_val")
    step = int(chosen["step"].iloc[0])
    xd = [r["value"] for r in _rows(run_dir) if r["role"] == "zeroshot_xd" and r["metric"] == "acc"
          and r["step"] == step]
    assert cell.mean == pytest.approx(sum(xd) / len(xd))  # the mean over the suite, at the selected step (a fraction)
    assert f"{100 * sum(xd) / len(xd):.1f}" in text  # rendered in percent
    wide = table_formats.render(tables.build(collect.load(run_dir.parent), "xd"), "markdown")
    assert "dtd" in wide and "fgvc_aircraft" in wide and "Avg" in wide


def _copy_run(src: Path, dst: Path, lr: float | None = None, edit=None) -> None:
    """A copy of a run folder, as another job (another lr: another hparam setting) with edited rows."""
    shutil.copytree(src, dst)
    rec = json.loads((dst / "config.json").read_text())
    if lr is not None:
        rec["config"]["train"]["lr"] = lr
        rec["job_id"] = config.stable_hash(rec["config"])
        (dst / "config.json").write_text(json.dumps(rec))
    rows = [edit(r) if edit else r for r in _rows(dst)]
    (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_model_selection_never_uses_the_suite(suite_run, tmp_path):
    from bench import collect
    from bench import model_selection

    _, run_dir = suite_run

    def worse_id_better_suite(r):
        if r["role"] == "id_val" and r["metric"] == "acc":
            return {**r, "value": r["value"] - 0.05}
        if r["role"] == "zeroshot_xd" and r["metric"] == "acc":
            return {**r, "value": 1.0}
        return r

    def suite_reversed(r):  # the suite's best step becomes its worst
        if r["role"] == "zeroshot_xd" and r["metric"] == "acc":
            return {**r, "value": round(1.0 - r["value"] + 0.001 * r["step"], 6)}
        return r

    picks = {}
    for case, edit_a in (("as run", None), ("suite reversed", suite_reversed)):
        root = tmp_path / case.replace(" ", "_")
        _copy_run(run_dir, root / "a", edit=edit_a)
        _copy_run(run_dir, root / "b", lr=0.5, edit=worse_id_better_suite)  # the suite says b, id_val says a
        coll = collect.load(root, cache=False)
        for rule in ("train_val", "oracle"):
            chosen = model_selection.select(coll, rule)
            picks[(case, rule)] = sorted(zip(chosen["job"], chosen["step"]))
    a_id = json.loads((run_dir / "config.json").read_text())["job_id"]
    assert picks[("as run", "train_val")] == picks[("suite reversed", "train_val")]
    assert picks[("as run", "oracle")] == picks[("suite reversed", "oracle")]
    chosen = model_selection.select(collect.load(tmp_path / "as_run", cache=False), "train_val")
    assert list(chosen["job_id"]) == [a_id] and int(chosen["step"].iloc[0]) in (0, 4, 6)  # among the suite's steps


def test_job_ids_without_a_suite_stay_and_with_one_change(embedded_root):
    from bench.prepare import prepare

    base = tiny_config(embedded_root)
    assert "zeroshot_suite" not in config.identity(base)["data"] and "suite_every" not in config.identity(base)["train"]
    # suite_every without a suite changes nothing; a suite and its schedule are part of what a job computes
    assert prepare(tiny_config(embedded_root, **{"train.suite_every": 5})).job_id == prepare(base).job_id
    with_suite = tiny_config(embedded_root, **{"data.zeroshot_suite": ["coop10"]})
    every5 = tiny_config(embedded_root, **{"data.zeroshot_suite": ["coop10"], "train.suite_every": 5})
    ids = {prepare(c).job_id for c in (base, with_suite, every5)}
    assert len(ids) == 3


def test_a_bad_suite_fails_at_prepare_in_one_line(embedded_root):
    from bench.prepare import prepare

    cfg = tiny_config(embedded_root, **{"data.zeroshot_suite": ["coop100"]})
    with pytest.raises(BenchError, match=r"x.yaml: data.zeroshot_suite: unknown zero-shot suite or card 'coop100'") as e:
        prepare(cfg, "x.yaml")
    _one_line(e)


def test_imagenet_sweep_evaluates_coop10():
    from bench import sweep

    path = Path(__file__).resolve().parent.parent / "sweeps" / "imagenet.yaml"
    sw = sweep.load_sweep(path)
    jobs = sweep.expand(sw, str(path), check_data=False)
    assert {j.cfg.data.zeroshot_suite for j in jobs} == {("coop10",)}
    assert {j.cfg.train.suite_every for j in jobs} == {1}

"""`bench table` on the committed fixture sweep: known tables (golden files) in every format for every selection
rule, explained gaps, LaTeX that compiles with booktabs, the command line.

Regenerate the golden files after an intended change, then read the diff:
    BENCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_table.py
"""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import collect
from bench import metrics
from bench.errors import BenchError
from bench import table_formats
from bench import tables
from bench.cli import main
from tests.test_collect import FAILED, RUNNING

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
EXT = {"markdown": "md", "latex": "tex", "csv": "csv", "json": "json"}
RULES = ["train_val", "lodo", "oracle"]


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    """The fixture sweep, loaded once from a copy at ./runs (notes name relative paths)."""
    root = tmp_path_factory.mktemp("table")
    shutil.copytree(collect.__file__ and Path(__file__).parent / "fixtures" / "runs", root / "runs")
    (root / "runs" / RUNNING / "heartbeat").touch()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield collect.load(Path("runs"), cache=False)
    finally:
        os.chdir(cwd)


_REPORTS = {}


def report(coll, metric, rule, cost=False):
    """Built once per test module (and checked: every empty cell carries a note)."""
    key = (metric, rule, cost)
    if key not in _REPORTS:
        rep = tables.build(coll, metric, rule, cost=cost)
        for sec in rep.sections:
            for (row, col), cell in sec.cells.items():
                assert cell.mean is not None or cell.notes, (rule, metric, row, col)
        for fmt in EXT:
            text = table_formats.render(rep, fmt)
            assert "KeyError" not in text and not re.search(r"(^|[|&,])\s*X\s*($|[|&,\\])", text, re.M)
        _REPORTS[key] = rep
    return _REPORTS[key]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("BENCH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing; run with BENCH_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from the golden file"


@pytest.mark.parametrize("fmt", list(EXT))
@pytest.mark.parametrize("rule", RULES)
def test_golden_tables(coll, rule, fmt):
    """The main table (ood_avg, costs) in every format for every rule."""
    check_golden(f"{rule}.ood_avg.{EXT[fmt]}", table_formats.render(report(coll, "ood_avg", rule, cost=True), fmt))


@pytest.mark.parametrize("metric", ["ood", "id", "zs_avg"])
@pytest.mark.parametrize("rule", RULES)
def test_golden_metric_tables(coll, rule, metric):
    """Per held-out domain (one table per dataset, ImageNet-style averages), ID and zero-shot, as markdown."""
    check_golden(f"{rule}.{metric}.md", table_formats.render(report(coll, metric, rule), "markdown"))


@pytest.mark.parametrize("metric", ["ood_avg4", "ood_avg5", "ood:sketch"])
@pytest.mark.parametrize("rule", RULES)
def test_other_metrics_say_why_cells_are_empty(coll, rule, metric):
    rep = report(coll, metric, rule, cost=True)
    if metric != "ood:sketch":
        assert rep.sections[0].cells[("zeroshot", "embedded")].notes
        assert "defined for ImageNet-style shift suites only" in rep.notes[0]


def test_known_values_in_the_golden_table(coll):
    """A few cells worked out by hand from the fixture's results files (values in %)."""
    rep = report(coll, "ood", "train_val")
    emb, imn = rep.sections
    # zeroshot held out sketch (its one step): 0.6277 (seed 0) and 0.6293 (seed 1): mean 62.85,
    # SE = population std 0.08 / sqrt(2) = 0.057 (DomainBed's format_mean)
    zs = emb.cells[("zeroshot", "ood:sketch")]
    assert (round(100 * zs.mean, 3), round(100 * zs.se, 3), zs.n) == (62.85, 0.057, 2)
    assert "62.9 ± 0.1" in table_formats.render(rep, "markdown")
    # ImageNet-style: erm seed 1 has no ObjectNet rows, so Avg (5) has one seed and Avg (4) two
    assert imn.cells[("erm", "ood_avg5")].n == 1 and imn.cells[("erm", "ood_avg4")].n == 2
    assert imn.headers["ood_avg4"] == "Avg (4)" and list(imn.columns[:5]) == [
        f"ood:{d}" for d in metrics.SHIFT_SUITES["imagenet"]["sets"]]


def test_notes_name_jobs_not_done_and_their_states(coll):
    text = table_formats.render(report(coll, "ood_avg", "train_val", cost=True), "markdown")
    assert f"job {FAILED} failed" in text and f"job {RUNNING} running" in text
    assert "0000submitted: submitted, no config.json yet" in text
    assert "runs/13081f729d27/results.jsonl:6" in text  # the corrupt line, in the footer too
    assert "repeated result rows (requeued jobs) counted once" in text
    lodo = table_formats.render(report(coll, "ood_avg", "lodo", cost=True), "markdown")
    assert "missing painting+sketch (no job folder)" in lodo  # the zeroshot pair run never written
    assert "no runs hold out one domain more" in lodo  # imagenet has no pair runs
    assert "Selection: lodo, leave-one-domain-out" in lodo


def test_csv_and_json_are_tidy(coll):
    rep = tables.build(coll, "ood", "oracle", cost=True)
    rows = list(csv.DictReader(io.StringIO(table_formats.to_csv(rep))))
    assert {r["selection"] for r in rows} == {"oracle"} and {r["table"] for r in rows} == {"embedded", "imagenet"}
    cell = next(r for r in rows if r["table"] == "embedded" and r["row"] == "erm" and r["column"] == "photo")
    assert float(cell["mean"]) > 0 and int(cell["n"]) == 2
    data = json.loads(table_formats.to_json(rep))
    assert data["selection"] == "oracle" and len(data["cells"]) == len(rows)
    assert all(n in data["notes"] for c in data["cells"] for n in c["notes"])


def test_latex_escapes_and_uses_booktabs(coll):
    tex = table_formats.render(tables.build(coll, "ood", "train_val", cost=True), "latex")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert "imagenet\\_v2" in tex and "20 \\%" in tex and "±" not in tex
    body = tex.replace("\\\\", "").replace("\\_", "").replace("\\%", "").replace("\\&", "")
    assert "_" not in re.sub(r"\\[a-z]+", "", body) and "&" in body


@pytest.mark.skipif(not shutil.which("pdflatex"), reason="pdflatex not installed")
def test_latex_compiles(coll, tmp_path):
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage[margin=1cm,landscape]{geometry}\n"
           "\\begin{document}\n" + table_formats.render(tables.build(coll, "ood", "lodo", cost=True), "latex") + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_rows_and_datasets_filters(coll):
    rep = tables.build(coll, "ood_avg", "train_val", datasets=["embedded"], rows=["erm*"])
    sec = rep.sections[0]
    assert sec.columns == ["embedded"] and sec.rows == ["erm", "erm+wise:0", "erm+wise:0.5", "erm+wise:1"]


def test_unknown_metric_or_rule_lists_the_choices(coll):
    with pytest.raises(BenchError, match="choose one of id, id_test, ood_avg, ood, zs_avg, hm, xd, xd_avg, ood_avg4, ood_avg5"):
        tables.build(coll, "oood", "train_val")
    with pytest.raises(BenchError, match="choose one of train_val, lodo, oracle"):
        tables.build(coll, "ood_avg", "best")


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_formats_and_out_file(coll, capsys, tmp_path):
    code, out, err = run_cli(["table", "--runs", str(coll.root.resolve()), "--selection", "oracle", "--format",
                              "csv", "--cost"], capsys)
    assert code == 0 and out.startswith("metric,selection,table,row,column,mean,se,n,unit,notes")
    code, out, err = run_cli(["table", "--runs", str(coll.root.resolve()), "--metric", "ood", "--out",
                              str(tmp_path / "t.md")], capsys)
    assert code == 0 and (tmp_path / "t.md").read_text().startswith("### embedded")


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, out, err = run_cli(["table", "--runs", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["table", "--runs", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no runs under" in err and "bench sweep" in err
    code, out, err = run_cli(["table", "--runs", str(tmp_path / "empty"), "--metric", "acc"], capsys)
    assert code == 2 and "unknown metric 'acc'" in err


def test_makefile_quickstart_command_prints_markdown(tmp_path):
    """The `bench table` line of `make quickstart`, as the Makefile has it, in a fresh process."""
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    (line,) = [ln.split("bench ", 1)[1].split() for ln in makefile.splitlines() if ".venv/bin/bench table" in ln]
    assert line[:3] == ["table", "--runs", "runs/quickstart"] and "--metric" in line
    shutil.copytree(Path(__file__).parent / "fixtures" / "runs", tmp_path / "runs" / "quickstart")
    proc = subprocess.run([sys.executable, "-m", "bench", *line],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| method ") and "| zeroshot " in proc.stdout
    header = proc.stdout.splitlines()[0]
    assert all(f" {col} " in header for col in ("ID", "OOD avg", "zero-shot")), header  # issue 2's columns
    assert "Selection: train_val, training-domain validation" in proc.stdout
    assert "results.jsonl:6: skipping a corrupt results line" in proc.stderr


@pytest.mark.parametrize("rule", RULES)
def test_several_metrics_side_by_side_equal_their_own_tables(coll, rule):
    """--metric id,ood_avg,zs_avg: one table, a column per (dataset, metric), the cells of the single tables."""
    both = report(coll, "id,ood_avg,zs_avg", rule)
    (sec,) = both.sections
    datasets = coll.datasets
    assert sec.columns == [f"{m}@{ds}" for ds in datasets for m in ("id", "ood_avg", "zs_avg")]
    assert sec.headers["id@embedded"] == "embedded ID" and sec.headers["zs_avg@embedded"] == "embedded zero-shot"
    assert both.header_lines[0].startswith("Metrics: id, ID accuracy")
    for m in ("id", "ood_avg", "zs_avg"):
        (single,) = report(coll, m, rule).sections
        for row in sec.rows:
            for ds in datasets:
                a, b = sec.cells[(row, f"{m}@{ds}")], single.cells[(row, ds)]
                assert (a.mean, a.se, a.n) == (b.mean, b.se, b.n), (m, row, ds)
    one = tables.build(coll, "id,ood_avg,zs_avg", rule, datasets=["embedded"]).sections[0]
    assert [one.headers[c] for c in one.columns] == ["ID", "OOD avg", "zero-shot"]


@pytest.mark.parametrize("metric, pattern", [("id,oops", "unknown metric 'oops'"), ("ood,id", "cannot be combined"),
                                             ("id,id", "names a metric twice")])
def test_bad_metric_lists_are_one_line(metric, pattern):
    with pytest.raises(BenchError, match=pattern) as err:
        metrics.check_metric(metric)
    assert "\n" not in str(err.value)

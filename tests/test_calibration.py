"""Metrics beyond accuracy (issue 11): bench.calibration's pure functions against hand-computed values, the
evaluation rows of every eval set (temperature fitted on id_val only), the table columns (ECE, NLL, TS-ECE,
macro-F1, worst domain, HM of ID and OOD) on a hand-made run folder, and the reliability diagram."""
import json
import math
import types
from pathlib import Path

import pytest
import torch

from bench import calibration as calibration_metrics
from bench import collect
from bench import results
from bench import table_formats
from bench import tables
from bench.cli import main
from bench.config import stable_hash
from bench.errors import BenchError
from bench.evaluate import evaluate, predict_classes, subset_index
from tests.conftest import tiny_config


def logits_of(*probs):
    """Logits whose softmax is exactly the given probability rows (log p)."""
    return torch.tensor(probs, dtype=torch.float32).log()


# four samples, two classes: confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.7 (right)
Z = logits_of((0.9, 0.1), (0.9, 0.1), (0.65, 0.35), (0.3, 0.7))
Y = torch.tensor([0, 1, 0, 1])


# ---- pure functions ------------------------------------------------------------------------------------------
def test_ece_by_hand():
    # bins [13/15, 14/15): 0.9, 0.9 (1 of 2 right); [9/15, 10/15): 0.65; [10/15, 11/15): 0.7
    expect = (abs(1 - 1.8) + abs(1 - 0.65) + abs(1 - 0.7)) / 4
    assert calibration_metrics.ece(Z, Y) == pytest.approx(expect, abs=1e-6)
    bins = calibration_metrics.confidence_bins(*calibration_metrics.top1(Z)[:1], calibration_metrics.top1(Z)[1] == Y)
    assert bins[0].tolist() == [0] * 9 + [1, 1, 0, 0, 2, 0, 0] and bins[1, 13] == 1
    # confidence exactly 1.0 goes to torchmetrics' 16th slot; a confident mistake costs its full weight
    z1 = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    conf, pred = calibration_metrics.top1(z1)
    assert conf.tolist() == [1.0, 1.0] and calibration_metrics.confidence_bins(conf, pred == 0)[0, 15] == 2
    assert calibration_metrics.ece(z1, torch.tensor([0, 0])) == pytest.approx(0.5)


def test_nll_by_hand():
    expect = -(math.log(0.9) + math.log(0.1) + math.log(0.65) + math.log(0.7)) / 4
    assert calibration_metrics.nll(Z, Y) == pytest.approx(expect, rel=1e-6)


def test_temperature_by_hand():
    # every sample has logits (2, 0), 3 of 4 labelled 0: the NLL is least where sigmoid(2 / T) = 3/4
    z, y = torch.tensor([[2.0, 0.0]] * 4), torch.tensor([0, 0, 0, 1])
    t = calibration_metrics.fit_temperature(z, y)
    assert t == pytest.approx(2 / math.log(3), rel=1e-9)
    assert calibration_metrics.ece(z, y) == pytest.approx(1 / (1 + math.exp(-2)) - 0.75, abs=1e-6)  # 0.881 confident, 75 % right
    assert calibration_metrics.ece(z / t, y) == pytest.approx(0.0, abs=1e-6)  # after scaling: 0.75 confident, 75 % right
    # the fitted T is the NLL minimum: a grid around it is never lower
    assert all(calibration_metrics.nll(z / t, y) <= calibration_metrics.nll(z / (t * f), y) for f in (0.9, 0.99, 1.01, 1.1))
    # all right with ever-surer logits: the minimum lies beyond the range, so T is its lower end (deterministic)
    assert calibration_metrics.fit_temperature(torch.tensor([[5.0, 0.0]] * 3), torch.tensor([0, 0, 0])) == calibration_metrics.T_MIN
    assert calibration_metrics.fit_temperature(torch.tensor([[1.0, 0.0]] * 2), torch.tensor([0, 1])) == calibration_metrics.T_MAX  # a coin


def test_temperature_matches_a_grid_search_on_random_logits():
    g = torch.Generator().manual_seed(0)
    z, y = 4 * torch.randn(300, 6, generator=g), torch.randint(0, 6, (300,), generator=g)
    t = calibration_metrics.fit_temperature(z, y)
    grid = torch.logspace(-1, 2, 3001, dtype=torch.float64)
    best = grid[torch.stack([torch.nn.functional.cross_entropy(z.double() / s, y) for s in grid]).argmin()]
    assert t == pytest.approx(float(best), rel=2e-3) and t == calibration_metrics.fit_temperature(z, y)


def test_macro_f1_by_hand():
    # class 0: tp 1, predicted 2, true 1 -> 2/3; class 1: tp 1, predicted 1, true 3 -> 1/2; class 2: never a label,
    # left out (WILDS: labels present in y_true)
    pred, y = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
    assert calibration_metrics.macro_f1(pred, y, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert calibration_metrics.macro_f1(y, y, 3) == 1.0


def test_batches_add_up_to_the_whole_set_and_bins_round_trip():
    g = torch.Generator().manual_seed(1)
    z, y = 3 * torch.randn(100, 5, generator=g), torch.randint(0, 5, (100,), generator=g)
    s = calibration_metrics.SetMetrics(torch.device("cpu"), f1=True, keep=True)
    for k in range(0, 100, 32):
        s.update(z[k:k + 32], y[k:k + 32])
    s.set_temperature(1.7)
    rows = {r["metric"]: r for r in s.rows({"step": 0, "role": "id_val", "domain": "photo", "split": "out"})}
    assert rows["ece"]["value"] == pytest.approx(calibration_metrics.ece(z, y), abs=1e-9)
    assert rows["nll"]["value"] == pytest.approx(calibration_metrics.nll(z, y), rel=1e-6)
    assert rows["ece_ts"]["value"] == pytest.approx(calibration_metrics.ece(z / 1.7, y), abs=1e-9)
    assert rows["macro_f1"]["value"] == pytest.approx(calibration_metrics.macro_f1(z.argmax(-1), y, 5))
    count, correct, conf = calibration_metrics.decode_bins(rows["rel_bins"]["bins"])
    assert sum(count) == 100 and sum(correct) == int((z.argmax(-1) == y).sum())
    assert calibration_metrics.ece_from_bins([count, correct, conf]) == pytest.approx(rows["ece"]["value"], abs=1e-5)


def test_group_logits_argmax_is_predict_classes():
    subset = ((1, 2), (0,), (3, 4, 5))
    z = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    groups = z[:, subset_index(subset, z.device)].amax(-1)
    assert groups.shape == (50, 3) and torch.equal(groups.argmax(-1), predict_classes(z, subset))
    assert torch.equal(groups[:, 0], torch.maximum(z[:, 1], z[:, 2]))


# ---- evaluation: rows of every eval set, the temperature from id_val only --------------------------------------
class LogitsAreTheImages(torch.nn.Module):
    """A method whose logits are its inputs (the eval 'images' are hand-made logits)."""

    def predict(self, x):
        return x

    def evaluating(self):
        import contextlib
        return contextlib.nullcontext()


class FixedData:
    """EvalData's interface over hand-made (logits, labels) per eval set."""

    def __init__(self, sets, metrics=()):
        self.sets = sets
        evalsets = [types.SimpleNamespace(role=r, domain=d, split="x", classes="seen", class_subset=None)
                    for r, d, _, _ in sets]
        self.task = types.SimpleNamespace(evalsets=evalsets, card=types.SimpleNamespace(metrics=metrics))

    def batches(self, i, es):
        _, _, z, y = self.sets[i]
        for k in range(0, len(y), 3):
            yield z[k:k + 3], y[k:k + 3]


def eval_rows(sets, metrics=()):
    return evaluate(LogitsAreTheImages(), FixedData(sets, metrics), 7, torch.device("cpu"), lambda: torch.autocast(
        "cpu", enabled=False))


def test_temperature_is_fitted_on_id_val_only_and_applied_to_every_set():
    g = torch.Generator().manual_seed(3)
    zi, yi = [3 * torch.randn(10, 4, generator=g) for _ in range(2)], [torch.randint(0, 4, (10,), generator=g)
                                                                      for _ in range(2)]
    zo, yo = 5 * torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)
    # the OOD set comes first in the task: the id_val sets are still evaluated first, rows keep the task's order
    sets = [("ood", "sketch", zo, yo), ("id_val", "photo", zi[0], yi[0]), ("id_val", "cartoon", zi[1], yi[1])]
    rows = eval_rows(sets, metrics=("macro_f1",))
    assert [r["domain"] for r in rows if r["metric"] == "acc"] == ["sketch", "photo", "cartoon"]
    (temp,) = [r for r in rows if r["metric"] == "temperature"]
    t = calibration_metrics.fit_temperature(torch.cat(zi), torch.cat(yi))
    assert temp["value"] == t and temp["n"] == 20 and temp["role"] == "id_val"
    got = {(r["domain"], r["metric"]): r["value"] for r in rows if r["metric"] != "temperature"}
    for d, z, y in [("sketch", zo, yo), ("photo", zi[0], yi[0]), ("cartoon", zi[1], yi[1])]:
        assert {m for dd, m in got if dd == d} == {"acc", "ece", "nll", "ece_ts", "macro_f1", "rel_bins"}
        assert got[(d, "acc")] == (z.argmax(-1) == y).sum().item() / len(y)
        assert got[(d, "ece")] == pytest.approx(calibration_metrics.ece(z, y), abs=1e-9)
        assert got[(d, "nll")] == pytest.approx(calibration_metrics.nll(z, y), rel=1e-6)
        assert got[(d, "ece_ts")] == pytest.approx(calibration_metrics.ece(z / t, y), abs=1e-9)
        assert got[(d, "macro_f1")] == pytest.approx(calibration_metrics.macro_f1(z.argmax(-1), y, 4))
    # perturbing the OOD logits moves the OOD numbers, never the temperature or the ID numbers
    worse = eval_rows([("ood", "sketch", 3 * zo + torch.randn(12, 4, generator=g), yo)] + sets[1:])
    assert [r for r in worse if r["metric"] == "temperature"] == [temp]
    w = {(r["domain"], r["metric"]): r["value"] for r in worse}
    assert all(w[(d, m)] == got[(d, m)] for d in ("photo", "cartoon") for m in ("ece", "nll", "ece_ts"))
    assert w[("sketch", "ece_ts")] != got[("sketch", "ece_ts")]
    assert ("sketch", "macro_f1") not in w  # only where the card asks for it


def test_no_id_val_set_no_temperature():
    z, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    rows = eval_rows([("ood", "sketch", z, y)])
    assert {r["metric"] for r in rows} == {"acc", "ece", "nll", "rel_bins"}


def test_a_short_run_logs_the_new_rows_for_every_eval_set(embedded_root, tmp_path):
    from bench.train import run

    out = run(tiny_config(embedded_root, method="flyp"), tmp_path / "run", progress=False)
    rows = results.read_rows(out / results.RESULTS)
    for step in (0, 3, 6):
        mine = [r for r in rows if r["step"] == step and r["role"] != "train"]
        sets = {(r["role"], r["domain"]) for r in mine if r["metric"] == "acc"}
        assert {r[0] for r in sets} == {"id_val", "ood", "ood_val", "zeroshot"}  # every role, seen and unseen
        for s in sets:
            got = {r["metric"]: r for r in mine if (r["role"], r["domain"]) == s}
            assert set(got) == {"acc", "ece", "nll", "ece_ts", "rel_bins"}, s
            assert all(got[m]["n"] == got["acc"]["n"] for m in got)
            assert 0 <= got["ece"]["value"] <= 1 and 0 <= got["ece_ts"]["value"] <= 1 and got["nll"]["value"] > 0
            assert calibration_metrics.ece_from_bins(calibration_metrics.decode_bins(got["rel_bins"]["bins"])) == pytest.approx(
                got["ece"]["value"], abs=1e-5)
            count, correct, _ = calibration_metrics.decode_bins(got["rel_bins"]["bins"])
            assert sum(count) == got["acc"]["n"] and sum(correct) == round(got["acc"]["value"] * got["acc"]["n"])
        (temp,) = [r for r in mine if r["metric"] == "temperature"]
        assert calibration_metrics.T_MIN <= temp["value"] <= calibration_metrics.T_MAX
        assert temp["n"] == sum(r["n"] for r in mine if r["metric"] == "acc" and r["role"] == "id_val")


# ---- cards ---------------------------------------------------------------------------------------------------
def test_card_metrics_key(tmp_path):
    from bench.cards import CARDS_DIR, load_card

    text = (CARDS_DIR / "embedded.yaml").read_text()
    (tmp_path / "ok.yaml").write_text(text + "metrics: [macro_f1]\n")
    assert load_card(str(tmp_path / "ok.yaml")).metrics == ("macro_f1",)
    assert load_card("embedded").metrics == ()
    (tmp_path / "bad.yaml").write_text(text + "metrics: [auroc]\n")
    with pytest.raises(BenchError, match="metrics: 'auroc' is not one of macro_f1"):
        load_card(str(tmp_path / "bad.yaml"))


# ---- the collector and tables on a hand-made run folder ----------------------------------------------------------
# (seed, held-out domain) -> id_val accs and ECEs of the three other domains, then the held-out domain's
# acc, ECE, NLL, ECE after temperature scaling
RUNS = {
    (0, "sketch"): ({"photo": (.8, .10), "cartoon": (.7, .20), "painting": (.6, .30)}, (.5, .25, 1.5, .05)),
    (0, "photo"): ({"sketch": (.6, .10), "cartoon": (.7, .10), "painting": (.8, .10)}, (.9, .05, .5, .03)),
    (1, "sketch"): ({"photo": (.9, .20), "cartoon": (.8, .20), "painting": (.7, .20)}, (.4, .35, 2.0, .15)),
    (1, "photo"): ({"sketch": (.8, .30), "cartoon": (.8, .30), "painting": (.8, .30)}, (.6, .15, 1.0, .07)),
}
BINS_SKETCH = calibration_metrics.encode_bins([[0] * 9 + [10, 0, 0, 0, 30, 0, 0], [0] * 9 + [4, 0, 0, 0, 15, 0, 0],
                               [0] * 9 + [6.3, 0, 0, 0, 27.0, 0, 0]])


def write_run(root: Path, method: str, seed: int, held: str, calibration: bool = True) -> str:
    cfg = {"method": method, "data": {"dataset": "embedded", "test_domains": [held], "root": "data"},
           "trial_seed": seed, "model": {"name": "TinyCLIP-32"}, "train": {"steps": 100}}
    job_id = stable_hash({"config": cfg})
    d = root / job_id
    d.mkdir(parents=True)
    (d / results.CONFIG).write_text(json.dumps({"config": cfg, "hparams": {}, "job_id": job_id, "protocol_version": 1}))
    ids, (acc, ece, nll, ece_ts) = RUNS[(seed, held)]
    rows = []
    for dom, (a, e) in ids.items():
        base = {"step": 100, "role": "id_val", "domain": dom, "split": "out"}
        rows.append({**base, "metric": "acc", "value": a, "n": 100})
        if calibration:
            rows += [{**base, "metric": "ece", "value": e, "n": 100}, {**base, "metric": "nll", "value": 9.0, "n": 100},
                     {**base, "metric": "ece_ts", "value": e / 2, "n": 100},
                     {**base, "metric": "rel_bins", "value": 15, "n": 40, "bins": BINS_SKETCH}]
    base = {"step": 100, "role": "ood", "domain": held, "split": "in"}
    rows.append({**base, "metric": "acc", "value": acc, "n": 400})
    if calibration:
        rows += [{**base, "metric": "ece", "value": ece, "n": 400}, {**base, "metric": "nll", "value": nll, "n": 400},
                 {**base, "metric": "ece_ts", "value": ece_ts, "n": 400},
                 {**base, "metric": "rel_bins", "value": 15, "n": 40, "bins": BINS_SKETCH},
                 {"step": 100, "role": "id_val", "domain": None, "split": None, "metric": "temperature", "value": 1.5,
                  "n": 300}]
    (d / results.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / results.DONE).write_text("")
    return job_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib") / "runs"
    for seed, held in RUNS:
        write_run(root, "erm", seed, held)
        write_run(root, "zeroshot", seed, held, calibration=held != "photo" or seed != 1)  # one old-style run
    return root


def cell(coll, metric, label="erm"):
    (sec,) = tables.build(coll, metric, "train_val").sections
    return sec.cells[(label, "embedded")]


def se(a, b):
    return abs(a - b) / 2 / math.sqrt(2)  # std (ddof 0) of two values over sqrt(2)


def test_table_values_by_hand(runs):
    coll = collect.load(runs, cache=False)
    # per trial seed: the mean over held-out domains (sketch and photo runs), then mean ± SE over seeds
    c = cell(coll, "ece_ood")
    assert (c.mean, c.se, c.n) == (pytest.approx(0.2), pytest.approx(se(.15, .25)), 2)
    c = cell(coll, "nll_ood")
    assert (c.mean, c.se, c.nats) == (pytest.approx(1.25), pytest.approx(se(1.0, 1.5)), True)
    assert cell(coll, "ece_ts_ood").mean == pytest.approx(((.05 + .03) / 2 + (.15 + .07) / 2) / 2)
    # ID: the mean over the training domains of each run, then over the seed's runs, then over seeds
    assert cell(coll, "ece_id").mean == pytest.approx(((.2 + .1) / 2 + (.2 + .3) / 2) / 2)
    assert cell(coll, "ece_ts_id").mean == pytest.approx(((.2 + .1) / 2 + (.2 + .3) / 2) / 4)
    # worst held-out domain: min(.5, .9) and min(.4, .6)
    c = cell(coll, "worst_ood")
    assert (c.mean, c.se) == (pytest.approx(.45), pytest.approx(se(.5, .4)))
    # HM of ID (seed 0: .7, seed 1: .8) and OOD average (.7, .5)
    hm0, hm1 = 2 * .7 * .7 / 1.4, 2 * .8 * .5 / 1.3
    c = cell(coll, "hm_id_ood")
    assert (c.mean, c.se) == (pytest.approx((hm0 + hm1) / 2), pytest.approx(se(hm0, hm1)))
    assert cell(coll, "ood_avg").mean == pytest.approx(.6)  # accuracy and its selection are as before


def test_table_columns_side_by_side_and_explained_gaps(runs):
    coll = collect.load(runs, cache=False)
    rep = tables.build(coll, "id,ood_avg,ece_ood,nll_ood,worst_ood,macro_f1_ood", "train_val")
    text = table_formats.render(rep, "markdown")
    head = text.splitlines()[0]
    for h in ("ID", "OOD avg", "OOD ECE", "OOD NLL", "OOD worst", "OOD macro-F1"):
        assert f" {h} " in head
    erm = next(line for line in text.splitlines() if line.startswith("| erm "))
    assert "20.0 ± 3.5" in erm and "1.250 ± 0.177" in erm and "45.0 ± 3.5" in erm
    assert "NLL in nats" in text
    # the zeroshot row: one selected run (seed 1, photo) has no calibration rows; macro-F1: no card asks for it
    assert "job " in text and "lacks ece_ood on photo" in text
    assert "no macro_f1 rows in the selected runs (logged only where the dataset card asks for it" in text
    rec = {(r["row"], r["column"]): r for r in json.loads(table_formats.render(rep, "json"))["cells"]}
    assert rec[("erm", "OOD NLL")]["unit"] == "nats" and rec[("erm", "OOD NLL")]["mean"] == 1.25
    assert rec[("erm", "OOD ECE")]["unit"] == "%" and rec[("erm", "OOD ECE")]["mean"] == 20.0


def test_runs_without_calibration_rows_get_an_explained_empty_cell(tmp_path):
    for seed, held in RUNS:
        write_run(tmp_path / "old", "erm", seed, held, calibration=False)
    coll = collect.load(tmp_path / "old", cache=False)
    rep = tables.build(coll, "ood_avg,ece_ood", "train_val")
    (sec,) = rep.sections
    assert sec.cells[("erm", "ood_avg@embedded")].mean == pytest.approx(.6)
    gap = sec.cells[("erm", "ece_ood@embedded")]
    assert gap.mean is None and "no ece rows in the selected runs" in rep.notes[gap.notes[0] - 1]


def test_zero_shot_calibration_columns(tmp_path):
    """ece_zs, nll_zs: the unseen classes' rows (role zeroshot), the mean over domains as zs_avg, then mean ± SE
    over trial seeds; a run that logged only their accuracy gets an explained empty cell."""
    for seed, held in RUNS:
        job_id = write_run(tmp_path / "zs", "erm", seed, held)
        ids = RUNS[(seed, held)][0]
        zs = []
        for dom, (_, e) in ids.items():
            base = {"step": 100, "role": "zeroshot", "domain": dom, "split": "out", "n": 50}
            zs += [{**base, "metric": "acc", "value": .5}, {**base, "metric": "ece", "value": e + .05},
                   {**base, "metric": "nll", "value": 2.0 + seed}]
        with open(tmp_path / "zs" / job_id / results.RESULTS, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in zs))
    coll = collect.load(tmp_path / "zs", cache=False)
    c = cell(coll, "ece_zs")
    assert (c.mean, c.n) == (pytest.approx(((.2 + .1) / 2 + (.2 + .3) / 2) / 2 + .05), 2)  # as ece_id, + .05
    c = cell(coll, "nll_zs")
    assert (c.mean, c.se, c.nats) == (pytest.approx(2.5), pytest.approx(se(2.0, 3.0)), True)
    text = table_formats.render(tables.build(coll, "zs_avg,ece_zs,nll_zs,ece_ts_zs", "train_val"), "markdown")
    assert " zero-shot ECE " in text.splitlines()[0] and " zero-shot NLL " in text.splitlines()[0]
    erm = next(line for line in text.splitlines() if line.startswith("| erm "))
    assert "50.0 ± 0.0" in erm and "2.500 ± 0.354" in erm
    assert "no ece_ts rows in the selected runs" in text  # these runs logged no zero-shot ece_ts


def test_cli_table_and_reliability_plot(runs, tmp_path, capsys):
    assert main(["table", "--runs", str(runs), "--metric", "id,ood_avg,ece_ood,ece_ts_ood,hm_id_ood", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "OOD ECE (TS)" in out and "HM (ID, OOD)" in out
    from bench.plot import reliability_bins

    bins = reliability_bins(collect.load(runs, cache=False))
    erm = bins[(bins["label"] == "erm") & (bins["side"] == "OOD")]
    # pooled over 2 seeds x 2 held-out sets: 4 x the fixture's bins; acc and confidence per bin are theirs
    assert erm["n"].sum() == 160 and erm.loc[erm["bin"] == 13, "acc"].item() == pytest.approx(0.5)
    assert erm.loc[erm["bin"] == 13, "conf"].item() == pytest.approx(0.9)
    assert erm["ece"].iloc[0] == pytest.approx((abs(4 - 6.3) + abs(15 - 27)) / 40)
    assert main(["plot", "--runs", str(runs), "--kind", "reliability", "--out", str(tmp_path / "rel")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "rel.png"), str(tmp_path / "rel.pdf")]
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "rel.pdf").read_bytes()[:5] == b"%PDF-"

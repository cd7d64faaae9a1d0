"""The collector on the committed fixture sweep (tests/fixtures/runs, written by tests/fixtures/make_runs.py):
loading, job states, duplicates, corrupt lines, the cache, and DomainBed's three selection rules checked
against a plain re-implementation of DomainBed's model_selection.py written here from its description."""
import json
import logging
import os
import shutil
import statistics
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from bench import collect
from bench import metrics
from bench import model_selection
from bench import table_cache

FIXTURE = Path(__file__).parent / "fixtures" / "runs"
REQUEUED = "7182e4a71f43"  # erm, held out photo, seed 0, lr 3e-4: its step-100 rows were appended twice
CORRUPT = "13081f729d27"  # erm, held out sketch, seed 1, lr 1e-4: a stray half line (6), a truncated last line (62)
FAILED, RUNNING = "5d54d91dae1d", "a6b345c4e7a6"


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A copy of the fixture sweep at ./runs (relative paths in notes), its running job's heartbeat fresh."""
    shutil.copytree(FIXTURE, tmp_path / "runs")
    (tmp_path / "runs" / RUNNING / "heartbeat").touch()
    monkeypatch.chdir(tmp_path)
    return Path("runs")


@pytest.fixture
def coll(runs):
    return collect.load(runs)


def test_fixture_is_small_and_complete():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 400_000
    assert {p.name for p in FIXTURE.iterdir()} >= {REQUEUED, CORRUPT, FAILED, RUNNING, "0000submitted"}


def test_jobs_states_and_folder_problems(coll):
    states = dict(zip(coll.jobs["job_id"], coll.jobs["state"]))
    assert states[FAILED] == "failed" and states[RUNNING] == "running"
    assert sum(s == "done" for s in states.values()) == 46
    assert any("0000submitted: submitted, no config.json yet" in p for p in coll.problems)
    assert coll.primary_sets == {"embedded": ["photo", "sketch"], "imagenet": [
        "imagenet_a+imagenet_r+imagenet_sketch+imagenet_v2+objectnet"]}
    assert coll.seeds == {"embedded": [0, 1], "imagenet": [0, 1]}
    assert coll.domains["embedded"] == ["photo", "sketch", "cartoon", "painting"]  # the trainer's (card) order
    assert coll.domains["imagenet"][:5] == ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"]
    # the ImageNet card's ood_averages (datasets/imagenet.yaml), read through the card and through the metric
    # registry (which derives SHIFT_SUITES from the shipped cards: defined once, in the card)
    assert coll.suite("imagenet")["averages"] == metrics.SHIFT_SUITES["imagenet"]["averages"] == {
        "ood_avg4": ("Avg (4)", ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a")),
        "ood_avg5": ("Avg (5)", ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"))}
    assert set(metrics.SHIFT_SUITES) == {"imagenet"} and {"ood_avg4", "ood_avg5"} <= set(metrics.METRICS)
    assert coll.suite("embedded") is None


def test_pairs_without_their_single_runs_are_not_columns(runs):
    """DomainBed sweeps every pair; {cartoon, painting} validates no table column but must not become one."""
    src = next(d for d in runs.iterdir() if (d / "config.json").exists() and json.loads(
        (d / "config.json").read_text())["config"]["data"]["test_domains"] == ["photo", "sketch"])
    dst = runs / "0000cartpaint"
    shutil.copytree(src, dst)
    rec = json.loads((dst / "config.json").read_text())
    rec["config"]["data"]["test_domains"], rec["job_id"] = ["cartoon", "painting"], "0000cartpaint"
    (dst / "config.json").write_text(json.dumps(rec))
    coll = collect.load(runs)
    assert coll.primary_sets["embedded"] == ["photo", "sketch"]
    assert not coll.jobs.set_index("job_id").loc["0000cartpaint", "primary"]


def test_job_state_is_bench_jobs_state_with_or_without_the_listing(tmp_path):
    from bench import jobs as job_states

    for name, files in {"a": ["done", "failed"], "b": ["failed"], "c": [], "d": ["heartbeat"]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).touch()
    os.utime(tmp_path / "d" / "heartbeat", (0, 0))
    for name in "abcd":
        names = set(os.listdir(tmp_path / name))
        assert collect.job_state(tmp_path / name) == collect.job_state(tmp_path / name, names) == job_states.job_state(tmp_path / name)
    assert [collect.job_state(tmp_path / n) for n in "abcd"] == ["done", "failed", "missing", "stale"]
    assert collect.job_state(tmp_path / "nowhere") == "missing"


def test_requeued_rows_count_once(coll):
    job = coll.jobs.set_index("job_id").loc[REQUEUED, "job"]
    rows = coll.rows[coll.rows["job"] == job]
    raw = [json.loads(line) for line in (FIXTURE / REQUEUED / "results.jsonl").read_text().splitlines()]
    keys = {(r["step"], r["role"], r["domain"], r["split"], r["metric"], r.get("variant", "")) for r in raw}
    assert len(raw) > len(keys) == len(rows)
    assert coll.duplicates == len(raw) - len(keys)


def test_corrupt_lines_are_skipped_with_file_and_line_and_the_rest_is_read(runs, caplog):
    with caplog.at_level(logging.WARNING, logger="bench"):
        coll = collect.load(runs, cache=False)
    path = f"runs/{CORRUPT}/results.jsonl"
    assert {r.getMessage() for r in caplog.records} == {f"{path}:6: skipping a corrupt results line",
                                                        f"{path}:62: skipping a corrupt results line"}
    assert coll.skipped_lines == [f"{path}:6", f"{path}:62"]
    job = coll.jobs.set_index("job_id").loc[CORRUPT, "job"]
    good = sum(1 for line in (FIXTURE / CORRUPT / "results.jsonl").read_text().splitlines() if line.endswith("}"))
    assert (coll.rows["job"] == job).sum() == good


def test_a_results_file_of_garbage_or_nothing_does_not_stop_the_table(runs, caplog):
    (runs / CORRUPT / "results.jsonl").write_bytes(b"\x00\xff garbage\n[1, 2]\n")
    (runs / REQUEUED / "results.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, logger="bench"):
        coll = collect.load(runs)
    assert len(caplog.records) == 2 and "results.jsonl:2: skipping" in caplog.records[1].getMessage()
    assert len(coll.rows) and len(model_selection.select(coll, "train_val"))


def test_cache_gives_the_same_rows_and_sees_changed_files(runs, caplog):
    def frame(c):
        return c.rows.astype({k: str for k in table_cache.TEXT_COLS}).sort_values(list(c.rows.columns)).reset_index(drop=True)

    plain = collect.load(runs, cache=False)
    assert not (runs / table_cache.CACHE).exists()
    first = collect.load(runs)
    assert (runs / table_cache.CACHE).exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bench"):
        second = collect.load(runs)  # every file from the cache
    assert frame(plain).equals(frame(first)) and frame(first).equals(frame(second))
    assert sum("skipping a corrupt results line" in r.getMessage() for r in caplog.records) == 2  # warned again
    # a post-hoc WiSE-FT run rewrites a file: the cache must not hide it
    path = runs / FAILED.replace(FAILED, REQUEUED) / "results.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"step": 100, "role": "ood", "domain": "photo", "split": "in", "metric": "acc",
                            "value": 0.123, "n": 512, "variant": "wise:0.3"}) + "\n")
    third = collect.load(runs)
    assert (third.rows["variant"] == "wise:0.3").sum() == 1
    # a finished job appears, another is removed
    shutil.rmtree(runs / CORRUPT)
    fourth = collect.load(runs)
    assert frame(fourth).equals(frame(collect.load(runs, cache=False)))


def test_a_dataset_filter_does_not_shrink_the_cache(runs):
    collect.load(runs)
    size = (runs / table_cache.CACHE).stat().st_size
    assert set(collect.load(runs, datasets=["imagenet"]).jobs["dataset"]) == {"imagenet"}
    assert (runs / table_cache.CACHE).stat().st_size == size


def test_unwritable_cache_is_no_error(runs):
    (runs / table_cache.CACHE).mkdir()  # cannot be replaced by a file
    assert len(collect.load(runs).rows)


def test_hp_key_ignores_what_not_computes_and_sees_what_does():
    from bench.config import NOT_IDENTITY

    covered = {(a, b) for a, bs in collect._NOT_HP.items() if bs for b in bs} | {(a,) for a, bs in collect._NOT_HP.items()
                                                                             if bs is None}
    assert NOT_IDENTITY <= covered  # keep in step with job ids
    cfg = json.loads((FIXTURE / REQUEUED / "config.json").read_text())["config"]
    other = json.loads(json.dumps(cfg))
    other["data"]["test_domains"], other["trial_seed"], other["data"]["root"] = ["sketch"], 5, "/elsewhere"
    assert collect._hp_key(cfg, {"a": 1}) == collect._hp_key(other, {"a": 1}) != collect._hp_key(cfg, {"a": 2})
    other["train"]["lr"] = 1.0
    assert collect._hp_key(cfg, {"a": 1}) != collect._hp_key(other, {"a": 1})


# ------------------------------------------------------------------ DomainBed's rules, written out plainly

def _reference_runs():
    """Done runs of the fixture as plain dicts: records[(variant, step)][(role, domain)] = value."""
    runs = []
    for d in sorted(FIXTURE.iterdir()):
        if not (d / "done").exists():
            continue
        rec = json.loads((d / "config.json").read_text())
        cfg = rec["config"]
        records = {}
        for line in (d / "results.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r["metric"] == "acc":
                records.setdefault((r.get("variant", ""), r["step"]), {})[(r["role"], r["domain"])] = r["value"]
        runs.append({"job": rec["job_id"], "method": cfg["method"], "dataset": cfg["data"]["dataset"],
                     "test": frozenset(cfg["data"]["test_domains"]), "seed": cfg["trial_seed"],
                     "hp": cfg["train"]["lr"], "records": records})
    return runs


def _mean(xs):
    return sum(xs) / len(xs)


def reference_selection(rule):
    """(label, dataset, held-out set, seed) -> (job, step, values at that step)."""
    runs = _reference_runs()
    out = {}
    variants = {(r["method"], v) for r in runs for v, _ in r["records"]}
    primary = {"embedded": [frozenset({"photo"}), frozenset({"sketch"})],
               "imagenet": [frozenset(metrics.SHIFT_SUITES["imagenet"]["sets"])]}
    domains = {"embedded": ["photo", "sketch", "cartoon", "painting"]}
    for (method, variant), (ds, sets), seed in product(variants, primary.items(), (0, 1)):
        for test in sets:
            best = None  # (val, job, step)
            for run in runs:
                if (run["method"], run["dataset"], run["test"], run["seed"]) != (method, ds, test, seed):
                    continue
                steps = sorted(s for v, s in run["records"] if v == variant)
                cands = []
                for step in steps:
                    acc = run["records"][(variant, step)]
                    if rule == "train_val":
                        val = [x for (role, _), x in acc.items() if role == "id_val"]
                        cands.append((_mean(val), step))
                    elif rule == "oracle" and step == steps[-1]:
                        val = [acc.get(("ood_val", d)) for d in test]
                        if None not in val:
                            cands.append((_mean(val), step))
                    elif rule == "lodo" and ds in domains:
                        val = []
                        for v in domains[ds]:
                            if v in test:
                                continue
                            pair = [p for p in runs if (p["method"], p["dataset"], p["test"], p["seed"], p["hp"])
                                    == (method, ds, test | {v}, seed, run["hp"])]
                            x = pair[0]["records"].get((variant, step), {}).get(("ood", v)) if pair else None
                            val.append(x)
                        if None not in val:
                            cands.append((_mean(val), step))
                if not cands:
                    continue
                top = max(c[0] for c in cands)
                step = min(s for v, s in cands if v == top)  # the earliest of the best steps
                if best is None or top > best[0] or (top == best[0] and run["job"] < best[1]):
                    best = (top, run["job"], step, run["records"][(variant, step)])
            if best:
                label = method if not variant else f"{method}+{variant}"
                out[(label, ds, "+".join(sorted(test)), seed)] = best[1:]
    return out


@pytest.mark.parametrize("rule", ["train_val", "lodo", "oracle"])
def test_selection_matches_domainbed_written_out(coll, rule):
    ref = reference_selection(rule)
    got = model_selection.select(coll, rule)
    mine = {(r.label, r.dataset, r.test_set, int(r.trial_seed)): (r.job_id, int(r.step))
            for r in got.itertuples(index=False)}
    assert mine == {k: v[:2] for k, v in ref.items()}
    assert len(mine) > 10


def test_rules_choose_differently_on_the_fixture(coll):
    picks = {rule: {(r.label, r.test_set, r.trial_seed): (r.job_id, r.step) for r in
                    model_selection.select(coll, rule).itertuples(index=False) if r.dataset == "embedded" and r.label == "erm"}
             for rule in ("train_val", "lodo", "oracle")}
    assert picks["train_val"] != picks["lodo"] != picks["oracle"] != picks["train_val"]
    assert any(step not in (0, 100) for _, step in picks["train_val"].values()) or \
        any(step == 0 for _, step in picks["lodo"].values())  # early stopping happens


@pytest.mark.parametrize("rule", ["train_val", "lodo", "oracle"])
def test_per_seed_values_are_domainbed_averages(coll, rule):
    """Cell = mean over trial seeds of (mean over held-out domains of the chosen run's accuracy)."""
    ref = reference_selection(rule)
    values = model_selection.chosen_values(coll, model_selection.select(coll, rule))
    for metric in ("ood_avg", "id"):
        got, _ = model_selection.per_seed(coll, values, metric, "embedded")
        got = {(r.label, int(r.trial_seed)): r.value for r in got.itertuples(index=False)}
        expect = {}
        for (label, ds, test, seed), (_, _, acc) in ref.items():
            if ds != "embedded":
                continue
            if metric == "ood_avg":
                x = [acc[("ood", d)] for d in test.split("+")]
            else:
                x = [v for (role, _), v in acc.items() if role == "id_val"]
            expect.setdefault((label, seed), []).append(_mean(x))
        expect = {k: _mean(v) for k, v in expect.items() if len(v) == 2}  # both held-out domains chosen
        assert got.keys() == expect.keys()
        for k in got:
            assert got[k] == pytest.approx(expect[k], abs=1e-12)


def test_mean_se_is_domainbeds_format_mean():
    mean, se, n = model_selection.mean_se([0.5, 0.7, 0.9])
    assert (round(mean, 12), n) == (0.7, 3)
    assert se == pytest.approx(statistics.pstdev([0.5, 0.7, 0.9]) / np.sqrt(3))
    assert model_selection.mean_se([])[2] == 0


def test_suite_averages_come_from_the_dict(coll):
    values = model_selection.chosen_values(coll, model_selection.select(coll, "train_val"))
    four, gaps = model_selection.per_seed(coll, values, "ood_avg4", "imagenet")
    five, gaps5 = model_selection.per_seed(coll, values, "ood_avg5", "imagenet")
    assert set(four["label"]) == {"zeroshot", "erm"} and len(four) == 4  # both seeds
    assert len(five) == 3 and not len(gaps) and list(gaps5["key"]) == ["ood:objectnet"]  # erm seed 1 has no ObjectNet
    assert metrics.METRICS["ood_avg4"].endswith("imagenet_v2, imagenet_r, imagenet_sketch, imagenet_a")


def test_suites_come_from_the_card_or_the_dict(coll, monkeypatch):
    monkeypatch.setattr(collect, "_card_averages", lambda ds: None)
    coll._suites.clear()
    assert coll.suite("imagenet") is metrics.SHIFT_SUITES["imagenet"]
    monkeypatch.setattr(collect, "_card_averages", lambda ds: {"ood_avg4": ("imagenet_v2", "imagenet_r")})
    coll._suites.clear()
    assert coll.suite("embedded")["averages"] == {"ood_avg4": ("Avg (4)", ("imagenet_v2", "imagenet_r"))}
    coll._suites.clear()


def test_export_best_names_jobs_hparams_and_configs(coll):
    best = model_selection.export_best(coll, "lodo")
    erm = [b for b in best if b["row"] == "erm" and b["dataset"] == "embedded"]
    assert len(erm) == 4
    for b in erm:
        assert b["config"]["data"]["test_domains"] == b["test_domains"] and len(b["test_domains"]) == 1
        assert b["validated_on"][0] == b["job_id"] and len(b["validated_on"]) == 4  # + 3 pair runs
        assert b["hparams"] == {"label_smoothing": 0.0} and b["config"]["train"]["lr"] in (1e-4, 3e-4)
    assert not [b for b in best if b["dataset"] == "imagenet"]  # no pair runs there
    assert json.dumps(best)

"""Everything a run config or a sweep file can get wrong fails before anything launches: one line naming the file,
the key and the fix, a non-zero exit, and no job folder written (finished ones left as they were)."""
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from bench import config
from bench.cli import main
from bench.cards import load_card
from bench.errors import BenchError
from bench.method import METHODS, load_builtin_methods, resolve_hparams
from tests.conftest import nest, tiny_config

TINY_TRAIN = {"steps": 6, "batch_size": 12, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "checkpoint_every": 2,
              "eval_batch_size": 64}

# (dotted run-config key, bad value, method, what the message must say after the key)
BAD = [
    ("train.batch_size", 0, "erm", "out of range; set it at least 1"),
    ("train.batch_size", -8, "erm", "out of range; set it at least 1"),
    ("train.batch_size", 2, "erm", "fewer than the 3 training domains of embedded"),
    ("train.steps", 0, "erm", "out of range; set it at least 1"),
    ("train.steps", -70, "erm", "out of range; set it at least 1"),
    ("train.eval_every", 0, "erm", "set it at least 1"),
    ("train.checkpoint_every", 0, "erm", "set it at least 1"),
    ("train.warmup_steps", -1, "erm", "set it at least 0"),
    ("train.eval_batch_size", 0, "erm", "set it at least 1"),
    ("train.num_workers", -1, "erm", "set it at least 0"),
    ("train.suite_every", 0, "erm", "set it at least 1"),
    ("train.lr", -1e-4, "erm", "set it greater than 0"),
    ("train.lr", 0, "erm", "set it greater than 0"),
    ("train.lr", float("nan"), "erm", "set it greater than 0"),
    ("train.weight_decay", -0.1, "erm", "set it at least 0"),
    ("train.grad_clip", -1.0, "erm", "set it at least 0"),
    ("train.device", "tpu", "erm", "'tpu' is not a device; set auto, cpu, cuda or cuda:N"),
    ("train.precision", "fp8", "erm", "'fp8' is not one of auto, fp32, bf16"),
    ("data.holdout_fraction", 2, "erm", "set it between 0 and 1"),
    ("data.holdout_fraction", 0, "erm", "set it between 0 and 1"),
    ("data.classes", "novel", "erm", "'novel' is not one of card, base_to_novel"),
    ("wise_alphas", [0.5, 1.5], "erm", "1.5 is outside [0, 1]"),
    ("model.name", "TinyCLIP-23", "erm", "unknown model 'TinyCLIP-23': did you mean 'TinyCLIP-32'"),
    ("trial_seed", -1, "erm", "-1 is negative"),
    ("hparams.kl_direction", "sideways", "car_ft", "'sideways' is not one of zs_ft, ft_zs"),
    ("hparams.lam", -1.0, "car_ft", "set it at least 0"),
    ("hparams.temperature", -2.0, "car_ft", "set it at least 0"),
    ("hparams.label_smoothing", 1.0, "erm", "set it in [0, 1)"),
    ("hparams.alpha", 1.5, "wise_ft", "set it in [0, 1]"),
    ("hparams.lam", -0.5, "lipsum_ft", "set it at least 0"),
    ("hparams.num_texts", 0, "lipsum_ft", "set it at least 1"),
    ("hparams.lp_max_iter", 0, "lp_ft", "set it at least 1"),
    ("hparams.lp_l2", -1e-4, "lp_ft", "set it at least 0"),
    ("hparams.retrieve_by", "caption", "arf", "'caption' is not one of text, image, both, random"),
    ("hparams.captioner", "blip", "arf", "unknown captioner 'blip'"),
    ("hparams.top_k", 0, "arf", "set it at least 1"),
]


def _case_id(case):
    key, value, method, _ = case
    return f"{method}-{key}={value}"


def _one_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch, embedded_root):
    """A fresh working folder (the cwd: `bench run` writes runs/<job id> there) whose sweep output holds one
    finished job, which a broken config must leave exactly as it was."""
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "runs" / "0123456789ab"
    done.mkdir(parents=True)
    (done / "config.json").write_text('{"job_id": "0123456789ab"}')
    (done / "results.jsonl").write_text('{"step": 6}\n')
    (done / "done").write_text("")
    return tmp_path, snapshot(tmp_path)


def _run_config(root, key, value, method):
    d = config.merge({"method": method, "model": {"name": "TinyCLIP-32", "pretrained": str(root / "tiny.pt")},
                 "data": {"dataset": "embedded", "root": str(root), "test_domains": ["sketch"]}, "train": TINY_TRAIN},
                nest(key, value))
    return d


def _sweep(root, tmp_path, key=None, value=None, method="erm", **top):
    """A sweep file with the bad value where a user would write it: a run-config key in `base`, a method's
    hparam under overrides.methods.<method>, trial_seed as trial_seeds."""
    base = {"model": {"name": "TinyCLIP-32", "pretrained": str(root / "tiny.pt")}, "data": {"root": str(root)},
            "train": dict(TINY_TRAIN)}
    d = {"name": "s", "output": str(tmp_path / "runs"), "methods": [method], "datasets": ["embedded"],
         "test_domains": [["sketch"]], "trial_seeds": [0], "launcher": {"kind": "debug", "heartbeat_s": 1}}
    if key == "trial_seed":
        d["trial_seeds"] = [value]
    elif key and key.startswith("hparams."):
        d["overrides"] = {"methods": {method: nest(key, value)}}
    elif key:
        base = config.merge(base, nest(key, value))
    d["base"] = base
    d.update(top)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("case", BAD, ids=_case_id)
def test_bad_run_config_fails_at_load(case, work, embedded_root, capsys):
    key, value, method, says = case
    tmp_path, before = work
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_run_config(embedded_root, key, value, method)))
    before[path.name] = path.read_bytes()
    line = _one_line(capsys, main(["run", str(path), "--no-progress"]))
    assert line.startswith(f"error: {path}: ") and f"{key}: " in line and says in line, line
    assert snapshot(tmp_path) == before  # no runs/<job id>, the finished job untouched


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
@pytest.mark.parametrize("case", BAD, ids=_case_id)
def test_bad_sweep_value_fails_before_any_job_folder(case, dry_run, work, embedded_root, capsys):
    key, value, method, says = case
    tmp_path, before = work
    path = _sweep(embedded_root, tmp_path, key, value, method)
    before[path.name] = path.read_bytes()
    line = _one_line(capsys, main(["sweep", str(path), "--no-progress", *(["--dry-run"] if dry_run else [])]))
    where = "trial_seeds" if key == "trial_seed" else key
    assert line.startswith(f"error: {path}: ") and f"{where}: " in line, line
    assert says in line, line
    at_prepare = "training domains" in says or (key, value) == ("train.steps", 0)  # needs the card / the method
    if key.startswith(("train.", "data.", "model.")) and not at_prepare:
        assert f"base.{key}: " in line, line  # checked at load, under the key as written in the file
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("top, says", [
    ({"output": ""}, "output is empty"),
    ({"output": "  "}, "output is empty"),
    ({"name": ""}, "name is empty"),
    ({"trial_seeds": [0, -3]}, "trial_seeds: -3 is negative"),
    ({"search": {"n_draws": 3, "space": {"train.lr": ["uniform", -1, -0.5]}}}, "train.lr: "),
    ({"search": {"n_draws": 3, "space": {"hparams.label_smoothing": ["uniform", 1.5, 2]}}},
     "hparams.label_smoothing: "),
    ({"overrides": {"methods": {"erm": {"train": {"steps": -70}}}}}, "overrides.methods.erm.train.steps: -70"),
    ({"launcher": {"kind": "debug", "slurm": {"nodes": 0}}}, "launcher.slurm.nodes: 0 is out of range"),
    ({"launcher": {"kind": "debug", "slurm": {"gpus": -1}}}, "launcher.slurm.gpus: -1 is out of range"),
    ({"launcher": {"kind": "debug", "slurm": {"gpus": 1.5}}}, "launcher.slurm.gpus' must be int, got 1.5"),
    ({"launcher": {"kind": "debug", "slurm": {"mem_gb": 0}}}, "launcher.slurm.mem_gb: 0.0 is out of range; set it above 0"),
    ({"launcher": {"kind": "debug", "slurm": {"time_min": 0}}}, "launcher.slurm.time_min: 0 is out of range"),
    ({"launcher": {"kind": "debug", "slurm": {"max_array_size": 0}}}, "launcher.slurm.max_array_size: 0"),
    ({"launcher": {"kind": "debug", "slurm": {"tasks_per_node": 0}}}, "launcher.slurm.tasks_per_node: 0 is out of range"),
    ({"launcher": {"kind": "debug", "slurm": {"gpus": 4, "tasks_per_node": 2}}},
     "launcher.slurm.tasks_per_node: 2 with gpus: 4; each task drives one GPU"),
    # a job of 16 processes cannot split a batch of 12: said for the plan, not by each job on the cluster
    ({"launcher": {"kind": "slurm", "slurm": {"gpus": 0, "tasks_per_node": 8, "nodes": 2}}},
     "launcher.slurm runs each job as 16 processes: train.batch_size: 12 is fewer than 16 processes"),
])
def test_bad_sweep_file_keys(top, says, work, embedded_root, capsys):
    tmp_path, before = work
    path = _sweep(embedded_root, tmp_path, **top)
    before[path.name] = path.read_bytes()
    for dry in (["--dry-run"], []):
        line = _one_line(capsys, main(["sweep", str(path), "--no-progress", *dry]))
        assert line.startswith(f"error: {path}: ") and says in line, line
        if "space" in str(top):  # a drawn value says it was drawn, and what to change
            assert "came from the search space: narrow its range" in line and "draw " in line, line
    assert snapshot(tmp_path) == before


def test_good_configs_still_pass(embedded_root, tmp_path):
    """The bounds are inclusive where a value is meaningful: 0 warmup, 0 decay, 0 clipping, 0 workers, alphas 0 and
    1, a batch of exactly one image per training domain."""
    from bench.prepare import prepare

    cfg = tiny_config(embedded_root, **{"train.warmup_steps": 0, "train.weight_decay": 0, "train.grad_clip": 0,
                                        "train.num_workers": 0, "train.batch_size": 3, "train.device": "cuda:1",
                                        "wise_alphas": [0, 1], "data.holdout_fraction": 0.5})
    prepare(cfg)
    for method in ("car_ft", "wise_ft", "lp_ft"):
        hp = {"car_ft": {"lam": 0, "kl_direction": "ft_zs"}, "wise_ft": {"alpha": 1}, "lp_ft": {"lp_l2": 0}}[method]
        prepare(tiny_config(embedded_root, method=method, hparams=hp))


load_builtin_methods()


@pytest.mark.parametrize("method", sorted(name for name, _ in METHODS.items()))
def test_every_method_accepts_its_defaults(method):
    hp = resolve_hparams(method, {})  # check_hparams passes on the defaults
    METHODS.get(method).check_hparams(hp)


def test_prepare_checks_configs_built_in_code(embedded_root):
    """prepare checks a config built without from_dict (dataclasses.replace, as sweep expansion does)."""
    import dataclasses

    from bench.prepare import prepare

    cfg = tiny_config(embedded_root)
    with pytest.raises(BenchError, match=r"^code: train.steps: -1 is out of range"):
        prepare(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=-1)), "code")
    with pytest.raises(BenchError, match=r"^code: trial_seed: -2 is negative"):
        prepare(dataclasses.replace(cfg, trial_seed=-2), "code")


# ---- cards and images ------------------------------------------------------------------------------
def _card(tmp_path, unseen=("c2", "c3"), classes=("c0", "c1", "c2", "c3"), name="mini"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "folder": name.upper(), "domains": ["a", "b"],
                                    "classes": list(classes), "unseen_classes": list(unseen),
                                    "templates": ["a photo of a {}."], "default_test_domains": ["b"]}))
    return path


@pytest.mark.parametrize("unseen, classes, says", [
    (["c3"], ["c0", "c1", "c2", "c3"], "unseen_classes lists one class (c3)"),
    (["c1", "c2"], ["c0", "c1", "c2"], "fewer than 2 classes are left to fine-tune on"),
])
def test_a_card_with_a_one_way_column_is_refused(unseen, classes, says, work, capsys):
    tmp_path, before = work
    card = _card(tmp_path, unseen=unseen, classes=classes)
    with pytest.raises(BenchError, match=re.escape(f"{card}: {says}")):
        load_card(str(card))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": str(card), "test_domains": ["b"]}}))
    line = _one_line(capsys, main(["run", str(cfg), "--no-progress"]))
    assert str(card) in line and says in line, line
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("runs")} == before


def test_every_shipped_card_still_loads():
    from bench.cards import list_cards

    for name in list_cards():
        load_card(name)


@pytest.fixture
def corrupt_data(tmp_path):
    """A two-domain card (2 seen, 2 unseen classes, 3 images each) whose data holds one truncated PNG."""
    card = _card(tmp_path)
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        for c in ("c0", "c1", "c2", "c3"):
            folder = root / "MINI" / d / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = root / "MINI" / "a" / "c1" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header reads, the pixels do not
    (root / "MINI" / "b" / "c0" / "2.jpg").write_bytes(b"not an image at all")
    return card, root, [str(bad), str(root / "MINI" / "b" / "c0" / "2.jpg")]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_it(corrupt_data, embedded_root, tmp_path, workers, capsys):
    card, root, bad = corrupt_data
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "method": "zeroshot", "model": {"name": "TinyCLIP-32", "pretrained": str(embedded_root / "tiny.pt")},
        "data": {"dataset": str(card), "root": str(root), "test_domains": ["b"]},
        "train": {"eval_batch_size": 4, "num_workers": workers, "device": "cpu"}}))
    line = _one_line(capsys, main(["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]))
    assert any(f"error: {b}: unreadable image (" in line for b in bad), line
    assert "replace or delete it" in line and "--check --decode" in line


def test_datasets_check_decode_lists_the_bad_files_of_a_card_given_by_path(corrupt_data, capsys):
    card, root, bad = corrupt_data
    assert main(["datasets", str(card), "--root", str(root), "--check"]) == 0  # counts only: no decode
    out = capsys.readouterr().out
    assert out.startswith("mini ") and "embedded" not in out and "    a " in out
    rc = main(["datasets", str(card), "--root", str(root), "--check", "--decode"])
    captured = capsys.readouterr()
    assert rc == 2
    listed = [line.split("bad: ", 1)[1].split("  (")[0] for line in captured.out.splitlines() if "bad: " in line]
    assert sorted(listed) == sorted(bad)
    assert captured.err.strip().splitlines() == [f"error: 2 unreadable images (listed above, first: {sorted(bad)[0]}); "
                                                 f"replace or delete them (re-download the dataset)"]
    rc = main(["datasets", str(card.parent / "nope.yaml"), "--root", str(root)])
    assert rc == 2 and "nope.yaml: no such dataset card" in capsys.readouterr().err


def test_zero_steps_is_for_a_method_that_trains_nothing(embedded_root):
    """train.steps: 0 is refused for a method that trains (its jobs would be marked done untrained), and is what a
    zeroshot config may say (its steps are never run)."""
    from bench.prepare import prepare

    assert prepare(tiny_config(embedded_root, **{"method": "zeroshot", "train.steps": 0})).cfg.train.steps == 0
    with pytest.raises(BenchError, match=r"^x.yaml: train.steps: 0 is out of range; set it at least 1 \(method erm"):
        prepare(tiny_config(embedded_root, **{"train.steps": 0}), "x.yaml")

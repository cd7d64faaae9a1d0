"""The shipped real sweep files, end to end on fixtures: every method, arf included, and a table with ID, OOD
and zero-shot columns filled.

- sweeps/domainbed_b2n.yaml (sweeps/domainbed.yaml with CoOp's base-to-novel split): PACS in DomainBed's layout,
  restricted with --only to one held-out domain, one trial seed and draw 0; the zero-shot column is PACS's
  novel classes.
- sweeps/imagenet.yaml: a miniature ImageNet tree (tests/test_imagenet.py) with the cross-dataset suite coop10 in
  CoOp's layouts (tests/coop_fixture.py); the zero-shot column is the suite's average.

Only what cannot be had offline is replaced, with --set: the model (the project's tiny CLIP instead of ViT-B/16
OpenAI weights; tests/test_real_shapes.py runs every method at ViT-B/16 shapes), the training length, ARF's
captioner (a captions file instead of CoCa weights) and pool (an img2dataset-layout fixture instead of CC3M).
"""
from __future__ import annotations

import json
import math
from pathlib import Path


from bench import collect
from bench import tables
from bench.cli import main
from bench import sweep as sweeps
from bench.cards import load_card
from bench.layouts import IMAGE_SUFFIXES
from bench.zeroshot_suite import resolve_suite
from tests.coop_fixture import make_coop_fixture
from tests.domainbed_fixture import make_domainbed_fixture
from tests.img2dataset_fixture import make_pool

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
SHORT = {"steps": 2, "batch_size": 6, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1,
         "num_workers": 0, "eval_batch_size": 64}


def write_captions(root: Path, folder: Path) -> str:
    """A captions file (methods/arf/captioning.py FileCaptioner's JSONL) for every image under `folder`."""
    rows = [{"path": str(p.relative_to(root)), "caption": f"a {p.parent.parent.name} picture of a {p.parent.name}"}
            for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "file:captions.jsonl"


def offline_sets(root: Path, out: Path, captioner: str) -> list[str]:
    sets = [f"output={out}", f"base.data.root={root}", "base.model.name=TinyCLIP-32",
            "base.model.pretrained=embedded", "launcher.kind=debug",
            f"overrides.methods.arf.hparams.captioner={captioner}", "overrides.methods.arf.hparams.pool=pool",
            "overrides.methods.arf.hparams.top_k=8", "overrides.methods.arf.hparams.retrieval_batch=4"]
    return sets + [f"base.train.{k}={v}" for k, v in SHORT.items()]


def sweep(path: Path, only: list[str], sets: list[str]) -> None:
    argv = ["sweep", str(path), "--no-progress"]
    for o in only:
        argv += ["--only", o]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0


def filled(report, columns_of) -> dict[str, dict[str, float]]:
    """{row label: {column: mean}} of the report's one section."""
    (sec,) = report.sections
    return {label: {c: sec.cells[(label, c)].mean for c in columns_of(sec.columns) if (label, c) in sec.cells}
            for label in sec.rows}


def test_domainbed_b2n_sweep_every_method_arf_included_has_id_ood_and_zero_shot(tmp_path, capsys):
    root = tmp_path / "data"
    make_domainbed_fixture(root, ["pacs"], per_class=2)
    for name in ("vlcs", "officehome", "terraincognita", "domainnet"):  # listed in the file, filtered out by --only
        card = load_card(name)
        for domain in card.domains:
            (root / card.folder / domain).mkdir(parents=True)
    make_pool(root / "pool", "files", n=12, per_shard=5)
    out = tmp_path / "runs"
    path = SWEEPS / "domainbed_b2n.yaml"
    sets = offline_sets(root, out, write_captions(root, root / "PACS"))
    sweep(path, ["dataset=pacs", "test_domains=sketch", "trial_seed=0", "draw=0"], sets)
    capsys.readouterr()

    methods = ["zeroshot", "erm", "lp_ft", "wise_ft", "flyp", "car_ft", "lipsum_ft", "arf"]
    assert set(sweeps.load_sweep(path).methods) == set(methods)  # the shipped file's methods, every one run here
    report = tables.build(collect.load(out), "id,ood_avg,zs_avg,hm")
    cells = filled(report, lambda cols: cols)
    for m in methods:
        got = {c.split("@")[0]: v for c, v in cells[m].items()}
        assert set(got) == {"id", "ood_avg", "zs_avg", "hm"} and all(math.isfinite(v) for v in got.values()), m
    assert all(c.endswith("@pacs:base_to_novel") for c in report.sections[0].columns)

    # the CLI prints the same table; a second run of the same command launches nothing
    assert main(["table", "--runs", str(out), "--metric", "id,ood_avg,zs_avg"]) == 0
    text = capsys.readouterr().out
    assert "zero-shot" in text and "| arf " in text.replace("  ", " ")
    sweep(path, ["dataset=pacs", "test_domains=sketch", "trial_seed=0", "draw=0"], sets)
    assert "to launch: 0" in capsys.readouterr().err


def test_imagenet_sweep_every_method_arf_included_has_id_ood_and_cross_dataset_zero_shot(tmp_path, capsys):
    from tests.test_imagenet import _card, _fake_tree

    root = tmp_path / "data"
    _fake_tree(root)
    card = _card(tmp_path / "fake_imagenet.yaml")
    suite = resolve_suite(["coop10"], "test")
    make_coop_fixture(root, suite, n_classes=2, per_class=1)
    make_pool(root / "pool", "webdataset", n=12, per_shard=5)
    out = tmp_path / "runs"
    sets = offline_sets(root, out, write_captions(root, root / "imagenet" / "train")) + [f"datasets=[{card}]"]
    sweep(SWEEPS / "imagenet.yaml", ["trial_seed=0"], sets)
    capsys.readouterr()

    report = tables.build(collect.load(out), "id,ood_avg5,xd_avg")
    cells = filled(report, lambda cols: cols)
    methods = sweeps.load_sweep(SWEEPS / "imagenet.yaml").methods
    assert "arf" in methods
    for m in methods:
        got = {c.split("@")[0]: v for c, v in cells[m].items()}
        assert set(got) == {"id", "ood_avg5", "xd_avg"} and all(math.isfinite(v) for v in got.values()), m
    per_set = tables.build(collect.load(out), "xd")
    assert {c.split("@")[0] for c in per_set.sections[0].columns} >= {f"xd:{n}" for n in suite}

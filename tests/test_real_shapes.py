"""Every registered method at real shapes: open_clip ViT-B-16 (random init, no download) at 224 px, through the
sweep machinery (debug launcher), on a DomainBed-layout fixture, to the table. Catches what the tiny CLIP cannot:
a 77-token context, 512/768 widths, 14x14 patches, OpenAI's tokenizer lengths, ARF's retrieval at 224 px.
About 3 minutes on 2 cores (issue 10)."""
from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from bench import collect
from bench import table_formats
from bench import tables
from bench.cli import main
from bench.cards import load_card
from bench.method import METHODS, load_builtin_methods
from tests.domainbed_fixture import make_domainbed_fixture


def caption_everything(data_root, path):
    """A captions file (JSONL of path -> caption) for every image of the PACS fixture."""
    rows = [{"path": str(p), "caption": f"a {p.parts[-3]} picture of a {p.parts[-2]}, colour {i % 5}"}
            for i, p in enumerate(sorted(data_root.rglob("*.jpg")))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def pair_folder(folder, n=8):
    """A pool of image + same-stem .txt pairs (methods.arf.retrieval.PairPool.from_folder)."""
    folder.mkdir()
    names = load_card("pacs").classes
    for i in range(n):
        Image.new("RGB", (32, 32), (30 * i % 256, 90, 200 - 20 * i)).save(folder / f"{i:04d}.jpg")
        (folder / f"{i:04d}.txt").write_text(f"a photo of a {names[i % len(names)]} on a table")


@pytest.mark.slow
def test_every_method_runs_at_vit_b16_shapes_to_the_table(tmp_path):
    load_builtin_methods()
    methods = sorted(METHODS)
    assert {"zeroshot", "erm", "wise_ft", "flyp", "car_ft", "lipsum_ft", "arf", "lp_ft"} <= set(methods)
    data = make_domainbed_fixture(tmp_path / "data", ["pacs"], per_class=1, size=32)
    assert caption_everything(data, tmp_path / "captions.jsonl") == 4 * 7
    pair_folder(tmp_path / "pool")
    sweep = {
        "name": "real-shapes", "output": str(tmp_path / "runs"), "methods": methods, "datasets": ["pacs"],
        "test_domains": [["sketch"]], "trial_seeds": [0],
        "base": {"model": {"name": "ViT-B-16", "pretrained": None}, "data": {"root": str(data)},
                 "train": {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "batch_size": 3, "eval_batch_size": 8,
                           "lr": 1e-5, "warmup_steps": 1, "device": "cpu", "save_final": False}},
        "overrides": {"methods": {"arf": {"hparams": {"captioner": f"file:{tmp_path / 'captions.jsonl'}",
                                                      "pool": str(tmp_path / "pool"), "top_k": 4,
                                                      "retrieval_batch": 3}}}},
        "launcher": {"kind": "debug", "heartbeat_s": 5}}
    path = tmp_path / "real-shapes.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--no-progress"]) == 0

    runs = sorted((tmp_path / "runs").glob("*/config.json"))
    records = [json.loads(p.read_text()) for p in runs]
    assert sorted(r["config"]["method"] for r in records) == methods
    assert all(r["config"]["model"] == {"name": "ViT-B-16", "pretrained": None} and r["pretrained_sha256"] is None
               for r in records)
    for p, record in zip(runs, records):  # every trained method took its 2 steps
        rows = [json.loads(line) for line in (p.parent / "results.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == (2 if METHODS.get(record["config"]["method"]).trains else 0)

    report = tables.build(collect.load(tmp_path / "runs"), "id,ood_avg")
    text = table_formats.render(report, "markdown")
    sec = report.sections[0]
    assert {m for m, _ in sec.cells} == set(methods), text
    for m in methods:
        for column in sec.columns:
            cell = sec.cells[(m, column)]
            assert cell is not None and cell.mean is not None and 0 <= cell.mean <= 1, (m, column, text)
    assert all(f"| {m} " in text for m in methods)

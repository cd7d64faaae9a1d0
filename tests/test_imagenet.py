"""The ImageNet card (protocol: shift) and its loader, on a fake miniature ImageNet tree laid out as the
datasets' download scripts lay them out: 5 wnids, ImageNet-V2 with index folders, ImageNet-R/-A with
3-class subsets, ObjectNet with its mapping files. Fast; no network, no real data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from bench import config
from bench import results
from bench.cards import load_card
from bench.data import build_task
from bench.layouts import check_counts, scan_domain
from bench.errors import BenchError
from bench.evaluate import EvalData, evaluate, predict_classes

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")
NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark")
R_WNIDS = WNIDS[:3]  # ImageNet-R's subset: classes 0, 1, 2
A_WNIDS = WNIDS[1:4]  # ImageNet-A's subset: classes 1, 2, 3
# ObjectNet: folder -> (ObjectNet label, ImageNet classes it maps to); 'air_freshener' overlaps no ImageNet class.
OBJECTNET = {"alarm_clock": ("Alarm clock", (1, 2)), "banana": ("Banana", (3,)), "air_freshener": ("Air freshener", ())}
DECOY = 4  # a class outside every subset above
PER_CLASS = 2
SHIFTS = ("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet")


def _images(cdir: Path, k: int, n: int = PER_CLASS) -> None:
    """n tiny PNGs whose red channel encodes the ImageNet class index k (the fake method reads it)."""
    cdir.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * k, 10 * i, 0)).save(cdir / f"img_{i}.png")


def _fake_tree(root: Path) -> None:
    for k, w in enumerate(WNIDS):
        _images(root / "imagenet" / "train" / w, k, 4)
        _images(root / "imagenet" / "val" / w, k)
        _images(root / "imagenetv2-matched-frequency-format-val" / str(k), k)
        _images(root / "sketch" / w, k)
    for k, w in enumerate(WNIDS):
        if w in R_WNIDS:
            _images(root / "imagenet-r" / w, k)
        if w in A_WNIDS:
            _images(root / "imagenet-a" / w, k)
    (root / "imagenet-r" / "README.txt").write_text("not a class")
    for folder, (_, classes) in OBJECTNET.items():
        _images(root / "objectnet-1.0" / "images" / folder, classes[0] if classes else DECOY)
    # The four mapping files of objectnet-1.0/mappings/, in their real formats, with a shuffled '2012' order.
    maps = root / "objectnet-1.0" / "mappings"
    maps.mkdir(parents=True)
    labels = [f"{n}, fake label" for n in NAMES]  # ImageNet label of each class (sorted-wnid order)
    id_2012 = [3, 0, 4, 1, 2]  # the 2012 id of each class
    lines = [None] * 5
    for k, i in enumerate(id_2012):
        lines[i] = labels[k]
    (maps / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(k): i for k, i in enumerate(id_2012)}))
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps({f: lab for f, (lab, _) in OBJECTNET.items()}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {lab: "; ".join(labels[k] for k in cls) for lab, cls in OBJECTNET.values() if cls}))


def _card(path: Path) -> Path:
    """The real card, cut down to the fake tree's 5 classes and subsets."""
    d = yaml.safe_load((Path(__file__).resolve().parent.parent / "datasets" / "imagenet.yaml").read_text())
    for key in ("classes_file", "class_names_from", "templates_from"):
        del d[key]
    d.update(name="fake_imagenet", classes=list(WNIDS), class_names=dict(zip(WNIDS, NAMES)),
             templates=["a photo of a {}.", "a sketch of a {}."])
    for name, n in (("imagenet", 5), ("imagenet_val", 5), ("imagenet_v2", 5), ("imagenet_r", 3),
                    ("imagenet_sketch", 5), ("imagenet_a", 3), ("objectnet", 2)):
        d["sets"][name]["n_classes"] = n
    d["expected_counts"] = {"imagenet": 20, "imagenet_val": 10, "imagenet_v2": 10, "imagenet_r": 6,
                            "imagenet_sketch": 10, "imagenet_a": 6, "objectnet": 4}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "data"
    _fake_tree(root)
    return root, load_card(str(_card(tmp_path / "fake_imagenet.yaml")))


# ---- the real card --------------------------------------------------------------------------------------
def test_real_card():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo

    card = load_card("imagenet")
    assert card.protocol == "shift" and card.folder == "."
    assert card.classes == tuple(ImageNetInfo("imagenet-1k").label_names())  # the committed wnid list
    assert len(card.classes) == 1000 and list(card.classes) == sorted(set(card.classes))
    assert card.prompt_names(card.classes) == list(IMAGENET_CLASSNAMES)
    assert card.prompt_name("n01440764") == "tench" and card.prompt_name("n15075141") == "toilet paper"
    assert len(card.templates) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert card.templates[0] == "a bad photo of a {}."
    assert card.domains == ("imagenet", "imagenet_val") + SHIFTS and card.shifts == SHIFTS
    assert (card.train_domain, card.id_test_domain) == ("imagenet", "imagenet_val")
    assert card.default_test_domains == SHIFTS
    assert card.ood_averages == {"ood_avg4": SHIFTS[:4], "ood_avg5": SHIFTS}
    assert card.expected_counts == {"imagenet": 1281167, "imagenet_val": 50000, "imagenet_v2": 10000,
                                    "imagenet_r": 30000, "imagenet_sketch": 50889, "imagenet_a": 7500,
                                    "objectnet": 18574}
    folders = {d: s["folder"] for d, s in card.sets.items()}
    assert folders == {"imagenet": "imagenet/train", "imagenet_val": "imagenet/val",
                       "imagenet_v2": "imagenetv2-matched-frequency-format-val", "imagenet_r": "imagenet-r",
                       "imagenet_sketch": "sketch", "imagenet_a": "imagenet-a", "objectnet": "objectnet-1.0/images"}
    assert [card.sets[d]["n_classes"] for d in card.domains] == [1000, 1000, 1000, 200, 1000, 200, 113]
    assert card.sets["imagenet_r"]["subset"] and card.sets["imagenet_a"]["subset"]


def test_shift_keys_are_checked(tmp_path):
    d = yaml.safe_load((Path(__file__).resolve().parent.parent / "datasets" / "pacs.yaml").read_text())
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**d, "sets": {"x": {"folder": "x"}}}))
    with pytest.raises(BenchError, match="protocol: shift"):
        load_card(str(tmp_path / "a.yaml"))
    real = yaml.safe_load((Path(__file__).resolve().parent.parent / "datasets" / "imagenet.yaml").read_text())
    real["classes_file"] = str(Path(__file__).resolve().parent.parent / "datasets" / "imagenet_wnids.txt")
    for change, msg in ((lambda c: c["sets"]["imagenet_r"].update(subsett=True), "unknown key 'subsett'"),
                        (lambda c: c.update(train_domain="imagenet_x"), "train_domain"),
                        (lambda c: c["ood_averages"].update(bad=["imagenet"]), "ood_averages.bad"),
                        (lambda c: c.update(domains=["imagenet"]), "lists no domains"),
                        (lambda c: c["sets"]["imagenet_v2"].update(class_folders="number"), "class_folders")):
        c = json.loads(json.dumps(real))
        change(c)
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(c))
        with pytest.raises(BenchError, match=msg):
            load_card(str(tmp_path / "b.yaml"))


# ---- the loader on the fake tree ----------------------------------------------------------------------
def test_task_eval_sets_and_sizes(fake):
    root, card = fake
    task = build_task(card, root, SHIFTS, 0.2, trial_seed=0)
    assert task.train_domains == ("imagenet",) and task.test_domains == SHIFTS
    assert task.seen_classes == WNIDS and task.unseen_classes == () and task.seen_names == list(NAMES)
    got = {(e.role, e.domain, e.split): len(e.items) for e in task.evalsets}
    assert got == {("id_val", "imagenet", "out"): 4, ("id_test", "imagenet_val", "all"): 10,
                   ("ood", "imagenet_v2", "all"): 10, ("ood", "imagenet_r", "all"): 6,
                   ("ood", "imagenet_sketch", "all"): 10, ("ood", "imagenet_a", "all"): 6,
                   ("ood", "objectnet", "all"): 4}
    assert len(task.train["imagenet"]) == 16
    by = {e.domain: e for e in task.evalsets}
    train_paths = {p for p, _ in task.train["imagenet"]}
    assert not train_paths & {p for p, _ in by["imagenet"].items}  # id_val is held out of training
    assert len(train_paths | {p for p, _ in by["imagenet"].items}) == 20
    # full sets: labels index the 1000 (here 5) classes; V2's folder k is class k
    for d in ("imagenet_val", "imagenet_sketch", "imagenet_v2"):
        assert by[d].class_subset is None
        assert sorted({k for _, k in by[d].items}) == [0, 1, 2, 3, 4]
    assert all(Path(p).parent.name == str(k) for p, k in by["imagenet_v2"].items)
    assert all(Path(p).parent.name == WNIDS[k] for p, k in by["imagenet_val"].items)
    # sub-heads: labels index the subset, whose groups index the classes
    assert by["imagenet_r"].class_subset == ((0,), (1,), (2,))
    assert by["imagenet_a"].class_subset == ((1,), (2,), (3,))
    for d, sub in (("imagenet_r", R_WNIDS), ("imagenet_a", A_WNIDS)):
        assert all(Path(p).parent.name == sub[k] for p, k in by[d].items)
    # ObjectNet: the sorted overlapping folders; 'alarm_clock' maps onto two ImageNet classes
    assert by["objectnet"].class_subset == ((1, 2), (3,))
    assert [(Path(p).parent.name, k) for p, k in by["objectnet"].items] == [
        ("alarm_clock", 0), ("alarm_clock", 0), ("banana", 1), ("banana", 1)]
    # a subset of the shifts: only those are evaluated
    task2 = build_task(card, root, ("imagenet_r",), 0.2, trial_seed=0)
    assert [(e.role, e.domain) for e in task2.evalsets] == [("id_val", "imagenet"), ("id_test", "imagenet_val"),
                                                           ("ood", "imagenet_r")]
    with pytest.raises(BenchError, match="'imagenet_val' is not a shift set"):
        build_task(card, root, ("imagenet_val",), 0.2, trial_seed=0)
    with pytest.raises(BenchError, match="protocol: shift"):
        scan_domain(root, card, "imagenet_r")


def test_split_depends_only_on_trial_seed(fake):
    root, card = fake
    a = build_task(card, root, SHIFTS, 0.2, trial_seed=0)
    b = build_task(card, root, ("imagenet_a",), 0.2, trial_seed=0)
    assert a.train == b.train and a.evalsets[0].items == b.evalsets[0].items
    splits = {tuple(p for p, _ in build_task(card, root, SHIFTS, 0.2, trial_seed=s).evalsets[0].items)
              for s in range(5)}
    assert len(splits) > 1


def test_check_counts(fake):
    root, card = fake
    assert check_counts(root, card) == {d: (n, n) for d, n in card.expected_counts.items()}
    shutil.rmtree(root / "objectnet-1.0" / "mappings")  # without its mappings ObjectNet counts every folder
    assert check_counts(root, card)["objectnet"] == (6, 4)


def test_bench_datasets_check_lists_the_imagenet_sets(fake, capsys):
    from bench.cli import main

    root, _ = fake
    assert main(["datasets", "--root", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("imagenet "))
    # the real card on the 5-class tree: 68 images found (ObjectNet's 5-class mapping does not fit the
    # card's 1000 classes, so all 3 of its folders count), of the 1,448,130 expected
    assert "7 domains, 1000 classes" in line and "68/1448130 images" in line
    assert "    imagenet_r           6  (expected 30000)" in out


def test_a_missing_shift_folder_is_named(fake):
    root, card = fake
    shutil.rmtree(root / "imagenet-a")
    with pytest.raises(BenchError) as err:
        build_task(card, root, SHIFTS, 0.2, trial_seed=0, source="run.yaml")
    msg = str(err.value)
    assert "\n" not in msg and str(root / "imagenet-a") in msg
    assert msg.startswith("run.yaml: ") and "imagenet-a.tar" in msg and "out of data.test_domains" in msg
    build_task(card, root, ("imagenet_v2", "imagenet_r"), 0.2, trial_seed=0)  # not asked for: no error
    (root / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(BenchError, match="objectnet_to_imagenet_1k.json not found") as err:
        build_task(card, root, ("objectnet",), 0.2, trial_seed=0)
    assert "\n" not in str(err.value)
    shutil.rmtree(root / "imagenet-r" / "n01484850")
    with pytest.raises(BenchError, match="holds 2 classes of fake_imagenet, not 3"):
        build_task(card, root, ("imagenet_r",), 0.2, trial_seed=0)


# ---- evaluation on sub-heads ----------------------------------------------------------------------------
def test_predict_classes():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0], [5.0, 0.0, 3.0, 9.0]])
    assert predict_classes(logits, None).tolist() == [3, 3]
    assert predict_classes(logits, ((0,), (1,), (2,))).tolist() == [2, 0]
    assert predict_classes(logits, ((1, 2), (0,))).tolist() == [0, 1]


class FavoursTheDecoy(torch.nn.Module):
    """Logits over the 5 classes: the true class (read off the red channel) gets 5, class DECOY 10."""

    def predict(self, x):
        k = (x[:, 0, 0, 0] * 255 / 40).round().long()
        logits = torch.zeros(len(x), len(WNIDS))
        logits[torch.arange(len(x)), k] = 5.0
        logits[:, DECOY] = 10.0
        return logits

    def evaluating(self):
        import contextlib
        return contextlib.nullcontext()


def test_subset_projection_scores_r_a_and_objectnet_on_their_classes(fake):
    import contextlib

    from torchvision.transforms import ToTensor

    root, card = fake
    task = build_task(card, root, SHIFTS, 0.2, trial_seed=0)
    rows = evaluate(FavoursTheDecoy(), EvalData(task, ToTensor(), batch_size=4), 0, torch.device("cpu"),
                    contextlib.nullcontext)
    acc = {r["domain"]: r["value"] for r in rows if r["role"] in ("ood", "id_test") and r["metric"] == "acc"}
    # the decoy class is outside the sub-heads, so R, A and ObjectNet are scored right ...
    assert acc["imagenet_r"] == acc["imagenet_a"] == acc["objectnet"] == 1.0
    # ... while the 5-way sets only get the decoy class's own images right
    assert acc["imagenet_val"] == acc["imagenet_sketch"] == acc["imagenet_v2"] == 1 / 5


# ---- one real run -------------------------------------------------------------------------------------------
def test_zeroshot_run_end_to_end(fake, tmp_path):
    from bench.train import run

    root, card = fake
    cfg = config.from_dict(config.RunConfig, {
        "method": "zeroshot", "model": {"name": "TinyCLIP-32", "pretrained": None},
        "data": {"dataset": card.source, "root": str(root), "test_domains": list(SHIFTS), "holdout_fraction": 0.2},
        "train": {"eval_batch_size": 8, "device": "cpu"}}, "test")
    out = run(cfg, tmp_path / "run", progress=False)
    assert (out / results.DONE).is_file()
    rows = [r for r in results.read_rows(out / results.RESULTS) if r["metric"] == "acc"]
    got = {(r["role"], r["domain"]): r["n"] for r in rows}
    assert got == {("id_val", "imagenet"): 4, ("id_test", "imagenet_val"): 10, ("ood", "imagenet_v2"): 10,
                   ("ood", "imagenet_r"): 6, ("ood", "imagenet_sketch"): 10, ("ood", "imagenet_a"): 6,
                   ("ood", "objectnet"): 4}
    assert all(r["step"] == 0 and 0.0 <= r["value"] <= 1.0 for r in rows)

"""The real-dataset cards in datasets/ (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet), and the
DomainBed folder layout they describe, checked on a tiny fake PACS tree. Fast; no network, no real data.
(The embedded card has its own tests.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bench.cards import list_cards, load_card
from bench.data import build_task
from bench.layouts import check_counts, scan_domain
from bench.errors import BenchError

REAL_CARDS = ("pacs", "vlcs", "officehome", "terraincognita", "domainnet")
# Every card in datasets/ except the embedded benchmark's, which another test module owns.
CARDS = sorted(set(list_cards()) - {"embedded"})


def test_real_cards_are_present():
    assert set(REAL_CARDS) <= set(list_cards())


@pytest.mark.parametrize("name", CARDS)
def test_card_is_consistent(name):
    card = load_card(name)
    assert len(set(card.domains)) == len(card.domains), "duplicate domain"
    assert len(set(card.classes)) == len(card.classes), "duplicate class"
    assert set(card.unseen_classes) <= set(card.classes)
    assert card.templates and all("{}" in t for t in card.templates)
    assert set(card.expected_counts) == set(card.domains)
    assert set(card.default_test_domains) <= set(card.domains)


@pytest.mark.parametrize("name", REAL_CARDS)
def test_real_card_is_complete(name):
    card = load_card(name)
    assert card.name == name and card.folder and card.description and card.download
    assert card.generator is None
    assert all(isinstance(n, int) and n > 0 for n in card.expected_counts.values())
    assert len(card.default_test_domains) == 1
    assert set(card.class_names) <= set(card.classes), "class_names names a class that is not in classes"
    for folder, prompt in card.class_names.items():
        assert prompt != folder.replace("_", " ").lower(), f"{folder}: override equals the default"
    names = card.prompt_names(card.classes)
    assert all(n and "_" not in n for n in names)
    assert len(set(names)) == len(names), "two classes share a prompt name"


@pytest.mark.parametrize("name", REAL_CARDS)
def test_real_card_is_sorted_as_domainbed_sorts(name):
    """DomainBed lists domains with sorted(os.scandir) and ImageFolder sorts classes the same way."""
    card = load_card(name)
    assert list(card.domains) == sorted(card.domains)
    assert list(card.classes) == sorted(card.classes)
    assert card.unseen_classes == ()


@pytest.mark.parametrize("name, folder, domains, n_classes, total", [
    ("pacs", "PACS", ("art_painting", "cartoon", "photo", "sketch"), 7, 9991),
    ("vlcs", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5, 10729),
    ("officehome", "office_home", ("Art", "Clipart", "Product", "Real World"), 65, 15588),
    ("terraincognita", "terra_incognita", ("location_100", "location_38", "location_43", "location_46"), 10, 24788),
    ("domainnet", "domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345, 586575),
])
def test_real_card_matches_domainbed(name, folder, domains, n_classes, total):
    card = load_card(name)
    assert card.folder == folder
    assert card.domains == domains
    assert len(card.classes) == n_classes
    assert sum(card.expected_counts.values()) == total


def test_pacs_counts():
    card = load_card("pacs")
    assert card.expected_counts == {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    assert card.default_test_domains == ("sketch",)


PER_CLASS = 2


def _fake_tree(root: Path, card, per_class: int = PER_CLASS) -> None:
    """<root>/<folder>/<domain>/<class>/<image>.png, the layout DomainBed's download script writes."""
    for d, domain in enumerate(card.domains):
        for k, cls in enumerate(card.classes):
            cdir = root / card.folder / domain / cls
            cdir.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * d, 30 * k, 100 * i)).save(cdir / f"{i:05d}.png")


@pytest.fixture
def pacs_root(tmp_path):
    card = load_card("pacs")
    _fake_tree(tmp_path, card)
    return tmp_path, card


def test_fake_pacs_scan_and_counts(pacs_root):
    root, card = pacs_root
    n_domain = PER_CLASS * len(card.classes)
    items = scan_domain(root, card, "sketch")
    assert len(items) == n_domain
    assert [k for _, k in items] == [k for k in range(len(card.classes)) for _ in range(PER_CLASS)]
    assert all(Path(p).parent.name == card.classes[k] for p, k in items)
    assert all(Path(p).parent.parent == root / "PACS" / "sketch" for p, _ in items)
    counts = check_counts(root, card)
    assert counts == {d: (n_domain, card.expected_counts[d]) for d in card.domains}


def test_fake_pacs_build_task(pacs_root):
    root, card = pacs_root
    task = build_task(card, root, ("sketch",), 0.2, trial_seed=0)
    n_domain = PER_CLASS * len(card.classes)  # 14
    n_out = int(n_domain * 0.2)  # 2
    n_in = n_domain - n_out  # 12
    assert task.train_domains == ("art_painting", "cartoon", "photo")
    assert task.test_domains == ("sketch",)
    assert task.seen_classes == card.classes and task.unseen_classes == ()
    assert task.seen_names == list(card.classes)
    assert {d: len(v) for d, v in task.train.items()} == {d: n_in for d in task.train_domains}
    got = {(e.role, e.domain): len(e.items) for e in task.evalsets}
    assert got == {("id_val", "art_painting"): n_out, ("id_val", "cartoon"): n_out, ("id_val", "photo"): n_out,
                   ("ood", "sketch"): n_in, ("ood_val", "sketch"): n_out}
    assert not any(e.role == "zeroshot" for e in task.evalsets)
    # 'in' and 'out' of a domain split it: disjoint, and together every image
    by = {(e.role, e.domain): e for e in task.evalsets}
    for d in task.train_domains:
        paths_in = {p for p, _ in task.train[d]}
        paths_out = {p for p, _ in by[("id_val", d)].items}
        assert not paths_in & paths_out
        assert paths_in | paths_out == {p for p, _ in scan_domain(root, card, d)}
    ood = {p for p, _ in by[("ood", "sketch")].items} | {p for p, _ in by[("ood_val", "sketch")].items}
    assert ood == {p for p, _ in scan_domain(root, card, "sketch")}
    # the split depends only on (trial seed, domain)
    again = build_task(card, root, ("sketch",), 0.2, trial_seed=0)
    assert [e.items for e in again.evalsets] == [e.items for e in task.evalsets]


def test_missing_domain_folder_is_named(tmp_path):
    card = load_card("pacs")
    _fake_tree(tmp_path, card)
    missing = tmp_path / "PACS" / "photo"
    for f in sorted(missing.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    missing.rmdir()
    with pytest.raises(BenchError, match="photo") as err:
        scan_domain(tmp_path, card, "photo")
    assert str(missing) in str(err.value)
    with pytest.raises(BenchError) as err:
        build_task(card, tmp_path, ("sketch",), 0.2, trial_seed=0)
    assert str(missing) in str(err.value)
    assert check_counts(tmp_path, card)["photo"] == (0, 1670)


def test_missing_class_folder_is_named(tmp_path):
    card = load_card("pacs")
    _fake_tree(tmp_path, card)
    cdir = tmp_path / "PACS" / "cartoon" / "giraffe"
    for f in cdir.iterdir():
        f.unlink()
    cdir.rmdir()
    with pytest.raises(BenchError) as err:
        scan_domain(tmp_path, card, "cartoon")
    assert str(cdir) in str(err.value)

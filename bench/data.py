"""Datasets: cards (YAML, in datasets/), folders in the DomainBed ImageFolder layout, and splits.

A card names a dataset's domains and classes; the images live in
`<root>/<card.folder>/<domain>/<class>/<image>`, the layout DomainBed's download
script writes and the embedded generator writes too, so one loader serves both.

A card with `protocol: shift` (ImageNet and its shifted variants) instead names `sets`, each with its
own folder and class-folder scheme; it trains on one set and evaluates on an ID test set and the
shift sets (see `build_task` and datasets/imagenet.yaml).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from bench.config import read_yaml, seed_hash
from bench.errors import BenchError

log = logging.getLogger(__name__)

CARDS_DIR = Path(__file__).resolve().parent.parent / "datasets"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class DatasetCard:
    name: str
    folder: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    unseen_classes: tuple[str, ...] = ()
    class_names: dict = field(default_factory=dict)
    expected_counts: dict = field(default_factory=dict)
    default_test_domains: tuple[str, ...] = ()
    description: str = ""
    generator: dict | None = None
    download: str = ""
    # Where classes, class names and templates come from, when not listed in the card (see _FROM).
    classes_file: str = ""  # a text file next to the card: one class folder a line ('#' comments)
    class_names_from: str = ""
    templates_from: str = ""
    # protocol: shift only (see _check_shift_card). domains are then the set names, in order.
    protocol: str = "domainbed"  # domainbed | shift
    train_domain: str = ""  # the set trained on (minus its held-out id_val split)
    id_test_domain: str = ""  # the ID test set (role id_test; never used for model selection)
    sets: dict = field(default_factory=dict)  # set name -> {folder, class_folders, subset, n_classes, ...}
    ood_averages: dict = field(default_factory=dict)  # average name -> shift sets it averages over
    metrics: tuple[str, ...] = ()  # metrics logged beyond the default ones (CARD_METRICS), e.g. [macro_f1]
    source: str = ""

    @property
    def seen_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.unseen_classes)

    @property
    def shifts(self) -> tuple[str, ...]:
        """protocol: shift: the OOD sets (every set but the training and the ID test set), in card order."""
        return tuple(d for d in self.sets if d not in (self.train_domain, self.id_test_domain))

    def prompt_name(self, folder: str) -> str:
        return self.class_names.get(folder, folder.replace("_", " ").lower())

    def prompt_names(self, folders: tuple[str, ...]) -> list[str]:
        return [self.prompt_name(c) for c in folders]


_CARD_KEYS = {f for f in DatasetCard.__dataclass_fields__ if f != "source"}
CARD_METRICS = ("macro_f1",)  # what a card's `metrics` may ask for (bench.calibration computes them)


def list_cards() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name_or_path: str) -> DatasetCard:
    """A card by name (datasets/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CARDS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name_or_path, list_cards(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise BenchError(f"unknown dataset {name_or_path!r}: {hint}known: {', '.join(list_cards())} "
                             f"(or give a path to a card YAML)")
    elif not path.is_file():
        raise BenchError(f"{path}: no such dataset card; check the path")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise BenchError(f"{path}: a dataset card must be a mapping of keys")
    unknown = set(data) - _CARD_KEYS
    if unknown:
        raise BenchError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(_CARD_KEYS))}")
    _resolve_from(path, data)
    if data.get("protocol", "domainbed") == "shift":
        _check_shift_card(path, data)
    elif data.get("protocol", "domainbed") != "domainbed":
        raise BenchError(f"{path}: protocol {data['protocol']!r} is not one of domainbed, shift")
    else:
        bad = [k for k in _SHIFT_KEYS if data.get(k)]
        if bad:
            raise BenchError(f"{path}: key {bad[0]!r} belongs to protocol: shift cards; "
                             f"add protocol: shift or remove it")
    for key in ("name", "folder", "domains", "classes", "templates"):
        if not data.get(key):
            raise BenchError(f"{path}: missing key {key!r}; every card needs name, folder, domains, classes, templates")
    for key in ("domains", "classes", "templates", "unseen_classes", "default_test_domains", "metrics"):
        data[key] = tuple(data.get(key) or ())
    bad = [m for m in data["metrics"] if m not in CARD_METRICS]
    if bad:
        raise BenchError(f"{path}: metrics: {bad[0]!r} is not one of {', '.join(CARD_METRICS)} (accuracy, ECE, NLL "
                         f"and ECE after temperature scaling are always logged)")
    bad = [c for c in data["unseen_classes"] if c not in data["classes"]]
    if bad:
        raise BenchError(f"{path}: unseen_classes {bad} are not in classes; list them under classes too")
    if len(set(data["unseen_classes"])) == 1:  # zero-shot among one class: the column would always read 100 %
        raise BenchError(f"{path}: unseen_classes lists one class ({data['unseen_classes'][0]}): its zero-shot "
                         f"column would be a one-way classification (always 100 %); list at least 2, or none")
    if len(set(data["classes"]) - set(data["unseen_classes"])) < 2:
        raise BenchError(f"{path}: fewer than 2 classes are left to fine-tune on (classes minus unseen_classes); "
                         f"list at least 2 seen classes")
    bad = [t for t in data["templates"] if "{}" not in t]
    if bad:
        raise BenchError(f"{path}: template {bad[0]!r} has no '{{}}' for the class name")
    return DatasetCard(source=str(path), **data)


def _open_clip_imagenet(what: str) -> list[str]:
    """open_clip's copy of CLIP's ImageNet class names (openai_classnames, in sorted-wnid order) and its
    80 OpenAI prompt templates (lambdas in open_clip, turned into '{}' strings here)."""
    from open_clip import zero_shot_metadata as meta

    if what == "class_names":
        return list(meta.IMAGENET_CLASSNAMES)
    return [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]


_FROM = {"open_clip_imagenet": _open_clip_imagenet}  # values of class_names_from and templates_from


def _resolve_from(path: Path, data: dict) -> None:
    """classes_file, class_names_from, templates_from -> classes, class_names, templates (in place)."""
    if data.get("classes_file"):
        if data.get("classes"):
            raise BenchError(f"{path}: give classes or classes_file, not both")
        file = path.parent / data["classes_file"]
        if not file.is_file():
            raise BenchError(f"{path}: classes_file {file} not found; it is looked up next to the card")
        data["classes"] = [line.split()[0] for line in file.read_text().splitlines()
                           if line.strip() and not line.lstrip().startswith("#")]
    for key, target in (("class_names_from", "class_names"), ("templates_from", "templates")):
        src = data.get(key)
        if not src:
            continue
        if src not in _FROM:
            raise BenchError(f"{path}: {key}: {src!r} is not one of {', '.join(_FROM)}")
        if data.get(target):
            raise BenchError(f"{path}: give {target} or {key}, not both")
        values = _FROM[src](target)
        if target == "class_names":
            classes = data.get("classes") or []
            if len(values) != len(classes):
                raise BenchError(f"{path}: {key}: {src} names {len(values)} classes, the card has {len(classes)}")
            values = dict(zip(classes, values))
        data[target] = values


_SHIFT_KEYS = ("train_domain", "id_test_domain", "sets", "ood_averages")
_SET_KEYS = ("folder", "class_folders", "subset", "n_classes", "mappings", "download")
CLASS_FOLDER_SCHEMES = ("wnid", "index", "objectnet")


def _check_shift_card(path: Path, data: dict) -> None:
    """Validate a protocol: shift card and fill in defaults; its domains are the names under sets, in order.

    sets.<name>: folder (under <data.root>/<card folder>); class_folders: wnid (a folder per class, named as in
    classes), index (folders 0..K-1, the class's position in classes) or objectnet (ObjectNet folders, mapped
    onto classes by the mapping files in `mappings`); subset: true (wnid only: the class folders present are
    the set's classes, evaluated on that sub-head); n_classes: the number of class folders expected; download."""
    if data.get("domains"):
        raise BenchError(f"{path}: a protocol: shift card lists no domains (they are the names under sets); "
                         f"remove domains")
    sets = data.get("sets")
    if not isinstance(sets, dict) or not sets:
        raise BenchError(f"{path}: a protocol: shift card needs sets: a mapping of set name -> {{folder: ...}}")
    norm = {}
    for name, spec in sets.items():
        where = f"{path}: sets.{name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("folder"), str) or not spec["folder"]:
            raise BenchError(f"{where}: needs folder: the set's folder under <data.root>/<card folder>")
        unknown = set(spec) - set(_SET_KEYS)
        if unknown:
            raise BenchError(f"{where}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(_SET_KEYS)}")
        spec = {"class_folders": "wnid", "subset": False, "n_classes": None, "mappings": "", "download": "", **spec}
        if spec["class_folders"] not in CLASS_FOLDER_SCHEMES:
            raise BenchError(f"{where}: class_folders {spec['class_folders']!r} is not one of "
                             f"{', '.join(CLASS_FOLDER_SCHEMES)}")
        if not isinstance(spec["subset"], bool) or (spec["subset"] and spec["class_folders"] != "wnid"):
            raise BenchError(f"{where}: subset must be true or false, and true only with class_folders: wnid")
        if (spec["class_folders"] == "objectnet") != bool(spec["mappings"]):
            raise BenchError(f"{where}: class_folders: objectnet and mappings (the folder of ObjectNet's mapping "
                             f"files) go together")
        n = spec["n_classes"]
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise BenchError(f"{where}: n_classes must be a positive integer, got {n!r}")
        norm[str(name)] = spec
    for key in ("train_domain", "id_test_domain"):
        d = data.get(key)
        if d not in norm:
            raise BenchError(f"{path}: {key}: {d!r} is not one of sets ({', '.join(norm)})")
        if norm[d]["subset"] or norm[d]["class_folders"] == "objectnet":
            raise BenchError(f"{path}: {key}: set {d!r} must hold every class (class_folders wnid or index, no subset)")
    if data["train_domain"] == data["id_test_domain"]:
        raise BenchError(f"{path}: train_domain and id_test_domain must be two different sets")
    shifts = [d for d in norm if d not in (data["train_domain"], data["id_test_domain"])]
    if not shifts:
        raise BenchError(f"{path}: sets holds no shift set besides train_domain and id_test_domain")
    if data.get("unseen_classes"):
        raise BenchError(f"{path}: a protocol: shift card has no unseen_classes")
    averages = data.get("ood_averages") or {}
    if not isinstance(averages, dict):
        raise BenchError(f"{path}: ood_averages must map an average's name to a list of shift sets")
    for avg, members in averages.items():
        if not isinstance(members, list) or not members or any(m not in shifts for m in members):
            raise BenchError(f"{path}: ood_averages.{avg} must list shift sets (of {', '.join(shifts)})")
    bad = [d for d in data.get("default_test_domains") or () if d not in shifts]
    if bad:
        raise BenchError(f"{path}: default_test_domains: {bad[0]!r} is not a shift set (of {', '.join(shifts)})")
    data["sets"] = norm
    data["ood_averages"] = {k: tuple(v) for k, v in averages.items()}
    data["domains"] = list(norm)


def ensure_generated(card: DatasetCard, root: str | Path, progress: bool = True) -> None:
    """The project's own benchmark is drawn on first use; other datasets must be downloaded. A folder drawn by
    another generator version (other classes, other pictures) is never replaced: BenchError says what to do.
    (One drawn with other sizes or seeds, e.g. a test's small one, is used as it is.)"""
    if card.generator is None:
        return
    from bench import embedded

    folder = Path(root) / card.folder
    if folder.exists():
        embedded.check_version(folder)
    else:
        embedded.generate_benchmark(root, **card.generator, progress=progress)


def domain_folder(root: str | Path, card: DatasetCard, domain: str) -> Path:
    """The folder of a domain (protocol: shift: of a set)."""
    if card.protocol == "shift":
        return Path(root) / card.folder / card.sets[domain]["folder"]
    return Path(root) / card.folder / domain


def scan_domain(root: str | Path, card: DatasetCard, domain: str) -> list[tuple[str, int]]:
    """(path, class index into card.classes) for every image of one domain, in sorted order."""
    if card.protocol == "shift":
        raise BenchError(f"{card.name} is a protocol: shift card; read its sets with build_task (or scan_set)")
    folder = domain_folder(root, card, domain)
    if not folder.is_dir():
        how = ("it is generated on first use, or by `bench data embedded`" if card.generator
               else f"download it ({card.download or 'see the card'}) or set data.root")
        raise BenchError(f"data folder {folder} not found (dataset {card.name}, domain {domain}); {how}")
    items = []
    for k, cls in enumerate(card.classes):
        cdir = folder / cls
        if not cdir.is_dir():
            raise BenchError(f"class folder {cdir} not found; the data under {folder} is incomplete, re-download it")
        items += [(str(p), k) for p in sorted(cdir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def check_counts(root: str | Path, card: DatasetCard) -> dict[str, tuple[int, int | None]]:
    """domain -> (images found, images expected)."""
    if card.protocol == "shift":
        return {d: (_count_set(root, card, d), card.expected_counts.get(d)) for d in card.domains}
    out = {}
    for d in card.domains:
        folder = domain_folder(root, card, d)
        n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
        out[d] = (n, card.expected_counts.get(d))
    return out


# ---- protocol: shift: the sets of ImageNet and its shifted variants ------------------------------------
# The four files that ship in ObjectNet 1.0's objectnet-1.0/mappings/ (read here as mlfoundations/wise-ft's
# src/datasets/objectnet.py reads them): folder -> ObjectNet label; ObjectNet label -> ImageNet labels
# ('; '-separated); ImageNet label per line (line i: ImageNet 2012 id i); PyTorch index -> 2012 id.
OBJECTNET_MAPPING_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                           "imagenet_to_label_2012_v2", "pytorch_to_imagenet_2012_id.json")


def _subdirs(folder: str | Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


_IMAGE_EXTS = {s[1:] for s in IMAGE_SUFFIXES}


def _image_names(folder: str) -> list[str]:
    """Sorted image file names of one folder: one os.scandir, a suffix test, no stat per file."""
    with os.scandir(folder) as it:
        names = [e.name for e in it]
    return sorted(n for n in names if n.rpartition(".")[2].lower() in _IMAGE_EXTS and "." in n)


def objectnet_classes(mappings: str | Path, classes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """ObjectNet folder -> indices into `classes` (the ImageNet wnids, sorted: PyTorch's class order) of the
    ImageNet classes it maps to; only the ObjectNet classes that overlap ImageNet (113 in ObjectNet 1.0)."""
    mappings = Path(mappings)
    loaded = {}
    for name in OBJECTNET_MAPPING_FILES:
        file = mappings / name
        try:
            text = file.read_text()
            loaded[name] = text if not name.endswith(".json") else json.loads(text)
        except FileNotFoundError:
            raise BenchError(f"ObjectNet mapping file {file} not found; it ships in the ObjectNet download "
                             f"(objectnet-1.0/mappings/): extract objectnet-1.0.zip there again") from None
        except json.JSONDecodeError as err:
            raise BenchError(f"ObjectNet mapping file {file} is not valid JSON ({err.msg}); extract it again") from None
    folder_label, objectnet_to_imagenet, imagenet_labels, pytorch_to_2012 = (loaded[n] for n in OBJECTNET_MAPPING_FILES)
    if len(pytorch_to_2012) != len(classes):
        raise BenchError(f"{mappings / OBJECTNET_MAPPING_FILES[3]} indexes {len(pytorch_to_2012)} ImageNet classes, "
                         f"the card {len(classes)}; ObjectNet maps onto the 1000 ImageNet classes in sorted-wnid order")
    index_of_2012 = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    by_label: dict[str, list[int]] = {}
    for i, line in enumerate(imagenet_labels.splitlines()):
        if i in index_of_2012:
            by_label.setdefault(line.strip(), []).append(index_of_2012[i])
    folder_of = {label: folder for folder, label in folder_label.items()}
    out = {}
    for label, names in objectnet_to_imagenet.items():
        if label not in folder_of:
            raise BenchError(f"{mappings}: ObjectNet class {label!r} has no folder in {OBJECTNET_MAPPING_FILES[0]}; "
                             f"the mapping files do not match each other, extract them again")
        idx = []
        for name in names.split("; "):
            hits = by_label.get(name.strip(), [])
            if len(hits) != 1:
                raise BenchError(f"{mappings}: ImageNet class {name!r} (of ObjectNet {label!r}) is on {len(hits)} "
                                 f"lines of {OBJECTNET_MAPPING_FILES[2]}, not one; extract the mapping files again")
            idx.append(hits[0])
        out[folder_of[label]] = tuple(idx)
    return out


def _set_classes(root: str | Path, card: DatasetCard, name: str
                 ) -> tuple[list[str], tuple[tuple[int, ...], ...] | None]:
    """A set's class folders in label order, and its class subset (None: every class of the card)."""
    spec = card.sets[name]
    kind = spec["class_folders"]
    if kind == "index":
        return [str(k) for k in range(len(card.classes))], None
    if kind == "objectnet":
        groups = objectnet_classes(Path(root) / card.folder / spec["mappings"], card.classes)
        dirs = sorted(groups)
        return dirs, tuple(groups[d] for d in dirs)
    if not spec["subset"]:
        return list(card.classes), None
    folder = domain_folder(root, card, name)
    dirs = _subdirs(folder)
    index = {c: k for k, c in enumerate(card.classes)}
    bad = [d for d in dirs if d not in index]
    if bad:
        raise BenchError(f"{folder / bad[0]} is not a class of {card.name}; remove it or extract {folder} again")
    return dirs, tuple((index[d],) for d in dirs)


def scan_set(root: str | Path, card: DatasetCard, name: str
             ) -> tuple[list[tuple[str, int]], tuple[tuple[int, ...], ...] | None]:
    """protocol: shift: (path, label) for every image of one set, and the set's class subset.

    Without a subset a label indexes card.classes; with one it indexes the subset (see EvalSet.class_subset).
    Fast on ImageNet's 1.28M files: one os.scandir per folder, no stat per file, no image opened."""
    folder = domain_folder(root, card, name)
    if not folder.is_dir():
        how = f"download it ({card.sets[name]['download'] or card.download or 'see ' + card.source}) or set data.root"
        if name in card.shifts:
            how += f", or leave {name} out of data.test_domains"
        raise BenchError(f"data folder {folder} not found (dataset {card.name}, set {name}); {how}")
    dirs, subset = _set_classes(root, card, name)
    expected = card.sets[name]["n_classes"]
    if expected is not None and len(dirs) != expected:
        raise BenchError(f"{folder} holds {len(dirs)} classes of {card.name}, not {expected}; "
                         f"the data is incomplete, download it again")
    items = []
    for label, d in enumerate(dirs):
        cdir = os.path.join(folder, d)
        try:
            names = _image_names(cdir)
        except (FileNotFoundError, NotADirectoryError):
            raise BenchError(f"class folder {cdir} not found; the data under {folder} is incomplete, "
                             f"download it again") from None
        prefix = cdir + os.sep
        items += [(prefix + n, label) for n in names]
    return items, subset


def _count_set(root: str | Path, card: DatasetCard, name: str) -> int:
    """Images of one set's classes that are there (0 if its folder is missing); for bench datasets --check."""
    folder = domain_folder(root, card, name)
    if not folder.is_dir():
        return 0
    try:
        dirs, _ = _set_classes(root, card, name)
    except BenchError:  # e.g. ObjectNet's mapping files are missing: count every class folder
        dirs = _subdirs(folder)
    n = 0
    for d in dirs:
        try:
            n += len(_image_names(os.path.join(folder, d)))
        except (FileNotFoundError, NotADirectoryError):
            pass
    return n


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's split: a seeded permutation; the first `holdout_fraction` is 'out', the rest 'in'."""
    perm = np.random.default_rng(seed).permutation(n)
    n_out = int(n * holdout_fraction)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


@dataclass
class EvalSet:
    """One evaluation set. role: id_val | id_test | ood | ood_val | zeroshot | zeroshot_xd.
    classes: 'seen', 'unseen' (the card's unseen classes) or 'own' (class_names/templates of its own).

    class_subset: None, or the set's own classes, each a group of indices into the seen (or unseen) classes:
    the logits are projected onto those columns, the prediction is the group holding the highest of them,
    and a label indexes class_subset. ImageNet-R/-A: 200 one-class groups (a bare int is one); ObjectNet:
    a group per ObjectNet class, of the ImageNet classes it maps to (wise-ft's max over each group)."""

    role: str
    domain: str
    split: str
    classes: str
    items: list[tuple[str, int]]  # (path, label within the seen or unseen class list, or within class_subset)
    class_subset: tuple[tuple[int, ...], ...] | None = None
    # classes 'own' (role zeroshot_xd, a dataset never fine-tuned on): its own class names and prompt templates
    class_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    def __post_init__(self):
        if self.class_subset is not None:
            self.class_subset = tuple((g,) if isinstance(g, int) else tuple(g) for g in self.class_subset)


@dataclass
class Task:
    """Everything one run needs to know about its data."""

    card: DatasetCard
    root: Path
    train_domains: tuple[str, ...]
    test_domains: tuple[str, ...]
    seen_classes: tuple[str, ...]
    unseen_classes: tuple[str, ...]
    train: dict[str, list[tuple[str, int]]]  # training domain -> (path, seen label), the 'in' split
    evalsets: list[EvalSet]

    def train_items(self) -> list[tuple[str, int]]:
        """Training items of all training domains in one list: batch["index"] indexes it."""
        return [item for d in self.train_domains for item in self.train[d]]

    @property
    def seen_names(self) -> list[str]:
        return self.card.prompt_names(self.seen_classes)

    @property
    def unseen_names(self) -> list[str]:
        return self.card.prompt_names(self.unseen_classes)

    @property
    def templates(self) -> tuple[str, ...]:
        return self.card.templates


def build_task(card: DatasetCard, root: str | Path, test_domains: tuple[str, ...], holdout_fraction: float,
               trial_seed: int, source: str = "config") -> Task:
    """The DomainBed protocol: the split of each domain depends only on (trial seed, domain).

    A protocol: shift card is built by build_shift_task (test_domains: the shift sets evaluated)."""
    if card.protocol == "shift":
        return build_shift_task(card, root, test_domains, holdout_fraction, trial_seed, source)
    bad = [d for d in test_domains if d not in card.domains]
    if bad:
        raise BenchError(f"{source}: data.test_domains: {bad[0]!r} is not a domain of {card.name}; "
                         f"its domains are {', '.join(card.domains)}")
    if not test_domains:
        raise BenchError(f"{source}: data.test_domains is empty; name at least one of {', '.join(card.domains)}")
    seen = card.seen_classes
    seen_index = {card.classes.index(c): i for i, c in enumerate(seen)}
    unseen_index = {card.classes.index(c): i for i, c in enumerate(card.unseen_classes)}
    train, evalsets = {}, []
    for domain in card.domains:
        try:
            items = scan_domain(root, card, domain)
        except BenchError as err:
            raise BenchError(f"{source}: {err}") from None
        seen_items = [(p, seen_index[k]) for p, k in items if k in seen_index]
        unseen_items = [(p, unseen_index[k]) for p, k in items if k in unseen_index]
        idx_in, idx_out = split_indices(len(seen_items), holdout_fraction, seed_hash("split", trial_seed, domain))
        part_in = [seen_items[i] for i in idx_in]
        part_out = [seen_items[i] for i in idx_out]
        if domain in test_domains:
            evalsets.append(EvalSet("ood", domain, "in", "seen", part_in))
            evalsets.append(EvalSet("ood_val", domain, "out", "seen", part_out))
        else:
            train[domain] = part_in
            evalsets.append(EvalSet("id_val", domain, "out", "seen", part_out))
        if unseen_items:
            evalsets.append(EvalSet("zeroshot", domain, "all", "unseen", unseen_items))
    if not train:
        raise BenchError(f"{source}: data.test_domains holds every domain of {card.name}; leave one to train on")
    return Task(card, Path(root), tuple(d for d in card.domains if d not in test_domains), tuple(test_domains),
                seen, card.unseen_classes, train, evalsets)


def build_shift_task(card: DatasetCard, root: str | Path, test_domains: tuple[str, ...], holdout_fraction: float,
                     trial_seed: int, source: str = "config") -> Task:
    """Single-source shift: train on card.train_domain minus a held-out `holdout_fraction` (role id_val, the
    split seeded by the trial seed alone, as DomainBed splits a domain); role id_test: card.id_test_domain
    (reported, never used for selection); role ood: one set per shift named in test_domains, in card order."""
    shifts = card.shifts
    bad = [d for d in test_domains if d not in shifts]
    if bad:
        raise BenchError(f"{source}: data.test_domains: {bad[0]!r} is not a shift set of {card.name}; its shift "
                         f"sets are {', '.join(shifts)} (it trains on {card.train_domain}, tests ID on "
                         f"{card.id_test_domain})")
    if not test_domains:
        raise BenchError(f"{source}: data.test_domains is empty; name shift sets of {card.name}: {', '.join(shifts)}")

    def scan(name: str) -> tuple[list[tuple[str, int]], tuple[tuple[int, ...], ...] | None]:
        try:
            return scan_set(root, card, name)
        except BenchError as err:
            raise BenchError(f"{source}: {err}") from None

    items, _ = scan(card.train_domain)
    idx_in, idx_out = split_indices(len(items), holdout_fraction, seed_hash("split", trial_seed, card.train_domain))
    evalsets = [EvalSet("id_val", card.train_domain, "out", "seen", [items[i] for i in idx_out]),
                EvalSet("id_test", card.id_test_domain, "all", "seen", scan(card.id_test_domain)[0])]
    for name in shifts:
        if name in test_domains:
            ood_items, subset = scan(name)
            evalsets.append(EvalSet("ood", name, "all", "seen", ood_items, subset))
    return Task(card, Path(root), (card.train_domain,), tuple(test_domains), card.seen_classes, (),
                {card.train_domain: [items[i] for i in idx_in]}, evalsets)


def split_classes(card: DatasetCard, mode: str, source: str = "config") -> DatasetCard:
    """The card with data.classes applied. 'card': as it is. 'base_to_novel': CoOp's base-to-novel split
    (Zhou et al., CoCoOp, CVPR 2022; CoOp's `subsample_classes`): the classes sorted, the first ceil(n/2) base
    (seen, fine-tuned on), the rest novel (unseen: zero-shot in every domain, never trained on)."""
    from bench.config import CLASS_SPLITS

    if mode == "card":
        return card
    if mode not in CLASS_SPLITS:
        raise BenchError(f"{source}: data.classes: {mode!r} is not one of {', '.join(CLASS_SPLITS)}")
    if card.protocol == "shift":
        raise BenchError(f"{source}: data.classes: base_to_novel splits a DomainBed-protocol card's classes; "
                         f"{card.name} is a shift card (its sets share ImageNet's classes): use data.zeroshot_suite "
                         f"for its zero-shot column")
    if card.unseen_classes:
        raise BenchError(f"{source}: data.classes: base_to_novel, but {card.name} lists unseen_classes of its own; "
                         f"use data.classes: card, or remove unseen_classes from {card.source}")
    ordered = sorted(card.classes)
    novel = ordered[math.ceil(len(ordered) / 2):]
    if len(novel) < 2:
        raise BenchError(f"{source}: data.classes: base_to_novel leaves {len(novel)} novel class of {card.name} "
                         f"({len(card.classes)} classes): a zero-shot column needs at least 2; use data.classes: card")
    return dataclasses.replace(card, unseen_classes=tuple(novel))


def suite_evalsets(root: str | Path, names: tuple[str, ...], source: str = "config") -> list[EvalSet]:
    """Role zeroshot_xd: the test split of each zero-shot suite dataset (data.zeroshot_suite), with its own
    class names and templates (bench.zeroshot_suite; CoOp's cross-dataset transfer protocol)."""
    from bench import zeroshot_suite as Z

    out = []
    for name in Z.resolve_suite(list(names), f"{source}: data.zeroshot_suite"):
        card = Z.load_zeroshot_card(name)
        try:
            items = Z.scan_zeroshot(root, card, "test")
        except BenchError as err:
            raise BenchError(f"{source}: data.zeroshot_suite: {err}") from None
        out.append(EvalSet("zeroshot_xd", card.name, "test", "own", items, class_names=tuple(card.class_names),
                           templates=tuple(card.templates)))
    return out


def load_image(path: str) -> Image.Image:
    """The image as RGB; a missing, corrupt or truncated file is one BenchError naming it (also when a DataLoader
    worker reads it: the error's message stays one line, see bench.errors)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BenchError(f"{path}: unreadable image ({_image_error(err)}); replace or delete it "
                         f"(`bench datasets CARD --check --decode` lists every bad file)") from None


def _image_error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__


def image_error(path: str) -> str | None:
    """Why an image cannot be decoded in full, or None if it can (for `bench datasets --check --decode`)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - any failure to decode is a bad file
        return _image_error(err)
    return None


def image_paths(root: str | Path, card: DatasetCard) -> list[str]:
    """Every image file under the card's domain (set) folders that are there, sorted."""
    out = []
    for d in card.domains:
        folder = domain_folder(root, card, d)
        if folder.is_dir():
            out += sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return out


def decode_errors(paths: list[str], progress: bool = True, desc: str = "decode", workers: int = 0
                  ) -> list[tuple[str, str]]:
    """(path, reason) of every image of `paths` that does not decode in full, in order. Decoded by a thread pool
    (PIL releases the GIL while it decodes), `workers` threads (0: one per core), in chunks."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    bad = []
    chunk = 1024
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for i in range(0, len(paths), chunk):
            part = paths[i:i + chunk]
            bad += [(p, e) for p, e in zip(part, pool.map(image_error, part)) if e is not None]
            bar.update(len(part))
    return bad


def seeded_transform(transform, img: Image.Image, seed: int | None) -> torch.Tensor:
    """Apply a (possibly random) transform; with a seed, its random draws depend on that seed alone."""
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


class ImageItems(torch.utils.data.Dataset):
    """(path, label) items -> (image tensor, label, index). A key may be an index or (index, seed):
    with a seed, the (random) transform runs under that seed, so a batch depends only on its keys."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Any):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.items[index]
        return seeded_transform(self.transform, load_image(path), seed), label, index


def iterate(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate a DataLoader, shutting its worker processes down as soon as iteration ends. After an error (an
    unreadable image) the DataLoader's iterator sits in a reference cycle with the exception; left to the garbage
    collector, its shutdown stalls ~5 s per worker at some later, unrelated moment."""
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # only the multi-process iterator has workers
        if shutdown is not None:
            shutdown()


class StepSampler(torch.utils.data.Sampler):
    """Yields, for steps start..steps-1, the batch keys of that step: a function of (seed, step) alone,
    so a resumed run sees exactly the batches an unbroken run sees. Samples each training domain
    with replacement (DomainBed's InfiniteDataLoader), batch_size split evenly over domains."""

    def __init__(self, domain_sizes: list[int], batch_size: int, seed: int, start: int, steps: int):
        self.offsets = np.cumsum([0] + domain_sizes[:-1])
        self.sizes = domain_sizes
        n = len(domain_sizes)
        self.per_domain = [batch_size // n + (1 if i < batch_size % n else 0) for i in range(n)]
        self.seed, self.start, self.steps = seed, start, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def keys(self, step: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, step])
        out = []
        for off, size, m in zip(self.offsets, self.sizes, self.per_domain):
            idx = rng.integers(0, size, m)
            out += [(int(off + i), int(s)) for i, s in zip(idx, rng.integers(0, 2**31, m))]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            yield self.keys(step)


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions file (JSONL of {"path", "caption"}) -> {path: caption}."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["path"]] = row["caption"]
    return out

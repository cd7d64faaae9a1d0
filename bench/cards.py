"""Dataset cards: YAML files in datasets/ naming a dataset's domains, classes, prompt templates and expected
image counts, read and validated into a :class:`DatasetCard` (:func:`load_card`).

A card with `protocol: shift` (ImageNet and its shifted variants) instead names `sets`, each with its own folder
and class-folder scheme (see `_check_shift_card` and datasets/imagenet.yaml). Scanning a card's folders, splits
and samplers are bench.data's.

This module imports no torch (bench.collect reads cards through it): a card whose class names come from
open_clip (`class_names_from: open_clip_imagenet`) imports open_clip when it is loaded, not before.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.config import read_yaml
from bench.errors import BenchError

CARDS_DIR = Path(__file__).resolve().parent.parent / "datasets"


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


def card_file(name_or_path: str | Path) -> Path:
    """The YAML file of a card given by name (datasets/<name>.yaml) or by path, as load_card looks it up; not
    checked to exist."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else CARDS_DIR / f"{name_or_path}.yaml"


def read_ood_averages(name_or_path: str | Path) -> dict[str, tuple[str, ...]] | None:
    """A card's `ood_averages` (average name -> the shift sets it averages over), read from its YAML alone:
    the rest of the card is neither validated nor resolved (no classes file, no open_clip class names), so this
    is cheap and torch-free. None if the card lists none; OSError / yaml.YAMLError if it is missing or broken."""
    data = yaml.safe_load(card_file(name_or_path).read_text())
    averages = data.get("ood_averages") if isinstance(data, dict) else None
    return {str(k): tuple(v) for k, v in averages.items()} if isinstance(averages, dict) and averages else None


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

"""Cross-dataset zero-shot suites: datasets a run never trains on, classified against their own prompts.

CoOp's cross-dataset transfer protocol (Zhou et al., CoCoOp, CVPR 2022, Table 2), also ARF's zero-shot
benchmark: a CLIP fine-tuned on ImageNet is evaluated, zero-shot, on the test split of ten other datasets.
Each dataset has a *zero-shot card* in datasets/zeroshot/<name>.yaml, read in the layout of CoOp's DATASETS.md:

    <data.root>/<folder>/<image_dir>/...         the images
    <data.root>/<folder>/<split_file>            split_zhou_*.json: {"train"|"val"|"test": [[path, label, classname]]}

(FGVCAircraft has no split_zhou file: `split_format: fgvc_aircraft` reads images_variant_<split>.txt, as CoOp's
fgvc_aircraft.py does.) Labels never come from list order: every split-file classname is matched to the card's
classes (ignoring case, '_', '-' and word order), and the card gives each class its prompt name. Suites are
named in datasets/zeroshot/suites.yaml (coop10). Torch-free; docs/ZEROSHOT_SUITE.md has the full story.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.config import read_yaml
from bench.errors import BenchError

log = logging.getLogger(__name__)

ZEROSHOT_DIR = Path(__file__).resolve().parent.parent / "datasets" / "zeroshot"
SUITES_FILE = ZEROSHOT_DIR / "suites.yaml"
SPLIT_FORMATS = ("coop_json", "fgvc_aircraft")
SPLITS = ("train", "val", "test")


def class_key(name: str) -> frozenset:
    """How a split file's classname is matched to a card's class: case, '_', '-' and word order ignored
    (CoOp's SUN397 'outdoor apartment_building' is CLIP's 'apartment building outdoor')."""
    return frozenset(str(name).casefold().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class ZeroshotCard:
    name: str
    title: str
    folder: str  # under data.root
    image_dir: str  # under folder ('' : the split file's paths are relative to folder itself)
    split_file: str  # under folder; fgvc_aircraft: images_variant_{split}.txt
    class_names: tuple[str, ...]  # prompt names; a label of scan_zeroshot indexes this
    coop_names: tuple[str, ...]  # the classname CoOp's split file gives each class (same order)
    templates: tuple[str, ...]
    download: tuple[str, ...] = ()
    split_format: str = "coop_json"
    test_count: int | None = None  # images in CoOp's test split
    class_names_source: str = ""
    templates_source: str = ""
    source: str = ""
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def class_index(self, classname: str) -> int | None:
        return self._index.get(class_key(classname))

    @property
    def how_to_get(self) -> str:
        """The card's download instructions on one line."""
        steps = "; ".join(self.download) or "see the card"
        return f"download it as CoOp's DATASETS.md says ({steps}; {self.source}) or set data.root"

    def split_path(self, root: str | Path, split: str) -> Path:
        return Path(root) / self.folder / self.split_file.format(split=split)


_CARD_KEYS = {"name", "title", "folder", "image_dir", "split_file", "split_format", "test_count", "download",
              "class_names_source", "templates_source", "classes", "templates"}
_REQUIRED = ("name", "folder", "split_file", "classes", "templates")


def list_zeroshot_cards() -> list[str]:
    return sorted(p.stem for p in ZEROSHOT_DIR.glob("*.yaml") if p != SUITES_FILE)


def list_suites() -> dict[str, tuple[str, ...]]:
    """Suite name -> its zero-shot card names (datasets/zeroshot/suites.yaml)."""
    return dict(_suites(str(SUITES_FILE)))


@functools.lru_cache(maxsize=4)
def _suites(path: str) -> tuple:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BenchError(f"{path}: cannot read the suite file ({err}); fix or restore it") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and v and all(isinstance(c, str) for c in v)
                                             for v in data.values()):
        raise BenchError(f"{path}: each suite must map a name to a non-empty list of zero-shot card names")
    return tuple((str(k), tuple(v)) for k, v in data.items())


def resolve_suite(values: list[str], where: str = "data.zeroshot_suite") -> tuple[str, ...]:
    """Suite names, zero-shot card names or card YAML paths -> card names/paths, each once, in order."""
    if isinstance(values, str):
        values = [values]
    suites, cards = list_suites(), list_zeroshot_cards()
    out: list[str] = []
    for value in values:
        value = str(value)
        if value in suites:
            found = list(suites[value])
        elif value in cards:
            found = [value]
        elif Path(value).suffix in (".yaml", ".yml"):
            if not Path(value).is_file():
                raise BenchError(f"{where}: {value}: no such zero-shot card; check the path")
            found = [value]
        else:
            close = difflib.get_close_matches(value, list(suites) + cards, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise BenchError(f"{where}: unknown zero-shot suite or card {value!r}: {hint}suites: "
                             f"{', '.join(suites)}; cards: {', '.join(cards)} (or a path to a zero-shot card YAML)")
        out += [c for c in found if c not in out]
    if not out:
        raise BenchError(f"{where}: empty; name a suite ({', '.join(suites)}) or zero-shot cards")
    return tuple(out)


def load_zeroshot_card(name_or_path: str) -> ZeroshotCard:
    """A zero-shot card by name (datasets/zeroshot/<name>.yaml) or by path, validated in full."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = ZEROSHOT_DIR / f"{name_or_path}.yaml"
        if not path.is_file() or path == SUITES_FILE:
            resolve_suite([str(name_or_path)], "zero-shot card")  # raises with the known names
            raise BenchError(f"{name_or_path!r} is a zero-shot suite, not a card; resolve it with resolve_suite")
    stat = path.stat() if path.is_file() else None
    if stat is None:
        raise BenchError(f"{path}: no such zero-shot card; check the path")
    return _load_card(str(path.resolve()), stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _load_card(path_text: str, _mtime: int) -> ZeroshotCard:
    path = Path(path_text)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise BenchError(f"{path}: a zero-shot card must be a mapping of keys")
    unknown = sorted(set(data) - _CARD_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], _CARD_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BenchError(f"{path}: unknown key {unknown[0]!r}; {hint}valid keys: {', '.join(sorted(_CARD_KEYS))}")
    for key in _REQUIRED:
        if not data.get(key):
            raise BenchError(f"{path}: missing key {key!r}; a zero-shot card needs {', '.join(_REQUIRED)}")
    fmt = data.get("split_format", "coop_json")
    if fmt not in SPLIT_FORMATS:
        raise BenchError(f"{path}: split_format {fmt!r} is not one of {', '.join(SPLIT_FORMATS)}")
    if fmt == "fgvc_aircraft" and "{split}" not in data["split_file"]:
        raise BenchError(f"{path}: split_file must hold '{{split}}' with split_format: fgvc_aircraft "
                         f"(images_variant_{{split}}.txt)")
    count = data.get("test_count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise BenchError(f"{path}: test_count must be a positive integer, got {count!r}")
    templates = data["templates"]
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        bad = next((t for t in templates if not (isinstance(t, str) and "{}" in t)), templates) \
            if isinstance(templates, list) else templates
        raise BenchError(f"{path}: template {bad!r} has no '{{}}' for the class name")
    download = data.get("download") or []
    if isinstance(download, str):
        download = [download]
    prompts, coop, index = [], [], {}
    if not isinstance(data["classes"], list):
        raise BenchError(f"{path}: classes must be a list (a prompt name, or {{CoOp classname: prompt name}} each)")
    for i, entry in enumerate(data["classes"]):
        if isinstance(entry, dict) and len(entry) == 1:
            (coop_name, prompt), = entry.items()
        elif isinstance(entry, (str, int, float)) and not isinstance(entry, bool):
            coop_name = prompt = entry
        else:
            raise BenchError(f"{path}: classes[{i}] must be a prompt name or {{CoOp classname: prompt name}}, "
                             f"got {entry!r}")
        key = class_key(str(coop_name))
        if not key or key in index:
            other = f" as classes[{index[key]}]" if key in index else ""
            raise BenchError(f"{path}: classes[{i}] ({coop_name!r}) matches the same split-file classname{other}; "
                             f"give it a distinct CoOp classname")
        index[key] = i
        prompts.append(str(prompt))
        coop.append(str(coop_name))
    return ZeroshotCard(name=str(data["name"]), title=str(data.get("title") or data["name"]), folder=str(data["folder"]),
                        image_dir=str(data.get("image_dir") or ""), split_file=str(data["split_file"]),
                        class_names=tuple(prompts), coop_names=tuple(coop), templates=tuple(templates),
                        download=tuple(str(d) for d in download), split_format=fmt, test_count=count,
                        class_names_source=str(data.get("class_names_source", "")),
                        templates_source=str(data.get("templates_source", "")), source=str(path), _index=index)


def read_split(root: str | Path, card: ZeroshotCard, split: str = "test") -> list[tuple[str, int, str]]:
    """(image path relative to the image folder, CoOp's label, CoOp's classname) of one split, as the file says."""
    if split not in SPLITS:
        raise BenchError(f"zero-shot split {split!r} is not one of {', '.join(SPLITS)}")
    folder = Path(root) / card.folder
    if not folder.is_dir():
        raise BenchError(f"data folder {folder} not found (zero-shot dataset {card.title}); {card.how_to_get}")
    path = card.split_path(root, split)
    if card.split_format == "fgvc_aircraft":
        return _read_fgvc(folder, path, card)
    if not path.is_file():
        raise BenchError(f"split file {path} not found (zero-shot dataset {card.title}); {card.how_to_get}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"{path}: not a readable JSON split file ({err}); download it again") from None
    rows = data.get(split) if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise BenchError(f"{path}: no {split!r} list; CoOp's split files map train, val and test to "
                         f"[[image path, label, classname], ...]; download it again")
    out = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and isinstance(row[1], int) and isinstance(row[2], str)):
            raise BenchError(f"{path}: {split}[{i}] is {row!r}, not [image path, label, classname]; download it again")
        out.append((row[0], row[1], row[2]))
    return out


def _read_fgvc(folder: Path, path: Path, card: ZeroshotCard) -> list[tuple[str, int, str]]:
    """CoOp's fgvc_aircraft.py: labels by the line order of variants.txt, images_variant_<split>.txt lines
    '<image id> <variant>' (the variant may hold spaces), images at images/<id>.jpg."""
    variants_file = folder / "variants.txt"
    for f in (variants_file, path):
        if not f.is_file():
            raise BenchError(f"split file {f} not found (zero-shot dataset {card.title}); {card.how_to_get}")
    variants = [v.strip() for v in variants_file.read_text().splitlines() if v.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ")
        name = " ".join(parts[1:])
        if len(parts) < 2 or name not in label_of:
            raise BenchError(f"{path}: line {n} {line.strip()!r} is not '<image id> <variant of {variants_file.name}>'; "
                             f"download the data again")
        out.append((parts[0] + ".jpg", label_of[name], name))
    return out


def scan_zeroshot(root: str | Path, card: ZeroshotCard, split: str = "test") -> list[tuple[str, int]]:
    """(image path, label) of one split; a label indexes card.class_names (matched by classname, never by order)."""
    rows = read_split(root, card, split)
    image_dir = Path(root) / card.folder / card.image_dir
    if not image_dir.is_dir():
        raise BenchError(f"image folder {image_dir} not found (zero-shot dataset {card.title}); {card.how_to_get}")
    where = card.split_path(root, split)
    seen: dict[int, str] = {}
    items = []
    for rel, label, classname in rows:
        k = card.class_index(classname)
        if k is None:
            close = difflib.get_close_matches(classname, card.coop_names, n=1, cutoff=0.6)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise BenchError(f"{where}: classname {classname!r} (label {label}) is not a class of zero-shot card "
                             f"{card.name}{hint}; is this CoOp's split file of {card.title}? else add the class to "
                             f"{card.source}")
        if seen.setdefault(label, classname) != classname:
            raise BenchError(f"{where}: label {label} is both {seen[label]!r} and {classname!r}; download it again")
        items.append((os.path.join(image_dir, rel), k))
    if not items:
        raise BenchError(f"{where}: the {split} split is empty; download it again")
    return items


def check_dataset(root: str | Path, card: ZeroshotCard, split: str = "test") -> dict:
    """For `bench datasets --check`: state (ok | missing | incomplete | error), the split's images listed and found."""
    folder = Path(root) / card.folder
    out = {"card": card, "folder": folder, "listed": 0, "found": 0, "state": "missing", "error": ""}
    if not folder.is_dir():
        return out
    try:
        items = scan_zeroshot(root, card, split)
    except BenchError as err:
        out.update(state="error", error=str(err))
        return out
    out["listed"] = len(items)
    out["found"] = sum(1 for p, _ in items if os.path.isfile(p))
    complete = out["found"] == out["listed"] and card.test_count in (None, out["listed"])
    out["state"] = "ok" if complete else "incomplete"
    return out


def report_lines(root: str | Path, check: bool = False) -> list[str]:
    """`bench datasets`: one line per zero-shot card (its suites, where it is read, whether it is there); with
    check, the test split's images listed in the split file and found on disk, against CoOp's count."""
    suites = list_suites()
    lines = [f"zero-shot suites ({', '.join(f'{s}: {len(c)} datasets' for s, c in suites.items())}; "
             f"docs/ZEROSHOT_SUITE.md):"]
    for name in list_zeroshot_cards():
        card = load_zeroshot_card(name)
        member = ",".join(s for s, cards in suites.items() if name in cards) or "-"
        if not check:
            state = "present" if (Path(root) / card.folder).is_dir() else "missing"
            lines.append(f"{name:16s} {len(card.class_names)} classes  suite {member}  [{state}]  "
                         f"{Path(root) / card.folder}")
            continue
        c = check_dataset(root, card)
        state = c["state"]
        if state == "incomplete":  # images missing on disk, or a split file shorter than CoOp's
            state = (f"{c['found']}/{c['listed']} images" if c["found"] < c["listed"]
                     else f"{c['listed']}/{card.test_count} test images")
        lines.append(f"{name:16s} {len(card.class_names)} classes  suite {member}  [{state}]  {c['folder']}")
        if c["state"] == "error":
            lines.append(f"    {c['error']}")
        elif c["state"] != "missing":
            flag = "" if card.test_count in (None, c["listed"]) else f"  (CoOp's test split has {card.test_count})"
            lines.append(f"    test split: {c['listed']} listed in {card.split_file.format(split='test')}, "
                         f"{c['found']} found{flag}")
    return lines

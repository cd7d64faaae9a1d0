"""Dataset folders on disk: where a card's domains (protocol: shift: its sets) live in the DomainBed ImageFolder
layout or a shift set's class-folder scheme, scanning them into (path, label) items, counting and decoding their
images (`bench datasets --check`), and reading one image. Torch-free; splits, tasks and samplers are bench.data's.

A card names a dataset's domains and classes; the images live in
`<root>/<card.folder>/<domain>/<class>/<image>`, the layout DomainBed's download
script writes and the embedded generator writes too, so one loader serves both. A card with
`protocol: shift` names `sets` instead, each with its own folder and class-folder scheme (scan_set).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from bench.cards import DatasetCard
from bench.errors import BenchError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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

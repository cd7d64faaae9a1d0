"""Datasets: folders in the DomainBed ImageFolder layout, the shift sets of protocol: shift cards, splits,
tasks and samplers. The cards themselves (YAML, in datasets/) are bench.cards'; their names are imported here too.

A card names a dataset's domains and classes; the images live in
`<root>/<card.folder>/<domain>/<class>/<image>`, the layout DomainBed's download
script writes and the embedded generator writes too, so one loader serves both.

A card with `protocol: shift` (ImageNet and its shifted variants) instead names `sets`, each with its
own folder and class-folder scheme; it trains on one set and evaluates on an ID test set and the
shift sets (see `build_task` and datasets/imagenet.yaml).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

# The card names, from their torch-free home; imported from here too (bench.data.load_card, ...) for now.
from bench.cards import (CARD_METRICS, CARDS_DIR, CLASS_FOLDER_SCHEMES, DatasetCard, list_cards,  # noqa: F401
                         load_card, split_classes)
from bench.config import seed_hash
from bench.errors import BenchError

log = logging.getLogger(__name__)

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


def suite_evalsets(root: str | Path, names: tuple[str, ...], source: str = "config") -> list[EvalSet]:
    """Role zeroshot_xd: the test split of each zero-shot suite dataset (data.zeroshot_suite), with its own
    class names and templates (bench.zeroshot_suite; CoOp's cross-dataset transfer protocol)."""
    from bench import zeroshot_suite

    out = []
    for name in zeroshot_suite.resolve_suite(list(names), f"{source}: data.zeroshot_suite"):
        card = zeroshot_suite.load_zeroshot_card(name)
        try:
            items = zeroshot_suite.scan_zeroshot(root, card, "test")
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

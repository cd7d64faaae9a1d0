"""Datasets: cards (YAML, in datasets/), folders in the DomainBed ImageFolder layout, and splits.

A card names a dataset's domains and classes; the images live in
`<root>/<card.folder>/<domain>/<class>/<image>`, the layout DomainBed's download
script writes and the embedded generator writes too, so one loader serves both.
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from PIL import Image

from bench.config import seed_hash
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
    source: str = ""

    @property
    def seen_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.unseen_classes)

    def prompt_name(self, folder: str) -> str:
        return self.class_names.get(folder, folder.replace("_", " ").lower())

    def prompt_names(self, folders: tuple[str, ...]) -> list[str]:
        return [self.prompt_name(c) for c in folders]


_CARD_KEYS = {f for f in DatasetCard.__dataclass_fields__ if f != "source"}


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
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BenchError(f"{path}: malformed YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: a dataset card must be a mapping of keys")
    unknown = set(data) - _CARD_KEYS
    if unknown:
        raise BenchError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid keys: {', '.join(sorted(_CARD_KEYS))}")
    for key in ("name", "folder", "domains", "classes", "templates"):
        if not data.get(key):
            raise BenchError(f"{path}: missing key {key!r}; every card needs name, folder, domains, classes, templates")
    for key in ("domains", "classes", "templates", "unseen_classes", "default_test_domains"):
        data[key] = tuple(data.get(key) or ())
    bad = [c for c in data["unseen_classes"] if c not in data["classes"]]
    if bad:
        raise BenchError(f"{path}: unseen_classes {bad} are not in classes; list them under classes too")
    bad = [t for t in data["templates"] if "{}" not in t]
    if bad:
        raise BenchError(f"{path}: template {bad[0]!r} has no '{{}}' for the class name")
    return DatasetCard(source=str(path), **data)


def ensure_generated(card: DatasetCard, root: str | Path, progress: bool = True) -> None:
    """The project's own benchmark is drawn on first use; other datasets must be downloaded."""
    if card.generator is not None and not (Path(root) / card.folder).exists():
        from bench import embedded

        embedded.generate_benchmark(root, **card.generator, progress=progress)


def domain_folder(root: str | Path, card: DatasetCard, domain: str) -> Path:
    return Path(root) / card.folder / domain


def scan_domain(root: str | Path, card: DatasetCard, domain: str) -> list[tuple[str, int]]:
    """(path, class index into card.classes) for every image of one domain, in sorted order."""
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
    out = {}
    for d in card.domains:
        folder = domain_folder(root, card, d)
        n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
        out[d] = (n, card.expected_counts.get(d))
    return out


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's split: a seeded permutation; the first `holdout_fraction` is 'out', the rest 'in'."""
    perm = np.random.default_rng(seed).permutation(n)
    n_out = int(n * holdout_fraction)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


@dataclass
class EvalSet:
    """One evaluation set. role: id_val | ood | ood_val | zeroshot. classes: 'seen' or 'unseen'."""

    role: str
    domain: str
    split: str
    classes: str
    items: list[tuple[str, int]]  # (path, label within the seen or unseen class list)


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
    """The DomainBed protocol: the split of each domain depends only on (trial seed, domain)."""
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


def load_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


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
        img = load_image(path)
        if seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(img)
        return x, label, index


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

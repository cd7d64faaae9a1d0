"""Datasets as runs see them: DomainBed's seeded splits, the Task of a run (training items and evaluation sets,
protocol: shift cards included), and loading (ImageItems, StepSampler, iterate). The cards (YAML, in datasets/) are
bench.cards'; the folders on disk (layouts, scanning, image checks) are bench.layouts'.

A DomainBed card trains on its domains but data.test_domains, each split into an 'in' and an 'out' part.
A card with `protocol: shift` (ImageNet and its shifted variants) trains on one set and evaluates on an ID test set
and the shift sets (see `build_task` and datasets/imagenet.yaml).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from bench.cards import DatasetCard
from bench.config import seed_hash
from bench.errors import BenchError
from bench.layouts import load_image, scan_domain, scan_set

log = logging.getLogger(__name__)


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

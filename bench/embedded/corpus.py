"""The caption corpus: the tiny CLIP's "web" of captioned images (:func:`generate_corpus`), drawn from a seed
stream the benchmark never uses; :func:`save_corpus` / :func:`load_corpus` store it as ``.npz``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.embedded.paint import draw
from bench.embedded.parallel import _imap, _integer
from bench.embedded.shapes import (_CORPUS_STREAM, CLASSES, DOMAINS, GENERATOR_VERSION, SEEN_CLASSES, caption,
                                   sample_scene)
from bench.errors import BenchError
from bench.results import atomic_write

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the caption corpus


class Corpus(NamedTuple):
    """An in-memory caption corpus; ``labels`` index :data:`CLASSES`, ``domains`` index :data:`DOMAINS`.

    ``named`` is the class each caption names: its label, or -1 where it says a generic word instead
    (see :func:`generate_corpus`)."""

    images: np.ndarray   # (n, H, W, 3) uint8
    captions: list[str]
    labels: np.ndarray   # (n,) int64
    domains: np.ndarray  # (n,) int64
    named: np.ndarray    # (n,) int64


# The corpus is the tiny CLIP's "web", where the seen classes' names are specialised vocabulary and the unseen
# classes' names everyday words: a caption names its object's class with probability WEB_NAMED_SEEN for a seen
# (geometric) class and WEB_NAMED_UNSEEN for an unseen one (house, key, cloud, ...); otherwise it says a generic
# word ("a painting of a large red shape on a striped background"). So the pretrained model sees every class in
# every domain and learns their looks, but its text side knows the geometric names poorly: zero-shot leaves room
# for fine-tuning on the seen classes, as web-pretrained CLIP does on a specialised task, while the everyday
# unseen classes are known well, so that forgetting them shows. With every class always named, the pretrained
# model is already the best classifier of the benchmark and fine-tuning has nothing to add (docs/EMBEDDED.md).
WEB_NAMED_SEEN = 0.3
WEB_NAMED_UNSEEN = 0.9
GENERIC_NAMES: tuple[str, ...] = ("shape", "object", "figure", "thing")


def _corpus_item(task: tuple[int, int, int, float, float]) -> tuple[np.ndarray, str, int, int, int]:
    """Worker: corpus item ``j`` -> (pixels, caption, class index, domain index, class named by the caption)."""
    seed, j, image_size, named_seen, named_unseen = task
    rng = np.random.default_rng([seed, _CORPUS_STREAM, j])
    c = int(rng.integers(len(CLASSES)))
    d = int(rng.integers(len(DOMAINS)))
    scene = sample_scene(CLASSES[c], DOMAINS[d], rng)
    image = draw(scene, rng, image_size)
    # Drawn after the image, from the item's own stream: the naming rates never change an image.
    u, generic = float(rng.random()), int(rng.integers(len(GENERIC_NAMES)))
    if u < (named_seen if CLASSES[c] in SEEN_CLASSES else named_unseen):
        return np.asarray(image), caption(scene), c, d, c
    return np.asarray(image), caption(scene, GENERIC_NAMES[generic]), c, d, -1


def generate_corpus(n: int, seed: int, image_size: int = 32, workers: int = 2, progress: bool = True,
                    named_seen: float = WEB_NAMED_SEEN, named_unseen: float = WEB_NAMED_UNSEEN) -> Corpus:
    """Draw ``n`` captioned images of uniformly random classes (seen and unseen) and domains, each caption
    naming its class with probability ``named_seen`` or ``named_unseen`` (see WEB_NAMED_SEEN; 1, 1 gives
    every caption its class name).

    Item ``j`` depends only on ``(seed, j, image_size)`` (its caption also on the naming rates), from a
    seed stream the benchmark never uses, so the result does not depend on ``workers`` and never repeats
    a benchmark image.
    """
    n, seed = _integer("n", n, 0), _integer("seed", seed, 0)
    image_size, workers = _integer("image_size", image_size, 8), _integer("workers", workers, 1)
    if not (0.0 <= named_seen <= 1.0 and 0.0 <= named_unseen <= 1.0):
        raise ValueError(f"naming rates named_seen={named_seen}, named_unseen={named_unseen} must lie in [0, 1]")
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    domains = np.empty(n, dtype=np.int64)
    named = np.empty(n, dtype=np.int64)
    captions = []
    tasks = [(seed, j, image_size, float(named_seen), float(named_unseen)) for j in range(n)]
    for j, (pixels, text, c, d, k) in enumerate(_imap(_corpus_item, tasks, workers, progress,
                                                      desc="embedded corpus")):
        images[j], labels[j], domains[j], named[j] = pixels, c, d, k
        captions.append(text)
    logger.info("drew an embedded caption corpus of %d images (seed %d, %d px, class named in %.0f%% of seen and "
                "%.0f%% of unseen captions)", n, seed, image_size, 100 * named_seen, 100 * named_unseen)
    return Corpus(images, captions, labels, domains, named)


def save_corpus(path: str | Path, corpus: Corpus) -> Path:
    """Store a corpus as a compressed ``.npz`` (suffix added if missing), written atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    atomic_write(path, lambda out: np.savez_compressed(
        out, images=corpus.images, captions=np.array(corpus.captions, dtype=str), labels=corpus.labels,
        domains=corpus.domains, named=corpus.named, class_names=np.array(CLASSES), domain_names=np.array(DOMAINS),
        generator_version=np.int64(GENERATOR_VERSION)))
    return path


def load_corpus(path: str | Path) -> Corpus:
    """Read a corpus written by :func:`save_corpus`; BenchError if it is missing or from other classes."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: no such corpus file; generate it first or fix the path")
    with np.load(path, allow_pickle=False) as data:
        if tuple(data["class_names"]) != CLASSES or tuple(data["domain_names"]) != DOMAINS:
            raise BenchError(f"{path}: corpus drawn for other classes or domains (generator version "
                             f"{int(data['generator_version'])}, now {GENERATOR_VERSION}); delete it to regenerate")
        if int(data["generator_version"]) != GENERATOR_VERSION:
            raise BenchError(f"{path}: corpus of generator version {int(data['generator_version'])}, now "
                             f"{GENERATOR_VERSION}; delete it to regenerate")
        return Corpus(images=data["images"], captions=data["captions"].tolist(),
                      labels=data["labels"], domains=data["domains"], named=data["named"])

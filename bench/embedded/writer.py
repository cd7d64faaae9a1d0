"""The benchmark folder: ``ROOT/embedded/<domain>/<class>/<i:05d>.png`` (the DomainBed ImageFolder layout),
``captions.jsonl`` and ``MANIFEST.json`` (:func:`generate_benchmark`), its digest and version check."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image

from bench.embedded.paint import render
from bench.embedded.parallel import _imap, _integer
from bench.embedded.shapes import _BENCHMARK_STREAM, CLASSES, DOMAINS, GENERATOR_VERSION, UNSEEN_CLASSES
from bench.errors import BenchError

logger = logging.getLogger(__name__)

DATASET_NAME = "embedded"
MANIFEST_NAME = "MANIFEST.json"
CAPTIONS_NAME = "captions.jsonl"


# --------------------------------------------------------------------------- encoding and digests


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array.

    Rows are stored unfiltered: at 32 px this is several times faster than Pillow's
    adaptive-filter encoder, and the bytes depend only on zlib, not on the Pillow version.
    """
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + _png_chunk(b"IEND", b""))


def _pixels_sha256(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


class _Record(NamedTuple):
    """One benchmark image as the manifest digest sees it."""

    path: str  # relative to the dataset folder, "<domain>/<class>/<i:05d>.png"
    pixels_sha256: str
    caption: str


_DIGEST_METHOD = "sha256 over 'path<TAB>sha256(RGB pixel bytes)<TAB>caption<LF>' lines in sorted path order"


def _digest(records: Iterable[_Record]) -> str:
    """The manifest digest (see ``_DIGEST_METHOD``); pixels, not PNG bytes, so zlib builds don't matter."""
    digest = hashlib.sha256()
    for record in sorted(records):
        digest.update(f"{record.path}\t{record.pixels_sha256}\t{record.caption}\n".encode())
    return digest.hexdigest()


def benchmark_digest(folder: str | Path) -> str:
    """Recompute a generated folder's digest from its images and ``captions.jsonl``.

    Equal to the ``sha256`` in its ``MANIFEST.json`` unless an image or caption was changed.
    """
    folder = Path(folder)
    records = []
    with open(folder / CAPTIONS_NAME, encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            with Image.open(folder / entry["path"]) as image:
                pixels = np.asarray(image.convert("RGB"))
            records.append(_Record(entry["path"], _pixels_sha256(pixels), entry["caption"]))
    return _digest(records)


# --------------------------------------------------------------------------- the benchmark folder


def _benchmark_item(task: tuple[int, int, int, int, int]) -> tuple[_Record, bytes]:
    """Worker: benchmark image ``i`` of class ``c`` in domain ``d`` -> (its record, its PNG bytes)."""
    seed, d, c, i, image_size = task
    image, text = render(CLASSES[c], DOMAINS[d], np.random.default_rng([seed, _BENCHMARK_STREAM, d, c, i]),
                         image_size)
    pixels = np.asarray(image)
    return _Record(f"{DOMAINS[d]}/{CLASSES[c]}/{i:05d}.png", _pixels_sha256(pixels), text), _png_bytes(pixels)


def _matches_existing(folder: Path, params: dict[str, int]) -> bool:
    """Whether ``folder`` already holds this benchmark; False if absent, BenchError if it holds another."""
    if not folder.exists():
        return False
    manifest_path = folder / MANIFEST_NAME
    fix = "delete that folder or choose another data root"
    if not manifest_path.is_file():
        raise BenchError(f"{folder} exists but has no {MANIFEST_NAME} (not written by the embedded generator): {fix}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        found = {key: manifest[key] for key in params}
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{manifest_path} is unreadable or incomplete: {fix}") from None
    if found != params:
        differences = ", ".join(f"{key} {found[key]} (requested {params[key]})"
                                for key in params if found[key] != params[key])
        raise BenchError(f"{folder} holds an embedded benchmark with {differences}: {fix}")
    return True


def check_version(folder: str | Path) -> None:
    """BenchError (naming the fix) unless ``folder`` holds a benchmark drawn by this generator version."""
    folder = Path(folder)
    try:
        found = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("generator_version")
    except (OSError, ValueError, AttributeError):
        raise BenchError(f"{folder} exists but has no readable {MANIFEST_NAME} (not written by the embedded "
                         f"generator): delete that folder or choose another data root") from None
    if found != GENERATOR_VERSION:
        raise BenchError(f"{folder} was drawn by embedded generator version {found}, this is version "
                         f"{GENERATOR_VERSION} (other classes): delete {folder} (it is drawn again in seconds) or "
                         f"choose another data root")


def _write_benchmark(folder: Path, params: dict[str, int], workers: int, progress: bool) -> None:
    """Draw every image into ``folder`` (new), then ``captions.jsonl``, then ``MANIFEST.json`` last."""
    seed, per_class, image_size = params["seed"], params["per_class"], params["image_size"]
    for domain in DOMAINS:
        for cls in CLASSES:
            (folder / domain / cls).mkdir(parents=True)
    tasks = [(seed, d, c, i, image_size)
             for d in range(len(DOMAINS)) for c in range(len(CLASSES)) for i in range(per_class)]
    records = []
    for record, png in _imap(_benchmark_item, tasks, workers, progress, desc="embedded benchmark"):
        (folder / record.path).write_bytes(png)
        records.append(record)
    records.sort()
    with open(folder / CAPTIONS_NAME, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"path": record.path, "caption": record.caption}) + "\n")
    manifest = {
        "name": DATASET_NAME,
        **params,
        "domains": list(DOMAINS),
        "classes": list(CLASSES),
        "unseen_classes": list(UNSEEN_CLASSES),
        "counts": {domain: per_class * len(CLASSES) for domain in DOMAINS},
        "num_images": len(records),
        "digest_method": _DIGEST_METHOD,
        "sha256": _digest(records),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def generate_benchmark(root: str | Path, per_class: int = 40, seed: int = 0, image_size: int = 32,
                       workers: int = 2, progress: bool = True) -> Path:
    """Write the benchmark to ``root/embedded`` and return that folder.

    Layout: ``<domain>/<class>/<i:05d>.png`` for every domain, every class (seen and unseen)
    and ``i < per_class``, plus ``captions.jsonl`` and ``MANIFEST.json``. The images are drawn
    into ``root/embedded.tmp-<pid>`` and moved into place in one rename, so a folder with a
    manifest is always complete. If the folder already holds a benchmark with the same
    generator version, seed, per_class and image_size this returns at once; if it holds
    anything else it raises :class:`BenchError` and touches nothing.
    """
    params = {"generator_version": GENERATOR_VERSION, "seed": _integer("seed", seed, 0),
              "per_class": _integer("per_class", per_class, 1), "image_size": _integer("image_size", image_size, 8)}
    workers = _integer("workers", workers, 1)
    root = Path(root)
    target = root / DATASET_NAME
    if _matches_existing(target, params):
        logger.info("%s already holds the embedded benchmark (seed %d, %d per class, %d px); not regenerating",
                    target, params["seed"], params["per_class"], params["image_size"])
        return target
    staging = root / f"{DATASET_NAME}.tmp-{os.getpid()}"
    if staging.exists():
        logger.warning("removing %s, left over by an interrupted run of this generator", staging)
        shutil.rmtree(staging)
    root.mkdir(parents=True, exist_ok=True)
    total = params["per_class"] * len(CLASSES) * len(DOMAINS)
    logger.info("drawing %d embedded images (%d px, seed %d) into %s with %d worker(s)",
                total, params["image_size"], params["seed"], target, workers)
    started = time.perf_counter()
    try:
        _write_benchmark(staging, params, workers, progress)
        try:
            os.replace(staging, target)
        except OSError:  # fine if another process has just published the same benchmark there
            if not _matches_existing(target, params):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    elapsed = time.perf_counter() - started
    logger.info("wrote %s: %d images in %.1f s (%.0f images/s)", target, total, elapsed, total / max(elapsed, 1e-9))
    return target

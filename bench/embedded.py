"""The "embedded" benchmark: a procedural, deterministic multi-domain image dataset.

Twenty-four classes (16 *seen* geometric shapes and 8 *unseen* pictograms, a
different shape family held out of fine-tuning for the zero-shot column) are
drawn in four domains -- ``photo``, ``sketch``, ``cartoon`` and ``painting`` --
with a random colour, size, background, position and a small rotation, each
image with a caption such as "a painting of a large red star on a striped
background".

Shapes are rasterised at ``_SUPERSAMPLE`` times the output size and reduced with
an anti-aliasing filter; colour, texture, noise and blur are then applied at the
output size with numpy: about 1,250 images/s per process at 32 px (PNG encoding
and writing included, a little under 1,000).

Two entry points write or build data:

* :func:`generate_benchmark` writes ``ROOT/embedded/<domain>/<class>/<i:05d>.png``
  (the DomainBed ImageFolder layout), ``captions.jsonl`` and ``MANIFEST.json``.
* :func:`generate_corpus` builds an in-memory caption corpus (a seed stream
  disjoint from the benchmark's) to pretrain a tiny CLIP and to serve as a
  retrieval pool; :func:`save_corpus` / :func:`load_corpus` store it as ``.npz``.

Every image's random generator is seeded from its own coordinates
(``[seed, stream, domain, class, index]`` or ``[seed, stream, index]``), so the
output is byte-identical whatever the number of worker processes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from bench.errors import BenchError
from bench.results import atomic_write

logger = logging.getLogger(__name__)

GENERATOR_VERSION: int = 2
"""Bump whenever drawing, captions or seeding change: existing folders then no longer match."""

DATASET_NAME = "embedded"
MANIFEST_NAME = "MANIFEST.json"
CAPTIONS_NAME = "captions.jsonl"

SEEN_CLASSES: tuple[str, ...] = (
    "triangle", "square", "pentagon", "circle", "star", "cross", "ring", "diamond",
    "semicircle", "trapezoid", "parallelogram", "crescent", "heart", "arrow", "hourglass", "chevron",
)
UNSEEN_CLASSES: tuple[str, ...] = (
    "house", "pine_tree", "key", "umbrella", "cup", "lightning_bolt", "cloud", "flag",
)
CLASSES: tuple[str, ...] = SEEN_CLASSES + UNSEEN_CLASSES
DOMAINS: tuple[str, ...] = ("photo", "sketch", "cartoon", "painting")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "gradient")

_PALETTE: Mapping[str, tuple[float, float, float]] = MappingProxyType({
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.96, 0.88, 0.14),
    "green": (0.16, 0.64, 0.20),
    "cyan": (0.10, 0.80, 0.86),
    "blue": (0.14, 0.28, 0.86),
    "purple": (0.55, 0.20, 0.76),
    "pink": (0.97, 0.52, 0.72),
})
COLORS: tuple[str, ...] = tuple(_PALETTE)

_SUPERSAMPLE = 4                       # shapes are rasterised at this multiple of the output size
_RADIUS = {"small": (0.20, 0.27), "large": (0.33, 0.42)}  # object radius, fraction of the width
_MAX_ROTATION = 15.0                   # degrees either way
_MAX_LOG_ASPECT = 0.1                  # horizontal/vertical stretch, exp(+-0.1)
_BENCHMARK_STREAM = 0xBE7C             # SeedSequence tags: the benchmark and corpus never share a stream
_CORPUS_STREAM = 0xC0A5

_COLOR_TEMPLATES = (
    "a {domain} of {article} {size} {color} {name} on a {background} background",
    "a {domain} of {article} {color} {name} on a {background} background",
    "a {domain} of {article} {size} {color} {name}",
    "a {domain} showing {article} {size} {color} {name} against a {background} background",
    "{article} {size} {color} {name} in a {domain} with a {background} background",
)
_SKETCH_TEMPLATES = (
    "a sketch of {article} {size} {name}",
    "a sketch of {article} {name}",
    "a rough sketch of {article} {size} {name}",
    "a pencil sketch of {article} {name}",
)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Part:
    """One closed polygon of a class's geometry, painted in order: solid adds, a hole cuts."""

    points: np.ndarray  # (N, 2) x, y; y points down, as in images
    solid: bool = True


def _arc(cx: float, cy: float, r: float, start: float, stop: float, n: int = 32) -> np.ndarray:
    """Points on a circular arc from angle ``start`` to ``stop`` (degrees, y down)."""
    angles = np.radians(np.linspace(start, stop, n))
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _circle(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    return _arc(cx, cy, r, 0.0, 360.0, n + 1)[:-1]


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _regular(sides: int, turn: float = 0.0) -> np.ndarray:
    """A regular polygon of circumradius 1 with a vertex at the top, turned by ``turn`` degrees."""
    return _arc(0.0, 0.0, 1.0, -90.0 + turn, 270.0 + turn, sides + 1)[:-1]


def _star(points: int, inner: float) -> np.ndarray:
    outer = _regular(points)
    between = _regular(points, 180.0 / points) * inner
    return np.stack([outer, between], axis=1).reshape(-1, 2)


def _crescent(offset: float = 0.5, inner: float = 0.85) -> np.ndarray:
    """A unit disc minus a disc of radius ``inner`` shifted right by ``offset``, as one outline."""
    x = (1.0 - inner**2 + offset**2) / (2.0 * offset)
    y = np.sqrt(1.0 - x**2)
    outer_angle = np.degrees(np.arctan2(y, x))
    inner_angle = np.degrees(np.arctan2(y, x - offset))
    return np.concatenate([
        _arc(0.0, 0.0, 1.0, outer_angle, 360.0 - outer_angle, 40),
        _arc(offset, 0.0, inner, 360.0 - inner_angle, inner_angle, 40)[1:-1],
    ])


def _heart(n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _mirrored(right_side: Sequence[tuple[float, float]]) -> np.ndarray:
    """A left-right symmetric outline from its right half, listed top to bottom."""
    right = np.array(right_side, dtype=float)
    left = right[::-1] * (-1.0, 1.0)
    return np.concatenate([right, left])


def _house() -> np.ndarray:
    return np.array([
        (0.0, -0.9), (0.35, -0.569), (0.35, -0.8), (0.55, -0.8), (0.55, -0.381),  # roof, chimney
        (0.95, -0.05), (0.6, -0.05), (0.6, 0.85),                                   # eave, wall
        (0.16, 0.85), (0.16, 0.3), (-0.16, 0.3), (-0.16, 0.85),                     # door
        (-0.6, 0.85), (-0.6, -0.05), (-0.95, -0.05),
    ])


def _pine_tree() -> np.ndarray:
    return _mirrored([
        (0.0, -1.0), (0.42, -0.45), (0.2, -0.45), (0.62, 0.08), (0.36, 0.08),
        (0.82, 0.6), (0.14, 0.6), (0.14, 1.0),
    ])


def _key() -> tuple[_Part, ...]:
    blade = [(-0.2, -0.14), (0.95, -0.14), (0.95, 0.36), (0.79, 0.36), (0.79, 0.14), (0.7, 0.14),
             (0.7, 0.46), (0.52, 0.46), (0.52, 0.14), (-0.2, 0.14)]
    return (_Part(_circle(-0.55, 0.0, 0.45)), _Part(_circle(-0.6, 0.0, 0.2), solid=False),
            _Part(np.array(blade)))


def _umbrella() -> tuple[_Part, ...]:
    canopy = _arc(0.0, 0.0, 1.0, 180.0, 360.0, 40)
    scallops = tuple(_Part(_circle(x, 0.0, 0.25, 24), solid=False) for x in (-0.75, -0.25, 0.25, 0.75))
    hook = np.concatenate([_arc(-0.18, 0.72, 0.24, 0.0, 180.0, 20), _arc(-0.18, 0.72, 0.12, 180.0, 0.0, 20)])
    return (_Part(canopy), *scallops, _Part(_rect(-0.06, -0.1, 0.06, 0.74)), _Part(hook))


def _cup() -> tuple[_Part, ...]:
    body = np.array([(-0.7, -0.6), (0.4, -0.6), (0.3, 0.62), (-0.6, 0.62)])
    return (_Part(_circle(0.38, 0.0, 0.4)), _Part(_circle(0.38, 0.0, 0.22), solid=False),
            _Part(body), _Part(_rect(-0.9, 0.62, 0.6, 0.76)))


def _lightning_bolt() -> np.ndarray:
    return np.array([(0.05, -1.0), (-0.5, 0.12), (-0.04, 0.12), (-0.25, 1.0),
                     (0.55, -0.18), (0.08, -0.18), (0.45, -1.0)])


def _cloud() -> tuple[_Part, ...]:
    return (_Part(_circle(-0.55, 0.15, 0.35)), _Part(_circle(-0.1, -0.1, 0.5)),
            _Part(_circle(0.5, 0.08, 0.42)), _Part(_rect(-0.55, 0.1, 0.5, 0.5)))


def _flag() -> tuple[_Part, ...]:
    x = np.linspace(-0.62, 0.85, 24)
    wave = 0.08 * np.sin((x + 0.62) * 4.3)
    top = np.stack([x, -0.92 + wave], axis=1)
    bottom = np.stack([x, -0.12 + wave], axis=1)[::-1]
    return (_Part(_rect(-0.75, -0.95, -0.62, 1.0)), _Part(_circle(-0.685, -0.98, 0.1, 16)),
            _Part(np.concatenate([top, bottom])))


def _normalized(parts: Iterable[_Part | np.ndarray]) -> tuple[_Part, ...]:
    """Parts centred on their bounding box and scaled to fit the unit disc (so rotation stays inside)."""
    parts = tuple(p if isinstance(p, _Part) else _Part(np.asarray(p, dtype=float)) for p in parts)
    solid = np.concatenate([p.points for p in parts if p.solid])
    centre = (solid.min(axis=0) + solid.max(axis=0)) / 2.0
    scale = np.linalg.norm(solid - centre, axis=1).max()
    return tuple(_Part((p.points - centre) / scale, p.solid) for p in parts)


_GEOMETRY: Mapping[str, tuple[_Part, ...]] = MappingProxyType({
    "triangle": _normalized([_regular(3)]),
    "square": _normalized([_regular(4, 45.0)]),
    "pentagon": _normalized([_regular(5)]),
    "circle": _normalized([_circle(0.0, 0.0, 1.0, 64)]),
    "star": _normalized([_star(5, 0.42)]),
    "cross": _normalized([_mirrored([(0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3), (0.3, 1.0)])]),
    "ring": _normalized([_Part(_circle(0.0, 0.0, 1.0, 64)), _Part(_circle(0.0, 0.0, 0.56, 48), solid=False)]),
    "diamond": _normalized([[(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]]),
    "semicircle": _normalized([_arc(0.0, 0.0, 1.0, 180.0, 360.0, 40)]),
    "trapezoid": _normalized([[(-0.5, -0.5), (0.5, -0.5), (1.0, 0.5), (-1.0, 0.5)]]),
    "parallelogram": _normalized([[(-0.5, -0.45), (1.0, -0.45), (0.5, 0.45), (-1.0, 0.45)]]),
    "crescent": _normalized([_crescent()]),
    "heart": _normalized([_heart()]),
    "arrow": _normalized([[(-1.0, -0.2), (0.15, -0.2), (0.15, -0.55), (1.0, 0.0), (0.15, 0.55), (0.15, 0.2),
                           (-1.0, 0.2)]]),
    "hourglass": _normalized([[(-0.7, -1.0), (0.7, -1.0), (0.1, 0.0), (0.7, 1.0), (-0.7, 1.0), (-0.1, 0.0)]]),
    "chevron": _normalized([[(-1.0, 0.35), (0.0, -0.6), (1.0, 0.35), (1.0, 0.8), (0.0, -0.15), (-1.0, 0.8)]]),
    "house": _normalized([_house()]),
    "pine_tree": _normalized([_pine_tree()]),
    "key": _normalized(_key()),
    "umbrella": _normalized(_umbrella()),
    "cup": _normalized(_cup()),
    "lightning_bolt": _normalized([_lightning_bolt()]),
    "cloud": _normalized(_cloud()),
    "flag": _normalized(_flag()),
})
assert tuple(_GEOMETRY) == CLASSES, "every class needs exactly one geometry, in class order"


# --------------------------------------------------------------------------- scenes and captions


@dataclass(frozen=True)
class Scene:
    """Everything random about one image except its pixel-level texture and noise.

    ``color`` and ``background`` are ``None`` in the sketch domain (grey ink on white paper).
    ``center`` and ``radius`` are fractions of the image width; ``rotation`` is in degrees.
    """

    cls: str
    domain: str
    color: str | None
    size: str
    background: str | None
    center: tuple[float, float]
    radius: float
    rotation: float
    aspect: float
    wording: int


def prompt_name(cls: str) -> str:
    """The words for a class folder in prompts and captions ("lightning_bolt" -> "lightning bolt")."""
    return cls.replace("_", " ")


def sample_scene(cls: str, domain: str, rng: np.random.Generator) -> Scene:
    """Draw a scene's colour, size, background, placement and caption wording from ``rng``."""
    if cls not in _GEOMETRY:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    color = COLORS[rng.integers(len(COLORS))]
    size = SIZES[rng.integers(len(SIZES))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    radius = float(rng.uniform(*_RADIUS[size]))
    aspect = float(np.exp(rng.uniform(-_MAX_LOG_ASPECT, _MAX_LOG_ASPECT)))
    extent = radius * max(aspect, 1.0 / aspect) + 0.01
    center = (float(rng.uniform(extent, 1.0 - extent)), float(rng.uniform(extent, 1.0 - extent)))
    rotation = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    sketch = domain == "sketch"
    wording = int(rng.integers(len(_SKETCH_TEMPLATES if sketch else _COLOR_TEMPLATES)))
    return Scene(cls=cls, domain=domain, color=None if sketch else color, size=size,
                 background=None if sketch else background, center=center, radius=radius,
                 rotation=rotation, aspect=aspect, wording=wording)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, name: str | None = None) -> str:
    """The scene's caption; it names the domain, the object and (outside sketches) the colour.

    name: the words for the object (default: the scene's class; the web corpus may say "shape" or
    another class, see :func:`generate_corpus`)."""
    template = (_SKETCH_TEMPLATES if scene.color is None else _COLOR_TEMPLATES)[scene.wording]
    fields = {"domain": scene.domain, "size": scene.size, "color": scene.color,
              "name": prompt_name(scene.cls) if name is None else name, "background": scene.background}
    following = template.split("{article} ", 1)[1].split(" ", 1)[0]  # the field after the article
    return template.format(article=_article(following.format(**fields)), **fields)


# --------------------------------------------------------------------------- rasterising


def _placed(scene: Scene, hi: int) -> tuple[_Part, ...]:
    """The class geometry stretched, rotated and moved to the scene's place, in supersampled pixels."""
    theta = np.radians(scene.rotation)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    stretch = np.array([scene.aspect, 1.0 / scene.aspect]) * scene.radius * hi
    offset = np.array(scene.center) * hi
    return tuple(_Part(p.points * stretch @ rotation + offset, p.solid) for p in _GEOMETRY[scene.cls])


def _densified(points: np.ndarray, step: float) -> np.ndarray:
    """A closed outline resampled so that no segment is longer than ``step``."""
    following = np.roll(points, -1, axis=0)
    counts = np.maximum(1, np.ceil(np.linalg.norm(following - points, axis=1) / step)).astype(int)
    index = np.repeat(np.arange(len(points)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(counts.sum()) - starts) / np.repeat(counts, counts)
    return points[index] + (following[index] - points[index]) * t[:, None]


def _wobbled(parts: Sequence[_Part], rng: np.random.Generator, amplitude: float, reach: float) -> tuple[_Part, ...]:
    """Parts with hand-drawn wobble: a smooth random displacement field plus a little per-point jitter.

    ``amplitude`` is in pixels; ``reach`` (the object's radius in pixels) sets the wobble's wavelength.
    """
    directions = rng.normal(size=(2, 2))
    wavelengths = rng.uniform(1.5, 4.0, size=2) * reach
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(2, 2))
    outlines = [_densified(part.points, reach / 6.0) for part in parts]
    points = np.concatenate(outlines)
    along = points @ directions.T * (2.0 * np.pi / wavelengths)
    field = np.stack([np.sin(along + phases[0]).sum(axis=1), np.cos(along + phases[1]).sum(axis=1)], axis=1)
    moved = points + amplitude * (0.5 * field + rng.normal(scale=0.25, size=points.shape))
    ends = np.cumsum([len(outline) for outline in outlines])[:-1]
    return tuple(_Part(p, part.solid) for p, part in zip(np.split(moved, ends), parts))


def _raster(parts: Sequence[_Part], hi: int) -> Image.Image:
    """The parts' silhouette at supersampled resolution (mode "L", 255 inside)."""
    canvas = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        draw.polygon(part.points.ravel().tolist(), fill=255 if part.solid else 0)
    return canvas


def _outline(silhouette: Image.Image, width: float, size: int) -> np.ndarray:
    """A band about ``width`` supersampled pixels wide on the silhouette's boundary, at ``size`` px in [0, 1].

    The band is where a Gaussian-blurred copy lies between 15% and 85%; it is found at half the
    supersampled resolution (four times cheaper) and box-filtered down, which anti-aliases it.
    """
    half = silhouette.reduce(2).filter(ImageFilter.GaussianBlur(float(width) / 2.0 / 2.07))
    blurred = np.asarray(half)
    band = ((blurred >= 38) & (blurred <= 217)).astype(np.float32)  # 15%..85% of 255
    factor = half.width // size
    return band.reshape(size, factor, size, factor).mean(axis=(1, 3))


def _reduced(mask: Image.Image, size: int) -> np.ndarray:
    """A supersampled mask box-filtered down to ``size`` pixels, as floats in [0, 1]."""
    return np.asarray(mask.reduce(mask.width // size), dtype=np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------- textures


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each of shape (size, size); cached, so read-only."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return tuple(_read_only(a) for a in np.meshgrid(centres, centres))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _pattern(background: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A background pattern in [0, 1] (0: first tone, 1: second tone), anti-aliased to one pixel."""
    x, y = _pixel_grid(size)
    unit = size / 32.0
    if background == "plain":
        return np.zeros((size, size), dtype=np.float32)
    if background == "striped":
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(4.0, 8.0) * unit
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period % 1.0
        return np.clip((0.25 - np.abs(phase - 0.5)) * period + 0.5, 0.0, 1.0)
    if background == "dotted":
        spacing = rng.uniform(5.0, 8.0) * unit
        radius = rng.uniform(1.0, 1.8) * unit
        ox, oy = rng.uniform(0.0, spacing, size=2)
        dx = ((x - ox) / spacing % 1.0 - 0.5) * spacing
        dy = ((y - oy) / spacing % 1.0 - 0.5) * spacing
        return np.clip(radius - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
    if background == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        return (ramp - ramp.min()) / (ramp.max() - ramp.min())
    raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")


@functools.lru_cache(maxsize=64)
def _interpolation(cells: int, size: int) -> np.ndarray:
    """A (size, cells + 1) matrix that smoothly interpolates ``cells + 1`` knots onto ``size`` pixels (cached)."""
    t = np.linspace(0.0, cells, size)
    low = np.minimum(t.astype(int), cells - 1)
    w = t - low
    w = w * w * (3.0 - 2.0 * w)
    matrix = np.zeros((size, cells + 1))
    matrix[np.arange(size), low] = 1.0 - w
    matrix[np.arange(size), low + 1] = w
    return _read_only(matrix)


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int], channels: int) -> np.ndarray:
    """Value noise with ``cells`` (rows, columns) unit-normal random knots, shape (size, size, channels)."""
    knots = rng.standard_normal((cells[0] + 1, cells[1] + 1, channels))
    return _separable(knots, _interpolation(cells[0], size), _interpolation(cells[1], size))


def _separable(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ image @ cols.T`` for every channel of an (H, W, C) image."""
    return (rows @ np.moveaxis(image, 2, 0) @ cols.T).transpose(1, 2, 0)


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """A (size, size) Gaussian blur matrix with mirrored edges (numpy's "reflect" padding)."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    columns = np.abs(np.arange(size)[:, None] + offsets)
    columns = np.where(columns > size - 1, 2 * (size - 1) - columns, columns)
    matrix = np.zeros((size, size))
    for column, tap in zip(columns.T, taps):  # a row may meet one column twice at a mirrored edge
        matrix[np.arange(size), column] += tap
    return matrix


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of an (H, W, C) float image (square), edges mirrored."""
    matrix = _blur_matrix(image.shape[0], sigma)
    return _separable(image, matrix, matrix)


def _two_tones(tones: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Blend a (2, 3) pair of RGB tones by a pattern into an (H, W, 3) image."""
    p = pattern[..., None]
    return tones[0] * (1.0 - p) + tones[1] * p


def _object_color(scene: Scene, rng: np.random.Generator, spread: float) -> np.ndarray:
    """The scene's palette colour, each channel scaled by a random factor around 1 (``spread``: its sd)."""
    base = np.array(_PALETTE[scene.color], dtype=np.float32)
    return np.clip(base * (1.0 + rng.normal(0.0, spread, size=3)), 0.0, 1.0)


# --------------------------------------------------------------------------- domains


def _paint_photo(scene: Scene, parts: Sequence[_Part], rng: np.random.Generator, size: int) -> np.ndarray:
    """Filled, shaded object with a drop shadow on a textured background; slight blur and sensor noise."""
    hi, unit = size * _SUPERSAMPLE, size / 32.0
    fill = _reduced(_raster(parts, hi), size)
    grey = rng.uniform(0.35, 0.85)
    first = np.clip(grey + rng.normal(0.0, 0.05, size=3), 0.0, 1.0)
    tones = np.stack([first, first * rng.uniform(0.65, 0.85)])
    background = _two_tones(tones, _pattern(scene.background, rng, size))
    background *= 1.0 + 0.12 * _smooth_noise(rng, size, (8, 8), 1) + 0.04 * rng.standard_normal((size, size, 1))
    shift = max(1, round(0.12 * scene.radius * size))  # shadow offset: about a tenth of the object's radius
    shadow = _blurred(np.roll(fill, (shift, shift), axis=(0, 1))[..., None], 1.2 * unit)
    background *= 1.0 - 0.45 * shadow

    x, y = _pixel_grid(size)
    cx, cy = np.array(scene.center) * size
    light = rng.uniform(np.radians(-160.0), np.radians(-110.0))
    reach = scene.radius * size
    along = ((x - cx) * np.cos(light) + (y - cy) * np.sin(light)) / reach
    spot = np.exp(-(((x - cx - 0.45 * reach * np.cos(light)) ** 2 + (y - cy - 0.45 * reach * np.sin(light)) ** 2)
                    / (2.0 * (0.25 * reach) ** 2)))
    shaded = _object_color(scene, rng, 0.06) * (1.0 + 0.25 * along)[..., None] + 0.2 * spot[..., None]

    f = fill[..., None]
    image = background * (1.0 - f) + shaded * f
    image = _blurred(image, rng.uniform(0.25, 0.55) * unit)
    return image + rng.normal(0.0, rng.uniform(0.015, 0.04), size=image.shape)


def _paint_sketch(scene: Scene, parts: Sequence[_Part], rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey or dark wobbly pencil strokes (one or two passes, sometimes hatching) on white paper."""
    hi, unit = size * _SUPERSAMPLE, size / 32.0
    reach = scene.radius * hi
    strokes = np.zeros((size, size), dtype=np.float32)
    for _ in range(1 + int(rng.random() < 0.6)):
        wobbled = _wobbled(parts, rng, rng.uniform(0.04, 0.09) * reach, reach)
        width = rng.uniform(0.9, 1.5) * _SUPERSAMPLE * unit
        strokes = np.maximum(strokes, rng.uniform(0.7, 1.0) * _outline(_raster(wobbled, hi), width, size))
    if rng.random() < 0.5:
        x, y = _pixel_grid(size)
        angle = rng.choice([np.radians(45.0), np.radians(135.0)]) + rng.uniform(-0.3, 0.3)
        period = rng.uniform(2.5, 3.5) * unit
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period % 1.0
        hatch = np.clip((0.15 - np.abs(phase - 0.5)) * period + 0.5, 0.0, 1.0)
        strokes = np.maximum(strokes, rng.uniform(0.25, 0.5) * hatch * _reduced(_raster(parts, hi), size))
    paper = rng.uniform(0.92, 1.0)
    ink = rng.uniform(0.05, 0.45)
    grey = paper - (paper - ink) * strokes + rng.normal(0.0, 0.012, size=strokes.shape)
    return np.repeat(grey[..., None], 3, axis=2)


def _paint_cartoon(scene: Scene, parts: Sequence[_Part], rng: np.random.Generator, size: int) -> np.ndarray:
    """Flat palette colour with a thick black outline on a pastel background; no noise, no blur."""
    hi, unit = size * _SUPERSAMPLE, size / 32.0
    silhouette = _raster(parts, hi)
    fill = _reduced(silhouette, size)[..., None]
    thinner_when_small = np.clip(scene.radius / _RADIUS["large"][1], 0.6, 1.0)
    width = rng.uniform(1.4, 2.0) * thinner_when_small * _SUPERSAMPLE * unit
    line = _outline(silhouette, width, size)[..., None]
    pastel = 0.72 + 0.25 * rng.random(3)
    tones = np.stack([pastel, pastel + (1.0 - pastel) * rng.uniform(0.4, 0.7)])
    background = _two_tones(tones, _pattern(scene.background, rng, size))
    image = background * (1.0 - fill) + np.array(_PALETTE[scene.color]) * fill
    return image * (1.0 - line) + 0.06 * line


def _paint_painting(scene: Scene, parts: Sequence[_Part], rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushy object and background: blotchy colour noise, directional streaks, soft edges and blur."""
    hi, unit = size * _SUPERSAMPLE, size / 32.0
    reach = scene.radius * hi
    wobbled = _wobbled(parts, rng, rng.uniform(0.02, 0.05) * reach, reach)
    fill = _reduced(_raster(wobbled, hi), size)[..., None]
    first = rng.uniform(0.3, 0.75) + rng.uniform(-0.15, 0.15, size=3)  # a muted hue
    tones = np.stack([first, first + rng.uniform(-0.2, 0.2, size=3)])
    background = _two_tones(tones, _pattern(scene.background, rng, size))
    streaks = (3, 12) if rng.random() < 0.5 else (12, 3)
    background += 0.08 * _smooth_noise(rng, size, (6, 6), 3) + 0.05 * _smooth_noise(rng, size, streaks, 3)
    paint = _object_color(scene, rng, 0.08) + 0.1 * _smooth_noise(rng, size, (5, 5), 3)
    paint += 0.06 * _smooth_noise(rng, size, streaks, 3)
    image = background * (1.0 - fill) + paint * fill
    image = _blurred(image, rng.uniform(0.45, 0.75) * unit)
    return image + rng.normal(0.0, 0.01, size=image.shape)


_PAINTERS: Mapping[str, Callable[[Scene, Sequence[_Part], np.random.Generator, int], np.ndarray]] = MappingProxyType({
    "photo": _paint_photo,
    "sketch": _paint_sketch,
    "cartoon": _paint_cartoon,
    "painting": _paint_painting,
})


def draw(scene: Scene, rng: np.random.Generator, image_size: int = 32) -> Image.Image:
    """Paint a scene as an RGB image of ``image_size`` pixels, texture and noise drawn from ``rng``."""
    parts = _placed(scene, image_size * _SUPERSAMPLE)
    pixels = _PAINTERS[scene.domain](scene, parts, rng, image_size)
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8), "RGB")


def render(cls: str, domain: str, rng: np.random.Generator, image_size: int = 32) -> tuple[Image.Image, str]:
    """Draw one image of ``cls`` in ``domain`` and its caption; deterministic given the state of ``rng``."""
    scene = sample_scene(cls, domain, rng)
    return draw(scene, rng, image_size), caption(scene)


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


# --------------------------------------------------------------------------- parallel drawing

_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


def _imap(function: Callable[[_Task], _Result], tasks: Sequence[_Task], workers: int, progress: bool,
          desc: str) -> Iterator[_Result]:
    """``map(function, tasks)`` in task order, on ``workers`` spawned processes (in this one when 1).

    A ``concurrent.futures`` process pool rather than ``multiprocessing.Pool``, which restarts
    workers that die at start-up forever (a hang) where this one fails at once.
    """
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            stack.callback(pool.shutdown, cancel_futures=True)
            results = pool.map(function, tasks, chunksize=max(1, min(256, len(tasks) // (8 * workers))))
        else:
            results = map(function, tasks)
        try:
            yield from tqdm(results, total=len(tasks), desc=desc, unit="img", disable=not progress, leave=False)
        except BrokenProcessPool as err:
            raise BenchError(f"embedded generator: a worker process died ({err}); if the caller is a script, "
                             f"guard it with `if __name__ == '__main__':`, or use workers=1") from None


def _integer(name: str, value: object, minimum: int) -> int:
    """``value`` as an int; BenchError naming the parameter unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BenchError(f"embedded generator: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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


# --------------------------------------------------------------------------- a picture of it


def preview(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A PNG of one image of every class (columns) in every domain (rows), labelled; returns its path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(len(CLASSES) * 0.62 + 0.9, len(DOMAINS) * 0.7 + 0.9), layout="constrained")
    axes = fig.subplots(len(DOMAINS), len(CLASSES), squeeze=False)
    for i, domain in enumerate(DOMAINS):
        for k, cls in enumerate(CLASSES):
            image, _ = render(cls, domain, np.random.default_rng([seed, i, k]), image_size)
            ax = axes[i][k]
            ax.imshow(np.asarray(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(prompt_name(cls).replace(" ", "\n"), fontsize=7,
                             color="black" if cls in SEEN_CLASSES else "#b03030")
            if k == 0:
                ax.set_ylabel(domain, fontsize=8)
    fig.suptitle(f"the embedded benchmark: {len(SEEN_CLASSES)} seen classes (black), {len(UNSEEN_CLASSES)} unseen "
                 f"(red), {len(DOMAINS)} domains, {image_size} px", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path

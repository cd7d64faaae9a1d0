"""The embedded benchmark's classes, domains and geometry, and the scenes and captions drawn from them.

Every class is one or more closed polygons (``_GEOMETRY``); a :class:`Scene` is everything random about one
image except its pixels (colour, size, background, placement, caption wording), drawn by :func:`sample_scene`.
Painting a scene is bench.embedded.paint's job."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import numpy as np

GENERATOR_VERSION: int = 2
"""Bump whenever drawing, captions or seeding change: existing folders then no longer match."""

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

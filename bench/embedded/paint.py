"""Painting a scene: its geometry rasterised, then the colour, texture, noise and blur of its domain.

Shapes are rasterised at ``_SUPERSAMPLE`` times the output size and reduced with an anti-aliasing filter;
the rest is numpy at the output size. :func:`draw` paints a scene, :func:`render` draws one and paints it,
:func:`preview` pictures every class in every domain."""
from __future__ import annotations

import functools
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench.embedded.shapes import (_GEOMETRY, _PALETTE, _RADIUS, _SUPERSAMPLE, BACKGROUNDS, CLASSES, DOMAINS,
                                   SEEN_CLASSES, UNSEEN_CLASSES, Scene, _Part, caption, prompt_name, sample_scene)


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

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

The package, one concept a module: :mod:`~bench.embedded.shapes` (classes, domains, geometry, scenes and
captions), :mod:`~bench.embedded.paint` (rasterising and the domains' painters, :func:`preview`),
:mod:`~bench.embedded.writer` (the benchmark folder, its manifest and digest), :mod:`~bench.embedded.corpus`
(the caption corpus) and :mod:`~bench.embedded.parallel` (drawing on worker processes). The names below are
the package's interface: import them from ``bench.embedded``.
"""
from __future__ import annotations

from bench.embedded.corpus import (GENERIC_NAMES, WEB_NAMED_SEEN, WEB_NAMED_UNSEEN, Corpus, generate_corpus,
                                   load_corpus, save_corpus)
from bench.embedded.paint import draw, preview, render
from bench.embedded.shapes import (BACKGROUNDS, CLASSES, COLORS, DOMAINS, GENERATOR_VERSION, SEEN_CLASSES, SIZES,
                                   UNSEEN_CLASSES, Scene, caption, prompt_name, sample_scene)
from bench.embedded.writer import (CAPTIONS_NAME, DATASET_NAME, MANIFEST_NAME, benchmark_digest, check_version,
                                   generate_benchmark)

# The process-pool workers by their names of before the package (bench/embedded.py): a process that imported that
# module pickles its workers as bench.embedded._corpus_item / bench.embedded._benchmark_item for spawned children.
from bench.embedded.corpus import _corpus_item  # noqa: F401
from bench.embedded.writer import _benchmark_item  # noqa: F401

__all__ = [
    "BACKGROUNDS", "CAPTIONS_NAME", "CLASSES", "COLORS", "Corpus", "DATASET_NAME", "DOMAINS", "GENERATOR_VERSION",
    "GENERIC_NAMES", "MANIFEST_NAME", "SEEN_CLASSES", "SIZES", "Scene", "UNSEEN_CLASSES", "WEB_NAMED_SEEN",
    "WEB_NAMED_UNSEEN", "benchmark_digest", "caption", "check_version", "draw", "generate_benchmark",
    "generate_corpus", "load_corpus", "prompt_name", "preview", "render", "sample_scene", "save_corpus",
]

"""Image-text pairs retrieved from an auxiliary corpus (ARF's image-text-pair anchors).

ARF (Han et al., CVPR 2024) adds (image, caption) pairs "retrieved from the dataset
similar to pretraining data of CLIP according to the downstream task" (CC3M in the
paper, per a third-party review) and trains on them with their original captions.
The retrieval criterion is unpublished (METHODS.md 1f marks it UNVERIFIED), so this
module fixes one and documents it:

    query_k   = normalize(mean_t g(template_t(class_k)))      the task's seen-class prompts (K, D)
    score(n)  = max_k  cos(query_k, pool_n)                    pool_n: a pair's CLIP embedding
    retrieve  = the k pairs of highest score, ties by lower index

``pool_n`` is the pair's caption embedding (``by="text"``, the default), its image
embedding (``by="image"``, which is the pretrained zero-shot classifier's confidence) or
the normalised sum of both (``by="both"``). ``per_class=True`` instead takes the
``k // K`` best pairs of each class and returns their union, so that every class is
represented even when a few classes dominate the pool.

Pools: :class:`PairPool` holds N pairs, images in memory (uint8 array) or as files,
built from the embedded caption corpus, a folder of image + same-stem ``.txt`` files
(img2dataset's layout), or a CSV/Parquet table. :func:`embed_pool` embeds every pair
with CLIP once and caches the result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import text
from bench.data import seeded_transform
from bench.errors import BenchError
from bench.results import atomic_write

if TYPE_CHECKING:
    from bench.models import Clip

log = logging.getLogger("bench.retrieval")  # its name before methods/arf/: CLI and job logs show bench.*

EMBED_CACHE_VERSION = 2  # 2: text encoded without unused padding columns (bench.text.encode_text): other rounding
BY = ("text", "image", "both", "random")  # random: k pairs drawn uniformly, no query (an ablation baseline)
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_CHUNK = 65536  # pool rows scored at once by `retrieve`


# --------------------------------------------------------------------------- the pool


class PairPool:
    """N (image, caption) pairs; images as an (N, H, W, 3) uint8 array or as N file paths.

    ``labels`` optionally holds a class index per pair (the embedded corpus has them), for
    diagnostics only: retrieval never reads it. ``source`` says where the pool came from.
    """

    def __init__(self, captions: Sequence[str], images: np.ndarray | None = None,
                 paths: Sequence[str] | None = None, labels: np.ndarray | None = None, source: str = ""):
        if (images is None) == (paths is None):
            raise ValueError("PairPool needs exactly one of images (an array) or paths")
        n = len(images) if images is not None else len(paths)
        if len(captions) != n or (labels is not None and len(labels) != n):
            raise ValueError(f"PairPool: {n} images but {len(captions)} captions"
                             f"{'' if labels is None else f' and {len(labels)} labels'}")
        if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
            raise ValueError(f"PairPool images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        self.captions = list(captions)
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.labels = labels
        self.source = source
        self._fingerprint: str | None = None

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_embedded_corpus(cls, corpus: Any) -> "PairPool":
        """The embedded caption corpus (an ``embedded.Corpus`` or the path of one saved by ``save_corpus``)."""
        from bench import embedded

        source = "embedded corpus"
        if isinstance(corpus, (str, Path)):
            source = f"embedded corpus {corpus}"
            corpus = embedded.load_corpus(corpus)
        return cls(corpus.captions, images=np.asarray(corpus.images), labels=np.asarray(corpus.labels), source=source)

    @classmethod
    def from_folder(cls, path: str | Path) -> "PairPool":
        """Image files under ``path`` (recursively, sorted) with a same-stem ``.txt`` caption beside each.

        Images without a caption file are skipped with a warning (img2dataset leaves none such,
        but hand-made folders may).
        """
        from bench.layouts import IMAGE_SUFFIXES

        folder = Path(path)
        if not folder.is_dir():
            raise BenchError(f"{folder}: no such folder of image-text pairs; fix the path")
        paths, captions, uncaptioned = [], [], []
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                uncaptioned.append(p)
                continue
            paths.append(str(p))
            captions.append(txt.read_text(encoding="utf-8").strip())
        if uncaptioned:
            log.warning("%s: skipped %d image(s) without a same-stem .txt caption, e.g. %s",
                        folder, len(uncaptioned), uncaptioned[0])
        if not paths:
            raise BenchError(f"{folder}: no image with a same-stem .txt caption found; a pair folder holds "
                             f"e.g. 000001.jpg with 000001.txt")
        return cls(captions, paths=paths, source=f"folder {folder}")

    @classmethod
    def from_table(cls, path: str | Path, image_column: str = "image", caption_column: str = "caption") -> "PairPool":
        """A CSV (or TSV) or Parquet table with an image path column and a caption column.

        Relative image paths are read against the table's folder. Parquet needs pyarrow.
        """
        import pandas as pd

        path = Path(path)
        if not path.is_file():
            raise BenchError(f"{path}: no such table of image-text pairs; fix the path")
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise BenchError(f"{path}: unknown table format {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
        try:
            if suffix in (".parquet", ".pq"):
                table = pd.read_parquet(path)
            else:
                table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except ImportError:
            raise BenchError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow "
                             f"(or convert the table to CSV)") from None
        except Exception as err:  # noqa: BLE001 - any unreadable table gets the same one-line answer
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise BenchError(f"{path}: unreadable table ({reason}); fix or re-export it") from None
        missing = [c for c in (image_column, caption_column) if c not in table.columns]
        if missing:
            raise BenchError(f"{path}: no column {missing[0]!r}; columns are {', '.join(map(str, table.columns))} "
                             f"(a pair table needs {image_column!r} and {caption_column!r})")
        if len(table) == 0:
            raise BenchError(f"{path}: the table has no rows")
        base = path.parent
        paths = [str(p) if os.path.isabs(p) else str(base / p) for p in table[image_column].astype(str)]
        captions = [str(c).strip() for c in table[caption_column]]
        return cls(captions, paths=paths, source=f"table {path}")

    # ---- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.captions)

    def caption(self, i: int) -> str:
        return self.captions[i]

    def image(self, i: int) -> Image.Image:
        """Pair ``i``'s image as an RGB PIL image; BenchError naming the file if it cannot be read."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise BenchError(f"{path}: cannot read image {i} of the pair pool ({self.source}): "
                             f"{type(err).__name__}; restore the file or drop it from the pool") from None

    def subset(self, indices: Sequence[int] | np.ndarray) -> "PairPool":
        """The pairs at ``indices``, in that order (e.g. the retrieved anchors)."""
        idx = np.asarray(indices, dtype=np.int64)
        return PairPool([self.captions[i] for i in idx],
                        images=self.images[idx] if self.images is not None else None,
                        paths=[self.paths[i] for i in idx] if self.paths is not None else None,
                        labels=self.labels[idx] if self.labels is not None else None,
                        source=f"{len(idx)} pairs of {self.source}")

    def fingerprint(self) -> str:
        """A sha256 of the pool's content: pixel bytes and captions, or file paths and captions.

        For file pools the files' bytes are not read (that would cost a pass over the pool),
        so an image replaced in place under the same name is not noticed.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(f"pairpool/1 n={len(self)}\n".encode())
            if self.images is not None:
                h.update(f"array {self.images.shape}\n".encode())
                h.update(np.ascontiguousarray(self.images).tobytes())
            else:
                for p in self.paths:
                    h.update(p.encode() + b"\0")
            for c in self.captions:
                h.update(c.encode() + b"\0")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"PairPool({len(self)} pairs, {self.source or 'in memory'})"


class PairItems(torch.utils.data.Dataset):
    """Pool pairs as a dataset: key -> (image tensor, caption, key index).

    Like ``bench.data.ImageItems``, a key may be an index into ``indices`` or (index, seed);
    with a seed the (random) transform runs under that seed.
    """

    def __init__(self, pool: PairPool, transform, indices: Sequence[int] | None = None):
        self.pool = pool
        self.transform = transform
        self.indices = np.arange(len(pool)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any):
        index, seed = key if isinstance(key, tuple) else (key, None)
        i = int(self.indices[index])
        return seeded_transform(self.transform, self.pool.image(i), seed), self.pool.caption(i), index


# --------------------------------------------------------------------------- embedding


def model_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 of a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        v = value.detach().cpu().contiguous()
        h.update(f"{name} {v.dtype} {tuple(v.shape)}\n".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embedding_key(clip: "Clip", pool: PairPool, transform: Any) -> str:
    """The cache key of :func:`embed_pool`: model name, pretrained, weights, transform and pool content.

    The weights are hashed too, so a checkpoint rewritten under the same name or tag
    (e.g. the shipped tiny CLIP after ``bench pretrain``) never reads stale embeddings.
    """
    ident = {"version": EMBED_CACHE_VERSION, "model": clip.name, "pretrained": str(clip.pretrained),
             "weights": model_fingerprint(clip.model), "transform": repr(transform), "pool": pool.fingerprint()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _collate(batch):
    xs, caps, idx = zip(*batch)
    return torch.stack(xs), list(caps), list(idx)


@torch.no_grad()
def encode_pool(clip: "Clip", pool: PairPool, transform: Any, batch_size: int = 256, num_workers: int = 0,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (image_emb, text_emb) of every pair, float32 (N, D) each; no caching."""
    from tqdm.auto import tqdm

    model = clip.model
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(PairItems(pool, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate)
    image_out, text_out = [], []
    was_training = model.training
    model.eval()
    try:
        for x, caps, _ in tqdm(loader, desc=f"embedding pool ({len(pool)} pairs)", unit="batch",
                               disable=not progress, leave=False):
            image_out.append(F.normalize(model.encode_image(x.to(device)).float(), dim=-1).cpu())
            text_out.append(F.normalize(text.encode_text(model, clip.tokenize(caps).to(device)).float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(image_out).numpy(), torch.cat(text_out).numpy()


def embed_pool(clip: "Clip", pool: PairPool, transform: Any = None, batch_size: int = 256,
               cache: str | Path | None = None, num_workers: int = 0,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised CLIP embeddings of every pair, both towers: (image_emb, text_emb), float32 (N, D).

    clip: a ``bench.models.Clip``; transform defaults to ``clip.preprocess_val``. Computed under
    no_grad in eval mode (the model's mode is restored). cache: a folder; the result is stored
    there as ``pool-emb-<key>.npz``, the key a hash of :func:`embedding_key`, and a later call
    with the same model, weights, transform and pool loads it instead of recomputing.
    """
    transform = clip.preprocess_val if transform is None else transform
    path = None
    if cache is not None:
        key = embedding_key(clip, pool, transform)
        path = Path(cache) / f"pool-emb-{key[:24]}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    if str(data["key"]) == key and len(data["image_emb"]) == len(pool):
                        log.info("pool embeddings of %s loaded from %s", pool, path)
                        return data["image_emb"], data["text_emb"]
            except (OSError, ValueError, KeyError):
                pass
            log.warning("%s is unreadable or stale; recomputing the pool embeddings", path)
    image_emb, text_emb = encode_pool(clip, pool, transform, batch_size, num_workers, progress)
    if path is not None:
        meta = json.dumps({"model": clip.name, "pretrained": str(clip.pretrained), "pool": pool.source,
                           "n": len(pool)})
        atomic_write(path, lambda out: np.savez(out, image_emb=image_emb, text_emb=text_emb, key=np.array(key),
                                                meta=np.array(meta)))
        log.info("pool embeddings of %s cached in %s", pool, path)
    return image_emb, text_emb


# --------------------------------------------------------------------------- retrieval


def class_queries(clip: "Clip", classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(K, D) template-averaged, renormalised class-prompt embeddings (the zero-shot head's rows)."""

    model = clip.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = text.raw_embeddings(lambda t: text.encode_text(model, t), clip.tokenize, list(classnames),
                                      list(templates), device)
    finally:
        model.train(was_training)
    return text.class_weights(raw).cpu().numpy().astype(np.float32)


def pool_embedding(image_emb: np.ndarray, text_emb: np.ndarray, by: str = "text") -> np.ndarray:
    """The embedding pairs are scored by: the caption's ('text'), the image's, or normalize(sum) ('both')."""
    if by == "text":
        return text_emb
    if by == "image":
        return image_emb
    if by == "both":
        s = np.asarray(image_emb, np.float32) + np.asarray(text_emb, np.float32)
        return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    raise BenchError(f"retrieval: by={by!r} unknown; choose one of {', '.join(BY)}")


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _best(scores: np.ndarray, index: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m entries of highest score, ties by lower index, in that order: (scores, indices)."""
    if len(scores) > m:
        threshold = np.partition(scores, len(scores) - m)[len(scores) - m]  # the m-th largest
        keep = scores >= threshold  # every tie at the threshold, so the index tie-break is exact
        scores, index = scores[keep], index[keep]
    order = np.lexsort((index, -scores))[:m]
    return scores[order], index[order]


def retrieve(query_emb: Any, pool_emb: Any, k: int, per_class: bool = False) -> np.ndarray:
    """Indices of the k pool rows nearest the queries, best first (int64).

    query_emb: (K, D) class-prompt embeddings; pool_emb: (N, D); both L2-normalised, so dot
    products are cosine similarities. A row's score is its highest similarity to any query;
    the k best rows are returned, ties broken by lower index. k > N returns all N.

    per_class: take the ``k // K`` best rows of each query instead and return their union
    without duplicates, ordered rank by rank (every class's best row, then every class's
    second, ...; classes in query order), so any prefix is balanced over classes. The union
    holds fewer than k rows when classes share rows.
    """
    q, p = _as_array(query_emb), _as_array(pool_emb)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"retrieve: need (K, D) queries and (N, D) pool embeddings, got {q.shape} and {p.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise BenchError(f"retrieval: k must be a positive integer, got {k!r}")
    n, num_classes = len(p), len(q)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if not per_class:
        best = np.concatenate([(p[s:s + _CHUNK] @ q.T).max(axis=1) for s in range(0, n, _CHUNK)])
        return _best(best, np.arange(n), min(int(k), n))[1].astype(np.int64)
    m = int(k) // num_classes
    if m < 1:
        raise BenchError(f"retrieval: k={k} is less than the {num_classes} classes, so per-class retrieval "
                         f"keeps nothing; raise k to at least {num_classes} or set per_class: false")
    m = min(m, n)
    top_s = [np.empty(0, np.float32) for _ in range(num_classes)]
    top_i = [np.empty(0, np.int64) for _ in range(num_classes)]
    for s in range(0, n, _CHUNK):
        scores = p[s:s + _CHUNK] @ q.T  # (chunk, K)
        rows = np.arange(s, s + len(scores))
        for c in range(num_classes):
            top_s[c], top_i[c] = _best(np.concatenate([top_s[c], scores[:, c]]), np.concatenate([top_i[c], rows]), m)
    ranked = np.stack(top_i, axis=1).reshape(-1)  # rank-major: row r holds every class's r-th best
    _, first = np.unique(ranked, return_index=True)
    return ranked[np.sort(first)].astype(np.int64)


def retrieve_for_task(clip: "Clip", classnames: Sequence[str], templates: Sequence[str], image_emb: np.ndarray,
                      text_emb: np.ndarray, k: int, by: str = "text", per_class: bool = False) -> np.ndarray:
    """:func:`retrieve` with the task's class prompts as queries and the pool scored ``by`` text/image/both;
    ``by="random"``: k rows drawn uniformly without replacement (seed 0; no query, so no similarity to the task),
    in draw order: ARF's retrieval ablation (docs/ARF.md)."""
    if by == "random":
        n = len(text_emb)
        return np.random.default_rng(0).choice(n, size=min(int(k), n), replace=False).astype(np.int64)
    return retrieve(class_queries(clip, classnames, templates), pool_embedding(image_emb, text_emb, by), k, per_class)

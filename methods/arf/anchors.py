"""ARF's anchors, computed once per sweep and shared by its jobs through content-keyed caches.

Every ARF job of a sweep needs the same expensive things: captions of its training images (a CoCa
pass), and the image-text pairs retrieved from the pool (a CLIP pass over 3 M pairs). They depend on
neither the held-out domain, the trial seed nor the draw, so they are computed once and stored under
``<data.root>/.rft-cache/``, each file named by a hash of what it was computed from:

=================================  ==========================================================================
file                               key (sha256 of)
=================================  ==========================================================================
``captions-<key>.jsonl``           the captioner's identity (model, decoding, sha256 of its weights file) and
                                   the listing of the card's trainable images (path, size, mtime: every
                                   domain's seen-class images; a shift card's training set)
``pool-index-<key>.npz``           the pool folder's listing (methods.arf.pools.pool_source_key), a table's
                                   sha256, or the embedded corpus's (n, seed, generator version)
``pool-emb-<key>.npz``             methods.arf.retrieval.embedding_key: CLIP name and weights, transform,
                                   pool content
``anchors-<key>.npz``              the pool's key, CLIP name and weights, transform, the card's seen class
                                   names and templates, top_k and retrieve_by: the retrieved pairs themselves
``digests/<path hash>.json``       a weights file's sha256, remembered by (path, size, mtime)
=================================  ==========================================================================

Each is written once, atomically (a temporary file and one rename), under an exclusive ``fcntl.flock``
on ``<file>.lock``: jobs that start together compute it once, the others wait and read it.
``bench prepare-anchors SWEEP`` fills the caches before launch (:func:`prepare_sweep`); a job that finds
them reads the captions of its own training images and the retrieved pairs, and never loads the pool.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from bench.errors import BenchError
from bench.results import atomic_write

log = logging.getLogger("bench.anchors")  # its name before methods/arf/: CLI and job logs show bench.*

CACHE_VERSION = 1
CACHE_FOLDER = ".rft-cache"


def cache_dir(root: str | Path) -> Path:
    return Path(root) / CACHE_FOLDER


def content_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- compute once, under a lock


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``<path>.lock`` (released when the holder exits, even by a crash)."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.info("waiting for another process computing %s", path)
            t0 = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("%s: waited %.0f s", path, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compute_once(path: Path, compute: Callable[[], Any], save: Callable[[Path, Any], None],
                 load: Callable[[Path], Any]) -> Any:
    """``load(path)`` if it is there, else compute and ``save`` it under the lock; concurrent callers wait for
    the first one and load its file. An unreadable file is recomputed (with a warning)."""
    def try_load():
        if not path.is_file():
            return None
        try:
            return (load(path),)
        except (OSError, ValueError, KeyError, BenchError) as err:
            log.warning("%s is unreadable (%s); recomputing it", path, type(err).__name__)
            return None

    hit = try_load()
    if hit is not None:
        return hit[0]
    with file_lock(path):
        hit = try_load()
        if hit is not None:
            return hit[0]
        value = compute()
        save(path, value)
        return value


# --------------------------------------------------------------------------- weights digests


def file_sha256(path: str | Path, cache: str | Path | None = None) -> str:
    """sha256 of a file, remembered under ``<cache>/digests/`` by (real path, size, mtime) so a 2 GB checkpoint
    is read once, not by every job."""
    from bench.models import sha256_file

    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = Path(cache) / "digests" / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.json" if cache else None
    if memo is not None and memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["sha256"]
        except (OSError, ValueError):
            pass
    digest = sha256_file(real)
    if memo is not None:
        atomic_write(memo, lambda f: f.write(json.dumps({**stamp, "sha256": digest})), mode="w")
    return digest


# --------------------------------------------------------------------------- captions


def anchor_image_paths(card, root: str | Path) -> list[str]:
    """Every image some job of a sweep may train on: the seen-class images of every domain (each domain is
    a training domain of some job); for a protocol: shift card, its training set."""
    from bench.layouts import scan_domain, scan_set

    if card.protocol == "shift":
        return [p for p, _ in scan_set(root, card, card.train_domain)[0]]
    seen = {card.classes.index(c) for c in card.seen_classes}
    return [p for d in card.domains for p, k in scan_domain(root, card, d) if k in seen]


def listing_key(paths: Sequence[str], root: str | Path) -> str:
    """sha256 of the sorted (path relative to root, size, mtime) of every image."""
    base = os.path.abspath(root)  # string operations only: a realpath per image costs an lstat per component
    h = hashlib.sha256(b"listing/1\n")
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{os.path.relpath(os.path.abspath(p), base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def captioner_identity(spec: Any, root: str | Path, where: str = "hparams.captioner",
                       fetch: bool = True) -> dict:
    """What a captioner's captions depend on, without loading it: the kind, the model and decoding options,
    and the sha256 of the weights file (a CoCa tag not in the local cache is downloaded first when ``fetch``)."""
    from bench.models import cached_weights, download_hint
    from methods.arf.captioning import parse_captioner

    kind, opts = parse_captioner(spec, root, where)
    if kind == "embedded":
        from bench import embedded

        path = Path(root) / embedded.DATASET_NAME / embedded.CAPTIONS_NAME
        return {"kind": kind, "sha256": file_sha256(path, cache_dir(root)) if path.is_file() else None}
    if kind == "file":
        return {"kind": kind, "sha256": file_sha256(opts["file"], cache_dir(root)), "base": opts["base"]}
    ident = {"kind": kind, **{k: v for k, v in opts.items() if k != "batch_size"}}
    if opts["pretrained"] is not None:
        try:
            weights = cached_weights(opts["model"], opts["pretrained"])
        except BenchError as err:
            raise BenchError(f"{where}: {err}") from None
        if weights is None and fetch:
            import open_clip

            try:
                weights = open_clip.download_pretrained(open_clip.get_pretrained_cfg(opts["model"], opts["pretrained"]))
            except Exception as err:  # noqa: BLE001 - HF / urllib errors when offline
                raise BenchError(f"{where}: {opts['model']}/{opts['pretrained']} is not in the local cache and could "
                                 f"not be downloaded ({type(err).__name__}); "
                                 f"{download_hint(opts['model'], opts['pretrained'])}") from None
        if weights is None:
            raise BenchError(f"{where}: {opts['model']}/{opts['pretrained']} is not in the local cache; "
                             f"{download_hint(opts['model'], opts['pretrained'])}")
        ident["pretrained"] = os.path.basename(str(opts["pretrained"]))  # the path is not content
        ident["weights_sha256"] = file_sha256(weights, cache_dir(root))
    return ident


def card_captions(spec: Any, card, root: str | Path, device: Any = "cpu", progress: bool = True,
                  where: str = "hparams.captioner") -> dict[str, str]:
    """Captions of every image of :func:`anchor_image_paths`, computed once per (captioner identity, listing)
    and cached as ``captions-<key>.jsonl`` (paths relative to ``root``). A CoCa pass saves its progress in
    ``<file>.partial`` every minute, so an interrupted one resumes."""
    from methods.arf.captioning import build_captioner, caption_items, read_jsonl, write_jsonl_atomic

    root = Path(root)
    paths = anchor_image_paths(card, root)
    key = content_key("captions", captioner_identity(spec, root, where), card.name, listing_key(paths, root))
    path = cache_dir(root) / f"captions-{key[:24]}.jsonl"
    base = os.path.abspath(root)

    def compute():
        captioner = build_captioner(spec, root, device=device, where=where)
        log.info("captioning %d images of %s with %s (once; cached in %s)", len(paths), card.name, captioner.name, path)
        return caption_items(captioner, paths, cache=path.with_name(path.name + ".partial"), progress=progress)

    def save(p, captions):
        write_jsonl_atomic(p, [{"path": os.path.relpath(os.path.abspath(k), base), "caption": v}
                               for k, v in captions.items()])
        Path(f"{p}.partial").unlink(missing_ok=True)

    def load(p):
        return {os.path.join(base, row["path"]): row["caption"] for row in read_jsonl(p, "caption cache")}

    def compute_keyed():
        return {os.path.abspath(k): v for k, v in compute().items()}

    return compute_once(path, compute_keyed, save, load)


def captions_for(spec: Any, card, root: str | Path, paths: Sequence[str], device: Any = "cpu",
                 progress: bool = True, where: str = "hparams.captioner") -> list[str]:
    """The captions of ``paths`` (a job's training images). A captions file or the embedded captions are read
    as they are; a CoCa captioner's come from the card-wide cache (:func:`card_captions`)."""
    from methods.arf.captioning import EmbeddedCaptioner, FileCaptioner, parse_captioner

    kind, opts = parse_captioner(spec, root, where)
    if kind == "embedded":
        return EmbeddedCaptioner(root).caption(list(paths))
    if kind == "file":
        return FileCaptioner(opts["file"], base=opts["base"]).caption(list(paths))
    captions = card_captions(spec, card, root, device, progress, where)
    keys = [os.path.abspath(p) for p in paths]  # the cache's paths are data.root + a relative path, as these are
    missing = [p for p in keys if p not in captions]
    if missing:
        raise BenchError(f"{where}: the caption cache of {card.name} lacks {missing[0]}; the images changed while it "
                         f"was written: re-run `bench prepare-anchors`")
    return [captions[p] for p in keys]


# --------------------------------------------------------------------------- the pool and retrieval


def resolve_pool(spec: str, root: str | Path) -> str | Path:
    """'embedded', or the pool's path (relative paths are read against the data root)."""
    if spec == "embedded":
        return spec
    path = Path(spec)
    return path if path.is_absolute() else Path(root) / path


def pool_key(spec: str, root: str | Path, n: int, seed: int) -> str:
    """What a pool holds, cheaply (no caption is read): see the module doc."""
    from bench import embedded
    from methods.arf.pools import pool_source_key

    where = resolve_pool(spec, root)
    if where == "embedded":
        return content_key("pool", "embedded", n, seed, embedded.GENERATOR_VERSION)
    if where.is_dir():
        return content_key("pool", "folder", pool_source_key(where))
    if where.is_file():
        return content_key("pool", "table", file_sha256(where, cache_dir(root)))
    raise BenchError(f"hparams.pool: {where} not found; download the pool (docs/ARF.md) or fix the path "
                     f"(relative paths are read against data.root)")


def load_pool(spec: str, root: str | Path, n: int = 20000, seed: int = 1, progress: bool = True):
    """The whole pool, its index read once per pool key (``pool-index-<key>.npz``)."""
    from methods.arf.pools import pool_from_arrays, pool_to_arrays, scan_pool
    from methods.arf.retrieval import TABLE_SUFFIXES, PairPool

    where = resolve_pool(spec, root)
    if where == "embedded":
        from methods.arf import embedded_corpus_pool

        return embedded_corpus_pool(Path(root), n, seed)
    if not where.is_dir() and where.suffix.lower() not in TABLE_SUFFIXES:
        raise BenchError(f"hparams.pool: {spec!r} is not 'embedded', a pool folder (img2dataset's files or "
                         f"webdataset output) or a CSV/Parquet table of (image, caption); fix the path")
    path = cache_dir(root) / f"pool-index-{pool_key(spec, root, n, seed)[:24]}.npz"

    def compute():
        return scan_pool(where, progress) if where.is_dir() else PairPool.from_table(where)

    def load(p):
        with np.load(p, allow_pickle=False) as data:
            return pool_from_arrays(data)

    return compute_once(path, compute, lambda p, pool: atomic_write(p, lambda f: np.savez(f, **pool_to_arrays(pool))),
                        load)


def embed_pool_once(clip, pool, root: str | Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """methods.arf.retrieval.embed_pool with its cache file computed once under a lock."""
    from methods.arf.retrieval import embed_pool, embedding_key

    folder = cache_dir(root)
    path = folder / f"pool-emb-{embedding_key(clip, pool, clip.preprocess_val)[:24]}.npz"
    with file_lock(path):
        return embed_pool(clip, pool, clip.preprocess_val, cache=folder, progress=progress)


@dataclass(frozen=True)
class RetrievalSpec:
    pool: str
    pool_size: int
    pool_seed: int
    top_k: int
    retrieve_by: str


def retrieved_pairs(spec: RetrievalSpec, clip, classnames: Sequence[str], templates: Sequence[str],
                    root: str | Path, progress: bool = True):
    """The pool pairs nearest the task's class prompts (methods.arf.retrieval.retrieve_for_task, with the zero-shot
    CLIP): (their indices in the pool, a PairPool of them in that order); computed once per key and stored with their captions and image
    references (``anchors-<key>.npz``), so a job reads k pairs and never the pool."""
    import torch

    from methods.arf.pools import pool_from_arrays, pool_to_arrays
    from methods.arf.retrieval import model_fingerprint, retrieve_for_task

    key = content_key("anchors", pool_key(spec.pool, root, spec.pool_size, spec.pool_seed), clip.name,
                      model_fingerprint(clip.model), repr(clip.preprocess_val), list(classnames), list(templates),
                      spec.top_k, spec.retrieve_by)
    path = cache_dir(root) / f"anchors-{key[:24]}.npz"

    def compute():
        pool = load_pool(spec.pool, root, spec.pool_size, spec.pool_seed, progress)
        with torch.no_grad():
            image_emb, text_emb = embed_pool_once(clip, pool, root, progress)
            idx = retrieve_for_task(clip, classnames, templates, image_emb, text_emb, min(spec.top_k, len(pool)),
                                    by=spec.retrieve_by)
        log.info("retrieved %d of %d pairs of %s", len(idx), len(pool), pool)
        return idx, pool.subset(idx)

    def save(p, value):
        idx, sub = value
        atomic_write(p, lambda f: np.savez(f, indices=idx, **pool_to_arrays(sub)))

    def load(p):
        with np.load(p, allow_pickle=False) as data:
            return data["indices"], pool_from_arrays(data)

    return compute_once(path, compute, save, load)


# --------------------------------------------------------------------------- before launch


def check_arf_resources(hparams, root: str | Path) -> None:
    """What an ARF run reads from disk is there: BenchError naming the hparam, the path and how to get it."""
    from bench.models import cached_weights, download_hint
    from methods.arf.captioning import parse_captioner

    if hparams.caption_anchors:
        kind, opts = parse_captioner(hparams.captioner, root, "hparams.captioner")
        if kind == "file" and not os.path.isfile(opts["file"]):
            raise BenchError(f"hparams.captioner: captions file {opts['file']} not found; caption the images "
                             f"(docs/ARF.md) or fix the path (relative paths are read against data.root)")
        if kind == "coca" and opts["pretrained"] is not None:
            try:
                weights = cached_weights(opts["model"], opts["pretrained"])
            except BenchError as err:
                raise BenchError(f"hparams.captioner: {err}") from None
            if weights is None:
                raise BenchError(f"hparams.captioner: {opts['model']}/{opts['pretrained']} is not in the local "
                                 f"open_clip / Hugging Face cache (offline); "
                                 f"{download_hint(opts['model'], opts['pretrained'])}")
    if hparams.retrieval_anchors and hparams.pool != "embedded":
        from methods.arf.pools import detect_layout

        where = resolve_pool(hparams.pool, root)
        if where.is_dir():
            try:
                detect_layout(where)
            except BenchError as err:
                raise BenchError(f"hparams.pool: {err}") from None
        elif not where.is_file():
            raise BenchError(f"hparams.pool: {where} not found; download the pool with img2dataset (docs/ARF.md) "
                             f"or fix the path (relative paths are read against data.root)")


def prepare_sweep(jobs, device: str | None = None, progress: bool = True) -> list[str]:
    """Fill the caches of every distinct ARF anchor input of these jobs (bench prepare-anchors); one line each."""
    import torch

    from bench.cards import load_card, split_classes
    from bench.layouts import ensure_generated
    from bench.models import load_clip
    from bench.prepare import resolve_device

    groups: dict[str, Any] = {}
    for job in jobs:
        if job.cfg.method != "arf":
            continue
        h = job.hparams
        cfg = job.cfg
        ident = (cfg.data.dataset, cfg.data.root, cfg.data.classes, cfg.model.name, cfg.model.pretrained,
                 h["caption_anchors"] and h["captioner"], h["retrieval_anchors"] and
                 (h["pool"], h["pool_size"], h["pool_seed"], h["top_k"], h["retrieve_by"]))
        groups.setdefault(json.dumps(ident, default=str), (job, ident))
    lines, clips = [], {}
    for job, ident in groups.values():
        cfg, h = job.cfg, job.hparams
        dev = torch.device(device) if device else resolve_device(cfg.train.device)
        card = split_classes(load_card(cfg.data.dataset), cfg.data.classes)
        ensure_generated(card, cfg.data.root, progress)
        t0 = time.perf_counter()
        parts = []
        if h["caption_anchors"]:
            n = len(card_captions(h["captioner"], card, cfg.data.root, dev, progress))
            parts.append(f"{n} captions ({h['captioner']})")
        if h["retrieval_anchors"]:
            model = (cfg.model.name, cfg.model.pretrained)
            if model not in clips:
                clips.clear()  # one CLIP in memory at a time
                clips[model] = load_clip(*model, dev)
            spec = RetrievalSpec(h["pool"], h["pool_size"], h["pool_seed"], h["top_k"], h["retrieve_by"])
            _, sub = retrieved_pairs(spec, clips[model], card.prompt_names(card.seen_classes), card.templates,
                                  cfg.data.root, progress)
            parts.append(f"{len(sub)} pairs retrieved from {h['pool']}")
        lines.append(f"{cfg.data.dataset} ({cfg.model.name}/{cfg.model.pretrained}): {', '.join(parts) or 'nothing'}"
                     f" in {time.perf_counter() - t0:.1f} s -> {cache_dir(cfg.data.root)}")
    return lines

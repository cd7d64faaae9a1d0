"""Image-text pools on disk in the layouts img2dataset writes (CC3M, CC12M), indexed once.

img2dataset (rom1504/img2dataset) writes, under its ``--output_folder``:

* ``--output_format files``: shard folders ``00000/`` holding ``000000000.jpg`` + ``000000000.txt``
  (the caption) + ``000000000.json`` (metadata), and beside them ``00000.parquet`` and
  ``00000_stats.json`` (ignored here);
* ``--output_format webdataset``: shards ``00000.tar`` whose members are ``000000000.jpg`` /
  ``.txt`` / ``.json``, with the same ``.parquet`` and ``_stats.json`` files beside them.

:func:`scan_pool` reads either (or a plain folder of image + same-stem ``.txt`` files) into a
:class:`methods.arf.retrieval.PairPool`. Tar members are never extracted: a pair keeps (shard, byte offset,
size) and its image is decoded from those bytes when asked for (:class:`ShardPool`).

:func:`pool_source_key` says cheaply (without reading captions) what a pool folder holds: shard names,
sizes and modification times for tar shards; the file names of every shard folder for the files layout
(3.3 M pairs: no stat per file, see docs/ARF.md); names, sizes and times for a flat folder.
:func:`pool_to_arrays` / :func:`pool_from_arrays` store a pool (or a subset of one) in an ``.npz``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from bench.layouts import IMAGE_SUFFIXES
from bench.errors import BenchError
from methods.arf.retrieval import PairPool

log = logging.getLogger("bench.pools")  # its name before methods/arf/: CLI and job logs show bench.*

LAYOUTS = ("webdataset", "files", "flat")


class ShardPool(PairPool):
    """Pairs whose images are members of tar shards: (shard index, byte offset, size), decoded on access."""

    def __init__(self, captions: Sequence[str], shards: Sequence[str], shard_index, offsets, sizes,
                 names: Sequence[str], source: str = ""):
        self.shards = [str(s) for s in shards]
        self.shard_index = np.asarray(shard_index, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.names = list(names)
        refs = [f"{self.shards[t]}//{n}" for t, n in zip(self.shard_index.tolist(), self.names)]
        super().__init__(captions, paths=refs, source=source)

    def image(self, i: int) -> Image.Image:
        shard = self.shards[self.shard_index[i]]
        try:
            with open(shard, "rb") as f:
                f.seek(int(self.offsets[i]))
                data = f.read(int(self.sizes[i]))
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise BenchError(f"{shard}: cannot read member {self.names[i]} (pair {i} of {self.source}): "
                             f"{type(err).__name__}; re-download the shard or delete it from the pool") from None

    def subset(self, indices) -> "ShardPool":
        idx = np.asarray(indices, dtype=np.int64)
        return ShardPool([self.captions[i] for i in idx], self.shards, self.shard_index[idx], self.offsets[idx],
                         self.sizes[idx], [self.names[i] for i in idx], source=f"{len(idx)} pairs of {self.source}")


# --------------------------------------------------------------------------- layouts


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def detect_layout(folder: str | Path) -> str:
    """'webdataset' (``*.tar`` shards), 'files' (shard folders) or 'flat' (image + .txt files); BenchError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchError(f"{folder}: no such pool folder; download the pool (docs/ARF.md) or fix hparams.pool")
    entries = _entries(folder)
    if any(e.name.endswith(".tar") and e.is_file() for e in entries):
        return "webdataset"
    if any(e.is_dir() for e in entries):
        return "files"
    if any(_is_image(e.name) for e in entries):
        return "flat"
    raise BenchError(f"{folder}: no tar shards, shard folders or images found; a pool folder is what img2dataset "
                     f"writes (output_format files or webdataset, docs/ARF.md)")


def pool_source_key(folder: str | Path) -> str:
    """A sha256 of what a pool folder holds, read without opening a caption (see the module doc)."""
    folder = Path(folder)
    layout = detect_layout(folder)
    h = hashlib.sha256(f"pool-source/1 {layout}\n".encode())
    for e in _entries(folder):
        if layout == "webdataset" and e.name.endswith(".tar") and e.is_file():
            st = e.stat()
            h.update(f"{e.name} {st.st_size} {st.st_mtime_ns}\n".encode())
        elif layout == "files" and e.is_dir():
            h.update(f"[{e.name}] {e.stat().st_mtime_ns}\n".encode())
            for name in sorted(n.name for n in _entries(Path(e.path))):
                h.update(name.encode() + b"\n")
        elif layout == "flat" and e.is_file():
            st = e.stat()
            h.update(f"{e.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _pairs_in_folder(folder: Path) -> tuple[list[str], list[str], int]:
    """(image paths, captions, images without a caption) of one folder of image + same-stem .txt files."""
    entries = _entries(folder)
    names = {e.name for e in entries}
    paths, captions, uncaptioned = [], [], 0
    for e in entries:
        if not _is_image(e.name):
            continue
        txt = os.path.splitext(e.name)[0] + ".txt"
        if txt not in names:
            uncaptioned += 1
            continue
        paths.append(e.path)
        with open(os.path.join(folder, txt), encoding="utf-8") as f:
            captions.append(f.read().strip())
    return paths, captions, uncaptioned


def read_tar_shard(path: str | Path) -> tuple[list[str], list[int], list[int], list[str]]:
    """(image member names, data offsets, sizes, captions) of one webdataset shard; samples without both an image
    and a ``.txt`` member are skipped. Only the captions' bytes are read."""
    images: dict[str, tuple[str, int, int]] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                stem, ext = os.path.splitext(m.name)
                if ext.lower() in IMAGE_SUFFIXES:
                    images[stem] = (m.name, m.offset_data, m.size)
                elif ext == ".txt":
                    captions[stem] = tf.extractfile(m).read().decode("utf-8").strip()
    except (tarfile.TarError, OSError) as err:
        raise BenchError(f"{path}: not a readable tar shard ({type(err).__name__}: {err}); re-download it or "
                         f"delete it from the pool") from None
    keys = [k for k in sorted(images) if k in captions]
    return ([images[k][0] for k in keys], [images[k][1] for k in keys], [images[k][2] for k in keys],
            [captions[k] for k in keys])


def scan_pool(folder: str | Path, progress: bool = True) -> PairPool:
    """Every (image, caption) pair of a pool folder, in shard then key order (reads every caption once)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    layout = detect_layout(folder)
    entries = _entries(folder)
    if layout == "webdataset":
        shards = [e.path for e in entries if e.name.endswith(".tar") and e.is_file()]
        caps, idx, offs, sizes, names = [], [], [], [], []
        for t, shard in enumerate(tqdm(shards, desc=f"indexing {folder.name}", unit="shard",
                                       disable=not progress, leave=False)):
            n, o, s, c = read_tar_shard(shard)
            names += n
            offs += o
            sizes += s
            caps += c
            idx += [t] * len(n)
        if not caps:
            raise BenchError(f"{folder}: its tar shards hold no image with a .txt caption; re-download the pool")
        return ShardPool(caps, shards, idx, offs, sizes, names, source=f"webdataset {folder}")
    folders = [Path(e.path) for e in entries if e.is_dir()] if layout == "files" else [folder]
    paths, caps, uncaptioned = [], [], 0
    for sub in tqdm(folders, desc=f"indexing {folder.name}", unit="shard", disable=not progress or len(folders) < 2,
                    leave=False):
        p, c, u = _pairs_in_folder(sub)
        paths += p
        caps += c
        uncaptioned += u
    if uncaptioned:
        log.warning("%s: skipped %d image(s) without a same-stem .txt caption", folder, uncaptioned)
    if not paths:
        raise BenchError(f"{folder}: no image with a same-stem .txt caption found; a pool folder holds e.g. "
                         f"00000/000000000.jpg with 00000/000000000.txt (img2dataset output_format files)")
    return PairPool(caps, paths=paths, source=f"{layout} folder {folder}")


# --------------------------------------------------------------------------- storing a pool


def _utf8_json(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def _from_utf8_json(arr: np.ndarray):
    return json.loads(arr.tobytes().decode("utf-8"))


def pool_to_arrays(pool: PairPool) -> dict[str, np.ndarray]:
    """A pool as arrays for ``np.savez`` (strings as UTF-8 JSON bytes); :func:`pool_from_arrays` reads them."""
    out = {"captions": _utf8_json(pool.captions), "source": _utf8_json(pool.source)}
    if isinstance(pool, ShardPool):
        out.update(kind=_utf8_json("shards"), shards=_utf8_json(pool.shards), names=_utf8_json(pool.names),
                   shard_index=pool.shard_index, offsets=pool.offsets, sizes=pool.sizes)
    elif pool.images is not None:
        out.update(kind=_utf8_json("array"), images=pool.images)
    else:
        out.update(kind=_utf8_json("paths"), paths=_utf8_json(pool.paths))
    if pool.labels is not None:
        out["labels"] = np.asarray(pool.labels)
    return out


def pool_from_arrays(data) -> PairPool:
    kind, captions, source = (_from_utf8_json(data[k]) for k in ("kind", "captions", "source"))
    labels = data["labels"] if "labels" in data else None
    if kind == "shards":
        return ShardPool(captions, _from_utf8_json(data["shards"]), data["shard_index"], data["offsets"],
                         data["sizes"], _from_utf8_json(data["names"]), source=source)
    if kind == "array":
        return PairPool(captions, images=np.asarray(data["images"]), labels=labels, source=source)
    return PairPool(captions, paths=_from_utf8_json(data["paths"]), labels=labels, source=source)

"""The result rows of done jobs, parsed fast and kept in <root>/.bench-table-cache.npz (numpy arrays and JSON;
no pickle): a later call parses only the results files whose size or modification time changed.

    rows = load_rows(root, [(job index, run folder), ...], skipped, use_cache=True)

Called by bench.collect.load; this module imports no torch.
"""
from __future__ import annotations

import json
import logging
import operator
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bench import results

log = logging.getLogger(__name__)


def read_results(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Rows of a results file. Fast path: the whole file parsed as one JSON array; any doubt (a corrupt,
    truncated or blank line, a non-object) falls back to the line-by-line reader, which warns."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    try:
        body = data.decode("utf-8").strip()
        if not body:
            return []
        rows = json.loads("[" + body.replace("\n", ",") + "]")  # raw newlines never occur inside JSON strings
        if set(map(type, rows)) == {dict}:
            return rows
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        pass
    return results.read_rows(path, skipped)


TEXT_COLS = ("role", "domain", "split", "metric", "variant")
CACHE = ".bench-table-cache.npz"  # in the results folder; a hidden file, so no scan ever reads it as a run
CACHE_VERSION = 1


class _Parsed:
    """Rows of freshly read results files, as columns."""

    def __init__(self):
        self.rows: list[dict] = []
        self.files: list[tuple[str, int, int, int, list[str]]] = []  # (key, size, mtime_ns, rows, skipped lines)

    def add(self, key: str, path: str, size: int, mtime_ns: int) -> None:
        skipped: list[str] = []
        rows = read_results(path, skipped)
        self.rows += rows
        self.files.append((key, size, mtime_ns, len(rows), skipped))

    def column(self, key: str) -> list:
        try:
            return list(map(operator.itemgetter(key), self.rows))  # C speed; a row without the key raises
        except KeyError:
            return list(map(operator.methodcaller("get", key), self.rows))

    def columns(self) -> dict[str, np.ndarray | tuple[np.ndarray, list]]:
        """Numeric columns as arrays; text columns as (int32 codes, -1 = null; their strings)."""
        out = {"step": _numeric(self.column("step"), np.int64, -1), "value": _numeric(self.column("value"), np.float64,
               np.nan), "n": _numeric(self.column("n"), np.float64, np.nan)}
        for name in TEXT_COLS:
            codes, uniques = pd.factorize(np.array(self.column(name), dtype=object))
            out[name] = (codes.astype(np.int32), [str(u) for u in uniques])
        return out


def _numeric(values, dtype, fill) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)
    except (TypeError, ValueError):  # a null or a string in a numeric field
        num = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        return num.fillna(fill).to_numpy(dtype=dtype)


def _read_cache(root: Path) -> tuple[dict, dict] | None:
    """(meta, arrays) of the results cache of a folder, or None. No pickle: numpy arrays and a JSON string."""
    path = root / CACHE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("version") != CACHE_VERSION:
                return None
            arrays = {k: z[k] for k in ("step", "value", "n", *TEXT_COLS)}
        return meta, arrays
    except Exception as err:  # a cache is never worth an error: read the files instead
        log.debug("%s: unreadable cache (%s); ignored", path, err)
        return None


def _write_cache(root: Path, files: list, arrays: dict, strings: dict) -> None:
    meta = {"version": CACHE_VERSION, "files": files, "strings": strings}
    try:
        results.atomic_write(root / CACHE, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
    except OSError as err:  # a read-only results folder: no cache, same table
        log.debug("%s: cache not written (%s)", root, err)



def load_rows(root: Path, done: list[tuple[int, str]], skipped: list[str], use_cache: bool,
               write: bool = True) -> pd.DataFrame:
    """The result rows of done jobs [(job index, run folder)]. Files unchanged since the last call (same size
    and modification time) come from the folder's cache; the others are parsed, and the cache is rewritten."""
    cached = _read_cache(root) if use_cache else None
    cfiles = {f[0]: f for f in cached[0]["files"]} if cached else {}  # key -> [key, size, mtime, start, count, skipped]
    fresh = _Parsed()
    hits, misses = [], []  # (job, cache entry), (job, fresh row count)
    prefix = len(str(root).rstrip(os.sep)) + 1
    for j, run_dir in done:
        key = run_dir[prefix:]  # the folder relative to root (bench.collect.find_run_dirs joins onto str(root))
        try:
            st = os.stat(os.path.join(run_dir, results.RESULTS))
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        hit = cfiles.get(key)
        if hit and hit[1] == size and hit[2] == mtime:
            hits.append((j, hit))
            for where in hit[5]:
                log.warning("%s: skipping a corrupt results line", where)
            skipped += hit[5]
        else:
            fresh.add(key, os.path.join(run_dir, results.RESULTS), size, mtime)
            misses.append((j, fresh.files[-1][3]))
            skipped += fresh.files[-1][4]
    fcols = fresh.columns()
    strings: dict[str, list[str]] = {c: [""] if c == "variant" else [] for c in TEXT_COLS}
    index = {c: {t: i for i, t in enumerate(strings[c])} for c in TEXT_COLS}

    def remap(col: str, codes: np.ndarray, table: list[str]) -> np.ndarray:
        """Codes into `table` -> codes into the combined table (-1, null, stays -1)."""
        lut = np.full(len(table) + 1, -1, dtype=np.int32)
        for i, text in enumerate(table):
            lut[i] = index[col].setdefault(text, len(strings[col]))
            if lut[i] == len(strings[col]):
                strings[col].append(text)
        return lut[codes]

    take = (np.concatenate([np.arange(h[3], h[3] + h[4], dtype=np.int64) for _, h in hits])
            if hits else np.zeros(0, dtype=np.int64))
    out = {}
    for col in ("step", "value", "n"):
        old = cached[1][col][take].astype(fcols[col].dtype) if hits else fcols[col][:0]
        out[col] = np.concatenate([old, fcols[col]])
    for col in TEXT_COLS:
        old = remap(col, cached[1][col][take], cached[0]["strings"][col]) if hits else np.zeros(0, dtype=np.int32)
        out[col] = np.concatenate([old, remap(col, *fcols[col])])
    counts = [h[4] for _, h in hits] + [n for _, n in misses]
    job = np.repeat(np.array([j for j, _ in hits + misses], dtype=np.int64), counts)
    if use_cache and write and (misses or len(hits) != len(cfiles)):
        entries = [h[:3] + [h[5]] for _, h in hits] + [[k, sz, mt, sk] for k, sz, mt, _, sk in fresh.files]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        files = [[k, sz, mt, int(starts[i]), int(counts[i]), sk] for i, (k, sz, mt, sk) in enumerate(entries)]
        _write_cache(root, files, out, strings)
    variant = np.where(out["variant"] < 0, 0, out["variant"])  # no variant key = "" (the method itself)
    frame = {"job": job, "variant": pd.Categorical.from_codes(variant, strings["variant"]), "step": out["step"]}
    for col in ("role", "domain", "split", "metric"):
        frame[col] = pd.Categorical.from_codes(out[col], strings[col])
    frame["value"], frame["n"] = out["value"], out["n"]
    return pd.DataFrame(frame)

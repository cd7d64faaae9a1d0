"""A tiny image-text pool in the layouts img2dataset writes (rom1504/img2dataset, docs/ARF.md).

    make_pool(folder, "files", n=12, per_shard=5)
    -> folder/00000/000000000.jpg .txt .json ... folder/00000.parquet folder/00000_stats.json ...
    make_pool(folder, "webdataset", n=12, per_shard=5)
    -> folder/00000.tar (members 000000000.jpg .txt .json ...) folder/00000.parquet folder/00000_stats.json ...

Keys are img2dataset's: 5-digit shard number then 4-digit index within the shard. The .parquet files are
placeholders (bytes that are no parquet: the pool reader must never open them), the _stats.json files are
what img2dataset writes per shard. Images are small coloured JPEGs, one colour per pair; captions name it.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown", "teal")


def pair(i: int, size: int = 16) -> tuple[bytes, str]:
    colour = ((53 * i) % 256, (97 * i + 40) % 256, (31 * i + 90) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue(), f"a photo of a {WORDS[i % len(WORDS)]} square, number {i}"


def make_pool(folder: str | Path, layout: str, n: int = 12, per_shard: int = 5, size: int = 16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range((n + per_shard - 1) // per_shard):
        members = []
        for j in range(per_shard):
            i = shard * per_shard + j
            if i >= n:
                break
            key = f"{shard:05d}{j:04d}"
            jpg, caption = pair(i, size)
            meta = json.dumps({"key": key, "caption": caption, "status": "success", "url": f"http://x/{i}.jpg"})
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()), (f"{key}.json", meta.encode())]
        if layout == "files":
            sub = folder / f"{shard:05d}"
            sub.mkdir(exist_ok=True)
            for name, data in members:
                (sub / name).write_bytes(data)
        elif layout == "webdataset":
            with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        else:
            raise ValueError(layout)
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not a real parquet file PAR1")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(members) // 3, "successes":
                                                                    len(members) // 3, "failed_to_download": 0}))
    return folder

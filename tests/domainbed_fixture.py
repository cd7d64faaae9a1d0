"""A tiny tree in the layout DomainBed's download script writes, for any shipped DomainBed card.

    make_domainbed_fixture(root, ["pacs", "officehome"], per_class=2)
    -> <root>/PACS/<domain>/<class>/00000.jpg ... (every domain and class of each card)

The images are small coloured JPEGs whose colour depends on (domain, class, index), so a model can tell
them apart a little; real card names and folders, so the shipped sweep files run on it with `--set
base.data.root=<root>`.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from bench.cards import load_card


def make_domainbed_fixture(root: str | Path, names=("pacs",), per_class: int = 2, size: int = 16) -> Path:
    root = Path(root)
    for name in names:
        card = load_card(name)
        for d, domain in enumerate(card.domains):
            for k, cls in enumerate(card.classes):
                cdir = root / card.folder / domain / cls
                cdir.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    colour = ((37 * k + 11 * i) % 256, (60 * d + 7 * k) % 256, (90 * i + 13 * k) % 256)
                    Image.new("RGB", (size, size), colour).save(cdir / f"{i:05d}.jpg", quality=90)
    return root

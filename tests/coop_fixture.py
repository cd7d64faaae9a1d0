"""A tiny tree in the layouts CoOp's DATASETS.md describes, for the shipped zero-shot cards (datasets/zeroshot/).

    make_coop_fixture(root, ["dtd", "fgvc_aircraft"], n_classes=3, per_class=2)
    -> <root>/dtd/images/<class>/00000.jpg ... and <root>/dtd/split_zhou_DescribableTextures.json
    -> <root>/fgvc_aircraft/images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt

Split files in CoOp's format ({"train"|"val"|"test": [[path relative to the image folder, label, classname]]}) with
the card's own CoOp classnames (a few classes each, taken from the end of the card's list so that CoOp's labels
differ from the card's positions: loading must match by classname, never by order); small coloured JPEGs.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.zeroshot_suite import load_zeroshot_card


def _jpeg(path: Path, colour: tuple[int, int, int], size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, quality=90)


def make_coop_fixture(root: str | Path, names=("dtd",), n_classes: int = 3, per_class: int = 2, size: int = 16) -> Path:
    root = Path(root)
    for d, name in enumerate(names):
        card = load_zeroshot_card(name)
        chosen = list(range(len(card.coop_names)))[-n_classes:][::-1]  # the last classes, in reverse
        folder = root / card.folder
        image_dir = folder / card.image_dir
        if card.split_format == "fgvc_aircraft":
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "variants.txt").write_text("".join(v + "\n" for v in card.coop_names))
            for split in ("train", "val", "test"):
                lines = []
                for j, k in enumerate(chosen):
                    for i in range(per_class):
                        image_id = f"{1000000 + 100 * k + 10 * i + ('train', 'val', 'test').index(split)}"
                        _jpeg(image_dir / f"{image_id}.jpg", ((40 * j) % 256, 90 * i % 256, 60 * d % 256), size)
                        lines.append(f"{image_id} {card.coop_names[k]}\n")
                card.split_path(root, split).write_text("".join(lines))
            continue
        split = {"train": [], "val": [], "test": []}
        for label, k in enumerate(chosen):  # CoOp's labels: 0..n-1 here, not the card's positions
            cname = card.coop_names[k]
            for part in split:
                for i in range(per_class):
                    sub = "cars_test" if card.image_dir == "" else cname.replace("/", "_").replace(" ", "_")
                    rel = f"{sub}/{part}_{k:03d}_{i:03d}.jpg"
                    _jpeg(image_dir / rel, ((40 * label + 7 * i) % 256, (90 * i + 13 * k) % 256, 60 * d % 256), size)
                    split[part].append([rel, label, cname])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / card.split_file).write_text(json.dumps(split))
    return root

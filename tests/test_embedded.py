"""The procedural embedded benchmark (bench/embedded/) and its card (datasets/embedded.yaml).

Fast: tiny folders (one or two images per domain and class) and corpora of a few dozen images.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bench import embedded
from bench.errors import BenchError

CARD = Path(__file__).resolve().parent.parent / "datasets" / "embedded.yaml"


def _pixels_sha(image: Image.Image | np.ndarray) -> str:
    return hashlib.sha256(np.asarray(image, dtype=np.uint8).tobytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pngs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A benchmark with two images per domain and class, drawn in this process."""
    root = tmp_path_factory.mktemp("data")
    return embedded.generate_benchmark(root, per_class=2, seed=0, workers=1, progress=False)


# --------------------------------------------------------------------------- classes and rendering


def test_class_lists():
    assert len(embedded.SEEN_CLASSES) == 16 and len(embedded.UNSEEN_CLASSES) == 8
    assert not set(embedded.SEEN_CLASSES) & set(embedded.UNSEEN_CLASSES)
    assert embedded.CLASSES == embedded.SEEN_CLASSES + embedded.UNSEEN_CLASSES
    assert all(name.replace("_", "").isalpha() and name.islower() for name in embedded.CLASSES)
    assert embedded.DOMAINS == ("photo", "sketch", "cartoon", "painting")
    assert len(embedded.COLORS) == 8 and embedded.SIZES == ("small", "large")
    assert embedded.BACKGROUNDS == ("plain", "striped", "dotted", "gradient")
    assert embedded.prompt_name("lightning_bolt") == "lightning bolt"


@pytest.mark.parametrize("domain", embedded.DOMAINS)
def test_every_class_renders_with_a_caption(domain):
    for c, cls in enumerate(embedded.CLASSES):
        image, caption = embedded.render(cls, domain, np.random.default_rng([1, c]))
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.asarray(image).std() > 5.0, f"{domain}/{cls} is blank"
        words = caption.split()
        assert domain in words and embedded.prompt_name(cls) in caption, caption
        if domain == "sketch":
            assert not set(words) & set(embedded.COLORS) and "background" not in words, caption
        else:
            assert len(set(words) & set(embedded.COLORS)) == 1, caption


def test_render_is_deterministic_given_the_rng_state():
    first, caption = embedded.render("star", "photo", np.random.default_rng(5))
    again, caption_again = embedded.render("star", "photo", np.random.default_rng(5))
    other, _ = embedded.render("star", "photo", np.random.default_rng(6))
    assert np.asarray(first).tobytes() == np.asarray(again).tobytes() and caption == caption_again
    assert np.asarray(first).tobytes() != np.asarray(other).tobytes()


def test_render_other_sizes_and_rejects_unknown_names():
    image, _ = embedded.render("house", "cartoon", np.random.default_rng(0), image_size=64)
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="unknown class"):
        embedded.render("dodecahedron", "photo", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown domain"):
        embedded.render("star", "clipart", np.random.default_rng(0))


def test_captions_vary_in_wording():
    captions = [embedded.render("arrow", "painting", np.random.default_rng(i))[1] for i in range(40)]
    assert any("background" in c for c in captions) and not all("background" in c for c in captions)
    assert any(c.startswith("a painting of ") for c in captions)
    assert any(not c.startswith("a painting of ") for c in captions)


# --------------------------------------------------------------------------- the benchmark folder


def test_benchmark_layout_captions_and_manifest(benchmark):
    assert benchmark.name == "embedded"
    assert sorted(p.name for p in benchmark.parent.iterdir()) == ["embedded"], "a staging folder was left behind"
    expected = [f"{d}/{c}/{i:05d}.png" for d in embedded.DOMAINS for c in embedded.CLASSES for i in range(2)]
    assert _pngs(benchmark) == sorted(expected)
    with Image.open(benchmark / "sketch" / "cup" / "00001.png") as image:
        assert image.mode == "RGB" and image.size == (32, 32)

    lines = [json.loads(line) for line in (benchmark / "captions.jsonl").read_text().splitlines()]
    assert [entry["path"] for entry in lines] == sorted(expected)
    assert all(entry["path"].split("/")[0] in entry["caption"].split() for entry in lines)

    manifest = json.loads((benchmark / "MANIFEST.json").read_text())
    assert manifest["generator_version"] == embedded.GENERATOR_VERSION
    assert (manifest["seed"], manifest["per_class"], manifest["image_size"]) == (0, 2, 32)
    assert manifest["counts"] == {d: 2 * 24 for d in embedded.DOMAINS} and manifest["num_images"] == len(expected)
    assert manifest["sha256"] == embedded.benchmark_digest(benchmark)


def test_second_call_is_a_no_op(benchmark):
    before = _snapshot(benchmark)
    again = embedded.generate_benchmark(benchmark.parent, per_class=2, seed=0, workers=1, progress=False)
    assert again == benchmark and _snapshot(benchmark) == before


@pytest.mark.parametrize("change", [{"per_class": 3}, {"seed": 1}, {"image_size": 64}])
def test_other_parameters_raise_and_leave_the_files(benchmark, change):
    before = _snapshot(benchmark)
    params = {"per_class": 2, "seed": 0, "image_size": 32, **change}
    with pytest.raises(BenchError, match="delete that folder or choose another data root") as err:
        embedded.generate_benchmark(benchmark.parent, workers=1, progress=False, **params)
    assert str(benchmark) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(benchmark) == before
    assert sorted(p.name for p in benchmark.parent.iterdir()) == ["embedded"]


def test_a_foreign_folder_is_never_touched(tmp_path):
    user_file = tmp_path / "embedded" / "photo" / "mine.txt"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("keep me")
    with pytest.raises(BenchError, match="no MANIFEST.json"):
        embedded.generate_benchmark(tmp_path, per_class=1, workers=1, progress=False)
    assert user_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded"]


def test_same_seed_gives_the_same_bytes_whatever_the_workers(benchmark, tmp_path):
    """Each image depends only on (seed, domain, class, index): per_class=1 on two processes
    reproduces image 0 of the per_class=2 benchmark drawn in one process, byte for byte."""
    other = embedded.generate_benchmark(tmp_path, per_class=1, seed=0, workers=2, progress=False)
    names = _pngs(other)
    assert len(names) == 24 * 4
    assert all((other / name).read_bytes() == (benchmark / name).read_bytes() for name in names)
    captions = {json.loads(line)["path"]: json.loads(line)["caption"]
                for line in (benchmark / "captions.jsonl").read_text().splitlines()}
    for line in (other / "captions.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert captions[entry["path"]] == entry["caption"]


def test_another_seed_gives_other_images(benchmark, tmp_path):
    other = embedded.generate_benchmark(tmp_path, per_class=1, seed=1, workers=1, progress=False)
    assert all((other / name).read_bytes() != (benchmark / name).read_bytes() for name in _pngs(other))
    manifests = [json.loads((folder / "MANIFEST.json").read_text()) for folder in (benchmark, other)]
    assert manifests[0]["sha256"] != manifests[1]["sha256"]


# --------------------------------------------------------------------------- the caption corpus


def test_corpus_is_deterministic_whatever_the_workers():
    corpus = embedded.generate_corpus(48, seed=0, workers=1, progress=False)
    assert corpus.images.shape == (48, 32, 32, 3) and corpus.images.dtype == np.uint8
    assert len(corpus.captions) == 48 and corpus.labels.shape == corpus.domains.shape == (48,)
    assert corpus.labels.min() >= 0 and corpus.labels.max() < len(embedded.CLASSES)
    assert corpus.domains.min() >= 0 and corpus.domains.max() < len(embedded.DOMAINS)
    for caption, named, domain in zip(corpus.captions, corpus.named, corpus.domains):
        name = embedded.prompt_name(embedded.CLASSES[named]) if named >= 0 else None
        assert embedded.DOMAINS[domain] in caption.split()
        assert (name in caption) if name else any(g in caption.split() for g in embedded.GENERIC_NAMES)

    parallel = embedded.generate_corpus(48, seed=0, workers=2, progress=False)
    assert np.array_equal(parallel.images, corpus.images) and parallel.captions == corpus.captions
    assert np.array_equal(parallel.labels, corpus.labels) and np.array_equal(parallel.domains, corpus.domains)
    assert np.array_equal(parallel.named, corpus.named)
    other = embedded.generate_corpus(48, seed=1, workers=1, progress=False)
    assert not np.array_equal(other.images, corpus.images)


def test_corpus_names_seen_classes_rarely_and_the_naming_never_changes_an_image():
    web = embedded.generate_corpus(900, seed=2, workers=1, progress=False)
    seen = np.isin(web.labels, [embedded.CLASSES.index(c) for c in embedded.SEEN_CLASSES])
    assert set(np.unique(web.named)) <= {-1} | set(range(len(embedded.CLASSES)))
    assert np.all((web.named == -1) | (web.named == web.labels))  # a caption names its own class or none
    assert abs(np.mean(web.named[seen] >= 0) - embedded.WEB_NAMED_SEEN) < 0.06
    assert abs(np.mean(web.named[~seen] >= 0) - embedded.WEB_NAMED_UNSEEN) < 0.06
    every = embedded.generate_corpus(900, seed=2, workers=1, progress=False, named_seen=1.0, named_unseen=1.0)
    assert np.array_equal(every.images, web.images) and np.array_equal(every.labels, web.labels)
    assert np.array_equal(every.named, every.labels)
    for caption, label in zip(every.captions, every.labels):
        assert embedded.prompt_name(embedded.CLASSES[label]) in caption
    with pytest.raises(ValueError, match="naming rates"):
        embedded.generate_corpus(2, seed=0, workers=1, progress=False, named_seen=1.5)


def test_corpus_is_disjoint_from_the_benchmark(benchmark):
    corpus = embedded.generate_corpus(192, seed=0, workers=1, progress=False)
    assert set(corpus.labels.tolist()) == set(range(len(embedded.CLASSES))) and set(corpus.domains.tolist()) == {0, 1, 2, 3}
    benchmark_images = set()
    for name in _pngs(benchmark):
        with Image.open(benchmark / name) as image:
            benchmark_images.add(_pixels_sha(image.convert("RGB")))
    assert not benchmark_images & {_pixels_sha(image) for image in corpus.images}


def test_corpus_round_trips_through_npz(tmp_path):
    corpus = embedded.generate_corpus(8, seed=3, workers=1, progress=False)
    path = embedded.save_corpus(tmp_path / "corpus", corpus)
    assert path.name == "corpus.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.npz"]
    loaded = embedded.load_corpus(path)
    assert np.array_equal(loaded.images, corpus.images) and loaded.captions == corpus.captions
    assert np.array_equal(loaded.labels, corpus.labels) and np.array_equal(loaded.domains, corpus.domains)
    assert np.array_equal(loaded.named, corpus.named)
    with pytest.raises(BenchError, match="no such corpus"):
        embedded.load_corpus(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- the card


def test_card_matches_the_generator():
    card = yaml.safe_load(CARD.read_text())
    assert card["name"] == "embedded" and card["folder"] == embedded.DATASET_NAME and card["description"]
    assert card["domains"] == list(embedded.DOMAINS)
    assert card["classes"] == list(embedded.SEEN_CLASSES + embedded.UNSEEN_CLASSES)
    assert card["unseen_classes"] == list(embedded.UNSEEN_CLASSES)
    assert card["class_names"] == {}
    assert 8 <= len(card["templates"]) <= 12 and all("{}" in t for t in card["templates"])
    assert card["expected_counts"] == {d: 24 * 40 for d in embedded.DOMAINS}
    assert set(card["default_test_domains"]) <= set(embedded.DOMAINS)
    defaults = inspect.signature(embedded.generate_benchmark).parameters
    assert card["generator"] == {key: defaults[key].default for key in ("per_class", "seed", "image_size")}


def test_a_folder_of_another_generator_version_is_named_not_replaced(benchmark):
    from bench.cards import load_card
    from bench.layouts import ensure_generated

    embedded.check_version(benchmark)  # this version's: fine
    manifest = benchmark / "MANIFEST.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**old, "generator_version": embedded.GENERATOR_VERSION - 1}))
    try:
        with pytest.raises(BenchError, match=f"drawn by embedded generator version {embedded.GENERATOR_VERSION - 1}, "
                                             f"this is version {embedded.GENERATOR_VERSION}.*delete") as err:
            ensure_generated(load_card("embedded"), benchmark.parent, progress=False)
        assert "\n" not in str(err.value) and (benchmark / "photo").is_dir()  # nothing was removed
    finally:
        manifest.write_text(json.dumps(old))

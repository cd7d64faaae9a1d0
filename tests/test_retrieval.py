import numpy as np
import pytest
import torch
from PIL import Image

from bench import embedded
from bench.errors import BenchError
from bench.models import load_clip
from methods.arf.retrieval import (PairItems, PairPool, class_queries, embed_pool, pool_embedding, retrieve,
                                   retrieve_for_task)


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def corpus():
    return embedded.generate_corpus(48, seed=3, workers=1, progress=False)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip("TinyCLIP-32", None)


# ---- retrieve on hand-made embeddings -------------------------------------------------------------

def test_retrieve_returns_the_pairs_nearest_any_class_prompt():
    queries = _unit(np.eye(3, 4))  # three classes along axes 0, 1, 2
    pool = _unit([
        [0.0, 0.0, 0.0, 1.0],  # 0: unrelated
        [1.0, 0.1, 0.0, 0.0],  # 1: class 0, cos 0.995
        [0.0, 0.0, 1.0, 1.0],  # 2: class 2, cos 0.707
        [0.0, 1.0, 0.0, 0.0],  # 3: class 1, cos 1
        [0.5, 0.0, 0.0, 1.0],  # 4: class 0, cos 0.447
        [0.0, 0.0, 1.0, 0.2],  # 5: class 2, cos 0.981
    ])
    assert retrieve(queries, pool, 3).tolist() == [3, 1, 5]
    assert retrieve(queries, pool, 5).tolist() == [3, 1, 5, 2, 4]
    assert retrieve(torch.from_numpy(queries), torch.from_numpy(pool), 100).tolist() == [3, 1, 5, 2, 4, 0]
    # per class: the best row of each class, rank by rank
    assert retrieve(queries, pool, 3, per_class=True).tolist() == [1, 3, 5]
    # two per class: class 0 -> 1, 4; class 1 -> 3, 1 (1 again: kept once); class 2 -> 5, 2
    assert retrieve(queries, pool, 6, per_class=True).tolist() == [1, 3, 5, 4, 2]


def test_retrieve_breaks_ties_by_index_and_deduplicates_per_class():
    queries = _unit([[1.0, 0.0], [0.0, 1.0]])
    pool = _unit([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert retrieve(queries, pool, 3).tolist() == [1, 3, 4]
    assert retrieve(queries, pool[[0, 2]], 1).tolist() == [0]
    # row 0 and 2 tie for both classes' second place: the union keeps one copy of each
    assert retrieve(queries, pool, 4, per_class=True).tolist() == [3, 1, 0, 4]
    diag = _unit([[1.0, 1.0]] * 5)
    assert retrieve(queries, diag, 4, per_class=True).tolist() == [0, 1]  # both classes pick rows 0 and 1


def test_retrieve_chunked_scoring_matches_brute_force(monkeypatch):
    import methods.arf.retrieval as R

    rng = np.random.default_rng(0)
    queries, pool = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(1000, 8)))
    scores = pool @ queries.T
    brute = np.lexsort((np.arange(1000), -scores.max(axis=1)))[:40]
    per = [np.lexsort((np.arange(1000), -scores[:, c]))[:8] for c in range(5)]
    monkeypatch.setattr(R, "_CHUNK", 64)
    assert retrieve(queries, pool, 40).tolist() == brute.tolist()
    got = retrieve(queries, pool, 40, per_class=True)
    assert set(got.tolist()) == set(np.concatenate(per).tolist())
    assert got[:5].tolist() == [p[0] for p in per]


def test_retrieve_rejects_bad_arguments():
    q, p = _unit(np.eye(3)), _unit(np.eye(3))
    with pytest.raises(BenchError, match="k=2 is less than the 3 classes"):
        retrieve(q, p, 2, per_class=True)
    with pytest.raises(BenchError, match="k must be a positive integer"):
        retrieve(q, p, 0)
    with pytest.raises(ValueError):
        retrieve(q, np.eye(4), 1)
    with pytest.raises(BenchError, match="by='caption' unknown"):
        pool_embedding(p, p, by="caption")


# ---- pools -----------------------------------------------------------------------------------------

def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_pool_from_embedded_corpus(corpus, tmp_path):
    pool = PairPool.from_embedded_corpus(corpus)
    assert len(pool) == 48 and pool.caption(5) == corpus.captions[5]
    assert np.array_equal(np.asarray(pool.image(5)), corpus.images[5])
    saved = embedded.save_corpus(tmp_path / "corpus", corpus)
    again = PairPool.from_embedded_corpus(saved)
    assert again.fingerprint() == pool.fingerprint() and again.labels.tolist() == corpus.labels.tolist()
    sub = pool.subset([7, 2])
    assert sub.captions == [corpus.captions[7], corpus.captions[2]] and sub.labels.tolist() == corpus.labels[[7, 2]].tolist()


def test_pool_from_folder_pairs_images_with_same_stem_text(tmp_path, caplog):
    _write(tmp_path / "pairs" / "00" / "b.jpg", 40)
    (tmp_path / "pairs" / "00" / "b.txt").write_text("a grey tile\n")
    _write(tmp_path / "pairs" / "a.png", 200)
    (tmp_path / "pairs" / "a.txt").write_text("a light tile")
    _write(tmp_path / "pairs" / "orphan.png", 0)
    pool = PairPool.from_folder(tmp_path / "pairs")
    assert pool.captions == ["a grey tile", "a light tile"]
    assert pool.image(1).size == (8, 8) and np.asarray(pool.image(0))[0, 0, 0] in range(35, 46)  # jpeg
    assert "skipped 1 image" in caplog.text
    with pytest.raises(BenchError, match="no image with a same-stem .txt caption"):
        PairPool.from_folder(_empty(tmp_path))
    with pytest.raises(BenchError, match="no such folder"):
        PairPool.from_folder(tmp_path / "missing")


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_pool_from_csv_reads_paths_against_the_table_folder(tmp_path):
    _write(tmp_path / "data" / "img" / "x.png", 10)
    _write(tmp_path / "abs.png", 90)
    table = tmp_path / "data" / "pairs.csv"
    table.write_text(f'image,caption\nimg/x.png,"a dark tile, small"\n{tmp_path / "abs.png"},a tile\n')
    pool = PairPool.from_table(table)
    assert pool.captions == ["a dark tile, small", "a tile"]
    assert np.asarray(pool.image(0))[0, 0].tolist() == [10, 10, 10]
    assert np.asarray(pool.image(1))[0, 0].tolist() == [90, 90, 90]
    table.write_text("path,text\nimg/x.png,a\n")
    with pytest.raises(BenchError, match="no column 'image'; columns are path, text"):
        PairPool.from_table(table)
    table.write_text("image,caption\nimg/gone.png,a\n")
    with pytest.raises(BenchError, match=r"gone.png: cannot read image 0 of the pair pool"):
        PairPool.from_table(table).image(0)


def test_parquet_without_pyarrow_says_pip_install_pyarrow(tmp_path, monkeypatch):
    import pandas as pd

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1")
    with pytest.raises(BenchError, match="pip install pyarrow") as err:
        PairPool.from_table(tmp_path / "pairs.parquet")
    assert "\n" not in str(err.value)


def test_pair_items_applies_the_transform_under_a_seed(corpus):
    pool = PairPool.from_embedded_corpus(corpus)
    items = PairItems(pool, lambda img: torch.rand(1) + torch.from_numpy(np.array(img)).float().mean(), [4, 9])
    x1, cap, i = items[(1, 123)]
    x2, _, _ = items[(1, 123)]
    assert cap == corpus.captions[9] and i == 1 and torch.equal(x1, x2) and len(items) == 2


# ---- embedding and end to end ----------------------------------------------------------------------

def test_embed_pool_is_normalised_and_cached(corpus, tiny_clip, tmp_path, monkeypatch):
    pool = PairPool.from_embedded_corpus(corpus)
    calls = {"image": 0, "text": 0}
    from bench import text

    encode_image, encode_text = tiny_clip.model.encode_image, text.encode_text

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(tiny_clip.model, "encode_image", count("image", encode_image))
    monkeypatch.setattr(text, "encode_text", count("text", encode_text))  # captions: bench.text.encode_text
    tiny_clip.model.train()
    img, txt = embed_pool(tiny_clip, pool, batch_size=20, cache=tmp_path / "emb", progress=False)
    assert tiny_clip.model.training  # mode restored
    assert img.shape == txt.shape == (48, 128) and img.dtype == np.float32
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert calls == {"image": 3, "text": 3}
    img2, txt2 = embed_pool(tiny_clip, pool, batch_size=20, cache=tmp_path / "emb", progress=False)
    assert calls == {"image": 3, "text": 3}  # loaded from the cache
    assert np.array_equal(img, img2) and np.array_equal(txt, txt2)
    assert len(list((tmp_path / "emb").glob("pool-emb-*.npz"))) == 1
    embed_pool(tiny_clip, pool.subset(range(10)), batch_size=20, cache=tmp_path / "emb", progress=False)
    assert calls == {"image": 4, "text": 4}  # another pool, another key
    with torch.no_grad():
        tiny_clip.model.logit_scale.add_(1.0)  # other weights under the same name: not the same cache
    embed_pool(tiny_clip, pool, batch_size=48, cache=tmp_path / "emb", progress=False)
    assert calls == {"image": 5, "text": 5}


def test_retrieval_end_to_end_on_the_embedded_corpus(corpus, tiny_clip, tmp_path):
    pool = PairPool.from_embedded_corpus(corpus)
    img, txt = embed_pool(tiny_clip, pool, cache=tmp_path, progress=False)
    names = [embedded.prompt_name(c) for c in embedded.SEEN_CLASSES]
    templates = ["a photo of a {}.", "a sketch of a {}."]
    queries = class_queries(tiny_clip, names, templates)
    assert queries.shape == (16, 128) and np.allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    for by in ("text", "image", "both"):
        idx = retrieve_for_task(tiny_clip, names, templates, img, txt, k=10, by=by)
        assert len(idx) == len(set(idx.tolist())) == 10 and idx.max() < 48
        assert idx.tolist() == retrieve(queries, pool_embedding(img, txt, by), 10).tolist()
    balanced = retrieve_for_task(tiny_clip, names, templates, img, txt, k=32, per_class=True)
    assert 2 <= len(balanced) <= 32
    anchors = pool.subset(balanced)
    assert len(anchors) == len(balanced) and anchors.caption(0) == corpus.captions[balanced[0]]


def test_random_retrieval_ignores_the_queries(corpus, tiny_clip, tmp_path):
    """by="random" (ARF's ablation baseline): k distinct rows, the same every call, whatever the class prompts."""
    pool = PairPool.from_embedded_corpus(corpus)
    img, txt = embed_pool(tiny_clip, pool, cache=tmp_path, progress=False)
    seen = [embedded.prompt_name(c) for c in embedded.SEEN_CLASSES]
    unseen = [embedded.prompt_name(c) for c in embedded.CLASSES if c not in embedded.SEEN_CLASSES]
    a = retrieve_for_task(tiny_clip, seen, ["a photo of a {}."], img, txt, k=20, by="random")
    b = retrieve_for_task(tiny_clip, unseen, ["a sketch of a {}."], img, txt, k=20, by="random")
    assert a.dtype == np.int64 and len(set(a.tolist())) == 20 and a.max() < 48
    assert a.tolist() == b.tolist()
    assert a.tolist() != retrieve_for_task(tiny_clip, seen, ["a photo of a {}."], img, txt, k=20).tolist()
    assert sorted(retrieve_for_task(tiny_clip, seen, ["x {}"], img, txt, k=100, by="random").tolist()) == list(range(48))

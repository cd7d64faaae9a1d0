"""ARF's shared anchors: img2dataset pools, content-keyed caches computed once, resource checks before launch."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.errors import BenchError
from methods.arf import anchors
from methods.arf import retrieval as Rt
from methods.arf.captioning import CocaCaptioner
from methods.arf.pools import ShardPool, detect_layout, pool_from_arrays, pool_to_arrays, scan_pool
from tests.conftest import tiny_config
from tests.domainbed_fixture import make_domainbed_fixture
from tests.img2dataset_fixture import make_pool, pair


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """PACS in DomainBed's layout (1 image per domain and class), a tiny CLIP and a tiny CoCa checkpoint,
    and a webdataset pool at <root>/cc3m."""
    from bench.models import load_clip, save_checkpoint

    root = tmp_path_factory.mktemp("anchors")
    make_domainbed_fixture(root, ["pacs"], per_class=1)
    torch.manual_seed(0)
    save_checkpoint(load_clip("TinyCLIP-32", None).model, "TinyCLIP-32", root / "tiny.pt")
    save_coca(root / "coca.pt", seed=0)
    make_pool(root / "cc3m", "webdataset", n=30, per_shard=8)
    return root


def save_coca(path: Path, seed: int) -> None:
    """A random-init tiny CoCa whose output projection is re-drawn, so captions depend on the image."""
    from bench.models import load_clip, save_checkpoint

    torch.manual_seed(seed)
    model = load_clip("TinyCoCa-32", None).model
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.125)
    save_checkpoint(model, "TinyCoCa-32", path)


def arf_config(root: Path, hparams: dict, test_domain: str = "sketch", **over):
    return tiny_config(root, **{"method": "arf", "data.dataset": "pacs", "data.root": str(root),
                                "data.test_domains": [test_domain], "hparams": hparams, **over})


def build_arf(root: Path, hparams: dict, test_domain: str = "sketch"):
    from bench.method import build_method
    from bench.models import load_clip
    from bench.prepare import build_run_task

    cfg = arf_config(root, hparams, test_domain)
    task = build_run_task(cfg)
    clip = load_clip(cfg.model.name, cfg.model.pretrained)
    return build_method("arf", clip, task, dict(cfg.hparams)), task


# ---- pools in img2dataset's layouts ------------------------------------------------------------------------

def test_img2dataset_files_and_webdataset_layouts_load_as_the_same_pool(tmp_path):
    files = make_pool(tmp_path / "files", "files", n=12, per_shard=5)
    wds = make_pool(tmp_path / "wds", "webdataset", n=12, per_shard=5)
    assert (detect_layout(files), detect_layout(wds)) == ("files", "webdataset")
    a, b = scan_pool(files, progress=False), scan_pool(wds, progress=False)
    assert len(a) == len(b) == 12  # .json, .parquet and _stats.json files are not pairs
    assert a.captions == b.captions == [pair(i)[1] for i in range(12)]
    assert isinstance(b, ShardPool) and b.names[:2] == ["000000000.jpg", "000000001.jpg"]
    for i in (0, 7, 11):
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
    assert sorted(p.name for p in wds.iterdir()) == sorted(  # nothing extracted
        [f"0000{s}{x}" for s in range(3) for x in (".tar", ".parquet", "_stats.json")])
    sub = b.subset([11, 2])
    assert sub.captions == [b.captions[11], b.captions[2]] and np.array_equal(np.asarray(sub.image(0)),
                                                                              np.asarray(b.image(11)))
    for pool in (a, sub):  # stored and read back, as the caches do
        back = pool_from_arrays(pool_to_arrays(pool))
        assert type(back) is type(pool) and back.captions == pool.captions and back.fingerprint() == pool.fingerprint()
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "notes.md").write_text("x")
    with pytest.raises(BenchError, match="no tar shards, shard folders or images found") as err:
        detect_layout(flat)
    assert "\n" not in str(err.value)


# ---- computed once, keyed by content ----------------------------------------------------------------------

@pytest.fixture
def counters(monkeypatch):
    calls = {"captioned": 0, "encoded": 0, "scanned": 0}
    caption, encode, scan = CocaCaptioner.caption, Rt.encode_pool, anchors.__dict__.get("scan_pool")
    import methods.arf.pools as P

    def counting_caption(self, paths):
        calls["captioned"] += len(paths)
        return caption(self, paths)

    def counting_encode(*a, **k):
        calls["encoded"] += 1
        return encode(*a, **k)

    def counting_scan(*a, **k):
        calls["scanned"] += 1
        return real_scan(*a, **k)

    real_scan = P.scan_pool
    monkeypatch.setattr(CocaCaptioner, "caption", counting_caption)
    monkeypatch.setattr(Rt, "encode_pool", counting_encode)
    monkeypatch.setattr(P, "scan_pool", counting_scan)
    assert scan is None
    return calls


def test_anchors_are_computed_once_per_sweep_and_keyed_by_content(root, counters, capsys):
    from bench.cli import main

    hp = {"captioner": f"coca:TinyCoCa-32/{root / 'coca.pt'}", "pool": "cc3m", "top_k": 10}
    sweep = write_sweep(root.parent / "once.yaml", root, hp)
    assert main(["prepare-anchors", str(sweep), "--device", "cpu", "--no-progress"]) == 0
    assert "pacs (TinyCLIP-32/" in capsys.readouterr().out
    n_images = 4 * 7  # every domain's images: each domain is a training domain of some job
    assert counters == {"captioned": n_images, "encoded": 1, "scanned": 1}
    cache = anchors.cache_dir(root)
    assert len(list(cache.glob("captions-*.jsonl"))) == 1 and not list(cache.glob("*.tmp-*"))

    m1, task1 = build_arf(root, hp, "sketch")
    m2, task2 = build_arf(root, hp, "photo")
    assert counters == {"captioned": n_images, "encoded": 1, "scanned": 1}  # both jobs only read the caches
    assert len(m1.caption_tokens) == len(task1.train_items()) and len(m2.anchor_items) == 10
    assert torch.equal(m1.anchor_tokens, m2.anchor_tokens)

    # A caption of the pool changes (the shard is rewritten): the pool is re-read and re-embedded, not re-captioned.
    time.sleep(0.01)
    make_pool(root / "cc3m", "webdataset", n=30, per_shard=8)
    shard = root / "cc3m" / "00001.tar"
    data = shard.read_bytes().replace(b"number 9", b"number X")
    shard.write_bytes(data)
    build_arf(root, hp)
    assert counters == {"captioned": n_images, "encoded": 2, "scanned": 2}
    # Other captioner weights under the same file name: every image is captioned again.
    save_coca(root / "coca2.pt", seed=1)
    os.replace(root / "coca2.pt", root / "coca.pt")
    build_arf(root, hp)
    assert counters == {"captioned": 2 * n_images, "encoded": 2, "scanned": 2}


def _compute_in_child(path, counter, out):
    def compute():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.4)
        return "computed"

    value = anchors.compute_once(Path(path), compute, lambda p, v: anchors.atomic_write(p, lambda f: f.write(v), "w"),
                                 lambda p: p.read_text())
    Path(out).write_text(value)


def test_the_lock_makes_concurrent_processes_compute_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    target, counter = tmp_path / "cache" / "thing.txt", tmp_path / "count"
    procs = [ctx.Process(target=_compute_in_child, args=(target, counter, tmp_path / f"out{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(counter.read_text().splitlines()) == 1  # one computed, the other waited and read its file
    assert {(tmp_path / f"out{i}").read_text() for i in range(2)} == {"computed"}
    assert target.read_text() == "computed" and not list(target.parent.glob("*.tmp-*"))


# ---- resources checked before launch -----------------------------------------------------------------------

def write_sweep(path: Path, root: Path, hparams: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "arf-test", "output": str(path.parent / f"runs-{path.stem}"),
        "base": {"model": {"name": "TinyCLIP-32", "pretrained": str(root / "tiny.pt")}, "data": {"root": str(root)},
                 "train": {"steps": 2, "batch_size": 6, "eval_every": 2, "warmup_steps": 1}},
        "methods": ["arf"], "datasets": ["pacs"], "test_domains": "all", "trial_seeds": [0, 1],
        "search": {"n_draws": 2, "space": {"train.lr": ["log10_uniform", -4, -3]}},
        "overrides": {"methods": {"arf": {"hparams": hparams}}}, "launcher": {"kind": "debug"}}))
    return path


@pytest.mark.parametrize("hparams, says", [
    ({"captioner": "file:caps/missing.jsonl"}, "hparams.captioner: captions file .*caps/missing.jsonl not found"),
    ({"captioner": "embedded", "pool": "nowhere"}, "hparams.pool: .*nowhere not found; download the pool"),
    ({"captioner": "coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k", "caption_anchors": True},
     "coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k is not in the local .*open_clip.create_model"),
    ({"captioner": "coca:TinyCoCa-32/ckpt/none.pt"}, "hparams.captioner: no checkpoint file .*ckpt/none.pt"),
])
def test_dry_run_names_the_missing_file_in_one_line_and_writes_nothing(root, tmp_path, monkeypatch, capsys,
                                                                       hparams, says):
    import huggingface_hub.constants

    from bench import sweep as sweeps
    from bench.cli import main
    from methods.arf import ARF

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []
    check = ARF.check_resources.__func__
    monkeypatch.setattr(ARF, "check_resources", classmethod(lambda cls, h, cfg: (calls.append(1), check(cls, h, cfg))))
    path = write_sweep(tmp_path / "s.yaml", root, {"retrieval_anchors": "pool" in hparams, **hparams})
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {path}: methods: arf: ")
    assert __import__("re").search(says, err), err
    assert not (tmp_path / "runs-s").exists()
    assert len(calls) == 1  # once for 16 jobs of the same hparams
    assert len(sweeps.expand(sweeps.load_sweep(path), str(path), check_data=False)) == 16
    assert main(["datasets", "--root", str(root), "--check", "pacs", "--sweep", str(path)]) == 2
    out = capsys.readouterr()
    assert "missing: " in out.out and "lack files" in out.err


def test_a_coca_tag_in_the_hugging_face_cache_passes(root, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from methods.arf import ARF
    from bench.models import cached_weights

    hub = tmp_path / "hf"
    snap = hub / "models--laion--mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    (hub / "models--laion--mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k" / "refs").mkdir()
    (hub / "models--laion--mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert cached_weights("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k") == str(
        snap / "open_clip_model.safetensors")
    cfg = arf_config(root, {"captioner": "coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k", "pool": "cc3m"})
    from bench.method import resolve_hparams

    ARF.check_resources(resolve_hparams("arf", dict(cfg.hparams)), cfg)  # nothing missing


# ---- a whole ARF run on real-layout data -------------------------------------------------------------------

def test_arf_run_with_a_captions_file_and_a_folder_pool_finishes(root, tmp_path):
    from bench.layouts import IMAGE_SUFFIXES
    from bench.train import run

    make_pool(root / "pool_files", "files", n=20, per_shard=7)
    rows = [{"path": str(p.relative_to(root)), "caption": f"a {p.parent.parent.name} picture of a {p.parent.name}"}
            for p in sorted((root / "PACS").rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = arf_config(root, {"captioner": "file:captions.jsonl", "pool": "pool_files", "top_k": 8,
                            "retrieval_batch": 4}, **{"train.steps": 2, "train.eval_every": 2, "train.batch_size": 6})
    run_dir = run(cfg, tmp_path / "run", progress=False)
    assert (run_dir / "done").is_file()
    losses = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in losses if r["role"] == "train"} >= {"caption", "retrieval", "loss"}

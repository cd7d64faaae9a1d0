"""`bench pretrain`: the tiny CLIP's contrastive pretraining, and the checkpoint the project ships."""
import numpy as np
import torch

from bench import embedded
from bench import pretrain
from bench.models import SHIPPED, SHIPPED_SHA256, load_clip, read_checkpoint, sha256_file


def test_short_captions_only_where_the_corpus_names_the_class():
    captions = ["a photo of a small red shape on a plain background", "a sketch of a star"]
    named = np.array([-1, embedded.CLASSES.index("star")])
    rng = np.random.default_rng(0)
    out = [pretrain.corpus_captions(captions, named, np.array([0, 1]), 1.0, rng) for _ in range(20)]
    assert all(o[0] == captions[0] for o in out)  # no class name: the attributes stay
    forms = {o[1] for o in out}
    assert forms <= {f.format(domain="sketch", cls="star") for f in pretrain.SHORT_FORMS} and len(forms) > 1
    assert pretrain.corpus_captions(captions, named, np.array([0, 1]), 0.0, rng) == captions


def test_a_short_pretraining_writes_a_checkpoint_that_loads_and_records_how_it_was_made(tmp_path):
    cfg = pretrain.PretrainConfig(steps=3, corpus_size=48, batch_size=16, warmup_steps=1)
    info = pretrain.pretrain(cfg, tmp_path / "tiny.pt", progress=False, command="bench pretrain --steps 3")
    assert np.isfinite(info["final_loss"]) and info["sha256"] == sha256_file(tmp_path / "tiny.pt")
    meta = read_checkpoint(tmp_path / "tiny.pt")["meta"]  # a weights-only load: plain types only
    assert meta["command"] == "bench pretrain --steps 3" and meta["pretrain_config"]["steps"] == 3
    assert meta["generator_version"] == embedded.GENERATOR_VERSION
    trained = load_clip("TinyCLIP-32", str(tmp_path / "tiny.pt")).model.state_dict()
    again = pretrain.pretrain(cfg, tmp_path / "again.pt", progress=False)  # the same seeds: the same weights
    for k, v in load_clip("TinyCLIP-32", again["path"]).model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_the_shipped_checkpoint_is_the_documented_one():
    path = SHIPPED[("TinyCLIP-32", "embedded")]
    assert sha256_file(path) == SHIPPED_SHA256[("TinyCLIP-32", "embedded")]
    meta = read_checkpoint(path)["meta"]
    assert meta["generator_version"] == embedded.GENERATOR_VERSION  # pretrained on the classes the benchmark draws
    assert meta["command"].startswith("bench") and "pretrain" in meta["command"]
    assert load_clip("TinyCLIP-32", "embedded").model.logit_scale.exp().item() > 1

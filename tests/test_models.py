import time

import pytest
import torch

from bench.errors import BenchError
from bench.models import load_clip, read_checkpoint, save_checkpoint


def test_random_init_tiny_clip_loads_with_tokenizer_and_transforms():
    clip = load_clip("TinyCLIP-32", None)
    tokens = clip.tokenize(["a sketch of a star", "a photo of a house"])
    assert tokens.shape == (2, 24)
    feats = clip.model.encode_text(tokens)
    assert feats.shape == (2, 128)


def test_a_project_checkpoint_records_and_checks_its_architecture(tmp_path):
    clip = load_clip("TinyCLIP-32", None)
    path = tmp_path / "tiny.pt"
    # torch.__version__ is a TorchVersion, which a weights-only load refuses: meta is stored as plain JSON types.
    sha = save_checkpoint(clip.model, "TinyCLIP-32", path, {"note": "test", "torch": torch.__version__})
    assert len(sha) == 64 and read_checkpoint(path)["arch"] == "TinyCLIP-32"
    assert read_checkpoint(path)["meta"] == {"note": "test", "torch": str(torch.__version__)}
    again = load_clip("TinyCLIP-32", str(path))
    for (k, a), (_, b) in zip(clip.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(BenchError, match="saved for architecture 'TinyCLIP-32', not 'RN50'"):
        load_clip("RN50", str(path))


@pytest.mark.parametrize("name, pretrained, pattern", [
    ("TinyCLIP-32", "openai", "neither a file nor a known tag for TinyCLIP-32; known tags: embedded"),
    ("TinyCLIP-32", "/no/such/file.pt", "no file '/no/such/file.pt'"),
    ("ViT-B-61", "openai", "unknown model 'ViT-B-61': did you mean 'ViT-B-16'"),
])
def test_loading_failures_give_one_clear_line(name, pretrained, pattern):
    with pytest.raises(BenchError, match=pattern) as err:
        load_clip(name, pretrained)
    assert "\n" not in str(err.value)


def test_unreadable_checkpoint_gives_one_line(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="not a readable checkpoint"):
        load_clip("TinyCLIP-32", str(bad))


def test_weights_that_cannot_be_fetched_fail_with_one_line(monkeypatch):
    """A real model name + tag goes through open_clip's download, which cannot succeed offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(BenchError) as err:
        load_clip("RN50", "openai")
    msg = str(err.value)
    assert msg.startswith("could not fetch pretrained weights RN50/openai") and "\n" not in msg
    assert "set model.pretrained to the local file path" in msg
    assert time.perf_counter() - t < 60

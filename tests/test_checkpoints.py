"""Local checkpoints in the formats people have (open_clip's, OpenAI's TorchScript release) and the sha256 of the
loaded weights in every run's config.json."""
from __future__ import annotations

import json
import os
import warnings

import open_clip
import pytest
import torch
from torch import nn

from bench import models
from bench.errors import BenchError
from bench.models import load_clip
from tests.conftest import tiny_config

QUICK = "TinyCLIP-32-quickgelu-test"  # TinyCLIP-32 with QuickGELU, as OpenAI's models are


@pytest.fixture(scope="module")
def quick_name(tmp_path_factory):
    cfg = open_clip.get_model_config("TinyCLIP-32")
    path = tmp_path_factory.mktemp("configs") / f"{QUICK}.json"
    path.write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(path)
    return QUICK


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in load_clip(name, None).model.state_dict().items()}


def assert_loaded(clip, expected: dict[str, torch.Tensor]) -> None:
    got = clip.model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k


def openai_torchscript(state: dict[str, torch.Tensor], resolution: int, context: int, path) -> dict:
    """Write `state` as OpenAI released CLIP: a TorchScript archive whose state dict has OpenAI's key names
    (open_clip's CLIP uses the same ones), the ints input_resolution, context_length and vocab_size, and
    fp16 weights where OpenAI's convert_weights puts them (matrices; norms and biases of 1-d stay fp32 here).
    Returns the state as written."""

    class Released(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root, written = Released(), {}
    for key, value in state.items():
        module, *parts = root, *key.split(".")
        for part in parts[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        written[key] = value.half() if value.ndim >= 2 else value.clone()
        module.register_parameter(parts[-1], nn.Parameter(written[key], requires_grad=False))
    vocab = state["token_embedding.weight"].shape[0]
    for key, n in (("input_resolution", resolution), ("context_length", context), ("vocab_size", vocab)):
        root.register_buffer(key, torch.tensor(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(root), str(path))
    return written


def test_open_clip_state_dicts_load_plain_and_as_its_trainer_writes_them(tmp_path):
    state = random_state("TinyCLIP-32", 1)
    plain, trained = tmp_path / "plain.pt", tmp_path / "epoch_3.pt"
    torch.save(state, plain)
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, trained)
    for path in (plain, trained):
        assert_loaded(load_clip("TinyCLIP-32", str(path)), state)


@pytest.mark.filterwarnings("ignore:.*TorchScript archive")  # torch.load's, inside open_clip
def test_openai_torchscript_release_loads_fp16_as_fp32(tmp_path, quick_name):
    path = tmp_path / "ViT-tiny.pt"
    written = openai_torchscript(random_state(quick_name, 2), 32, 24, path)
    assert models.is_torchscript(path) and any(v.dtype == torch.float16 for v in written.values())
    with pytest.raises(RuntimeError, match="weights_only"):  # why load_clip cannot leave it to open_clip 3.3
        open_clip.create_model(quick_name, pretrained=str(path))
    clip = load_clip(quick_name, str(path))
    assert_loaded(clip, written)
    assert clip.model.encode_text(clip.tokenize(["a photo of a dog"])).dtype == torch.float32


def test_openai_state_dict_without_torchscript_loads_too(tmp_path, quick_name):
    state = random_state(quick_name, 3)
    path = tmp_path / "openai-state.pt"
    torch.save({**{k: v.half() for k, v in state.items()}, "input_resolution": torch.tensor(32),
                "context_length": torch.tensor(24), "vocab_size": torch.tensor(49408)}, path)
    assert_loaded(load_clip(quick_name, str(path)), {k: v.half() for k, v in state.items()})


def test_openai_weights_into_a_gelu_model_are_refused(tmp_path, quick_name):
    """open_clip #771: OpenAI's weights in a GELU model load without a word and are subtly wrong."""
    path = tmp_path / "ViT-tiny.pt"
    openai_torchscript(random_state(quick_name, 4), 32, 24, path)
    with pytest.raises(BenchError, match="trained with QuickGELU, and TinyCLIP-32 uses GELU") as err:
        load_clip("TinyCLIP-32", str(path))
    with pytest.raises(BenchError, match="set model.name: ViT-B-16-quickgelu"):
        load_clip("ViT-B-16", str(path))
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_another_architecture_gives_one_line(tmp_path, quick_name):
    jit, plain = tmp_path / "ViT-tiny.pt", tmp_path / "tiny-state.pt"
    openai_torchscript(random_state(quick_name, 5), 32, 24, jit)
    torch.save(random_state("TinyCLIP-32", 5), plain)
    for name, path in (("ViT-B-32-quickgelu", jit), ("TinyCoCa-32", plain)):
        with pytest.raises(BenchError, match=f"weights do not fit {name} .*use the checkpoint's own architecture") \
                as err:
            load_clip(name, str(path))
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_file_without_a_state_dict_gives_one_line(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(BenchError, match="holds no state dict of tensors"):
        load_clip("TinyCLIP-32", str(path))


def test_sha256_is_cached_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 100)
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    first = models.pretrained_sha256("TinyCLIP-32", str(path))
    assert first == real(path) and models.pretrained_sha256("TinyCLIP-32", str(path)) == first and len(calls) == 1
    path.write_bytes(b"y" * 101)
    os.utime(path, ns=(1, 1))
    assert models.pretrained_sha256("TinyCLIP-32", str(path)) == real(path) != first and len(calls) == 2
    assert models.pretrained_sha256("TinyCLIP-32", None) is None and models.pretrained_sha256("TinyCLIP-32", "none") is None


def test_config_json_records_the_pretrained_sha256(embedded_root, tmp_path, monkeypatch):
    from bench import sweep
    from bench.train import run

    weights = embedded_root / "tiny.pt"
    run_dir = run(tiny_config(embedded_root, **{"train.steps": 1}), tmp_path / "r", progress=False)
    assert json.loads((run_dir / "config.json").read_text())["pretrained_sha256"] == models.sha256_file(weights)
    run_dir = run(tiny_config(embedded_root, **{"train.steps": 1, "model.pretrained": "none"}), tmp_path / "r0",
                  progress=False)
    assert json.loads((run_dir / "config.json").read_text())["pretrained_sha256"] is None

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(json.dumps({
        "name": "s", "output": str(tmp_path / "runs"), "methods": ["zeroshot", "erm"], "trial_seeds": [0, 1],
        "base": {"model": {"name": "TinyCLIP-32", "pretrained": str(weights)}, "data": {"root": str(embedded_root)}}}))
    jobs = sweep.expand(sweep.load_sweep(sweep_file))
    models._SHA256_CACHE.clear()
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    assert len(jobs) == 4 and {j.record["pretrained_sha256"] for j in jobs} == {real(weights)}
    assert len(calls) == 1  # once per distinct file, not per job

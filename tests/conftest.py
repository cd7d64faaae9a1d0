import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the network


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> Path:
    """A small embedded benchmark (6 images per domain and class), drawn once per test session."""
    from bench import embedded

    from bench.models import load_clip, save_checkpoint

    root = tmp_path_factory.mktemp("data")
    embedded.generate_benchmark(root, per_class=6, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    save_checkpoint(load_clip("TinyCLIP-32", None).model, "TinyCLIP-32", root / "tiny.pt")
    return root


def tiny_config(root: Path, **over):
    """A run config small enough for a unit test: a random-init tiny CLIP (saved once), a few steps."""
    from bench import config

    d = {"method": "erm", "model": {"name": "TinyCLIP-32", "pretrained": str(root / "tiny.pt")},
         "data": {"dataset": "embedded", "root": str(root), "test_domains": ["sketch"]},
         "train": {"steps": 6, "batch_size": 12, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3,
                   "checkpoint_every": 2, "eval_batch_size": 64}}
    for key, value in over.items():
        d = config.merge(d, config.parse_override(f"{key}={value}") if not isinstance(value, (dict, list)) else
                    nest(key, value))
    return config.from_dict(config.RunConfig, d, "test")


def nest(key, value):
    """'train.steps', 3 -> {'train': {'steps': 3}}."""
    out = node = {}
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out

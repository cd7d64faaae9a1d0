"""Loading CLIP models: open_clip names + pretrained tags, local checkpoints, and the project's tiny CLIP.

Every model goes through `load_clip`, which returns the model with its tokenizer and
transforms. Checkpoints written by this project record their exact architecture
(name and config), and loading checks it, so a checkpoint can never be silently
loaded into the wrong architecture (open_clip #771, the -quickgelu trap).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from bench.errors import BenchError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
ASSETS_DIR = Path(__file__).parent / "assets"
CHECKPOINT_FORMAT = "rft-bench-clip/1"

open_clip.add_model_config(MODEL_CONFIG_DIR)

# Weights the project ships: (model name, tag) -> file, and its sha256 (checked at load; docs/EMBEDDED.md says
# how it was made). `pretrained: embedded` resolves here.
SHIPPED = {("TinyCLIP-32", "embedded"): ASSETS_DIR / "tinyclip32-embedded.pt"}
SHIPPED_SHA256 = {("TinyCLIP-32", "embedded"): "fad7bf1ce369d89402afd3965670d03f304932d29f319c4326b2169c6af5cfc1"}


@dataclass
class Clip:
    """A CLIP model with what is needed to use it."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess_train: Callable
    preprocess_val: Callable
    name: str
    pretrained: str | None
    model_cfg: dict

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)


@contextlib.contextmanager
def _quiet_root_warnings():
    """open_clip logs 'No pretrained weights loaded' on the root logger for random-init models."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def model_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise BenchError(f"unknown model {name!r}: {hint}see open_clip.list_models() for the {len(known)} known names")
    return copy.deepcopy(cfg)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: torch.nn.Module, name: str, path: str | Path, meta: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> str:
    """Write a checkpoint that records its architecture; returns its sha256. Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    # meta as plain JSON types: a weights-only load (read_checkpoint) refuses anything else, and
    # torch.__version__ is a TorchVersion, not a str.
    meta = json.loads(json.dumps(meta or {}, default=str))
    payload = {"format": CHECKPOINT_FORMAT, "arch": name, "model_cfg": model_config(name),
               "state_dict": state, "meta": meta}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def read_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise BenchError(f"{path}: not a readable checkpoint ({type(err).__name__}); re-download or re-create it") from None


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """-> (kind, value): kind is 'none', 'project' (our format), 'file' (any other file) or 'tag'."""
    if pretrained in (None, "", "none"):
        return "none", None
    if (name, pretrained) in SHIPPED:
        path = SHIPPED[(name, pretrained)]
        if not path.is_file():
            raise BenchError(f"shipped weights {path} are missing; restore them with `git checkout -- {path}` "
                             f"or re-create them with `bench pretrain`")
        if sha256_file(path) != SHIPPED_SHA256[(name, pretrained)]:
            raise BenchError(f"shipped weights {path} are not the released ones (sha256 differs); restore them with "
                             f"`git checkout -- {path}`, or set model.pretrained to the file's path to use it anyway")
        return "project", str(path)
    if os.path.isfile(pretrained):
        return "file", pretrained
    if open_clip.get_pretrained_cfg(name, pretrained):
        return "tag", pretrained
    if any(sep in pretrained for sep in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise BenchError(f"model.pretrained: no file {pretrained!r}; check the path")
    tags = open_clip.list_pretrained_tags_by_model(name) + [t for (n, t) in SHIPPED if n == name]
    raise BenchError(f"model.pretrained: {pretrained!r} is neither a file nor a known tag for {name}; "
                     f"known tags: {', '.join(tags) or 'none (use a local checkpoint path)'}")


def _transforms(model: torch.nn.Module) -> tuple[Callable, Callable]:
    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False)


def load_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Clip:
    """Build `name` (an open_clip architecture) with weights from `pretrained`.

    pretrained: None (random init), an open_clip tag such as 'openai' (fetched by open_clip),
    'embedded' for the project's shipped tiny CLIP, or a checkpoint path (this project's
    format, whose recorded architecture must match `name`, or any open_clip state dict).
    """
    cfg = model_config(name)
    kind, value = _resolve_pretrained(name, pretrained)
    payload = None
    if kind in ("project", "file"):
        payload = read_checkpoint(value)
        if not (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT):
            payload = None  # a plain open_clip state dict: open_clip loads it
        elif payload["arch"] != name or payload["model_cfg"] != cfg:
            raise BenchError(
                f"{value}: checkpoint was saved for architecture {payload['arch']!r}"
                f"{' with another config' if payload['arch'] == name else ''}, not {name!r}; "
                f"set model.name: {payload['arch']} (or use a checkpoint of {name})")
    try:
        with _quiet_root_warnings():
            model = open_clip.create_model(name, pretrained=value if (kind in ("tag", "file") and payload is None)
                                           else None, device="cpu")
    except BenchError:
        raise
    except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError/OSError/HF errors on failed fetches
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if kind == "tag":
            raise BenchError(
                f"could not fetch pretrained weights {name}/{pretrained} ({reason}); download them where there is "
                f"network and set model.pretrained to the local file path") from None
        raise BenchError(f"could not load {name} with pretrained={pretrained!r}: {reason}") from None
    if payload is not None:
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BenchError(f"{value}: weights do not fit {name} (missing {list(missing)[:3]}, "
                             f"unexpected {list(unexpected)[:3]}); use the checkpoint's own architecture")
    model.to(device)
    model.eval()
    train_tf, val_tf = _transforms(model)
    return Clip(model=model, tokenizer=open_clip.get_tokenizer(name), preprocess_train=train_tf,
                preprocess_val=val_tf, name=name, pretrained=pretrained, model_cfg=cfg)

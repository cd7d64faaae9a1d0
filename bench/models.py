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
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from bench.errors import BenchError
from bench.results import atomic_torch_save

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


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256


def cached_sha256(path: str | Path) -> str:
    """sha256_file, computed once per file version in this process (a multi-GB checkpoint takes seconds to hash,
    and a sweep records it in every job's config.json): keyed by (real path, size, modification time)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = sha256_file(real)
    return _SHA256_CACHE[key]


def pretrained_file(name: str, pretrained: str | None) -> str | None:
    """The local file `model.pretrained` loads weights from: the shipped file, the path itself, or for an
    open_clip tag the file in Hugging Face's or open_clip's cache. None for random init, a tag not downloaded
    yet, or a value that names nothing (load_clip reports that one)."""
    if pretrained in (None, "", "none"):
        return None
    if (name, pretrained) in SHIPPED:
        path = SHIPPED[(name, pretrained)]
        return str(path) if path.is_file() else None
    if os.path.isfile(pretrained):
        return pretrained
    try:
        return cached_weights(name, pretrained)
    except BenchError:
        return None


def pretrained_sha256(name: str, pretrained: str | None) -> str | None:
    """sha256 of the weights `model.pretrained` loads (what a run's config.json records as pretrained_sha256);
    None where there is no file (random init, a tag not downloaded yet)."""
    path = pretrained_file(name, pretrained)
    return cached_sha256(path) if path else None


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
    atomic_torch_save(payload, path)
    return sha256_file(path)


def read_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise BenchError(f"{path}: not a readable checkpoint ({type(err).__name__}); re-download or re-create it") from None


OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's state dicts


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (how OpenAI released CLIP: torch.jit.save of the model), told by its constants.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_foreign_state_dict(path: str | Path, payload: Any = None) -> tuple[dict, str]:
    """The state dict of a checkpoint not in this project's format, and its format: 'openai' (OpenAI's release,
    a TorchScript archive or its state dict, with OpenAI's int entries input_resolution, context_length and
    vocab_size, which are dropped here) or 'open_clip' (a state dict, or {"state_dict": ...} with "module."
    prefixes as open_clip's trainer writes them). payload: the file's torch.load, if already read.
    open_clip 3.3's own create_model(pretrained=<path>) cannot read the TorchScript ones: it calls
    torch.load(weights_only=True), which refuses TorchScript archives (its load_openai_model reads them)."""
    if payload is None and is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as err:  # noqa: BLE001 - any unreadable archive gets the same one-line answer
            raise BenchError(f"{path}: not a readable TorchScript checkpoint ({type(err).__name__}); "
                             f"re-download it") from None
        fmt = "openai"
    else:
        payload = read_checkpoint(path) if payload is None else payload
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
            raise BenchError(f"{path}: holds no state dict of tensors (found {type(payload).__name__}); give a CLIP "
                             f"checkpoint (open_clip's, OpenAI's or this project's)")
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        fmt = "openai" if any(k in state for k in OPENAI_EXTRA_KEYS) else "open_clip"
    for key in OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, fmt


def _load_weights(model: torch.nn.Module, state: dict, name: str, path: str) -> None:
    """Load `state` (any float dtype: OpenAI's are partly fp16) into `model` as fp32; every key and shape must
    match, else one line naming the first differences."""
    own = model.state_dict()
    if "logit_scale" in state and "logit_scale" in own and state["logit_scale"].numel() == own["logit_scale"].numel():
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)  # scalar vs 1-d (open_clip)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise BenchError(f"{path}: weights do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]}"
                         f"{', shapes ' + str(shapes[:2]) if shapes else ''}); use the checkpoint's own architecture")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """-> (kind, value): kind is 'none', 'project' (our format), 'file' (any other file) or 'tag'."""
    if pretrained in (None, "", "none"):
        return "none", None
    if (name, pretrained) in SHIPPED:
        path = SHIPPED[(name, pretrained)]
        if not path.is_file():
            raise BenchError(f"shipped weights {path} are missing; restore them with `git checkout -- {path}` "
                             f"or re-create them with `bench pretrain`")
        if cached_sha256(path) != SHIPPED_SHA256[(name, pretrained)]:
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
    'embedded' for the project's shipped tiny CLIP, or a checkpoint path: this project's
    format (whose recorded architecture must match `name`), an open_clip state dict (plain or
    {"state_dict": ...}, "module." prefixes allowed; safetensors and big_vision .npz go through
    open_clip), or OpenAI's release (a TorchScript .pt, fp16: `name` must use QuickGELU, e.g.
    ViT-B-16-quickgelu). Every key and shape must fit `name`.
    """
    cfg = model_config(name)
    kind, value = _resolve_pretrained(name, pretrained)
    state = None  # weights read here; None: open_clip reads them (a tag; safetensors and numpy files)
    if kind == "file" and Path(value).suffix.lower() in (".safetensors", ".npz", ".npy"):
        pass
    elif kind in ("project", "file"):
        payload = None if is_torchscript(value) else read_checkpoint(value)
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            if payload["arch"] != name or payload["model_cfg"] != cfg:
                raise BenchError(
                    f"{value}: checkpoint was saved for architecture {payload['arch']!r}"
                    f"{' with another config' if payload['arch'] == name else ''}, not {name!r}; "
                    f"set model.name: {payload['arch']} (or use a checkpoint of {name})")
            state = dict(payload["state_dict"])
        else:
            state, fmt = read_foreign_state_dict(value, payload)
            if fmt == "openai" and not cfg.get("quick_gelu"):  # open_clip #771: GELU would load without a word
                quick = f"{name}-quickgelu"
                fix = (f"set model.name: {quick}" if open_clip.get_model_config(quick) is not None
                       else "use a model config with quick_gelu: true")
                raise BenchError(f"{value}: OpenAI's CLIP weights were trained with QuickGELU, and {name} uses GELU; "
                                 f"{fix}")
    try:
        with _quiet_root_warnings():
            model = open_clip.create_model(name, pretrained=value if (kind in ("tag", "file") and state is None)
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
    if state is not None:
        _load_weights(model, state, name, value)
    model.to(device)
    model.eval()
    train_tf, val_tf = _transforms(model)
    return Clip(model=model, tokenizer=open_clip.get_tokenizer(name), preprocess_train=train_tf,
                preprocess_val=val_tf, name=name, pretrained=pretrained, model_cfg=cfg)


# ---- open_clip's weight caches (offline: what is on disk, and how to get what is not) -----------------------------
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's HF file names


def cached_weights(model: str, pretrained: str | None) -> str | None:
    """The local file open_clip would load ``model``/``pretrained`` from: the path itself for a checkpoint,
    the file in Hugging Face's or open_clip's cache for a tag (None when it is not cached). BenchError for an
    unknown tag or a missing checkpoint path."""
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        if "/" in pretrained or os.path.splitext(pretrained)[1]:
            raise BenchError(f"no checkpoint file {pretrained!r}; fix the path or use an open_clip tag")
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise BenchError(f"{pretrained!r} is neither a file nor an open_clip tag of {model}; "
                         f"known tags: {', '.join(tags) or 'none (use a checkpoint path)'}")
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip.pretrained.download_pretrained splits it
        names = (filename,) if filename else HF_WEIGHT_FILES
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    if cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def download_hint(model: str, pretrained: str) -> str:
    return (f"download it where there is network with `python -c \"import open_clip; open_clip.create_model("
            f"'{model}', pretrained='{pretrained}')\"` (same HF_HOME as the jobs), or run `bench prepare-anchors`, "
            f"or give a local checkpoint path (docs/ARF.md)")

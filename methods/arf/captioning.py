"""Captioners: a rich caption for every fine-tuning image (ARF's text-compensated anchors).

ARF (Han et al., CVPR 2024) pairs each fine-tuning image with the caption of a
pretrained captioner, so that fine-tuning keeps seeing rich text as CLIP did in
pretraining (METHODS.md 1f; the paper used BLIP-2 per a third-party review,
UNVERIFIED). Three sources are offered, all behind one small interface:

* :class:`FileCaptioner` -- precomputed captions, a JSONL file of ``{"path", "caption"}`` lines
  (written by any captioner run elsewhere, or by :func:`caption_items` here);
* :class:`EmbeddedCaptioner` -- the embedded benchmark's own rich captions (``captions.jsonl``);
* :class:`CocaCaptioner` -- an open_clip CoCa model (``coca_ViT-B-32`` with
  ``mscoco_finetuned_laion2b_s13b_b90k`` in real use), as open_clip's README shows.

:func:`build_captioner` makes one from a config value and :func:`caption_items`
captions a list of images once, with a JSONL cache that is itself a valid input
of :class:`FileCaptioner`.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from bench.errors import BenchError
from bench.results import atomic_write, json_lines

log = logging.getLogger("bench.captioning")  # its name before methods/arf/: CLI and job logs show bench.*

DEFAULT_COCA_MODEL = "coca_ViT-B-32"
DEFAULT_COCA_PRETRAINED = "mscoco_finetuned_laion2b_s13b_b90k"
DECODINGS = ("greedy", "beam_search")
_SOT, _EOT = "<start_of_text>", "<end_of_text>"
_SOT_ID, _EOT_ID = 49406, 49407  # open_clip's SimpleTokenizer, the tokenizer of every CoCa config


class Captioner(abc.ABC):
    """Maps image files to captions. ``name`` records where captions came from (provenance, cache key)."""

    name: str

    @abc.abstractmethod
    def caption(self, paths: Sequence[str]) -> list[str]:
        """One caption per path, in order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _norm(path: str | Path) -> str:
    """The key an image is looked up by: its absolute path with symlinks resolved."""
    return os.path.realpath(path)


def write_jsonl_atomic(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as JSON lines to ``path`` through a temporary file and one rename."""
    atomic_write(path, lambda out: out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "w")


def read_jsonl(path: str | Path, what: str = "captions file") -> list[dict]:
    """JSON lines, each an object with string 'path' and 'caption'; BenchError naming the line otherwise."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as lines:
        for lineno, row in json_lines(lines):
            if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("caption"), str)):
                raise BenchError(f"{path}:{lineno}: not a JSON object with string 'path' and 'caption' "
                                 f"({what}); fix that line or regenerate the file")
            rows.append(row)
    return rows


class FileCaptioner(Captioner):
    """Precomputed captions: JSONL lines ``{"path": ..., "caption": ...}``.

    Relative paths in the file are read against ``base`` (default: the file's folder);
    images are matched by their resolved absolute path, so the caller may name them
    either way. Asking for an image the file has no caption for is a BenchError.
    """

    def __init__(self, path: str | Path, base: str | Path | None = None, name: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise BenchError(f"{self.path}: no such captions file; fix the path or caption the images first "
                             f"(e.g. with a coca captioner)")
        self.base = Path(base) if base is not None else self.path.parent
        self.name = name or f"file:{self.path}"
        self._captions = {_norm(self.base / row["path"]): row["caption"] for row in read_jsonl(self.path)}
        log.info("%s: %d captions (paths relative to %s)", self.path, len(self._captions), self.base)

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, paths: Sequence[str]) -> list[str]:
        out = []
        for p in paths:
            text = self._captions.get(_norm(p))
            if text is None:
                raise BenchError(f"{self.path} has no caption for image {p}; add it to the file or fix the file's "
                                 f"paths (relative ones are read against {self.base})")
            out.append(text)
        return out


class EmbeddedCaptioner(FileCaptioner):
    """The embedded benchmark's own rich captions: ``<root>/embedded/captions.jsonl``."""

    def __init__(self, root: str | Path):
        from bench import embedded

        folder = Path(root) / embedded.DATASET_NAME
        path = folder / embedded.CAPTIONS_NAME
        if not path.is_file():
            raise BenchError(f"{path} not found: the embedded benchmark is not generated under {root}; "
                             f"run `bench data embedded` or set data.root")
        super().__init__(path, base=folder, name="embedded")


class CocaCaptioner(Captioner):
    """An open_clip CoCa captioner: ``model.generate(images)``, then ``open_clip.decode`` without special tokens.

    decoding: 'greedy' (the default) is a dependency-free argmax decoder written here; it gives
    exactly ``model.generate(images, generation_type="top_k", top_k=1)`` (checked against
    open_clip 3.3.0), with generate's minimum length and forced end of text, is deterministic
    and does not depend on the batch size. 'beam_search' is ``model.generate(images)``, the
    README's call; open_clip 3.3.0 then needs a transformers that still exports
    BeamSearchScorer (4.55.4 works; 4.57 and 5.x do not), which wants huggingface_hub < 1.
    """

    def __init__(self, model_name: str = DEFAULT_COCA_MODEL, pretrained: str | None = DEFAULT_COCA_PRETRAINED,
                 device: str | torch.device = "cpu", batch_size: int = 32, decoding: str = "greedy",
                 seq_len: int = 30, min_seq_len: int = 5):
        from open_clip import CoCa

        from bench.models import load_clip

        if decoding not in DECODINGS:
            raise BenchError(f"captioner: decoding {decoding!r} unknown; choose one of {', '.join(DECODINGS)}")
        if decoding == "beam_search":
            _require_transformers()
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise BenchError(f"captioner: batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(seq_len, int) and isinstance(min_seq_len, int) and 1 <= min_seq_len < seq_len):
            raise BenchError(f"captioner: need integers 1 <= min_seq_len < seq_len, got {min_seq_len!r}, {seq_len!r}")
        try:
            clip = load_clip(model_name, pretrained, device)
        except BenchError as err:  # the same one line, naming the captioner's own setting
            raise BenchError(f"captioner: {err}".replace("model.pretrained", "the captioner's pretrained")) from None
        if not isinstance(clip.model, CoCa):
            raise BenchError(f"captioner: {model_name} is not a CoCa model and cannot caption; use a coca_* model "
                             f"such as {DEFAULT_COCA_MODEL}")
        if seq_len > clip.model.context_length:
            raise BenchError(f"captioner: seq_len {seq_len} exceeds {model_name}'s context length "
                             f"{clip.model.context_length}; lower it")
        self.model = clip.model.eval()
        self.transform = clip.preprocess_val
        self.device = torch.device(device)
        self.batch_size, self.decoding, self.seq_len, self.min_seq_len = batch_size, decoding, seq_len, min_seq_len
        self.model_name, self.pretrained = model_name, pretrained
        self.name = f"coca:{model_name}:{pretrained or 'none'}:{decoding}"

    @torch.no_grad()
    def caption(self, paths: Sequence[str]) -> list[str]:
        from bench.layouts import load_image

        out: list[str] = []
        for i in range(0, len(paths), self.batch_size):
            images = torch.stack([self.transform(load_image(p)) for p in paths[i:i + self.batch_size]])
            out += self.caption_tensors(images.to(self.device))
        return out

    @torch.no_grad()
    def caption_tensors(self, images: torch.Tensor) -> list[str]:
        """Captions of a batch of already-transformed images (B, 3, H, W)."""
        if self.decoding == "greedy":
            tokens = greedy_decode(self.model, images, self.seq_len, self.min_seq_len)
        else:
            tokens = self.model.generate(images, seq_len=self.seq_len, min_seq_len=self.min_seq_len)
        return [decode_caption(t) for t in tokens]


def _require_transformers() -> None:
    from open_clip import coca_model

    if not getattr(coca_model, "_has_transformers", False):
        raise BenchError("captioner: CoCa beam-search decoding needs transformers with BeamSearchScorer "
                         "(pip install 'transformers==4.55.4' 'huggingface_hub<1'), or set the captioner's "
                         "decoding: greedy")


def decode_caption(tokens: torch.Tensor) -> str:
    """Token ids -> text, cut at the end of text and without the start token (open_clip README)."""
    import open_clip

    text = open_clip.decode(tokens)
    return text.split(_EOT)[0].replace(_SOT, "").strip()


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, images: torch.Tensor, seq_len: int = 30, min_seq_len: int = 5) -> torch.Tensor:
    """Argmax decoding of a CoCa model: (B, <= seq_len) token ids, start token first.

    Mirrors ``CoCa.generate``'s sampling loop with top-1 choice: the end token is barred
    until the sequence has ``min_seq_len`` tokens and forced at ``seq_len``; finished rows
    are padded with ``model.pad_id``.
    """
    latent, embs = model._encode_image(images)
    batch = images.shape[0]
    out = torch.full((batch, 1), _SOT_ID, dtype=torch.long, device=images.device)
    done = torch.zeros(batch, dtype=torch.bool, device=images.device)
    # Only the last position's logits are used: the decoder is causal, so its final norm output is cut to that
    # position before the projection onto the 49,408-token vocabulary (the bulk of a step's work otherwise).
    last_only = model.text_decoder.ln_final.register_forward_hook(lambda module, args, output: output[:, -1:])
    try:
        return _greedy_loop(model, images, latent, embs, out, done, seq_len, min_seq_len)
    finally:
        last_only.remove()


def _greedy_loop(model, images, latent, embs, out, done, seq_len, min_seq_len) -> torch.Tensor:
    while out.shape[1] < seq_len and not bool(done.all()):
        logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1].float()
        if out.shape[1] < min_seq_len:
            logits[:, _EOT_ID] = float("-inf")
        nxt = logits.argmax(dim=-1)
        if out.shape[1] + 1 == seq_len:
            nxt = torch.full_like(nxt, _EOT_ID)
        nxt = torch.where(done, torch.full_like(nxt, model.pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == _EOT_ID
    return out


_COCA_KEYS = ("model", "pretrained", "batch_size", "decoding", "seq_len", "min_seq_len")
_CHOICES = ("'embedded', {'file': PATH} (or 'file:PATH'), or {'coca': {'model': ..., 'pretrained': ...}} "
            "(or 'coca:MODEL/PRETRAINED', e.g. 'coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k'; "
            "'coca' alone: coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k)")


def parse_captioner(spec: Any, root: str | Path | None = None, where: str = "captioner") -> tuple[str, dict]:
    """A captioner config value -> (kind, options), without loading anything.

    kind 'embedded': {}; 'file': {"file", "base"}; 'coca': {"model", "pretrained", ...} (every coca option
    filled in). String forms: ``embedded``, ``file:PATH``, ``coca`` (the default model and tag) and
    ``coca:MODEL/PRETRAINED`` (PRETRAINED: an open_clip tag, ``none`` for random init, or a checkpoint path:
    ``coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k``, ``coca:coca_ViT-L-14//abs/coca.pt``).
    Relative file paths (captions file, checkpoint) are read against ``root`` (the data root) when given.
    """
    def under_root(path: str) -> str:
        return str(Path(root) / path) if root is not None and not os.path.isabs(path) else path

    if spec == "embedded":
        return "embedded", {}
    if spec == "coca":
        spec = {"coca": {}}
    if isinstance(spec, str) and spec.startswith("coca:"):
        model, sep, pretrained = spec[len("coca:"):].partition("/")
        if not model or not sep or not pretrained:
            raise BenchError(f"{where}: {spec!r}: write coca:MODEL/PRETRAINED, e.g. "
                             f"coca:{DEFAULT_COCA_MODEL}/{DEFAULT_COCA_PRETRAINED} (or a checkpoint path after the /)")
        looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        spec = {"coca": {"model": model, "pretrained": under_root(pretrained) if looks_like_path else pretrained}}
    if isinstance(spec, str) and spec.startswith("file:"):
        spec = {"file": spec[len("file:"):]}
    if isinstance(spec, Mapping) and set(spec) in ({"file"}, {"file", "base"}) and isinstance(spec["file"], str):
        return "file", {"file": under_root(spec["file"]), "base": spec.get("base")}
    if isinstance(spec, Mapping) and set(spec) == {"coca"} and isinstance(spec["coca"] or {}, Mapping):
        opts = dict(spec["coca"] or {})
        unknown = sorted(set(opts) - set(_COCA_KEYS))
        if unknown:
            raise BenchError(f"{where}: unknown coca option {unknown[0]!r}; valid: {', '.join(_COCA_KEYS)}")
        pretrained = opts.get("pretrained", DEFAULT_COCA_PRETRAINED)
        opts = {"model": DEFAULT_COCA_MODEL, "batch_size": 32, "decoding": "greedy", "seq_len": 30, "min_seq_len": 5,
                **opts, "pretrained": None if pretrained in (None, "", "none") else pretrained}
        return "coca", opts
    raise BenchError(f"{where}: unknown captioner {spec!r}; choose {_CHOICES}")


def build_captioner(spec: Any, root: str | Path, device: str | torch.device = "cpu",
                    where: str = "captioner") -> Captioner:
    """A captioner from a config value (see :func:`parse_captioner` for the forms it takes).

    ``"embedded"`` needs the embedded benchmark under ``root``; ``{"file": PATH, "base": FOLDER}`` or
    ``"file:PATH"`` a captions file; ``{"coca": {"model", "pretrained", "batch_size", "decoding", "seq_len",
    "min_seq_len"}}`` (every key optional), ``"coca"`` or ``"coca:MODEL/PRETRAINED"`` an open_clip CoCa on
    ``device``. ``where`` names the config key in errors.
    """
    kind, opts = parse_captioner(spec, None, where)
    if kind == "embedded":
        return EmbeddedCaptioner(root)
    if kind == "file":
        return FileCaptioner(opts["file"], base=opts["base"])
    return CocaCaptioner(model_name=opts.pop("model"), pretrained=opts.pop("pretrained"), device=device, **opts)


# ---- CoCa weights: where open_clip keeps them, without loading them -----------------------------------------
def caption_items(captioner: Captioner, paths: Sequence[str], cache: str | Path | None = None,
                  batch_size: int = 64, progress: bool = True, save_every_s: float = 60.0) -> dict[str, str]:
    """Caption every image once -> {path: caption} (paths as given, duplicates captioned once).

    cache: a JSONL file of ``{"path", "caption", "captioner"}`` rows. Rows written by this
    captioner (same ``name``) are reused; the rest are captioned and the file is rewritten
    atomically, every ``save_every_s`` seconds during long runs and at the end, so an
    interrupted run resumes where it stopped. Rows of another captioner are discarded, with
    a warning. The file is also a valid input of :class:`FileCaptioner`.
    """
    from tqdm.auto import tqdm

    wanted = list(dict.fromkeys(paths))
    done: dict[str, str] = {}
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        rows = read_jsonl(cache, what="caption cache; delete it to recaption")
        foreign = {row.get("captioner") for row in rows} - {captioner.name}
        if foreign:
            log.warning("%s holds captions of %s, not %s; recaptioning", cache, sorted(map(str, foreign))[0],
                        captioner.name)
        done = {row["path"]: row["caption"] for row in rows if row.get("captioner") == captioner.name}
    todo = [p for p in wanted if p not in done]
    if todo:
        log.info("captioning %d images with %s (%d cached)", len(todo), captioner.name, len(wanted) - len(todo))
    last_save = time.monotonic()

    def save() -> None:
        if cache is not None:
            write_jsonl_atomic(cache, [{"path": p, "caption": c, "captioner": captioner.name} for p, c in done.items()])

    with tqdm(total=len(todo), desc=f"captioning ({captioner.name})", unit="img", disable=not progress or not todo,
              leave=False) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            texts = captioner.caption(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"{captioner!r} returned {len(texts)} captions for {len(batch)} images")
            done.update(zip(batch, texts))
            bar.update(len(batch))
            if cache is not None and time.monotonic() - last_save > save_every_s:
                save()
                last_save = time.monotonic()
    if todo:
        save()
    return {p: done[p] for p in wanted}

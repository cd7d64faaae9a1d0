"""ARF: anchor-based robust fine-tuning with semantic anchors (Han et al., CVPR 2024; arXiv 2404.06244).

FLYP's contrastive loss between images and class prompts, plus two auxiliary contrastive losses that
keep the rich-text feature space of pretraining (the abstract's two anchors):
- text-compensated anchors: each fine-tuning image with a rich caption from a captioner
  (the embedded benchmark's own captions, a precomputed captions file, or an open_clip CoCa model);
- image-text-pair anchors: (image, caption) pairs retrieved from an auxiliary corpus by CLIP
  similarity to the task's class prompts (the embedded pretraining corpus, or any image-caption
  folder or CSV/Parquet table), a separate mini-batch each step.
L = L_clip(img, prompt) + lam_caption * L_clip(img, caption(img)) + lam_retrieval * L_clip(img_ret, cap_ret).
Both towers and the logit scale train. No official code exists: the loss weights, the retrieval
rule (max cosine similarity to any class prompt, top-k, bench/retrieval.py) and the batch mix are
this harness's reconstruction (METHODS.md 1f marks them unverified).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import embedded
from bench.captioning import build_captioner, caption_items
from bench.config import stable_hash
from bench.errors import BenchError
from bench.losses import contrastive_loss
from bench.method import register_method
from bench.retrieval import PairItems, PairPool, embed_pool, retrieve_for_task
from methods.flyp import FLYP

log = logging.getLogger(__name__)

ANCHOR_CACHE_BYTES = 1 << 30  # transformed anchor images kept in memory (32 px: all of them; 224 px: ~7,000)


def embedded_corpus_pool(root: Path, n: int, seed: int) -> PairPool:
    """The embedded caption corpus (the tiny CLIP's pretraining data) as a pool, drawn once and cached."""
    path = root / f"embedded-corpus-s{seed}-n{n}-v{embedded.GENERATOR_VERSION}.npz"
    if not path.is_file():
        embedded.save_corpus(path, embedded.generate_corpus(n, seed, progress=True))
    return PairPool.from_embedded_corpus(path)


def load_pool(spec: str, root: Path, n: int, seed: int) -> PairPool:
    if spec == "embedded":
        return embedded_corpus_pool(root, n, seed)
    path = Path(spec)
    if path.is_dir():
        return PairPool.from_folder(path)
    if path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        return PairPool.from_table(path)
    raise BenchError(f"hparams.pool: {spec!r} is not 'embedded', a folder of image + .txt pairs, or a "
                     f"CSV/Parquet table of (image, caption); fix the path")


@register_method("arf")
class ARF(FLYP):
    @dataclass(frozen=True)
    class Hparams:
        caption_anchors: bool = True
        retrieval_anchors: bool = True
        lam_caption: float = 1.0
        lam_retrieval: float = 1.0
        captioner: str = "embedded"  # embedded | file:PATH (JSONL of path -> caption) | coca
        pool: str = "embedded"  # embedded (the pretraining corpus) | a folder | a CSV/Parquet table
        pool_size: int = 20000  # embedded pool only
        pool_seed: int = 1  # embedded pool only: the seed of the shipped tiny CLIP's pretraining corpus
        top_k: int = 2000
        retrieval_batch: int = 32
        retrieve_by: str = "text"  # score pool pairs by their caption (text), image, or both embeddings

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        device = self.model.logit_scale.device
        root = Path(task.root)
        if hparams.caption_anchors:
            paths = [p for p, _ in task.train_items()]
            captioner = build_captioner(hparams.captioner, root, device=device, where="hparams.captioner")
            cache = root / ".rft-cache" / f"captions-{stable_hash([captioner.name, task.card.name])}.jsonl"
            captions = caption_items(captioner, paths, cache=None if hparams.captioner == "embedded" else cache)
            # caption_tokens[i]: the caption of training item i (batch["index"] indexes task.train_items()).
            self.register_buffer("caption_tokens", clip.tokenize([captions[p] for p in paths]).to(device),
                                 persistent=False)
        if hparams.retrieval_anchors:
            pool = load_pool(hparams.pool, root, hparams.pool_size, hparams.pool_seed)
            with torch.no_grad():  # retrieval with the zero-shot model, before any training
                image_emb, text_emb = embed_pool(clip, pool, clip.preprocess_val, cache=root / ".rft-cache")
                self.retrieved = retrieve_for_task(clip, task.seen_names, self.templates, image_emb, text_emb,
                                                   min(hparams.top_k, len(pool)), by=hparams.retrieve_by)
            self.anchor_items = PairItems(pool, clip.preprocess_val, self.retrieved)
            # The anchors' captions, tokenized once; their images (eval transform: deterministic) are kept once
            # transformed, up to ANCHOR_CACHE_BYTES.
            self.register_buffer("anchor_tokens", clip.tokenize([pool.caption(int(i)) for i in self.anchor_items.indices])
                                 .to(device), persistent=False)
            self._anchor_images: dict[int, torch.Tensor] = {}
            log.info("ARF: %d anchor pairs retrieved from %s", len(self.retrieved), pool)

    def anchor_image(self, i: int) -> torch.Tensor:
        x = self._anchor_images.get(i)
        if x is None:
            x = self.anchor_items[i][0]
            if (len(self._anchor_images) + 1) * x.numel() * x.element_size() <= ANCHOR_CACHE_BYTES:
                self._anchor_images[i] = x
        return x

    def anchor_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random mini-batch of retrieved pairs (drawn from torch's RNG, which the trainer seeds per step)."""
        idx = torch.randint(len(self.anchor_items), (self.hparams.retrieval_batch,)).tolist()
        images = torch.stack([self.anchor_image(i) for i in idx]).to(device)
        return images, self.anchor_tokens[idx]

    def loss(self, batch):
        labels, device = batch["labels"], batch["labels"].device
        b = len(labels)
        templates = torch.randint(len(self.templates), (b,), device=device)
        texts = [self.prompt_tokens[templates, labels]]
        images = [batch["images"]]
        if self.hparams.caption_anchors:
            texts.append(self.caption_tokens[batch["index"].to(device)])
        if self.hparams.retrieval_anchors:
            ret_images, ret_tokens = self.anchor_batch(device)
            images.append(ret_images)
            texts.append(ret_tokens)
        # One forward pass per tower over everything in this step.
        img = F.normalize(self.model.encode_image(torch.cat(images)), dim=-1)
        txt = self.encode_text(torch.cat(texts))
        scale = self.model.logit_scale.exp()
        logs = {"prompt": contrastive_loss(img[:b], txt[:b], scale)}
        total, t = logs["prompt"], b
        if self.hparams.caption_anchors:
            logs["caption"] = contrastive_loss(img[:b], txt[t:t + b], scale)
            total = total + self.hparams.lam_caption * logs["caption"]
            t += b
        if self.hparams.retrieval_anchors:
            logs["retrieval"] = contrastive_loss(img[b:], txt[t:], scale)
            total = total + self.hparams.lam_retrieval * logs["retrieval"]
        return total, {k: v.item() for k, v in logs.items()}

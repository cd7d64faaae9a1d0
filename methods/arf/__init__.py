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
rule (max cosine similarity to any class prompt, top-k, methods/arf/retrieval.py) and the batch mix are
this harness's reconstruction (METHODS.md 1f marks them unverified).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import embedded
from bench.errors import BenchError
from bench.losses import contrastive_loss
from bench.method import check_choice, check_range, register_method
from methods.arf import anchors
from methods.arf.captioning import parse_captioner
from methods.arf.retrieval import BY, PairItems, PairPool
from methods.flyp import FLYP

log = logging.getLogger(__name__)

ANCHOR_CACHE_BYTES = 1 << 30  # transformed anchor images kept in memory (32 px: all of them; 224 px: ~7,000)


def embedded_corpus_pool(root: Path, n: int, seed: int) -> PairPool:
    """The embedded caption corpus (the tiny CLIP's pretraining data) as a pool, drawn once and cached."""
    path = root / f"embedded-corpus-s{seed}-n{n}-v{embedded.GENERATOR_VERSION}.npz"
    if not path.is_file():
        with anchors.file_lock(path):  # drawn once when jobs start together
            if not path.is_file():
                embedded.save_corpus(path, embedded.generate_corpus(n, seed, progress=True))
    return PairPool.from_embedded_corpus(path)


@register_method("arf")
class ARF(FLYP):
    @dataclass(frozen=True)
    class Hparams(FLYP.Hparams):
        caption_anchors: bool = True
        retrieval_anchors: bool = True
        lam_caption: float = 1.0
        lam_retrieval: float = 1.0
        # embedded | file:PATH (JSONL of path -> caption) | coca:MODEL/PRETRAINED (an open_clip CoCa: tag or
        # checkpoint path) on the run's device; relative paths are read against data.root (docs/ARF.md)
        captioner: str = "embedded"
        # embedded (the pretraining corpus) | a folder (img2dataset output: files or webdataset shards, or
        # image + .txt pairs) | a CSV/Parquet table; relative paths are read against data.root
        pool: str = "embedded"
        pool_size: int = 20000  # embedded pool only
        pool_seed: int = 1  # embedded pool only: the seed of the shipped tiny CLIP's pretraining corpus
        top_k: int = 2000
        retrieval_batch: int = 32
        retrieve_by: str = "text"  # score pool pairs by their caption (text), image, or both embeddings; random: ablation

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "lam_caption", 0, what="the weight of the caption anchors' loss")
        check_range(hparams, "lam_retrieval", 0, what="the weight of the retrieved anchors' loss")
        check_range(hparams, "pool_size", 1, what="pairs in the embedded pool")
        check_range(hparams, "top_k", 1, what="anchor pairs retrieved")
        check_range(hparams, "retrieval_batch", 1, what="anchor pairs per step")
        check_choice(hparams, "retrieve_by", BY)
        cap = hparams.captioner
        if cap not in ("embedded", "coca") and not (cap.startswith("file:") and cap[len("file:"):].strip()):
            parse_captioner(cap, where="hparams.captioner")  # coca:MODEL/PRETRAINED, or a one-line error
        if not hparams.pool:
            raise BenchError("hparams.pool is empty; set embedded, a folder of image + .txt pairs, or a "
                             "CSV/Parquet table of (image, caption)")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        device = self.model.logit_scale.device
        root = Path(task.root)
        # Captions and retrieved pairs come from content-keyed caches shared by every job of a sweep
        # (methods/arf/anchors.py; `bench prepare-anchors SWEEP` fills them before launch).
        if hparams.caption_anchors:
            paths = [p for p, _ in task.train_items()]
            captions = anchors.captions_for(hparams.captioner, task.card, root, paths, device=device)
            # caption_tokens[i]: the caption of training item i (batch["index"] indexes task.train_items()).
            self.register_buffer("caption_tokens", clip.tokenize(captions).to(device), persistent=False)
        if hparams.retrieval_anchors:
            spec = anchors.RetrievalSpec(hparams.pool, hparams.pool_size, hparams.pool_seed, hparams.top_k,
                                         hparams.retrieve_by)
            # retrieval with the zero-shot model, before any training
            self.retrieved, pairs = anchors.retrieved_pairs(spec, clip, task.seen_names, self.templates, root)
            self.anchor_items = PairItems(pairs, clip.preprocess_val)
            # The anchors' captions, tokenized once; their images (eval transform: deterministic) are kept once
            # transformed, up to ANCHOR_CACHE_BYTES.
            self.register_buffer("anchor_tokens", clip.tokenize(list(pairs.captions)).to(device), persistent=False)
            self._anchor_images: dict[int, torch.Tensor] = {}
            log.info("ARF: %d anchor pairs retrieved (%s)", len(pairs), pairs.source)

    @classmethod
    def check_resources(cls, hparams, cfg) -> None:
        """The captioner's weights or captions file and the pool must be on disk (docs/ARF.md)."""
        anchors.check_arf_resources(hparams, cfg.data.root)

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

    # The anchor pairs are rows too: under gradient accumulation each micro-batch encodes its share of them.
    row_keys = ("text_tokens", "anchor_images", "anchor_tokens")

    def draw(self, batch):
        """FLYP's templates, then the step's anchor mini-batch (in this order: the draws of the unsplit loss)."""
        draws = super().draw(batch)
        if self.hparams.retrieval_anchors:
            draws["anchor_images"], draws["anchor_tokens"] = self.anchor_batch(batch["labels"].device)
        return draws

    def features(self, batch):
        b = len(batch["labels"])
        texts, images = [batch["text_tokens"]], [batch["images"]]
        if self.hparams.caption_anchors:
            texts.append(self.caption_tokens[batch["index"].to(batch["labels"].device)])
        if self.hparams.retrieval_anchors:
            images.append(batch["anchor_images"])
            texts.append(batch["anchor_tokens"])
        # One forward pass per tower over everything in this (micro-)batch.
        img = F.normalize(self.model.encode_image(torch.cat(images)), dim=-1)
        txt = self.encode_text(torch.cat(texts))
        out = {"image": img[:b], "text": txt[:b]}
        if self.hparams.caption_anchors:
            out["caption"] = txt[b:2 * b]
        if self.hparams.retrieval_anchors:
            out["anchor_image"], out["anchor_text"] = img[b:], txt[len(txt) - len(batch["anchor_tokens"]):]
        return out

    def loss_from_features(self, features, batch):
        scale = self.model.logit_scale.exp()
        logs = {"prompt": contrastive_loss(features["image"], features["text"], scale)}
        total = logs["prompt"]
        if self.hparams.caption_anchors:
            logs["caption"] = contrastive_loss(features["image"], features["caption"], scale)
            total = total + self.hparams.lam_caption * logs["caption"]
        if self.hparams.retrieval_anchors:
            logs["retrieval"] = contrastive_loss(features["anchor_image"], features["anchor_text"], scale)
            total = total + self.hparams.lam_retrieval * logs["retrieval"]
        return total, {k: v.item() for k, v in logs.items()}

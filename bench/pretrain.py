"""Contrastive pretraining of the project's tiny CLIP on the embedded caption corpus.

The corpus covers every class (seen and unseen) in every domain, so the
pretrained model can recognise the unseen classes zero-shot, as web-pretrained
CLIP can. Half of the captions are rich ("a painting of a large red star on a
striped background"); half are short class captions ("a sketch of a star"),
which cannot be matched by colour or background alone and so teach shape.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.loss import ClipLoss

from bench import embedded
from bench.models import SHIPPED, load_clip, save_checkpoint
from bench.train import lr_factor, param_groups

log = logging.getLogger(__name__)

SHORT_FORMS = ("a {domain} of a {cls}.", "a {cls} {domain}.", "{domain}: a {cls}.", "a {cls}.")


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "TinyCLIP-32"
    corpus_size: int = 60000
    corpus_seed: int = 1
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    short_caption_fraction: float = 0.5
    seed: int = 0


def corpus_captions(captions: list[str], labels: np.ndarray, domains: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> list[str]:
    classes = embedded.CLASSES
    out = []
    for cap, k, d in zip(captions, labels, domains):
        if rng.random() < fraction:
            form = SHORT_FORMS[rng.integers(len(SHORT_FORMS))]
            cap = form.format(domain=embedded.DOMAINS[d], cls=embedded.prompt_name(classes[k]))
        out.append(cap)
    return out


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True, command: str = "") -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    corpus = embedded.generate_corpus(cfg.corpus_size, cfg.corpus_seed, progress=progress)
    images, captions, labels, domains = corpus.images, corpus.captions, corpus.labels, corpus.domains
    clip = load_clip(cfg.model, None)
    model = clip.model.train()
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
    named = [(n, p) for n, p in model.named_parameters()]
    opt = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    loss_fn = ClipLoss()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="pretrain", dynamic_ncols=True)
    for step in bar:
        idx = rng.integers(0, len(pixels), cfg.batch_size)
        x = (pixels[idx].float() / 255 - mean) / std
        texts = corpus_captions([captions[i] for i in idx], labels[idx], domains[idx], cfg.short_caption_fraction, rng)
        img, txt, scale = model(x, clip.tokenize(texts))
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 100 == 0:
            log.info("pretrain step %d loss %.4f", step, loss.item())
    meta = {"pretrain_config": asdict(cfg), "final_loss": loss.item(), "seconds": time.perf_counter() - t0,
            "generator_version": embedded.GENERATOR_VERSION, "command": command, "torch": torch.__version__}
    sha = save_checkpoint(model, cfg.model, out, meta, dtype=torch.float16)
    log.info("wrote %s (sha256 %s)", out, sha)
    return {"path": str(out), "sha256": sha, **meta}


def default_output(model: str = "TinyCLIP-32") -> Path:
    return SHIPPED[(model, "embedded")]

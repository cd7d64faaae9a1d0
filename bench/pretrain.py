"""Contrastive pretraining of the project's tiny CLIP on the embedded caption corpus.

The corpus covers every class (seen and unseen) in every domain, so the
pretrained model can recognise the unseen classes zero-shot, as web-pretrained
CLIP can. Its captions are web-like (bench.embedded.generate_corpus): the
geometric (seen) classes' names are rare words, said in 30% of their captions
("a photo of a small red shape" otherwise); the everyday (unseen) classes are
named in nine captions out of ten. Half of the captions that name a class are
rich ("a painting of a large red star on a striped background"), half short
("a sketch of a star"), which cannot be matched by colour or background alone
and so teach shape.
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
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    short_caption_fraction: float = 0.5
    # how often a caption names its class (bench.embedded.generate_corpus): seen classes' names are rare words
    named_seen: float = embedded.WEB_NAMED_SEEN
    named_unseen: float = embedded.WEB_NAMED_UNSEEN
    seed: int = 0


def corpus_captions(captions: list[str], named: np.ndarray, domains: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> list[str]:
    """A batch's captions: each the corpus's own or, where it names its class, with probability `fraction` a
    short form naming only the domain and the class (a caption without the class name keeps its attributes)."""
    out = []
    for cap, k, d in zip(captions, named, domains):
        if k >= 0 and rng.random() < fraction:
            form = SHORT_FORMS[rng.integers(len(SHORT_FORMS))]
            cap = form.format(domain=embedded.DOMAINS[d], cls=embedded.prompt_name(embedded.CLASSES[k]))
        out.append(cap)
    return out


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True, command: str = "") -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    corpus = embedded.generate_corpus(cfg.corpus_size, cfg.corpus_seed, progress=progress,
                                      named_seen=cfg.named_seen, named_unseen=cfg.named_unseen)
    images, captions, named_cls, domains = corpus.images, corpus.captions, corpus.named, corpus.domains
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
        texts = corpus_captions([captions[i] for i in idx], named_cls[idx], domains[idx], cfg.short_caption_fraction, rng)
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

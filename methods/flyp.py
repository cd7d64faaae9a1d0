"""FLYP: finetune like you pretrain (Goyal et al., CVPR 2023; locuslab/FLYP).

The CLIP contrastive loss between each image and a prompt of its class, the template drawn at
random per sample each step (FLYP's CSV has one row per (image, template)); no class-aware masking,
so two same-class images in a batch are negatives, as in FLYP. Both towers and the logit scale train.
Evaluation rebuilds the zero-shot head from the current text tower (template-averaged).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.losses import contrastive_loss
from bench.method import Method, register_method


@register_method("flyp")
class FLYP(Method):
    @dataclass(frozen=True)
    class Hparams:
        pass

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        self.train_only(self.model)  # image tower, text tower and logit scale
        prompts = [t.format(c) for t in self.templates for c in task.seen_names]
        device = self.model.logit_scale.device
        # (T, K, L) token ids: prompt of template t for class k.
        self.register_buffer("prompt_tokens", clip.tokenize(prompts).view(len(self.templates), len(task.seen_names), -1)
                             .to(device), persistent=False)
        self._head: torch.Tensor | None = None

    # The loss couples the batch's examples: it is loss_from_features(features(batch)), so that gradient
    # accumulation can compute it over the whole batch (bench/method.py, bench/accumulate.py).
    row_keys = ("text_tokens",)

    def draw(self, batch):
        """Each image's prompt: a template drawn at random per image, once per step."""
        labels = batch["labels"]
        templates = torch.randint(len(self.templates), (len(labels),), device=labels.device)
        return {"text_tokens": self.prompt_tokens[templates, labels]}

    def features(self, batch):
        return {"image": F.normalize(self.model.encode_image(batch["images"]), dim=-1),
                "text": self.encode_text(batch["text_tokens"])}

    def loss_from_features(self, features, batch):
        return contrastive_loss(features["image"], features["text"], self.model.logit_scale.exp())

    @contextlib.contextmanager
    def evaluating(self):
        """The head is rebuilt, on first use, from the text tower as it is at this evaluation."""
        self._head = None
        yield

    def seen_head(self) -> torch.Tensor:
        if self._head is None:
            self._head = self.text_head(self.task.seen_names)
        return self._head

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp() * self.encode_image(images) @ self.seen_head().t()

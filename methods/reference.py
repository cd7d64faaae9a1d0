"""A frozen reference image tower shared by the regularised methods (CAR-FT, Lipsum-FT).

It runs without autograd, and when the training batches are not augmented (train.augment: false)
its features depend only on the image, so they are cached per training item.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class FrozenImageFeatures(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = copy.deepcopy(visual).requires_grad_(False).eval()
        self._cache: dict[int, torch.Tensor] = {}

    def train(self, mode: bool = True):
        return super().train(False)  # never leaves eval mode

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        images = batch["images"]
        if not batch.get("deterministic_images"):
            return F.normalize(self.visual(images), dim=-1)
        index = batch["index"].tolist()
        missing = [i for i, key in enumerate(index) if key not in self._cache]
        if missing:
            feats = F.normalize(self.visual(images[missing]), dim=-1)
            for i, f in zip(missing, feats):
                self._cache[index[i]] = f
        return torch.stack([self._cache[key] for key in index])

"""Zero-shot CLIP: the pretrained model evaluated as is; the baseline every table needs.

Head: template-averaged, renormalised class-prompt embeddings times the logit scale, applied to
normalised image features (Radford et al. 2021; wise-ft src/models/zeroshot.py): the very head
ERM starts from, so WiSE-FT at alpha = 0 reproduces this model's outputs exactly.
"""
from __future__ import annotations

import torch

from bench.method import Method, register_method
from methods.erm import zeroshot_head


@register_method("zeroshot")
class ZeroShot(Method):
    trains = False
    baseline = 0  # the reference row: listed first, the reference point in plots

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        self.head = zeroshot_head(self).requires_grad_(False)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode_image(images))

    def loss(self, batch):
        raise RuntimeError("zeroshot does not train")

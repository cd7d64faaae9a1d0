"""LP-FT: linear probing, then full fine-tuning (Kumar et al., ICLR 2022).

For the first `lp_fraction` of the steps only the head trains (the image features are computed
without autograd, so the tower gets no gradient and AdamW leaves it alone); then the image tower
and the head train together, as in ERM. The head starts from the zero-shot text embeddings, as
ERM's does, and the phase switch is a function of the step, so resume is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.method import register_method
from methods.erm import ERM


@register_method("lp_ft")
class LPFT(ERM):
    @dataclass(frozen=True)
    class Hparams:
        lp_fraction: float = 0.5
        label_smoothing: float = 0.0

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        if not 0.0 <= hparams.lp_fraction <= 1.0:
            raise BenchError(f"hparams.lp_fraction must lie in [0, 1], got {hparams.lp_fraction}")

    def loss(self, batch):
        probing = batch["step"] < self.hparams.lp_fraction * batch["total_steps"]
        if probing:
            with torch.no_grad():
                features = self.encode_image(batch["images"])
        else:
            features = self.encode_image(batch["images"])
        return F.cross_entropy(self.head(features), batch["labels"], label_smoothing=self.hparams.label_smoothing)

"""ERM: standard full fine-tuning of the image tower with a linear head (FT in WiSE-FT's terms).

The head is initialised from the zero-shot text embeddings (template-averaged,
renormalised, times the logit scale), has a zero bias, and sees normalised image
features: logits = normalize(f(x)) W^T + b (wise-ft src/models/zeroshot.py and
finetune.py). Trains the image tower and the head with cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.method import Method, check_range, register_method


class LinearHead(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t() + self.bias


def zeroshot_head(method: Method) -> LinearHead:
    with torch.no_grad():
        return LinearHead(method.logit_scale_init * method.text_head(method.task.seen_names))


@register_method("erm")
class ERM(Method):
    baseline = 1  # listed after zero-shot; subclasses are not baselines (bench.method.baseline_of)

    @dataclass(frozen=True)
    class Hparams:
        label_smoothing: float = 0.0

    @classmethod
    def check_hparams(cls, hparams):
        # Shipped subclasses inherit label_smoothing (class Hparams(ERM.Hparams)); a user's plugin written before
        # that (docs/ADDING_A_METHOD.md's example once had a plain `class Hparams:`) may lack it: keep those working.
        if hasattr(hparams, "label_smoothing"):
            check_range(hparams, "label_smoothing", 0, 1, hi_open=True, what="cross-entropy label smoothing")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        self.head = zeroshot_head(self)
        self.train_only(self.model.visual, self.head)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode_image(images))

    loss_is_mean = True  # cross-entropy: a mean over the examples (gradient accumulation splits it exactly)

    def loss(self, batch):
        return F.cross_entropy(self.predict(batch["images"]), batch["labels"],
                               label_smoothing=self.hparams.label_smoothing)

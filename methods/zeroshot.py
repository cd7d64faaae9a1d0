"""Zero-shot CLIP: the pretrained model evaluated as is; the baseline every table needs.

Head: template-averaged, renormalised class-prompt embeddings (Radford et al. 2021;
wise-ft src/models/zeroshot.py).
"""
from __future__ import annotations

import torch

from bench.method import Method, register_method


@register_method("zeroshot")
class ZeroShot(Method):
    trains = False

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        self._head: torch.Tensor | None = None

    def seen_head(self) -> torch.Tensor:
        if self._head is None:
            self._head = self.text_head(self.task.seen_names)
        return self._head

    def loss(self, batch):
        raise RuntimeError("zeroshot does not train")

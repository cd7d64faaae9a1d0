"""WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model (Wortsman et al., CVPR 2022).

theta_alpha = (1 - alpha) theta_zeroshot + alpha theta_finetuned, over every trained weight, head
included (mlfoundations/wise-ft src/wise_ft.py::_merge). As a registry key it fine-tunes as ERM does
and evaluates the interpolated model at every evaluation (so model selection sees the ensemble).
The same arithmetic applies after any method's finished run, with no retraining: `bench wise RUN`
writes the variants wise:0.0 ... wise:1.0 (bench/wise.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bench.losses import interpolate
from bench.method import check_range, register_method
from methods.erm import ERM


@register_method("wise_ft")
class WiSEFT(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        alpha: float = 0.5  # 0 = the zero-shot model, 1 = the fine-tuned one (wise-ft's CLI default is 0.5)

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "alpha", 0, 1, what="0: the zero-shot model, 1: the fine-tuned one")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        # theta_0: the zero-shot weights of everything that trains (kept as buffers, never trained).
        self._theta0 = {n: p.detach().clone() for n, p in self.trainable_parameters()}

    @contextlib.contextmanager
    def evaluating(self):
        """The interpolated weights in place of the fine-tuned ones, which are restored on exit."""
        params = dict(self.trainable_parameters())
        finetuned = {n: p.detach().clone() for n, p in params.items()}
        mixed = interpolate(self._theta0, finetuned, self.hparams.alpha)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(mixed[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(finetuned[n])

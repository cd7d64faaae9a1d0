"""L2-SP: fine-tuning with an L2 penalty towards the starting point (Li, Grandvalet, Davoine, ICML 2018;
"Explicit Inductive Bias for Transfer Learning with Convolutional Networks", arXiv 1802.01483).

The paper's regulariser is Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_Sbar||^2: w_S the layers that exist in
the pretrained network (pulled towards their pretrained values w0_S), w_Sbar the new ones (plain L2). Here the
trained pretrained layers are the image tower's; the head is ERM's (zero-shot text embeddings times the logit
scale), so it is not a randomly initialised new layer: beta (default 0) applies the paper's new-layer term to
its weight, which pulls the zero-shot head towards 0 and so is off by default (a choice, docs/METHODS.md).
The loss is ERM's cross-entropy plus Omega; train.weight_decay (AdamW's decoupled decay) still applies, as for
every loss-only method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.method import check_range, register_method
from methods.erm import ERM


def l2sp_penalty(named_params, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the named parameters of ||p - start[name]||^2 (its gradient: 2 (p - start))."""
    return sum(((p - start[n]) ** 2).sum() for n, p in named_params)


@register_method("l2sp")
class L2SP(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        alpha: float = 0.1  # towards the pretrained image tower (the paper's default alpha)
        beta: float = 0.0  # the paper's new-layer L2 on the head's weight (0.01 there; here the head is not new)

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "alpha", 0, what="the weight of ||w - w0||^2 over the image tower")
        check_range(hparams, "beta", 0, what="the weight of ||head||^2")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        # w0: the pretrained image tower, kept as non-persistent buffers (a function of the pretrained weights)
        self._start = {n: p.detach().clone() for n, p in self.model.visual.named_parameters()}

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves w0 with the model
        out = super()._apply(fn, *args, **kwargs)
        self._start = {n: fn(t) for n, t in self._start.items()}
        return out

    def regularizer(self) -> torch.Tensor:
        """Omega(w) = alpha/2 ||w_visual - w0||^2 + beta/2 ||head.weight||^2."""
        reg = 0.5 * self.hparams.alpha * l2sp_penalty(self.model.visual.named_parameters(), self._start)
        return reg + 0.5 * self.hparams.beta * (self.head.weight ** 2).sum()

    loss_is_mean = True  # cross-entropy (a mean over examples) plus a term free of them

    def loss(self, batch):
        ce = super().loss(batch)
        reg = self.regularizer()
        return ce + reg, {"ce": ce.item(), "reg": reg.item()}

"""LP-FT: linear probing, then full fine-tuning (Kumar et al., ICLR 2022).

The linear probe is fitted to convergence before fine-tuning starts, as in the paper (and FLYP's
`linear_lbfgs.py`): L2-regularised logistic regression on the frozen pretrained image features of the
training images (eval transform), by L-BFGS, starting from the zero-shot head. Then the image tower and the
head train together with cross-entropy, as in ERM. The probe is a function of the pretrained weights and the
training images alone, so a resumed run fits the same probe (and then loads its checkpoint over it).

Why not probe with the fine-tuning optimiser: the head starts at logit scale x unit text embeddings (entries
of ~|9| for the tiny CLIP), and AdamW at a fine-tuning learning rate moves an entry by about lr a step, so a
head trained for a few hundred steps at lr 1e-4 stays where it started.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.data import ImageItems
from bench.method import check_range, register_method
from methods.erm import ERM


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression min_W,b CE(features W^T + b, labels) + l2 ||W||^2 by L-BFGS from (weight,
    bias); returns the fitted (W, b)."""
    W = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True)
    x, y = features.float(), labels
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.t() + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


@register_method("lp_ft")
class LPFT(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        lp_l2: float = 1e-4  # L2 weight of the probe's logistic regression (on the mean cross-entropy)
        lp_max_iter: int = 200  # L-BFGS iterations

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "lp_l2", 0, what="the probe's L2 weight")
        check_range(hparams, "lp_max_iter", 1, what="L-BFGS iterations")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        features, labels = self.probe_features(clip)
        weight, bias = fit_linear_probe(features, labels, self.head.weight, self.head.bias, hparams.lp_l2,
                                        hparams.lp_max_iter)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    @torch.no_grad()
    def probe_features(self, clip, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised frozen image features and labels of every training image (eval transform)."""
        device = self.model.logit_scale.device
        was_training = self.model.training
        self.model.eval()
        loader = torch.utils.data.DataLoader(ImageItems(self.task.train_items(), clip.preprocess_val),
                                             batch_size=batch_size)
        feats, labels = [], []
        for x, y, _ in loader:
            feats.append(self.encode_image(x.to(device)).float())
            labels.append(y.to(device))
        self.model.train(was_training)
        return torch.cat(feats), torch.cat(labels)

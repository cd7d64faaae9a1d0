"""CAR-FT: context-aware robust fine-tuning (Mao et al., IJCV 2024; arXiv 2211.16175).

Cross-entropy (ERM's head and trained image tower) plus lambda * KL between the context
distributions of the frozen zero-shot image tower and the fine-tuned one. The contexts are the
prompt templates: context prototype t is the text embedding of template t averaged over the
classes (ctx in cs-giung/lipsum-ft scripts/setup.py, the public re-implementation), and
p(t | x) = softmax_t(tau * <f(x), ctx_t>). No official code exists: the KL direction (default
KL(p_zeroshot || p_finetuned), the zero-shot model as teacher), lambda and the temperature tau
(default: the pretrained logit scale) are hyperparameters (METHODS.md 1d marks them unverified).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import text
from bench.losses import kl_divergence
from bench.method import check_choice, check_range, register_method
from methods.erm import ERM
from methods.reference import FrozenImageFeatures


@register_method("car_ft")
class CARFT(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        lam: float = 1.0
        temperature: float = 0.0  # 0 = the pretrained logit scale (100 for OpenAI CLIP)
        kl_direction: str = "zs_ft"  # zs_ft = KL(p_zeroshot || p_finetuned); ft_zs = the reverse

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "lam", 0, what="the weight of the KL term")
        check_range(hparams, "temperature", 0, what="0: the pretrained logit scale")
        check_choice(hparams, "kl_direction", ("zs_ft", "ft_zs"))

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        device = self.model.logit_scale.device
        with torch.no_grad():
            raw = text.raw_embeddings(self.encode_text, clip.tokenize, task.seen_names, self.templates, device)
        self.register_buffer("contexts", text.context_weights(raw), persistent=False)  # (T, D)
        self.tau = hparams.temperature or self.logit_scale_init
        self.reference = FrozenImageFeatures(self.model.visual)

    def context_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.tau * features @ self.contexts.t()

    def regularizer(self, batch, features: torch.Tensor) -> torch.Tensor:
        """KL between the context distributions of the zero-shot and the fine-tuned image features."""
        zs = self.context_logits(self.reference(batch))
        ft = self.context_logits(features)
        return kl_divergence(zs, ft) if self.hparams.kl_direction == "zs_ft" else kl_divergence(ft, zs)

    loss_is_mean = True  # cross-entropy and the KL: both means over the examples

    def loss(self, batch):
        features = self.encode_image(batch["images"])
        ce = F.cross_entropy(self.head(features), batch["labels"], label_smoothing=self.hparams.label_smoothing)
        reg = self.regularizer(batch, features)
        return ce + self.hparams.lam * reg, {"ce": ce.item(), "reg": reg.item()}

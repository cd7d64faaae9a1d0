"""Lipsum-FT: robust fine-tuning with random text guidance (Nam, Heo, Lee, ICLR 2024; cs-giung/lipsum-ft).

Cross-entropy (ERM's head and trained image tower) plus lambda * R, where
R = mean_batch 1/(2M) sum_m (v_theta(x)_m - v_theta0(x)_m)^2 and v(x)_m = s <phi(t_m), f(x)>: the
logits of the fine-tuned and the frozen zero-shot image features against M random texts t_m of L
random tokens ([BOS] + L ids uniform over the vocabulary without BOS/EOS + [EOS]), re-drawn every
step and embedded by the frozen text tower; s is the pretrained logit scale. Defaults M=80, L=8,
lambda=1 (scripts/Lipsum-FT.py, scripts/defaults.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.method import check_range, register_method
from bench.text import encode_text_prefix
from methods.erm import ERM
from methods.reference import FrozenImageFeatures


def random_token_texts(m: int, length: int, sot: int, eot: int, device: torch.device | str,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """M token sequences [sot] + `length` random ids below min(sot, eot) (the vocabulary without the
    special tokens, as in the reference code) + [eot]: shape (M, length + 2), no padding."""
    ids = torch.randint(0, min(sot, eot), (m, length), device=device, generator=generator)
    return torch.cat([torch.full((m, 1), sot, device=device), ids, torch.full((m, 1), eot, device=device)], dim=1)


@register_method("lipsum_ft")
class LipsumFT(ERM):
    @dataclass(frozen=True)
    class Hparams(ERM.Hparams):
        lam: float = 1.0
        num_texts: int = 80  # M
        text_length: int = 8  # L

    @classmethod
    def check_hparams(cls, hparams):
        super().check_hparams(hparams)
        check_range(hparams, "lam", 0, what="the weight of the regulariser")
        check_range(hparams, "num_texts", 1, what="random texts per step")
        check_range(hparams, "text_length", 1, what="random tokens per text; the model's text context is checked "
                                                    "when it is built")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        self.reference = FrozenImageFeatures(self.model.visual)
        tok = clip.tokenizer
        self.sot, self.eot = tok.sot_token_id, tok.eot_token_id
        self.context_length = tok.context_length
        if hparams.text_length + 2 > self.context_length:
            from bench.errors import BenchError
            raise BenchError(f"hparams.text_length {hparams.text_length} does not fit the text context "
                             f"({self.context_length} tokens with BOS and EOS)")

    @torch.no_grad()
    def random_text_features(self, device) -> torch.Tensor:
        tokens = random_token_texts(self.hparams.num_texts, self.hparams.text_length, self.sot, self.eot, device)
        return F.normalize(encode_text_prefix(self.model, tokens), dim=-1)

    def regularizer(self, batch, features: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        s = self.logit_scale_init
        v_ft = s * features @ texts.t()
        v_zs = s * self.reference(batch) @ texts.t()
        return ((v_ft.float() - v_zs.float()) ** 2).sum(-1).mean() / (2 * texts.shape[0])

    loss_is_mean = True  # cross-entropy and R: means over the examples, against the step's one draw of texts

    def draw(self, batch):
        """The step's M random texts, embedded by the frozen text tower: drawn once per step, whole batch."""
        return {"random_texts": self.random_text_features(batch["labels"].device)}

    def loss(self, batch):
        batch = self.drawn(batch)
        features = self.encode_image(batch["images"])
        ce = F.cross_entropy(self.head(features), batch["labels"], label_smoothing=self.hparams.label_smoothing)
        reg = self.regularizer(batch, features, batch["random_texts"])
        return ce + self.hparams.lam * reg, {"ce": ce.item(), "reg": reg.item()}

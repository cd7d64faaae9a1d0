"""CaRot: calibrated robust fine-tuning (Oh et al., NeurIPS 2024, "Towards Calibrated Robust Fine-Tuning of
Vision-Language Models"; MLAI-Yonsei/CaRot @ 5d78b94, `src/models/carot_loss.py`, `src/args.py`,
`example_scripts/carot.sh`).

FLYP's contrastive loss (both towers and the logit scale train; FLYP's per-image template draw) plus three terms,
each as carot_loss.py computes it:
- orthogonality of the visual projection W (width x embed): lam_orth * ||W^T W - I||_F (the Frobenius norm
  itself, not its square: `((covv - I)**2).sum()**(1/2)`; `--l_orth_wv`);
- lam_cross * ||W_v W_t^T||_F with W_t the text projection (`--cross_fnorm`): in the released ImageNet script
  (carot.sh: 0.05), beside the two terms the paper names;
- self-distillation from an EMA teacher (a copy of the whole CLIP, both towers and logit scale): with the
  teacher's image-text logits s_t I_t T_t^T of the same batch as soft targets,
  lam_distill * mean_i [CE(softmax(teacher row i), student row i) + CE(softmax(teacher col i), student col i)]
  (`--distil_coef`; the two directions summed, as there), from step 1 on (the reference skips step 0, where the
  teacher is the student).
The teacher is updated in Method.after_step, every `ema_every` steps (step % ema_every == 0, 0-based, after the
optimizer's step): teacher = m * teacher + (1 - m) * student over all parameters, with m rising linearly from
m_start to m_end over the first m_warmup of the run, then m_end (`--m_sche_src/--m_sche_tar/--m_warm_up`,
`--ema_up_freq`). The teacher is the method's extra state: saved with every checkpoint and restored on resume.
Defaults: the reference's (carot.sh and args.py): lam_distill 1.5, lam_orth 0.2, lam_cross 0.05, ema_every 500,
m 0.05 -> 0.9 over 20 %. Label smoothing of the contrastive loss (`--ls`, default 0 there) is not offered.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.losses import contrastive_loss
from bench.method import check_range, register_method
from methods.flyp import FLYP


def orthogonality(proj: torch.Tensor) -> torch.Tensor:
    """||W^T W - I||_F for a (width, embed) projection W."""
    cov = proj.t() @ proj
    return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))


def soft_target_ce(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per row: -sum_j softmax(teacher)_j log softmax(student)_j."""
    return -(F.softmax(teacher_logits.float(), dim=1) * F.log_softmax(student_logits.float(), dim=1)).sum(1)


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CaRot's self-distillation on a batch's (B, B) image-text logits: image rows and text rows (the
    transposes), each with the teacher's softmax as soft targets, summed, averaged over the B examples."""
    return (soft_target_ce(teacher_logits, student_logits)
            + soft_target_ce(teacher_logits.t(), student_logits.t())).mean()


def ema_momentum(step: int, total_steps: int, m_start: float, m_end: float, warmup: float) -> float:
    """CaRot's teacher momentum at (0-based) step: linear from m_start to m_end over warmup * total, then m_end."""
    ramp = total_steps * warmup
    return (m_end - m_start) / ramp * step + m_start if step < ramp else m_end


@register_method("carot")
class CaRot(FLYP):
    @dataclass(frozen=True)
    class Hparams(FLYP.Hparams):
        lam_distill: float = 1.5  # --distil_coef (carot.sh)
        lam_orth: float = 0.2  # --l_orth_wv (carot.sh)
        lam_cross: float = 0.05  # --cross_fnorm (carot.sh)
        ema_every: int = 500  # --ema_up_freq (args.py), in steps
        m_start: float = 0.05  # --m_sche_src
        m_end: float = 0.9  # --m_sche_tar
        m_warmup: float = 0.2  # --m_warm_up, a fraction of the run's steps

    @classmethod
    def check_hparams(cls, hparams):
        for key in ("lam_distill", "lam_orth", "lam_cross"):
            check_range(hparams, key, 0, what="a loss weight; 0 switches the term off")
        check_range(hparams, "ema_every", 1, what="teacher update period, in steps")
        check_range(hparams, "m_start", 0, 1, what="teacher momentum")
        check_range(hparams, "m_end", 0, 1, what="teacher momentum")
        check_range(hparams, "m_warmup", 0, 1, what="a fraction of the run's steps")

    def __init__(self, clip, task, hparams):
        super().__init__(clip, task, hparams)
        # the EMA teacher: a frozen copy of the whole CLIP, moved by after_step only (no teacher without distillation)
        self.teacher = (copy.deepcopy(self.model).requires_grad_(False) if hparams.lam_distill > 0 else None)

    def features(self, batch):
        feats = super().features(batch)
        if self.teacher is not None and batch["step"] > 0:
            with torch.no_grad():
                feats["teacher_image"] = F.normalize(self.teacher.encode_image(batch["images"]), dim=-1)
                feats["teacher_text"] = F.normalize(self.teacher.encode_text(batch["text_tokens"]), dim=-1)
        return feats

    def loss_from_features(self, features, batch):
        scale = self.model.logit_scale.exp()
        loss = contrastive_loss(features["image"], features["text"], scale)
        logs = {"clip": loss.item()}
        proj = self.model.visual.proj
        if self.hparams.lam_orth > 0:
            orth = orthogonality(proj)
            loss = loss + self.hparams.lam_orth * orth
            logs["orth"] = orth.item()
        if self.hparams.lam_cross > 0:
            cross = torch.linalg.matrix_norm(proj @ self.model.text_projection.t())
            loss = loss + self.hparams.lam_cross * cross
            logs["cross"] = cross.item()
        if "teacher_image" in features:
            student = scale * features["image"] @ features["text"].t()
            teacher = self.teacher.logit_scale.exp() * features["teacher_image"] @ features["teacher_text"].t()
            distill = distillation(student, teacher)
            loss = loss + self.hparams.lam_distill * distill
            logs["distill"] = distill.item()
        return loss, logs

    @torch.no_grad()
    def after_step(self, step, total_steps):
        if self.teacher is None or step % self.hparams.ema_every:
            return
        m = ema_momentum(step, total_steps, self.hparams.m_start, self.hparams.m_end, self.hparams.m_warmup)
        for student, teacher in zip(self.model.parameters(), self.teacher.parameters()):
            teacher.mul_(m).add_((1 - m) * student)

    def extra_state(self):
        return {} if self.teacher is None else {f"teacher.{n}": p for n, p in self.teacher.named_parameters()}

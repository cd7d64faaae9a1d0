"""Pure loss functions shared by methods; each is unit-tested on its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
                     ) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over B matched pairs (features already normalised):
    L = 1/2 [CE(s I T^T, arange(B)) + CE(s T I^T, arange(B))]. Equals open_clip's ClipLoss on one device."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(p_teacher || p_student), from logits."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (1 - alpha) * start + alpha * end, key by key.

    Written as a sum of two products so that alpha = 0 gives `start` and alpha = 1 gives `end` exactly."""
    if start.keys() != end.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(set(start) ^ set(end))[:5]}")
    return {k: (1 - alpha) * start[k] + alpha * end[k] if start[k].is_floating_point() else end[k] for k in start}

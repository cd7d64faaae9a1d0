"""Text-side tensors built from class names and prompt templates.

raw[t, k]  = normalize(g(template_t(class_k)))        (T, K, D)
classes[k] = normalize(mean_t raw[t, k])              (K, D)  the zero-shot head (wise-ft zeroshot.py)
contexts[t] = normalize(mean_k raw[t, k])             (T, D)  CAR-FT's context prototypes
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def fill(templates: Sequence[str], classnames: Sequence[str]) -> list[str]:
    """All prompts, template-major: index t * K + k."""
    return [t.format(c) for t in templates for c in classnames]


def encode_prompts(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenize: Callable, texts: Sequence[str],
                   device: torch.device | str, batch_size: int = 1024) -> torch.Tensor:
    """Normalised text embeddings of `texts`, (N, D)."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def raw_embeddings(encode_text: Callable, tokenize: Callable, classnames: Sequence[str], templates: Sequence[str],
                   device: torch.device | str) -> torch.Tensor:
    emb = encode_prompts(encode_text, tokenize, fill(templates, classnames), device)
    return emb.view(len(templates), len(classnames), -1)


def class_weights(raw: torch.Tensor) -> torch.Tensor:
    return F.normalize(raw.mean(dim=0), dim=-1)


def context_weights(raw: torch.Tensor) -> torch.Tensor:
    return F.normalize(raw.mean(dim=1), dim=-1)

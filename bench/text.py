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


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """The token columns up to the last one that any sequence of the batch uses (open_clip pads with 0)."""
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, :int(used.max()) + 1] if len(used) else tokens


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text(tokens) without the padding columns no sequence of the batch uses: the same features
    (see encode_text_prefix) at a fraction of the cost, since prompts and captions are short."""
    return encode_text_prefix(model, trim_padding(tokens))


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text on token sequences shorter than the context (no padding).

    The text tower is causal and pools at the EOS token, so the padding after EOS cannot change the
    output: running only the first n positions gives the same features at a fraction of the cost
    (Lipsum-FT's 80 random texts of 10 tokens, against a 77-token context). Models whose text tower
    is not open_clip's own causal transformer get plain encode_text on padded tokens."""
    from open_clip.model import CLIP, text_global_pool

    n = tokens.shape[1]
    if not isinstance(model, CLIP) or model.text_pool_type != "argmax" or model.attn_mask is None:
        padded = torch.zeros(len(tokens), model.context_length, dtype=tokens.dtype, device=tokens.device)
        padded[:, :n] = tokens
        return model.encode_text(padded)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection

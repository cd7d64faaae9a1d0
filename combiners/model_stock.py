"""Model Stock: k fine-tuned runs averaged per layer, pulled toward the pretrained weights by their angle.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv 2403.19522):
per layer, the average of k fine-tuned weights pulled back toward the pretrained weights by
a ratio set by the angle between their task vectors.

For each trained tensor ("layer"), with w0 the pretrained (zero-shot) weights and w_1..w_k the fine-tuned ones:

    cos(theta) = the mean over pairs i < j of cos(w_i - w0, w_j - w0)
    t          = k cos(theta) / (1 + (k - 1) cos(theta))          (the paper's Eq. for k models)
    merged     = t * w_avg + (1 - t) * w0,  w_avg = mean of the w_i

so identical task vectors (cos = 1) give t = 1 (the average, i.e. the runs themselves) and orthogonal ones
(cos = 0) give t = 0 (the pretrained weights). Reconstruction choices, where the paper is silent (its official
code was not public when this was written; arcee-ai/mergekit's model_stock.py makes the same first choice):
- k > 2: theta from the mean of the pairwise cosines (the paper derives t for k models with one theta);
- cos(theta) is clamped to [0, 1], so t stays in [0, 1]: a negative mean cosine would make t negative or
  unbounded (t = 1 / 0 at cos = -1 / (k - 1)); task vectors that disagree fall back to w0;
- a layer whose task vectors are all zero (it did not move) has cos = 0 and keeps w0 (= w_avg there);
- "layer" = each trained parameter tensor (the paper's per-layer rule applied per tensor, as mergekit does).
The paper's setting is k runs of one recipe with different seeds: `bench combine --combiner model_stock
--group-by hp` (members that differ only in train.seed_offset); the default group-by method also admits other
hparams.
"""
from __future__ import annotations

import itertools

import torch

from bench.combine import Combined, Combiner, register_combiner
from bench.errors import BenchError


def merge_ratio(k: int, cos: float) -> float:
    """t = k cos / (1 + (k - 1) cos), for cos in [0, 1]."""
    return k * cos / (1 + (k - 1) * cos)


def mean_cosine(vectors: list[torch.Tensor]) -> float:
    """The mean pairwise cosine of flattened task vectors, clamped to [0, 1]; 0 where one has no length."""
    flat = [v.detach().double().flatten() for v in vectors]
    norms = [float(v.norm()) for v in flat]
    cos = [float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
           for (a, na), (b, nb) in itertools.combinations(zip(flat, norms), 2)]
    return min(1.0, max(0.0, sum(cos) / len(cos)))


def model_stock(theta0: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """-> (merged state, t per tensor)."""
    k = len(states)
    if k < 2:
        raise BenchError(f"model_stock needs at least 2 fine-tuned runs of a task, got {k}")
    for s in states:
        if s.keys() != theta0.keys():
            raise BenchError(f"runs differ in trained parameters ({sorted(set(s) ^ set(theta0))[:3]}); combine "
                             f"runs of one method")
    merged, ratios = {}, {}
    for key, w0 in theta0.items():
        if not w0.is_floating_point():
            merged[key] = states[0][key]
            continue
        ws = [s[key] for s in states]
        t = merge_ratio(k, mean_cosine([w - w0 for w in ws]))
        w_avg = torch.stack(ws).mean(0)
        merged[key] = t * w_avg + (1 - t) * w0
        ratios[key] = t
    return merged, ratios


@register_combiner("model_stock")
class ModelStock(Combiner):
    min_members = 2

    def variants(self):
        return ["model_stock"]

    def combine(self, ctx):
        merged, ratios = model_stock(ctx.theta0, [m.state for m in ctx.members])
        info = {"t": {k: round(v, 6) for k, v in ratios.items()},
                "t_mean": round(sum(ratios.values()) / max(len(ratios), 1), 6)}
        yield Combined("model_stock", merged, [m.job_id for m in ctx.members], info)

"""Model soups: uniform and greedy averages of several fine-tuned runs of one task.

Wortsman et al., ICML 2022 (mlfoundations/model-soups main.py): the average of the trained weights of several
fine-tuned runs of one task.

- soup:uniform: the plain average of every member.
- soup:greedy: members sorted by their own ID validation accuracy, best first (ties: the smaller job id); the
  soup starts as the best one and each next member is kept if the average with it does not lower the soup's ID
  validation accuracy (the paper's Recipe 1, ">="; the repository's main.py keeps only a strict increase, ">").
  ID validation only (role id_val: the training domains' held-out split), never OOD.

Members: any hyperparameters and training seeds of one method on one (dataset, held-out set, trial seed)
(`bench combine --combiner soup`, group-by method by default), at least 2 (a soup of one run is that run).
"""
from __future__ import annotations

from typing import Callable

import torch

from bench.combine import Combined, Combiner, average, register_combiner


def greedy_soup(states: dict[str, dict[str, torch.Tensor]], score: Callable[[dict[str, torch.Tensor]], float]
                ) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """Recipe 1 of model soups over {job id: state}. -> (soup, ingredients in the order added, info: order,
    each member's own score, each candidate soup's score and whether it was kept)."""
    own = {j: score(s) for j, s in states.items()}
    order = sorted(states, key=lambda j: (-own[j], j))
    kept = [order[0]]
    soup, best = states[order[0]], own[order[0]]
    tried = []
    for j in order[1:]:
        candidate = average([states[k] for k in kept + [j]])
        acc = score(candidate)
        tried.append({"job_id": j, "soup_id_val": acc, "kept": acc >= best})
        if acc >= best:
            kept.append(j)
            soup, best = candidate, acc
    return soup, kept, {"order": order, "id_val": own, "tried": tried, "soup_id_val": best}


@register_combiner("soup")
class Soup(Combiner):
    min_members = 2  # `bench combine` leaves a lone run alone (its soup would be itself, under another name)

    def variants(self):
        return ["soup:uniform", "soup:greedy"]

    def combine(self, ctx):
        ids = [m.job_id for m in ctx.members]
        yield Combined("soup:uniform", average([m.state for m in ctx.members]), ids)
        soup, kept, info = greedy_soup({m.job_id: m.state for m in ctx.members}, ctx.score)
        yield Combined("soup:greedy", soup, kept, info)

"""Evaluation: accuracy of a method on every eval set of a task, as long-format rows."""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from bench.data import EvalSet, ImageItems, Task, iterate
from bench.method import Method

log = logging.getLogger(__name__)

_CACHE_LIMIT_BYTES = 2 * 1024**3


class EvalData:
    """Eval-transformed images of each eval set; kept in memory when they fit (they never change)."""

    def __init__(self, task: Task, transform, batch_size: int, num_workers: int = 0):
        self.task, self.transform = task, transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._cacheable: bool | None = None

    def _loader(self, es: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(ImageItems(es.items, self.transform), batch_size=self.batch_size,
                                             num_workers=self.num_workers)
        for x, y, _ in iterate(loader):
            yield x, y

    def batches(self, i: int, es: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if i in self._cache:
            yield from self._cache[i]
            return
        batches = []
        for x, y in self._loader(es):
            if self._cacheable is None:
                total = sum(len(e.items) for e in self.task.evalsets)
                self._cacheable = total * x[0].numel() * x.element_size() < _CACHE_LIMIT_BYTES
            if self._cacheable:
                batches.append((x, y))
            yield x, y
        if self._cacheable:
            self._cache[i] = batches


@torch.no_grad()
def evaluate(method: Method, data: EvalData, step: int, device: torch.device, autocast, suite: bool = True
             ) -> list[dict]:
    """Rows of every eval set; suite=False skips the zero-shot suite's (role zeroshot_xd, train.suite_every)."""
    was_training = method.training
    method.eval()
    with method.eval_context():
        method.eval_cache_clear()
        rows = _evaluate(method, data, step, device, autocast, suite)
    method.train(was_training)
    return rows


def predict_classes(logits: torch.Tensor, class_subset: tuple[tuple[int, ...], ...] | None) -> torch.Tensor:
    """argmax over the classes; with a class subset (EvalSet.class_subset), argmax over its columns only,
    returned as the index of the group holding that column (= argmax over groups of each group's max logit)."""
    if class_subset is None:
        return logits.argmax(-1)
    cols = torch.tensor([c for g in class_subset for c in g], device=logits.device)
    owner = torch.tensor([k for k, g in enumerate(class_subset) for _ in g], device=logits.device)
    return owner[logits.index_select(-1, cols).argmax(-1)]


def _evaluate(method: Method, data: EvalData, step: int, device: torch.device, autocast, suite: bool = True
              ) -> list[dict]:
    rows = []
    unseen_head = None
    for i, es in enumerate(data.task.evalsets):
        if es.role == "zeroshot_xd" and not suite:
            continue
        correct = total = 0
        own_head = None
        for x, y in data.batches(i, es):
            x, y = x.to(device, non_blocking=True), y.to(device)
            with autocast():
                if es.classes == "seen":
                    logits = method.predict(x)
                elif es.classes == "own":  # a dataset never fine-tuned on: its own class names and templates
                    if own_head is None:
                        own_head = method.text_head(list(es.class_names), list(es.templates))
                    logits = method.encode_image(x) @ own_head.t()
                else:
                    if unseen_head is None:
                        unseen_head = method.text_head(data.task.unseen_names)
                    logits = method.encode_image(x) @ unseen_head.t()
            correct += (predict_classes(logits.float(), es.class_subset) == y).sum().item()
            total += len(y)
        rows.append({"step": step, "role": es.role, "domain": es.domain, "split": es.split, "metric": "acc",
                     "value": correct / max(total, 1), "n": total})
    return rows

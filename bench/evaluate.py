"""Evaluation: accuracy and calibration (bench.calibration) of a method on every eval set of a task, as long-format
rows."""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from bench.data import EvalSet, ImageItems, Task, iterate
from bench.method import Method
from bench.results import row

log = logging.getLogger(__name__)

_CACHE_LIMIT_BYTES = 2 * 1024**3


class _SetBatches(torch.utils.data.Sampler):
    """The batches of one eval set at a time (`span`: its range in the concatenation of every eval set's items),
    in order: the batches a DataLoader(batch_size=...) over that set alone yields."""

    def __init__(self, batch_size: int):
        self.batch_size, self.span = batch_size, range(0)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.span.start, self.span.stop, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.span.stop)))

    def __len__(self) -> int:
        return -(-len(self.span) // self.batch_size)


class EvalData:
    """Eval-transformed images of each eval set; kept in memory when they fit (they never change).

    With num_workers > 0, one DataLoader over every eval set's items keeps its worker processes between eval sets
    and evaluations (persistent_workers), so that an evaluation of many sets does not start num_workers processes
    per set, every time; close() ends them. pin_memory: page-locked batches, for non_blocking copies to a GPU."""

    def __init__(self, task: Task, transform, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.task, self.transform = task, transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._cacheable: bool | None = None
        self._pool: torch.utils.data.DataLoader | None = None
        self._offsets: dict[int, int] = {}  # id(eval set) -> where its items start in the pool's dataset

    def _worker_pool(self) -> torch.utils.data.DataLoader:
        if self._pool is None:
            items, self._offsets = [], {}
            for es in self.task.evalsets:
                self._offsets[id(es)] = len(items)
                items += es.items
            self._pool = torch.utils.data.DataLoader(
                ImageItems(items, self.transform), batch_sampler=_SetBatches(self.batch_size),
                num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                persistent_workers=True)
        return self._pool

    def _loader(self, es: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0 or not any(e is es for e in self.task.evalsets):
            yield from self._loader_alone(es)  # in this process, or a set that is not the task's: on its own
            return
        if id(es) not in self._offsets:  # the task's eval sets changed since the pool was built
            self.close()
        pool = self._worker_pool()
        start = self._offsets[id(es)]
        pool.batch_sampler.span = range(start, start + len(es.items))
        try:
            for x, y, _ in pool:  # the same worker processes every time (persistent_workers)
                yield x, y
        except Exception:
            self.close()  # after an error (an unreadable image) start afresh, and stall nothing later
            raise

    def _loader_alone(self, es: EvalSet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(ImageItems(es.items, self.transform), batch_size=self.batch_size,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory)
        for x, y, _ in iterate(loader):
            yield x, y

    def close(self) -> None:
        """End the worker processes (if any); a later evaluation starts new ones."""
        it = getattr(self._pool, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
        self._pool = None

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
            if len(self._cache) == len(self.task.evalsets):
                self.close()  # every set is in memory: the workers have nothing left to load


@torch.no_grad()
def evaluate(method: Method, data: EvalData, step: int, device: torch.device, autocast, suite: bool = True
             ) -> list[dict]:
    """Rows of every eval set; suite=False skips the zero-shot suite's (role zeroshot_xd, train.suite_every)."""
    was_training = method.training
    method.eval()
    with method.evaluating():
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


def subset_index(class_subset: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """(groups, widest group) column indices, short groups padded with their first column: logits[:, index]
    .amax(-1) are the logits of a set's own classes, each group's max logit (wise-ft's projection for ImageNet-R/-A
    and ObjectNet; their argmax is predict_classes'). Calibration metrics are computed on these."""
    width = max(len(g) for g in class_subset)
    return torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in class_subset], device=device)


def logit_scale(method: Method) -> float:
    """The scale of the text-head logits of 'unseen' and 'own' sets: the model's current exp(logit_scale), the
    pretrained one unless the method trains it (FLYP). Seen classes: predict() scales its own logits."""
    return float(method.model.logit_scale.exp())


def _evaluate(method: Method, data: EvalData, step: int, device: torch.device, autocast, suite: bool = True
              ) -> list[dict]:
    """Per eval set (rows in the task's order): acc, then bench.calibration's ece, nll, ece_ts, macro_f1 (cards
    with metrics: [macro_f1]) and rel_bins; last, the temperature fitted on the id_val sets. The id_val sets are
    evaluated first, so that every other set is temperature-scaled on the fly (no logits kept but id_val's)."""
    from bench import calibration

    evalsets = [(i, es) for i, es in enumerate(data.task.evalsets) if es.role != "zeroshot_xd" or suite]
    order = sorted(evalsets, key=lambda ie: ie[1].role != "id_val")  # stable: id_val first, else the task's order
    f1 = "macro_f1" in getattr(data.task.card, "metrics", ())
    out: dict[int, tuple[dict, dict, calibration.SetMetrics]] = {}
    unseen_head, scale, temperature, id_stats = None, None, None, []

    def fit() -> float | None:  # on the id_val sets (pooled), then their own ece_ts from their kept logits
        if not id_stats:
            return None
        t = calibration.fit_temperature(*map(torch.cat, zip(*(s.logits() for s in id_stats))))
        for s in id_stats:
            s.set_temperature(t)
        return t

    for i, es in order:
        if temperature is None and es.role != "id_val":
            temperature = fit()
        stats = calibration.SetMetrics(device, f1=f1 and es.role != "zeroshot_xd", keep=es.role == "id_val")
        if temperature is not None:
            stats.set_temperature(temperature)
        correct = total = 0
        own_head = groups = None
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
            logits = logits.float()
            correct += (predict_classes(logits, es.class_subset) == y).sum().item()
            total += len(y)
            if es.classes != "seen":
                scale = logit_scale(method) if scale is None else scale
                logits = scale * logits
            if es.class_subset is not None and groups is None:
                groups = subset_index(es.class_subset, logits.device)
            stats.update(logits if groups is None else logits[:, groups].amax(-1), y)
        base = {"step": step, "role": es.role, "domain": es.domain, "split": es.split}
        out[i] = (base, row(**base, metric="acc", value=correct / max(total, 1), n=total), stats)
        if es.role == "id_val" and stats.n:
            id_stats.append(stats)
    if temperature is None:  # only id_val sets were evaluated
        temperature = fit()
    rows = []
    for i in sorted(out):
        base, acc, stats = out[i]
        rows += [acc] + stats.rows(base)
    if temperature is not None:
        n_id = sum(s.n for s in id_stats)
        rows.append(row(step, "id_val", "temperature", temperature, n_id))
    return rows

"""Gradient accumulation: one optimisation step from `train.accum_steps` micro-batches, with the gradient
of the unsplit step, so a large batch fits a small GPU (the method contract: bench/method.py).

Two routes, chosen by the method (Method.accumulation_route):
- mean: the loss is a mean over examples, so the size-weighted sum of the micro-batches' gradients is the
  batch's gradient (one backward per micro-batch);
- features: the loss couples the examples (CLIP's contrastive loss), so each micro-batch needs every other
  one's features. The features of all micro-batches are computed without gradients; the loss is computed
  once from all of them, and its backward gives the gradient of every feature row and of the parameters the
  loss reads directly (the logit scale); then each micro-batch's features are computed again with gradients
  and back-propagated with their rows of that gradient (GradCache, Gao et al. 2021). open_clip's
  `--accum-freq` (open_clip PR #267) caches features the same way, but recomputes the whole loss and runs its
  backward once per micro-batch, which counts the gradient of the logit scale accum_freq times; here it is
  counted once and the loss is computed once.
Both need forward passes without randomness of their own (no dropout: CLIP's towers have none): every random
draw of a step is made once per full batch, in Method.draw.
"""
from __future__ import annotations

from typing import Any

import torch

from bench.errors import BenchError

# The trainer's per-example batch entries, split into micro-batches (a method adds its own in Method.row_keys).
ROW_KEYS = ("images", "labels", "index", "domains")


def check_accumulation(method_cls: type, accum_steps: int, source: str = "config") -> None:
    """Refuse, at load time, accum_steps > 1 for a trained method that allows no accumulation route."""
    if accum_steps > 1 and method_cls.trains and method_cls.accumulation_route() is None:
        raise BenchError(f"{source}: train.accum_steps: {accum_steps}, but method {method_cls.name!r} has no "
                         f"accumulation route; set train.accum_steps: 1, or give the method loss_is_mean = True "
                         f"or features/loss_from_features (docs/ADDING_A_METHOD.md)")


def split_batch(batch: dict[str, Any], parts: int, row_keys: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`parts` micro-batches: each per-example tensor (ROW_KEYS and `row_keys`) cut along dim 0 into `parts`
    consecutive chunks (torch.tensor_split: sizes differ by at most one, some may be empty), every other entry
    shared."""
    rows = [key for key in (*ROW_KEYS, *row_keys) if key in batch]
    chunks = {key: torch.tensor_split(batch[key], parts) for key in rows}
    return [{**batch, **{key: chunks[key][j] for key in rows}} for j in range(parts)]


def _loss_and_logs(out) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def accumulate(method, batch: dict[str, Any], parts: int, autocast) -> tuple[float, dict]:
    """Back-propagate the gradient of method's loss on `batch` from `parts` micro-batches into the parameters'
    .grad (added to what is there); -> (loss, logs) of the whole batch. The caller zeroes, clips and steps."""
    route = type(method).accumulation_route()
    if route is None:  # check_accumulation refuses this at load time
        raise BenchError(f"method {type(method).name!r} has no accumulation route; set train.accum_steps: 1")
    with autocast():
        batch = method.drawn(batch)
    pieces = split_batch(batch, parts, method.row_keys)
    return (_features_route if route == "features" else _mean_route)(method, batch, pieces, autocast)


def _mean_route(method, batch, pieces, autocast) -> tuple[float, dict]:
    n = len(batch["labels"])
    total, logs = 0.0, {}
    for piece in pieces:
        weight = len(piece["labels"]) / n
        if weight == 0:
            continue
        with autocast():
            loss, piece_logs = _loss_and_logs(method.loss(piece))
        (weight * loss).backward()
        total += weight * loss.item()
        for key, value in piece_logs.items():
            logs[key] = logs.get(key, 0.0) + weight * float(value)
    return total, logs


def _features_route(method, batch, pieces, autocast, dist=None) -> tuple[float, dict]:
    """dist (bench/distributed.py): `pieces` are this rank's; every rank's features are gathered, so the loss is
    the whole batch's; with one piece per rank its features are computed once, with gradients, and kept."""
    keep = dist is not None and len(pieces) == 1
    with torch.set_grad_enabled(keep), autocast():
        cached = [method.features(piece) for piece in pieces]
    full = {key: torch.cat([c[key].detach() for c in cached]) for key in cached[0]}
    start = dict.fromkeys(full, 0)
    if dist is not None:
        from bench.distributed import gather_rows

        full, start = gather_rows(full, dist)
    full = {key: value.requires_grad_() for key, value in full.items()}
    with autocast():
        loss, logs = _loss_and_logs(method.loss_from_features(full, batch))
    loss.backward()  # the gradient of every feature row, and of the parameters the loss reads directly
    if dist is not None and not dist.main:  # those are counted once, by rank 0 (the caller zeroed .grad)
        for p in method.parameters():
            p.grad = None
    for piece, cache in zip(pieces, cached):
        if keep:
            feats = cache
        else:
            with autocast():
                feats = method.features(piece)
        tensors, grads = [], []
        for key, f in feats.items():
            n = len(cache[key])
            if f.shape != cache[key].shape:
                raise BenchError(f"method {type(method).name!r}: features[{key!r}] changed shape between two "
                                 f"passes over the same micro-batch; features() must be deterministic")
            if full[key].grad is not None and f.requires_grad and n:
                tensors.append(f)
                grads.append(full[key].grad[start[key]:start[key] + n])
            start[key] += n
        if tensors:
            torch.autograd.backward(tensors, grads)
    return loss.item(), logs

"""Multi-GPU and multi-node jobs (torch.distributed): one step over W processes is the one-process step.

A job is distributed when its processes carry torch's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): torchrun sets it, and bench.jobs.JobTask exports it from Slurm's (submitit's
TorchDistributedEnvironment) when a job runs as several Slurm tasks. Backend nccl on CUDA (each process on GPU
LOCAL_RANK), gloo on the CPU. What stays the same as one process:

- the batch: train.batch_size is the global batch; every rank draws the step's keys (StepSampler.keys(step), the
  same keys on every rank) and loads its contiguous slice of them (torch.tensor_split's: sizes differ by at most
  one), so the images, and their augmentations (seeded per key), are the one-process batch's;
- the seeding: every rank seeds torch per step as one process does and makes the step's draws (Method.draw) on the
  whole batch, then keeps its slice of the per-example draws (Method.row_keys), as gradient accumulation does;
  Method.draw sees the global batch's labels, index and domains, and a zero placeholder of its images' shape;
- the gradient: loss-mean methods back-propagate their slice's mean loss, weighted by the slice's share of the
  batch, and the gradients are summed over ranks; contrastive methods (the features route, bench/accumulate.py)
  gather every rank's features, so the contrastive batch is the global one, compute the loss once on each rank,
  back-propagate it through their own slice's features, and sum over ranks; the gradient of the parameters the
  loss reads directly (the logit scale) is kept on rank 0 only, so that it is counted once. Accumulation
  composes: each rank splits its slice into train.accum_steps micro-batches.
Only rank 0 writes the run folder and evaluates; the other ranks wait at a barrier. Every rank loads the
checkpoint when a job resumes. Gradients are all-reduced after the backward pass (no overlap with it, unlike
DistributedDataParallel's buckets).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from bench import accumulate
from bench.errors import BenchError

log = logging.getLogger(__name__)

# Rank 0 evaluates while the others wait at a barrier: the collectives' timeout must outlast an evaluation.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Dist:
    """This process's place in the job: rank of world (world 1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch's environment variables; (0, 1, 0) when they are absent."""
    values = []
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = os.environ.get(key)
        try:
            values.append(int(raw) if raw not in (None, "") else default)
        except ValueError:
            raise BenchError(f"environment: {key}={raw!r} is not an integer; launch with torchrun or unset "
                             f"RANK, WORLD_SIZE and LOCAL_RANK") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world:
        raise BenchError(f"environment: RANK={rank} is not in [0, WORLD_SIZE={world}); launch with torchrun or "
                         f"unset RANK and WORLD_SIZE")
    return rank, world, rank if local is None else local


def setup(device: torch.device, device_name: str, source: str = "config") -> tuple[Dist, torch.device]:
    """Join the job's process group (when WORLD_SIZE > 1) -> (Dist, this rank's device)."""
    rank, world, local = env_world()
    if world == 1:
        return Dist(), device
    if device.type == "cuda":
        if ":" in device_name:
            raise BenchError(f"{source}: train.device: {device_name!r} names one GPU, but this job runs as {world} "
                             f"processes (WORLD_SIZE); set train.device: auto or cuda (rank r uses GPU LOCAL_RANK)")
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = not tdist.is_initialized()
    if owns:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise BenchError(f"environment: WORLD_SIZE={world} but {missing[0]} is not set; launch with torchrun "
                             f"(docs/SWEEPS.md) or set MASTER_ADDR and MASTER_PORT")
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                 timeout=TIMEOUT)
    elif (tdist.get_rank(), tdist.get_world_size()) != (rank, world):
        raise BenchError(f"environment: RANK={rank}, WORLD_SIZE={world} differ from the process group's "
                         f"({tdist.get_rank()}, {tdist.get_world_size()}); unset them or launch with torchrun")
    log.info("distributed: rank %d of %d on %s", rank, world, device)
    return Dist(rank, world, local, owns), device


def check(method_cls: type, batch_size: int, accum_steps: int, world: int, source: str = "config") -> None:
    """Refuse what a distributed job cannot split: a method with no accumulation route, a batch too small."""
    if world == 1 or not method_cls.trains:
        return
    if method_cls.accumulation_route() is None:
        raise BenchError(f"{source}: method {method_cls.name!r} has no accumulation route, so a step cannot be split "
                         f"over {world} processes; run it as one process, or give the method loss_is_mean = True "
                         f"or features/loss_from_features (docs/ADDING_A_METHOD.md)")
    if batch_size < world * accum_steps:
        raise BenchError(f"{source}: train.batch_size: {batch_size} is fewer than {world} processes x "
                         f"train.accum_steps {accum_steps}; set it to at least {world * accum_steps}")


def bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous slice [lo, hi) of n rows: torch.tensor_split's (bench.accumulate.split_batch's)."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


class RankSlice(torch.utils.data.Sampler):
    """The step's keys of this rank: its slice of the step sampler's (global) batch."""

    def __init__(self, sampler, dist: Dist):
        self.sampler, self.dist = sampler, dist

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            lo, hi = bounds(len(keys), self.dist.world, self.dist.rank)
            yield keys[lo:hi]


def rank_batch(method, local: dict[str, Any], index: torch.Tensor, labels_of: torch.Tensor, domain_of: torch.Tensor,
               dist: Dist, autocast) -> dict[str, Any]:
    """This rank's batch: the step's draws made on the whole batch (index: its items, in order), then cut.
    The whole drawn batch travels along under 'global_batch' (the features route computes its loss from it)."""
    device = local["labels"].device
    images = local["images"]
    whole = {**local, "images": images.new_zeros(()).expand(len(index), *images.shape[1:]), "index": index,
             "labels": labels_of[index].to(device), "domains": domain_of[index].to(device)}
    with autocast():
        whole = method.drawn(whole)
    mine = accumulate.split_batch(whole, dist.world, method.row_keys)[dist.rank]
    return {**mine, "images": images, "global_batch": whole}


def step(method, batch: dict[str, Any], parts: int, autocast, dist: Dist) -> tuple[float, dict]:
    """Back-propagate this rank's share of the step's gradient and sum it over ranks into .grad (which the
    caller has zeroed) -> (loss, logs) of the whole batch, equal on every rank."""
    route = type(method).accumulation_route()
    whole = batch["global_batch"]
    local = {k: v for k, v in batch.items() if k != "global_batch"}
    pieces = accumulate.split_batch(local, parts, method.row_keys)
    params = [p for _, p in method.trainable_parameters()]
    if route == "features":
        loss, logs = accumulate._features_route(method, whole, pieces, autocast, dist)
    elif route == "mean":
        loss, logs = accumulate._mean_route(method, local, pieces, autocast)
        share = len(local["labels"]) / len(whole["labels"])
        for p in params:
            if p.grad is not None:
                p.grad.mul_(share)
        keys = sorted(logs)
        values = torch.tensor([loss, *(float(logs[k]) for k in keys)], dtype=torch.float64) * share
        tdist.all_reduce(values)
        loss, logs = values[0].item(), dict(zip(keys, values[1:].tolist()))
    else:  # check() refuses this before training
        raise BenchError(f"method {type(method).name!r} has no accumulation route; run it as one process")
    all_reduce_grads(params)
    return loss, logs


def gather_rows(local: dict[str, torch.Tensor], dist: Dist) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every rank's rows of each feature, in rank order (detached) -> (whole, where this rank's rows start)."""
    keys = list(local)
    device = local[keys[0]].device
    sizes = torch.tensor([len(local[k]) for k in keys], device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(dist.world)]
    tdist.all_gather(all_sizes, sizes)
    all_sizes = torch.stack(all_sizes).tolist()  # [rank][key]
    whole, start = {}, {}
    for j, key in enumerate(keys):
        t = local[key].detach()
        most = max(row[j] for row in all_sizes)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:len(t)] = t
        out = [torch.empty_like(padded) for _ in range(dist.world)]
        tdist.all_gather(out, padded)
        whole[key] = torch.cat([o[:row[j]] for o, row in zip(out, all_sizes)])
        start[key] = sum(row[j] for row in all_sizes[:dist.rank])
    return whole, start


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum .grad over ranks. A parameter without a gradient on every rank keeps none (AdamW then skips it, as
    it would in one process); one with a gradient on some rank gets zeros on the others."""
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    tdist.all_reduce(has)
    for p, n in zip(params, has.tolist()):
        if n and p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [tdist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
    for h in handles:
        h.wait()


def broadcast_parameters(method, dist: Dist) -> None:
    """Rank 0's trained parameters on every rank (they agree already: same weights, seed and checkpoint; this
    makes sure of it, as DistributedDataParallel does at its start)."""
    if dist.active:
        with torch.no_grad():
            for _, p in method.trainable_parameters():
                tdist.broadcast(p.data, 0)

"""The one training loop every method shares.

Reads top to bottom: build the model, data and method; AdamW with linear warmup and
cosine decay; gradient clipping; bf16 autocast on CUDA; evaluation every
`eval_every` steps (and at step 0 and the last step), a checkpoint every
`checkpoint_every` steps, resume from the latest checkpoint. Every random draw
of step s depends only on (run seed, s), so a resumed run equals an unbroken one.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path

import torch

from bench import config
from bench import distributed
from bench import results
from bench import trackers as tracking
from bench.accumulate import accumulate
from bench.data import ImageItems, StepSampler, iterate
from bench.errors import BenchError
from bench.evaluate import EvalData, evaluate
from bench.method import METHODS, baseline_of, build_method, hparams_dict
from bench.models import load_clip
from bench.prepare import Prepared, autocast_for, build_run_task, prepare, resolve_device
from bench.wise import wise_rows

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0 (wise-ft's cosine_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases and the logit scale (open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if p.ndim < 2 or "logit_scale" in name or name.endswith("bias") else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def make_optimizer(named_params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the param groups, with PyTorch's fused kernel (one pass over all parameters: ~8x faster than
    the per-parameter loop on a CPU, which matters when the text tower's token embedding trains)."""
    groups = param_groups(named_params, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(groups, lr=lr)


def build_optimizer(method, named_params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The method's own optimizer (Method.make_optimizer), or else the trainer's AdamW."""
    optimizer = method.make_optimizer(named_params, lr, weight_decay)
    if optimizer is None:
        return make_optimizer(named_params, lr, weight_decay)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BenchError(f"method {type(method).name!r}: make_optimizer returned {type(optimizer).__name__}; "
                         f"return a torch.optim.Optimizer, or None for the trainer's AdamW")
    return optimizer


def train_step(method, batch: dict, optimizer, scheduler, params: list, grad_clip: float, autocast,
               accum_steps: int = 1, dist: distributed.Dist | None = None) -> tuple[float, dict]:
    """One optimisation step: the method's loss, backward, clipping, AdamW, schedule. -> (loss, logs).

    accum_steps > 1: the same gradient from that many micro-batches (bench/accumulate.py); dist: this rank's
    share of a distributed step, its gradient summed over ranks (bench/distributed.py)."""
    optimizer.zero_grad(set_to_none=True)
    if dist is not None and dist.active:
        loss, logs = distributed.step(method, batch, accum_steps, autocast, dist)
    elif accum_steps > 1:
        loss, logs = accumulate(method, batch, accum_steps, autocast)
    else:
        with autocast():
            out = method.loss(batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        loss.backward()
        loss = loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    method.after_step(batch["step"], batch["total_steps"])  # e.g. an EMA teacher (Method.after_step)
    scheduler.step()
    return loss, logs


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cfg: config.RunConfig, run_dir: str | Path, progress: bool = True, source: str = "config",
        stop_after: int | None = None, prep: Prepared | None = None) -> Path:
    """Train and evaluate one run in `run_dir`; resumes if a checkpoint is there, returns at once if done.

    stop_after: leave after this many steps (tests use it to simulate a crash); prep: `prepare(cfg, source)` when
    the caller has it already."""
    prep = prep if prep is not None and prep.cfg is cfg else prepare(cfg, source)
    tracking.require(cfg.trackers, source)  # a tracker's package missing: fail before anything expensive
    run_dir = Path(run_dir)
    results.check_owner(run_dir, prep.job_id, "choose another output folder", record_must_name_it=True)
    if (run_dir / results.DONE).is_file():
        log.info("%s is done already", run_dir)
        return run_dir
    tc = cfg.train
    distributed.check(METHODS.get(cfg.method), tc.batch_size, tc.accum_steps, distributed.env_world()[1], source)
    # torchrun / Slurm tasks: this process's rank of the world
    dist, device = distributed.setup(resolve_device(tc.device), tc.device, source)
    autocast = autocast_for(tc.precision, device)
    if not dist.main:  # rank 0 draws generated data (the embedded benchmark) first, alone
        dist.barrier()
    task = build_run_task(cfg, source, progress and dist.main)
    if dist.main:  # only rank 0 writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / results.CONFIG).is_file():  # a sweep wrote it before launch, or this run did before a restart
            results.write_record(run_dir, results.config_record(prep.job_id, cfg, hparams_dict(prep.hparams), prep.seed,
                                                    results.versions(), baseline=baseline_of(METHODS.get(cfg.method))))
        dist.barrier()

    torch.manual_seed(prep.seed)
    clip = load_clip(cfg.model.name, cfg.model.pretrained, device)
    method = build_method(cfg.method, clip, task, dict(cfg.hparams), source).to(device)
    steps = tc.steps if method.trains else 0
    theta0 = method.checkpoint_state() if cfg.wise_alphas and method.trains else None
    named = method.trainable_parameters()
    if method.trains and not named:
        raise BenchError(f"method {cfg.method!r} trains no parameters; call self.train_only(...) in its __init__")
    optimizer = build_optimizer(method, named, tc.lr, tc.weight_decay) if steps else None
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup_steps, steps))
                 if steps else None)

    start = 0
    ckpt_path = run_dir / results.CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)  # tensors and plain values only
        method.load_checkpoint_state(ckpt["method"])
        method.load_extra_state(ckpt.get("method_extra", {}))  # absent from checkpoints of older versions
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        log.info("%s: resuming from step %d", run_dir, start)
    distributed.broadcast_parameters(method, dist)
    resume_step = start if ckpt_path.is_file() else None
    trackers = tracking.open_trackers(cfg.trackers if dist.main else config.TrackersConfig(), run_dir, prep.job_id,
                               {"config": config.to_dict(cfg), "hparams": hparams_dict(prep.hparams),
                                "job_id": prep.job_id}, resume_step, source)
    writer = (results.ResultsWriter(run_dir / results.RESULTS, resume_step=resume_step, on_write=trackers.log)
              if dist.main else None)

    pin = device.type == "cuda"  # page-locked batches: asynchronous host-to-device copies (non_blocking below)
    eval_data = EvalData(task, clip.preprocess_val, tc.eval_batch_size, tc.num_workers, pin, tc.prefetch_factor)
    train_items = task.train_items()
    sampler = StepSampler([len(task.train[d]) for d in task.train_domains], tc.batch_size, prep.seed, start, steps)
    loader = torch.utils.data.DataLoader(
        ImageItems(train_items, clip.preprocess_train if tc.augment else clip.preprocess_val),
        batch_sampler=distributed.RankSlice(sampler, dist) if dist.active else sampler, num_workers=tc.num_workers,
        pin_memory=pin,
        prefetch_factor=tc.prefetch_factor if tc.num_workers else None)
    domain_of = torch.tensor([i for i, d in enumerate(task.train_domains) for _ in task.train[d]])
    labels_of = torch.tensor([label for _, label in train_items])

    def log_eval(step: int, extra: list[dict]) -> None:
        if not dist.main:  # rank 0 evaluates; the others wait
            return dist.barrier()
        # the suite (role zeroshot_xd): at every suite_every-th evaluation (a function of the step alone, so a
        # resumed run evaluates it where an unbroken one does) and at the last step
        suite = (step // tc.eval_every) % tc.suite_every == 0 or step == steps
        t0 = time.perf_counter()
        rows = evaluate(method, eval_data, step, device, autocast, suite=suite)
        # seconds: the cost table's evaluation share
        rows.append(results.row(step, "train", "eval_time", time.perf_counter() - t0, 1))
        rows += extra
        writer.write(rows)
        accs = {r["role"]: r["value"] for r in rows if r["metric"] == "acc"}
        log.info("%s step %d: %s", run_dir.name, step, " ".join(f"{k}={v:.3f}" for k, v in sorted(accs.items())))
        dist.barrier()

    if start == 0:
        log_eval(0, [])
    bar = _progress(progress and steps > 0 and dist.main, total=steps, initial=start,
                    desc=f"{cfg.method} {run_dir.name[:8]}")
    method.train()
    losses, t_last, n_last = [], time.perf_counter(), 0
    for step, (x, y, idx) in enumerate(iterate(loader), start=start):
        torch.manual_seed(config.seed_hash(prep.seed, step))  # every random draw of this step depends on (seed, step)
        batch = {"images": x.to(device, non_blocking=True), "labels": y.to(device, non_blocking=True), "index": idx,
                 "domains": domain_of[idx].to(device, non_blocking=True), "step": step,
                 "total_steps": steps, "deterministic_images": not tc.augment}
        if dist.active:  # this rank's slice, with the draws of the whole batch (bench/distributed.py)
            index = torch.tensor([i for i, _ in sampler.keys(step)])
            batch = distributed.rank_batch(method, batch, index, labels_of, domain_of, dist, autocast)
        loss, logs = train_step(method, batch, optimizer, scheduler, [p for _, p in named], tc.grad_clip, autocast,
                                tc.accum_steps, dist)
        if not math.isfinite(loss):
            raise BenchError(f"{run_dir}: loss is {loss} at step {step}; lower train.lr or check the data")
        losses.append(loss)
        n_last += 1
        done_steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if done_steps % tc.eval_every == 0 or done_steps == steps:
            elapsed = time.perf_counter() - t_last
            extra = [results.row(done_steps, "train", m, v, n_last) for m, v in [("loss", sum(losses) / len(losses)),
                                                                           ("step_time", elapsed / n_last),
                                                                           ("peak_mem_mb", peak_memory_mb(device))]]
            extra += [results.row(done_steps, "train", k, float(v), 1) for k, v in logs.items()]
            log_eval(done_steps, extra)
            losses, n_last = [], 0
            t_last = time.perf_counter()
        if dist.main and (done_steps % tc.checkpoint_every == 0 or done_steps == steps):
            results.atomic_torch_save({"step": done_steps, "method": method.checkpoint_state(),
                                 "method_extra": method.extra_state(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict()}, ckpt_path)
        if stop_after is not None and done_steps >= stop_after:
            bar.close()
            trackers.close()
            eval_data.close()
            dist.barrier()  # the run folder is complete when any rank returns
            dist.close()
            return run_dir
    bar.close()
    if theta0 is not None and dist.main:
        writer.write(wise_rows(method, theta0, method.checkpoint_state(), cfg.wise_alphas, eval_data, steps, device,
                               autocast))
    if tc.save_final and method.trains and dist.main:
        results.atomic_torch_save({"step": steps, "method": method.checkpoint_state()}, run_dir / results.FINAL)
    trackers.close()
    eval_data.close()
    if dist.main:
        if ckpt_path.is_file():
            ckpt_path.unlink()
        results.atomic_write_text(run_dir / results.DONE, "")
    dist.barrier()
    dist.close()
    return run_dir


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)

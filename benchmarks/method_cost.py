"""Step cost of each method relative to ERM, and of the harness relative to a bare open_clip loop.

All timings are taken side by side in one process, on the same batch, interleaved round by round
(so a machine that gets busier slows every method alike), and reported as ratios of medians. Methods
with a frozen reference tower (CAR-FT, Lipsum-FT) are timed twice: on unaugmented batches, where the
reference features are cached per training item, and on augmented ones, where they are recomputed
(without autograd) every step:

    python benchmarks/method_cost.py [--batch 64] [--rounds 12] [--steps 5] [--pretrained embedded]

Needs the embedded benchmark under --root (drawn on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from bench.data import ImageItems, build_task, ensure_generated, load_card
from bench.method import METHODS, build_method, load_builtin_methods
from bench.models import load_clip
from bench.train import lr_factor, make_optimizer, param_groups, train_step


def make_batch(task, clip, n: int) -> dict:
    items = task.train_items()
    data = ImageItems(items, clip.preprocess_val)
    idx = torch.arange(n) * (len(items) // n)
    x = torch.stack([data[i][0] for i in idx.tolist()])
    y = torch.tensor([data[i][1] for i in idx.tolist()])
    return {"images": x, "labels": y, "index": idx, "domains": torch.zeros(n, dtype=torch.long), "step": 10**6,
            "total_steps": 10**6, "deterministic_images": True}


def harness_stepper(name, clip_args, task, batch, hparams=None):
    """-> (the method, a function that runs one training step of it on `batch`)."""
    clip = load_clip(*clip_args)
    method = build_method(name, clip, task, hparams or {}).train()
    named = method.trainable_parameters()
    opt = make_optimizer(named, 1e-5, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 10**6))
    params = [p for _, p in named]
    return method, lambda: train_step(method, batch, opt, sched, params, 1.0, contextlib.nullcontext)


def bare_stepper(clip_args, task, batch):
    """What a user would write with open_clip alone: image tower + linear head, CE, AdamW, clipping."""
    clip = load_clip(*clip_args)
    model = clip.model.train()
    with torch.no_grad():
        tokens = clip.tokenize([t.format(c) for t in task.templates for c in task.seen_names])
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(task.templates), len(task.seen_names), -1)
        weight = F.normalize(text.mean(0), dim=-1) * model.logit_scale.exp()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    named = list(model.visual.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    opt = torch.optim.AdamW(param_groups(named, 0.1), lr=1e-5, fused=True)  # the harness's optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 10**6))
    params = [p for _, p in named]
    x, y = batch["images"], batch["labels"]

    def step():
        logits = head(F.normalize(model.encode_image(x), dim=-1))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data")
    ap.add_argument("--model", default="TinyCLIP-32")
    ap.add_argument("--pretrained", default="embedded")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round")
    ap.add_argument("--methods", nargs="*")
    args = ap.parse_args()

    load_builtin_methods()
    card = load_card("embedded")
    ensure_generated(card, args.root, progress=True)
    task = build_task(card, args.root, ("sketch",), 0.2, 0)
    clip_args = (args.model, args.pretrained)
    batch = make_batch(task, load_clip(*clip_args), args.batch)
    names = args.methods or [n for n, cls in METHODS.items() if cls.trains]
    steppers = {"bare open_clip loop": bare_stepper(clip_args, task, batch)}
    # With train.augment: true every batch is new pixels, so a frozen reference tower cannot be cached:
    # methods that have one are timed both ways (the unmarked row is the cached one, augment: false).
    augmented = {**batch, "deterministic_images": False}
    for n in names:
        method, steppers[n] = harness_stepper(n, clip_args, task, batch)
        if hasattr(method, "reference"):
            steppers[f"{n} (augmented)"] = harness_stepper(n, clip_args, task, augmented)[1]
    for fn in steppers.values():  # warm-up (and fill the frozen-reference caches)
        fn(), fn()
    times = {n: [] for n in steppers}
    for _ in range(args.rounds):
        for name, fn in steppers.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"{args.model} / {args.pretrained}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print(f"{'method':22s} {'s/step':>8s} {'/ ERM':>7s}")
    for name, t in med.items():
        print(f"{name:22s} {t:8.4f} {t / med['erm']:7.2f}")
    print(f"harness ERM step / bare open_clip step: {med['erm'] / med['bare open_clip loop']:.3f}")


if __name__ == "__main__":
    main()

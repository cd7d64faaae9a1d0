"""Step cost of each method relative to ERM, and of the harness relative to a bare open_clip loop.

All timings are taken side by side in one process, on the same batch, interleaved round by round
(so a machine that gets busier slows every method alike), and reported as ratios of medians. Methods
with a frozen reference tower (CAR-FT, Lipsum-FT) are timed twice: on unaugmented batches, where the
reference features are cached per training item, and on augmented ones, where they are recomputed
(without autograd) every step:

    python benchmarks/method_cost.py [--batch 64] [--rounds 12] [--steps 5] [--pretrained embedded]
    python benchmarks/method_cost.py --model ViT-B-16 --pretrained none --batch 8 --share-model \
        --train-per-domain 16 --rounds 4 --steps 1 --warmup 1 --hparams arf.pool_size=64 arf.top_k=32 \
        arf.retrieval_batch=8                                   # real shapes: ViT-B/16 at 224 px

Each method is also compared with its pass-count limit: its step time over ERM's if a step cost only
its tower passes. ERM's step is one image-tower forward + backward over the batch = 1.0 (a backward
costs about two forwards, so a forward without autograd is 1/3). Text-tower passes are weighed by their
forward FLOPs (torch.utils.flop_counter, matmuls) against the image tower's, at the token lengths the
method needs (padding trimmed):
    bare loop, erm, wise_ft, lp_ft, car_ft (cached reference)   1
    car_ft (augmented)      1 + 1/3                              the frozen reference image forward
    lipsum_ft               1 + T(M random texts)                M texts through the frozen text tower (forward)
    lipsum_ft (augmented)   1 + 1/3 + T(M random texts)
    flyp                    1 + 3 T(B prompts)                   the batch's prompts, text forward + backward
    arf                     (B + R) / B + 3 T(B prompts + B captions + R anchor captions)
                                                                 R retrieved pairs through both towers, trained
where T(x) = text forward FLOPs of x / (3 x image forward FLOPs of the batch). The optimizer, the loss and
the head are left out of the limit: they are what the 1.1x allowance is for.

Needs the embedded benchmark under --root (drawn on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import yaml

from bench.cards import load_card
from bench.data import ImageItems, build_task
from bench.layouts import ensure_generated
from bench.method import METHODS, build_method, load_builtin_methods
from bench.models import load_clip
from bench.text import encode_text
from bench.train import lr_factor, make_optimizer, param_groups, train_step


def make_batch(task, clip, n: int) -> dict:
    items = task.train_items()
    data = ImageItems(items, clip.preprocess_val)
    idx = torch.arange(n) * (len(items) // n)
    x = torch.stack([data[i][0] for i in idx.tolist()])
    y = torch.tensor([data[i][1] for i in idx.tolist()])
    return {"images": x, "labels": y, "index": idx, "domains": torch.zeros(n, dtype=torch.long), "step": 10**6,
            "total_steps": 10**6, "deterministic_images": True}


def method_hparams(texts: list[str]) -> dict[str, dict]:
    """--hparams METHOD.KEY=VALUE ... -> {method: {key: value}} (values parsed as YAML)."""
    hparams: dict[str, dict] = {}
    for text in texts:
        key, _, value = text.partition("=")
        method, _, name = key.partition(".")
        hparams.setdefault(method, {})[name] = yaml.safe_load(value)
    return hparams


def harness_stepper(name, get_clip, task, hparams=None, device="cpu", autocast=contextlib.nullcontext):
    """-> (the method, step(batch): one training step of it on `batch`, on `device` under `autocast`)."""
    clip = get_clip()
    method = build_method(name, clip, task, hparams or {}).to(device).train()
    named = method.trainable_parameters()
    opt = make_optimizer(named, 1e-5, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 10**6))
    params = [p for _, p in named]
    trained = trained_set(clip.model)

    def step(batch):
        trained()
        return train_step(method, batch, opt, sched, params, 1.0, autocast)

    return method, step


def trained_set(model):
    """-> a function that restores which of `model`'s parameters train, as they are now (with --share-model
    every method builds on one model and sets its own; each step first puts its method's back)."""
    mask = [(p, p.requires_grad) for p in model.parameters()]
    return lambda: [p.requires_grad_(rg) for p, rg in mask]


def bare_stepper(get_clip, task, batch, device="cpu", autocast=contextlib.nullcontext):
    """What a user would write with open_clip alone: image tower + linear head, CE, AdamW, clipping."""
    clip = get_clip()
    model = clip.model.to(device).train()
    with torch.no_grad():
        tokens = clip.tokenize([t.format(c) for t in task.templates for c in task.seen_names]).to(device)
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(task.templates), len(task.seen_names), -1)
        weight = F.normalize(text.mean(0), dim=-1) * model.logit_scale.exp()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(device)
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
    trained = trained_set(model)

    def step():
        trained()
        with autocast():
            logits = head(F.normalize(model.encode_image(x), dim=-1))
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return step


def forward_flops(fn) -> int:
    """Matmul FLOPs of fn() without autograd (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pass_limits(methods: dict, batch: dict) -> dict[str, float]:
    """Each method's pass-count limit (its step time over ERM's if only tower passes cost; see the module doc).
    methods: row name -> the built method (None for the bare loop); the text inputs are drawn as the methods
    draw them, from a fixed seed."""
    from methods.arf import ARF
    from methods.carot import CaRot
    from methods.flyp import FLYP
    from methods.lipsum_ft import LipsumFT, random_token_texts
    from methods.lora import LoRA

    model = next(m for m in methods.values() if m is not None).model
    b = len(batch["labels"])
    unit = 3 * forward_flops(lambda: model.encode_image(batch["images"]))  # ERM: image forward + backward

    def text(tokens):  # one forward of these texts (padding trimmed, as the methods run them), in ERM steps
        return forward_flops(lambda: encode_text(model, tokens)) / unit

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, m in methods.items():
        augmented = name.endswith("(augmented)")
        limit = 1.0 + (1 / 3 if augmented else 0.0)  # an image forward + backward; the frozen reference forward
        if isinstance(m, (CaRot, LoRA)):
            limit = float("nan")  # not derived yet: CaRot's EMA-teacher passes, LoRA's text-tower head per step
        elif isinstance(m, LipsumFT):
            limit += text(random_token_texts(m.hparams.num_texts, m.hparams.text_length, m.sot, m.eot, "cpu", g))
        elif isinstance(m, FLYP):
            prompts = m.prompt_tokens[torch.randint(len(m.templates), (b,), generator=g), batch["labels"]]
            passes = [prompts]
            if isinstance(m, ARF):
                if m.hparams.caption_anchors:
                    passes.append(m.caption_tokens[batch["index"]])
                if m.hparams.retrieval_anchors:
                    r = m.hparams.retrieval_batch
                    limit += r / b
                    passes.append(m.anchor_tokens[torch.randint(len(m.anchor_tokens), (r,), generator=g)])
            limit += 3 * sum(text(t) for t in passes)  # text forward + backward
        elif m is not None and not type(m).__module__.startswith("methods."):
            limit = float("nan")  # a plugin: its passes are unknown here
        out[name] = limit
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data")
    ap.add_argument("--model", default="TinyCLIP-32")
    ap.add_argument("--pretrained", default="embedded", help="a tag, a checkpoint path, or none (random init)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--hparams", nargs="*", default=[], help="METHOD.KEY=VALUE, e.g. arf.pool_size=64")
    ap.add_argument("--train-per-domain", type=int, default=0,
                    help="keep this many training images per domain (0: all): LP-FT's probe embeds every one")
    ap.add_argument("--share-model", action="store_true",
                    help="build every method on one model (each keeps its own trained set, optimizer, head and "
                         "frozen reference): ten ViT-B-16 copies with their AdamW states would not fit in memory")
    args = ap.parse_args()
    hparams = method_hparams(args.hparams)

    load_builtin_methods()
    card = load_card("embedded")
    ensure_generated(card, args.root, progress=True)
    task = build_task(card, args.root, ("sketch",), 0.2, 0)
    if args.train_per_domain:
        task.train = {d: items[:args.train_per_domain] for d, items in task.train.items()}
    clip_args = (args.model, None if args.pretrained == "none" else args.pretrained)
    shared = load_clip(*clip_args) if args.share_model else None
    get_clip = (lambda: shared) if shared is not None else functools.partial(load_clip, *clip_args)
    batch = make_batch(task, shared or load_clip(*clip_args), args.batch)
    names = args.methods or [n for n, cls in METHODS.items() if cls.trains]
    steppers = {"bare open_clip loop": bare_stepper(get_clip, task, batch)}
    methods = {"bare open_clip loop": None}
    # With train.augment: true every batch is new pixels, so a frozen reference tower cannot be cached:
    # methods that have one are timed both ways (the unmarked row is the cached one, augment: false).
    augmented = {**batch, "deterministic_images": False}
    for n in names:
        methods[n], step = harness_stepper(n, get_clip, task, hparams.get(n))
        steppers[n] = functools.partial(step, batch)
        if hasattr(methods[n], "reference"):
            steppers[f"{n} (augmented)"] = functools.partial(step, augmented)
            methods[f"{n} (augmented)"] = methods[n]
    limits = pass_limits(methods, batch)
    for fn in steppers.values():  # warm-up (and fill the frozen-reference caches)
        for _ in range(args.warmup):
            fn()
    times = {n: [] for n in steppers}
    for _ in range(args.rounds):
        for name, fn in steppers.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {n: statistics.median(v) for n, v in times.items()}
    size = batch["images"].shape[-1]
    print(f"{args.model} / {args.pretrained}, {size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps, medians; hparams {hparams or 'defaults'}")
    print(f"{'method':22s} {'s/step':>8s} {'/ ERM':>7s} {'limit':>7s} {'/ limit':>8s}")
    for name, t in med.items():
        r = t / med["erm"]
        print(f"{name:22s} {t:8.4f} {r:7.2f} {limits[name]:7.2f} {r / limits[name]:8.2f}")
    print(f"harness ERM step / bare open_clip step: {med['erm'] / med['bare open_clip loop']:.3f}")


if __name__ == "__main__":
    main()

"""Evaluation time with and without the metrics beyond accuracy (issue 11: ECE, NLL, ECE after temperature scaling,
macro-F1, reliability bins), side by side.

    python benchmarks/eval_metrics_cost.py [--rounds 9] [--method erm] [--macro-f1]
    python benchmarks/eval_metrics_cost.py --model ViT-B-16 --pretrained none --device cuda   # real shapes, on a GPU

"without": accuracy only, the evaluation loop as it was before issue 11 (kept below, verbatim but for the names);
"with": bench.evaluate.evaluate, which computes accuracy and every metric of bench.calibration from the same logits.
Both evaluate the same method on the same eval sets (the embedded benchmark held out sketch: 3 id_val, ood, ood_val
and 4 zero-shot sets), from the same in-memory batches (EvalData's cache, filled by a warm-up pass), interleaved
round by round (a machine that gets busier slows both alike); ratios of the medians and of the minimums (the
latter is the steadier on a busy machine). The accuracies of the
two are checked equal. Needs the embedded benchmark under --root (drawn on first use).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench.cards import load_card
from bench.data import build_task
from bench.layouts import ensure_generated
from bench.evaluate import EvalData, evaluate, predict_classes
from bench.method import build_method, load_builtin_methods
from bench.models import load_clip
from bench.prepare import autocast_for, resolve_device


@torch.no_grad()
def accuracy_only(method, data: EvalData, step: int, device, autocast) -> list[dict]:
    """bench.evaluate._evaluate before issue 11: accuracy of every eval set, nothing else."""
    method.eval()
    rows, unseen_head = [], None
    with method.evaluating():
        for i, es in enumerate(data.task.evalsets):
            correct = total = 0
            for x, y in data.batches(i, es):
                x, y = x.to(device, non_blocking=True), y.to(device)
                with autocast():
                    if es.classes == "seen":
                        logits = method.predict(x)
                    else:
                        if unseen_head is None:
                            unseen_head = method.text_head(data.task.unseen_names)
                        logits = method.encode_image(x) @ unseen_head.t()
                correct += (predict_classes(logits.float(), es.class_subset) == y).sum().item()
                total += len(y)
            rows.append({"step": step, "role": es.role, "domain": es.domain, "split": es.split, "metric": "acc",
                         "value": correct / max(total, 1), "n": total})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data")
    ap.add_argument("--model", default="TinyCLIP-32")
    ap.add_argument("--pretrained", default="embedded", help="a tag, a checkpoint path, or none (random init)")
    ap.add_argument("--method", default="erm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--macro-f1", action="store_true", help="as if the card asked for metrics: [macro_f1]")
    args = ap.parse_args()

    load_builtin_methods()
    card = load_card("embedded")
    ensure_generated(card, args.root, progress=True)
    if args.macro_f1:
        import dataclasses
        card = dataclasses.replace(card, metrics=("macro_f1",))
    task = build_task(card, args.root, ("sketch",), 0.2, 0)
    device = resolve_device(args.device)
    clip = load_clip(args.model, None if args.pretrained == "none" else args.pretrained, device)
    method = build_method(args.method, clip, task, None).to(device)
    autocast = autocast_for(args.precision, device)
    data = EvalData(task, clip.preprocess_val, args.eval_batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timers = {"without (accuracy only)": lambda: accuracy_only(method, data, 0, device, autocast),
              "with (accuracy + ECE, NLL, TS-ECE, bins" + (", macro-F1)" if args.macro_f1 else ")"):
                  lambda: evaluate(method, data, 0, device, autocast)}
    out = {name: fn() for name, fn in timers.items()}  # warm-up: fills EvalData's cache, compiles kernels
    acc_a = [r["value"] for r in next(iter(out.values()))]
    acc_b = [r["value"] for r in list(out.values())[1] if r["metric"] == "acc"]
    if acc_a != acc_b:
        raise SystemExit(f"the accuracies differ: {acc_a} vs {acc_b}")
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, fn in timers.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    n = sum(len(es.items) for es in task.evalsets)
    print(f"{args.model} ({args.pretrained}), method {args.method}, {device}, eval batch {args.eval_batch}: "
          f"{len(task.evalsets)} eval sets, {n} images; median of {args.rounds} interleaved rounds")
    print("| evaluation | median (s) | min (s) | ratio of medians | ratio of minimums |")
    print("|---|---:|---:|---:|---:|")
    first = next(iter(times.values()))
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.4f} | {min(ts):.4f} | "
              f"{statistics.median(ts) / statistics.median(first):.3f} | {min(ts) / min(first):.3f} |")
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

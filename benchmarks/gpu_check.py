"""GPU check: how fast the harness trains, evaluates and loads data on this CUDA device, in one command.

    python benchmarks/gpu_check.py [--out gpu_check.json]        # make gpu-check
    python benchmarks/gpu_check.py --cpu --out smoke.json          # the same code, tiny sizes, on the CPU

On the CUDA device (ViT-B/16 random init, 224 px, bf16 autocast, the embedded benchmark's images):
  1. harness vs bare: training images/s of the harness's ERM step (bench.train.train_step on a method from
     bench.method, built as benchmarks/method_cost.py builds it) and of a bare open_clip loop on the same model,
     batch and optimizer, timed round by round, interleaved (goal: harness / bare >= 0.95);
  2. methods: each method's step time over ERM's at --batch, and its peak memory (torch.cuda.max_memory_allocated,
     the method alone on the device: model, optimizer state, activations) at each of --memory-batches;
  3. evaluation: images/s of bench.evaluate.evaluate over a generated JPEG set, loading the images with each
     --workers (as a set too large to keep in memory is loaded at every evaluation), and from memory;
  4. data loading: images/s of the training loader as the trainer builds it (StepSampler, open_clip's training
     transform, pinned memory) over the generated JPEGs, for each --workers (the sweep files': 8 and 12) and
     --prefetch;
  5. evaluation's share of a run at the DomainBed sweep's settings (sweeps/domainbed.yaml: steps, batch size,
     eval_every per dataset; the images each evaluation reads, from the cards' expected counts): ERM step time
     x steps vs evaluation time x evaluations, from the rates measured above.
Prints a table per section and writes everything as JSON (--out). Without a CUDA device it says so in one line
and exits 0, unless --cpu asks for the smoke run (which exercises every section at tiny sizes, fp32).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_cost import bare_stepper, harness_stepper, make_batch, method_hparams  # noqa: E402

from bench.cards import load_card  # noqa: E402
from bench.data import EvalSet, ImageItems, StepSampler, build_task, iterate  # noqa: E402
from bench.layouts import ensure_generated  # noqa: E402
from bench.evaluate import EvalData, evaluate  # noqa: E402
from bench.method import METHODS, load_builtin_methods  # noqa: E402
from bench.models import load_clip  # noqa: E402
from bench.prepare import autocast_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPU_DEFAULTS = dict(model="ViT-B-16", batch=128, memory_batches=[128, 256], steps=10, warmup=3, rounds=5,
                    workers=[8, 12], prefetch=[2, 4], images=2048, image_size=384, eval_batch=256, loader_steps=12,
                    train_per_domain=128, hparams=["arf.pool_size=2048", "arf.top_k=256"])
CPU_DEFAULTS = dict(model="TinyCLIP-32", batch=8, memory_batches=[8, 16], steps=1, warmup=1, rounds=1,
                    workers=[0, 2], prefetch=[2], images=32, image_size=64, eval_batch=16, loader_steps=2,
                    train_per_domain=8, hparams=["arf.pool_size=64", "arf.top_k=16", "arf.retrieval_batch=4"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, n: int) -> float:
    """Seconds per call of fn, over n calls (the device synchronised before and after)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "index" else v for k, v in batch.items()}


def harness_vs_bare(args, task, get_clip, device, autocast) -> dict:
    batch = on(make_batch(task, args.preprocess, args.batch), device)
    _, erm = harness_stepper("erm", get_clip, task, None, device, autocast)
    steppers = {"harness erm": functools.partial(erm, batch),
                "bare open_clip loop": bare_stepper(get_clip, task, batch, device, autocast)}
    for fn in steppers.values():
        timed(fn, device, args.warmup)
    times = {n: [] for n in steppers}
    for _ in range(args.rounds):
        for name, fn in steppers.items():
            times[name].append(timed(fn, device, args.steps))
    med = {n: statistics.median(v) for n, v in times.items()}
    out = {n: {"s_per_step": t, "images_per_s": args.batch / t} for n, t in med.items()}
    out["ratio"] = out["harness erm"]["images_per_s"] / out["bare open_clip loop"]["images_per_s"]
    out["goal"] = 0.95
    out["image_px"] = batch["images"].shape[-1]
    del steppers, erm, batch
    release(device)
    return out


def peak_memory(step, batch: dict, device: torch.device) -> float | str | None:
    """MiB allocated at most over two steps at this batch (the first allocates the optimizer state)."""
    if device.type != "cuda":
        step(batch)
        return None  # the CPU smoke run exercises the code; CPU memory is not what this measures
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step(batch)
        step(batch)
    except torch.cuda.OutOfMemoryError:
        release(device)
        return "out of memory"
    return torch.cuda.max_memory_allocated(device) / 2**20


def method_costs(args, task, get_clip, device, autocast, hparams: dict) -> dict:
    names = args.methods or [n for n, cls in METHODS.items() if cls.trains]
    names = ["erm"] + [n for n in names if n != "erm"]
    out = {}
    for name in names:
        method, step = harness_stepper(name, get_clip, task, hparams.get(name), device, autocast)
        batch = on(make_batch(task, args.preprocess, args.batch), device)
        timed(lambda: step(batch), device, args.warmup)
        t = statistics.median(timed(lambda: step(batch), device, args.steps) for _ in range(args.rounds))
        row = {"s_per_step": t, "images_per_s": args.batch / t, "over_erm": t / out["erm"]["s_per_step"]
               if out else 1.0, "peak_mem_mb": {}}
        for b in args.memory_batches:
            big = on(make_batch(task, args.preprocess, b), device) if b != args.batch else batch
            row["peak_mem_mb"][str(b)] = peak_memory(step, big, device)
            del big
        out[name] = row
        del method, step, batch
        release(device)
    return out


def generate_jpegs(folder: Path, n: int, size: int, classes: int) -> list[tuple[str, int]]:
    """n JPEGs of size x size: smooth random colour fields (a 12x12 noise image upsampled), which decode at about
    the cost of photographs of that size, unlike flat colours (too cheap) or pixel noise (too dear)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        k = i % classes
        path = folder / f"{k:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(path, quality=90)
        items.append((str(path), k))
    return items


def eval_throughput(args, task, items, get_clip, device, autocast) -> dict:
    clip = get_clip()
    method, _ = harness_stepper("erm", lambda: clip, task, None, device, autocast)
    evalset = EvalSet("ood", "generated", "in", "seen", items)
    gen_task = dataclasses.replace(task, evalsets=[evalset])
    pin = device.type == "cuda"
    out = {"images": len(items), "eval_batch_size": args.eval_batch, "loading": {}}
    for w in args.workers:
        data = EvalData(gen_task, clip.preprocess_val, args.eval_batch, w, pin)
        data._cacheable = False  # as a set too large for memory: loaded again at every evaluation
        evaluate(method, data, 0, device, autocast)  # starts the workers (kept: persistent)
        t = timed(lambda: evaluate(method, data, 0, device, autocast), device, 1)
        data.close()
        out["loading"][str(w)] = len(items) / t
    data = EvalData(gen_task, clip.preprocess_val, args.eval_batch, 0, pin)
    evaluate(method, data, 0, device, autocast)  # fills the in-memory cache
    out["from_memory"] = len(items) / timed(lambda: evaluate(method, data, 0, device, autocast), device, 1)
    del method, clip, data
    release(device)
    return out


def loader_throughput(args, items, get_clip, device) -> list[dict]:
    clip = get_clip()
    rows = []
    for w in args.workers:
        for p in (args.prefetch if w else [None]):
            steps = args.loader_steps + 1
            loader = torch.utils.data.DataLoader(
                ImageItems(items, clip.preprocess_train), batch_sampler=StepSampler([len(items)], args.batch, 0, 0,
                                                                                    steps),
                num_workers=w, pin_memory=device.type == "cuda", prefetch_factor=p)
            it = iterate(loader)
            next(it)  # the first batch: worker start-up
            t = time.perf_counter()
            n = sum(len(x) for x, _, _ in it)
            rows.append({"num_workers": w, "prefetch_factor": p, "images_per_s": n / (time.perf_counter() - t)})
    return rows


def eval_fraction(erm_images_per_s: float, eval_images_per_s: float, sweep: Path) -> dict:
    """Evaluation's share of an ERM run at the sweep's settings, per dataset (mean over held-out domains)."""
    spec = yaml.safe_load(sweep.read_text())
    base = spec["base"]["train"]
    holdout = spec["base"].get("data", {}).get("holdout_fraction", 0.2)
    out = {}
    for name in spec["datasets"]:
        train = {**base, **spec.get("overrides", {}).get("datasets", {}).get(name, {}).get("train", {})}
        steps, every, batch = train["steps"], train["eval_every"], train["batch_size"]
        n_evals = len({0, steps} | set(range(every, steps + 1, every)))
        counts = load_card(name).expected_counts
        per_eval = statistics.mean(n + holdout * (sum(counts.values()) - n) for n in counts.values())
        train_s = steps * batch / erm_images_per_s
        eval_s = n_evals * per_eval / eval_images_per_s
        out[name] = {"steps": steps, "batch_size": batch, "eval_every": every, "evaluations": n_evals,
                     "images_per_evaluation": round(per_eval), "train_s": train_s, "eval_s": eval_s,
                     "eval_fraction": eval_s / (train_s + eval_s)}
    return out


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def print_tables(r: dict) -> None:
    d, s = r["device"], r["settings"]
    print(f"{d['name']} ({d['device']}), torch {d['torch']}; {s['model']} random init, {s['image_px']} px, "
          f"{s['precision']}, batch {s['batch']}")
    hb = r["harness_vs_bare"]
    print(f"\n{'step':22s} {'s/step':>8s} {'images/s':>9s}")
    for name in ("harness erm", "bare open_clip loop"):
        print(f"{name:22s} {hb[name]['s_per_step']:8.4f} {hb[name]['images_per_s']:9.1f}")
    print(f"harness / bare images/s: {hb['ratio']:.3f} (goal >= {hb['goal']})")
    mb = s["memory_batches"]
    print(f"\n{'method':14s} {'s/step':>8s} {'/ ERM':>6s} " + " ".join(f"{'MiB@' + str(b):>10s}" for b in mb))
    for name, m in r["methods"].items():
        mem = " ".join(f"{v:10.0f}" if isinstance(v, float) else f"{v or '-':>10s}"
                       for v in m["peak_mem_mb"].values())
        print(f"{name:14s} {m['s_per_step']:8.4f} {m['over_erm']:6.2f} {mem}")
    ev = r["eval"]
    print(f"\nevaluation, {ev['images']} generated JPEGs, batch {ev['eval_batch_size']}: from memory "
          f"{ev['from_memory']:.0f} images/s; loading: " +
          ", ".join(f"{w} workers {v:.0f} images/s" for w, v in ev["loading"].items()))
    print("\ntraining loader (open_clip's training transform): " + ", ".join(
        f"{x['num_workers']} workers" + (f" x prefetch {x['prefetch_factor']}" if x["prefetch_factor"] else "") +
        f" {x['images_per_s']:.0f} images/s" for x in r["loader"]) +
        f" (the ERM step consumes {hb['harness erm']['images_per_s']:.0f})")
    print(f"\n{'DomainBed sweep':16s} {'steps':>6s} {'batch':>6s} {'evals':>6s} {'images/eval':>11s} "
          f"{'train h':>8s} {'eval h':>7s} {'eval %':>7s}")
    for name, f in r["eval_fraction"].items():
        print(f"{name:16s} {f['steps']:6d} {f['batch_size']:6d} {f['evaluations']:6d} "
              f"{f['images_per_evaluation']:11d} {f['train_s'] / 3600:8.2f} {f['eval_s'] / 3600:7.2f} "
              f"{100 * f['eval_fraction']:7.1f}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    ap.add_argument("--cpu", action="store_true", help="no GPU: run every section at tiny sizes on the CPU")
    ap.add_argument("--root", default="data", help="where the embedded benchmark is (drawn on first use)")
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "domainbed.yaml"))
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--memory-batches", type=int, nargs="+")
    ap.add_argument("--steps", type=int, help="timed steps per round")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--workers", type=int, nargs="+", help="DataLoader workers (the sweep files': 8, 12)")
    ap.add_argument("--prefetch", type=int, nargs="+")
    ap.add_argument("--images", type=int, help="generated JPEGs, for the loader and evaluation")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--eval-batch", type=int)
    ap.add_argument("--loader-steps", type=int)
    ap.add_argument("--train-per-domain", type=int)
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--hparams", nargs="*", help="METHOD.KEY=VALUE")
    args = ap.parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.cpu else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}); nothing measured "
              f"(--cpu runs a tiny smoke version on the CPU)")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    autocast = autocast_for("auto", device)  # bf16 autocast on CUDA, as the trainer's default; fp32 on the CPU
    hparams = method_hparams(args.hparams)
    load_builtin_methods()
    card = load_card("embedded")
    ensure_generated(card, args.root, progress=False)
    task = build_task(card, args.root, ("sketch",), 0.2, 0)
    task.train = {d: items[:args.train_per_domain] for d, items in task.train.items()}
    torch.manual_seed(0)
    get_clip = functools.partial(load_clip, args.model, None, device)
    args.preprocess = types.SimpleNamespace(preprocess_val=load_clip(args.model, None).preprocess_val)
    result = {"device": device_info(device),
              "settings": {"model": args.model, "pretrained": None, "precision": "bf16 autocast" if device.type ==
                           "cuda" else "fp32", "batch": args.batch, "memory_batches": args.memory_batches,
                           "steps": args.steps, "rounds": args.rounds, "hparams": hparams,
                           "command": " ".join(sys.argv)}}
    result["harness_vs_bare"] = harness_vs_bare(args, task, get_clip, device, autocast)
    result["settings"]["image_px"] = result["harness_vs_bare"].pop("image_px")
    result["methods"] = method_costs(args, task, get_clip, device, autocast, hparams)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        items = generate_jpegs(Path(tmp), args.images, args.image_size, len(task.seen_names))
        result["eval"] = eval_throughput(args, task, items, get_clip, device, autocast)
        result["loader"] = loader_throughput(args, items, get_clip, device)
    sweep_workers = str(8 if 8 in args.workers else args.workers[0])
    result["eval_fraction"] = eval_fraction(result["methods"]["erm"]["images_per_s"],
                                            result["eval"]["loading"][sweep_workers], Path(args.sweep))
    result["eval_fraction_workers"] = int(sweep_workers)
    print_tables(result)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

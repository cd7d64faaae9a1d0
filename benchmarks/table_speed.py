"""How long `bench table` takes over a large sweep: writes a results folder of finished jobs, then times the
command end to end (a fresh process, as a user runs it: interpreter start, imports, reading, selection, printing).

    .venv/bin/python benchmarks/table_speed.py                       # 10,000 jobs, 5 evaluations each
    .venv/bin/python benchmarks/table_speed.py --evals 18            # DomainBed's checkpoint count (5001 steps / 300)
    .venv/bin/python benchmarks/table_speed.py --jobs 1000 --repeat 1 --args "--selection lodo"

The sweep: 5 methods x 2 datasets (embedded: 4 domains, unseen classes; pacs: 4 domains, none) x 10 held-out
sets (the 4 domains and DomainBed's 6 pairs, for leave-one-domain-out) x 5 trial seeds x 20 hyperparameter
draws = 10,000 jobs, each with config.json, results.jsonl (the trainer's row format, `--evals` evaluations:
5 = the default run config, 200 steps evaluated every 50) and `done`. The folder is kept and reused.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = {"embedded": ["photo", "sketch", "cartoon", "painting"],
           "pacs": ["art_painting", "cartoon", "photo", "sketch"]}
ZEROSHOT = {"embedded": True, "pacs": False}
METHODS = ["erm", "flyp", "car_ft", "lipsum_ft", "arf"]


def held_out_sets(domains):
    return [[d] for d in domains] + [list(p) for p in itertools.combinations(domains, 2)]


def config(method, dataset, test, seed, draw, steps, eval_every):
    lr = round(10 ** (-5 + 1.5 * random.Random(f"{method}{draw}").random()), 8)
    return {"data": {"dataset": dataset, "holdout_fraction": 0.2, "root": "data", "test_domains": test},
            "hparams": {}, "method": method, "model": {"name": "TinyCLIP-32", "pretrained": "embedded"},
            "plugins": [], "train": {"augment": True, "batch_size": 64, "checkpoint_every": eval_every,
                                     "device": "auto", "eval_batch_size": 256, "eval_every": eval_every,
                                     "grad_clip": 1.0, "lr": lr, "num_workers": 0, "precision": "auto",
                                     "save_final": True, "steps": steps, "warmup_steps": 20, "weight_decay": 0.1},
            "trial_seed": seed}


def results_text(rng, dataset, test, evals, eval_every):
    lines = []
    for k in range(evals):
        step = k * eval_every
        for d in DOMAINS[dataset]:
            if d in test:
                lines.append(json.dumps({"step": step, "role": "ood", "domain": d, "split": "in", "metric": "acc",
                                         "value": rng.random(), "n": 512}))
                lines.append(json.dumps({"step": step, "role": "ood_val", "domain": d, "split": "out",
                                         "metric": "acc", "value": rng.random(), "n": 128}))
            else:
                lines.append(json.dumps({"step": step, "role": "id_val", "domain": d, "split": "out",
                                         "metric": "acc", "value": rng.random(), "n": 128}))
            if ZEROSHOT[dataset]:
                lines.append(json.dumps({"step": step, "role": "zeroshot", "domain": d, "split": "all",
                                         "metric": "acc", "value": rng.random(), "n": 320}))
        if step:
            for m, v in (("loss", rng.random() * 3), ("step_time", 0.3 + rng.random() / 10),
                         ("peak_mem_mb", 1100 + rng.random() * 100)):
                lines.append(json.dumps({"step": step, "role": "train", "domain": None, "split": None,
                                         "metric": m, "value": v, "n": eval_every}))
    return "\n".join(lines) + "\n"


def generate(root: Path, n_jobs: int, evals: int) -> tuple[int, int]:
    """Writes the sweep (deterministic); returns (jobs, result rows)."""
    eval_every = 50 if evals <= 5 else 300
    steps = (evals - 1) * eval_every
    rng = random.Random(0)
    combos = itertools.product(METHODS, DOMAINS, range(10), range(5), range(20))
    n = rows = 0
    for method, dataset, t, seed, draw in combos:
        if n == n_jobs:
            break
        test = held_out_sets(DOMAINS[dataset])[t]
        cfg = config(method, dataset, test, seed, draw, steps, eval_every)
        job_id = f"{n:012x}"
        d = root / job_id
        d.mkdir(parents=True, exist_ok=True)
        rec = {"config": cfg, "hparams": {}, "job_id": job_id, "protocol_version": 1, "seed": n}
        (d / "config.json").write_text(json.dumps(rec, indent=2, sort_keys=True))
        text = results_text(rng, dataset, test, evals, eval_every)
        rows += text.count("\n")
        (d / "results.jsonl").write_text(text)
        (d / "done").write_text("")
        n += 1
    (root / ".generated").write_text(json.dumps({"jobs": n, "evals": evals, "rows": rows}))
    return n, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--evals", type=int, default=5, help="evaluations per job (default 5: 200 steps, every 50)")
    ap.add_argument("--root", default=None, help="results folder (default /tmp/rft-bench-table-<jobs>-<evals>)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (the median is reported)")
    ap.add_argument("--args", default="", help="extra `bench table` arguments, e.g. '--selection lodo --cost'")
    a = ap.parse_args()
    root = Path(a.root or f"/tmp/rft-bench-table-{a.jobs}-{a.evals}")
    meta = root / ".generated"
    if not meta.is_file() or json.loads(meta.read_text())[("jobs")] != a.jobs \
            or json.loads(meta.read_text())["evals"] != a.evals:
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        n, rows = generate(root, a.jobs, a.evals)
        print(f"wrote {n:,} finished jobs ({rows:,} result rows) to {root} in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    info = json.loads(meta.read_text())
    size = sum(f.stat().st_size for f in root.rglob("results.jsonl")) / 2**20
    bench = Path(sys.executable).with_name("bench")
    cmd = [str(bench), "table", "--runs", str(root), *a.args.split()]
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        times.append(time.perf_counter() - t)
        if proc.returncode:
            sys.exit(f"bench table failed:\n{proc.stderr}")
    print(proc.stdout.split("\n\n")[0])
    print(f"bench table over {info['jobs']:,} finished jobs ({info['rows']:,} result rows, {size:.0f} MB, "
          f"{info['evals']} evaluations each): median {statistics.median(times):.2f} s of {a.repeat} runs "
          f"({', '.join(f'{x:.2f}' for x in times)}); command: {' '.join(cmd)}")


if __name__ == "__main__":
    main()

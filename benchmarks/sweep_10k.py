"""How long a sweep of ~10,000 jobs takes to plan (dry run) and to submit as one Slurm array.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_10k.py             # plan only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_10k.py --submit    # and submit (needs a cluster:
                                                                            # scripts/slurm-local.sh start)

The sweep: ERM on the five DomainBed datasets, every held-out domain (22), 152 random hparam draws,
3 trial seeds = 10,032 jobs, over empty stand-in data folders (planning never reads images). The submitted
jobs exit at once (the figure is the launcher's, not the training's); the array is cancelled afterwards and
the scratch folder removed. The figure to meet: at most 30 s for each of plan and submit.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ["pacs", "vlcs", "officehome", "terraincognita", "domainnet"]


def exit_at_once(run_dir: str) -> str:
    return run_dir


def write_sweep(scratch: Path, n_draws: int) -> Path:
    from bench.cards import load_card

    data = scratch / "data"
    for name in DATASETS:
        card = load_card(name)
        for domain in card.domains:
            (data / card.folder / domain).mkdir(parents=True, exist_ok=True)
    sweep = {
        "name": "bench10k", "output": str(scratch / "runs"),
        "base": {"model": {"name": "ViT-B-16", "pretrained": "openai"}, "data": {"root": str(data)},
                 "train": {"steps": 5000}},
        "methods": ["erm"], "datasets": DATASETS, "test_domains": "all", "trial_seeds": [0, 1, 2],
        "search": {"n_draws": n_draws, "draw_0": "defaults",
                   "space": {"train.lr": ["log10_uniform", -5.5, -4.5],
                             "train.weight_decay": ["log10_uniform", -6, -1],
                             "hparams.label_smoothing": ["choice", [0.0, 0.1]]}},
        "launcher": {"kind": "slurm", "slurm": {"cpus": 1, "gpus": 0, "mem_gb": 0.1, "time_min": 5,
                                                "array_parallelism": 2}},
    }
    path = scratch / "bench10k.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submit", action="store_true", help="also submit the array to the Slurm cluster")
    parser.add_argument("--draws", type=int, default=152)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and the array")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench10k-"))
    try:
        t0 = time.perf_counter()
        path = write_sweep(scratch, args.draws)
        # The user's figure: the whole command, Python start and imports included.
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "bench", "sweep", str(path), "--dry-run"], cwd=ROOT,
                             capture_output=True, text=True)
        dry_cli = time.perf_counter() - t
        if out.returncode:
            sys.exit(out.stderr)
        print(out.stderr.strip().splitlines()[0])

        from bench import launch
        from bench import sweep as sweeps

        t = time.perf_counter()
        sweep = sweeps.load_sweep(path)
        jobs = sweeps.expand(sweep, str(path))
        t_expand = time.perf_counter() - t
        plan = launch.make_plan(jobs)
        t_plan = time.perf_counter() - t
        launch.status_text(str(path), sweep, plan, "slurm")
        print(f"jobs: {len(jobs):,}")
        print(f"plan (bench sweep --dry-run, whole command): {dry_cli:.1f} s")
        print(f"  of which in-process: expand {t_expand:.1f} s + states {t_plan - t_expand:.1f} s")
        if args.submit:
            t = time.perf_counter()
            report = launch.launch(plan.to_launch, sweep, "slurm", task=exit_at_once)
            t_submit = time.perf_counter() - t
            print(f"submit (job folders + pickles + sbatch, {len(report.slurm_ids)} array(s) "
                  f"{','.join(report.slurm_ids)}): {t_submit:.1f} s")
            t = time.perf_counter()
            plan2 = launch.make_plan(jobs)
            print(f"status after submit: {dict(plan2.counts)} in {time.perf_counter() - t:.1f} s")
            time.sleep(10)
            results = list((scratch / "runs" / ".submitit").rglob("*_result.pkl"))
            print(f"array tasks that ran and exited in the first 10 s: {len(results)}")
            if not args.keep:
                for array in report.slurm_ids:
                    subprocess.run(["scancel", array], check=False)
        print(f"total {time.perf_counter() - t0:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""ARF's ablation on the embedded benchmark: which anchors, retrieved how, keep what (docs/ARF.md, "Ablation").

Each variant is the quick start's ARF job (sweeps/quickstart.yaml: sketch held out, 450 steps, pool 5,000 pairs,
top 1,000) with one or two hparams changed, run as its own sweep into its own folder (so that model selection never
chooses between variants), plus a reference folder with the zero-shot model, ERM and FLYP (ARF without anchors):

    python benchmarks/arf_ablation.py                       # runs what is missing (resumable), prints the table
    python benchmarks/arf_ablation.py --table-only          # the table of what is there

Trial seeds 0 and 1 (the quick start's; --seeds to change).

The table has ID, OOD and zero-shot accuracy (mean ± standard error over trial seeds, training-domain validation)
and what the retrieved anchors are: the share of them whose image is of an unseen class, and whose caption names
an unseen class (the embedded pool knows each pair's class). Nothing here is tuned: each variant is one setting.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP = "sweeps/quickstart.yaml"
BASE = {"pool_size": 5000, "top_k": 1000}  # the quick start's ARF overrides
# label -> ARF hparams changed from the defaults (caption and retrieval anchors, retrieval by caption text)
VARIANTS: dict[str, dict] = {
    "arf: both anchors, retrieval by text (default)": {},
    "arf: caption anchors only": {"retrieval_anchors": False},
    "arf: retrieval anchors only (by text)": {"caption_anchors": False},
    "arf: both, retrieval by image": {"retrieve_by": "image"},
    "arf: both, random pool pairs": {"retrieve_by": "random"},
    "arf: random pool pairs only": {"caption_anchors": False, "retrieve_by": "random"},
}
REFERENCE = ["zeroshot", "erm", "flyp"]
METRICS = "id,ood_avg,zs_avg"


def slug(label: str) -> str:
    keys = VARIANTS[label]
    return "arf-" + ("-".join(f"{k}={v}" for k, v in sorted(keys.items())) or "default")


def run_sweeps(out: Path, seeds: str, workers: str | None, reference: bool = True) -> None:
    common = [sys.executable, "-m", "bench", "sweep", SWEEP, "--no-progress", "--set", f"trial_seeds=[{seeds}]"]
    if workers:
        common += ["--workers", workers]
    plans = [("reference", [f"methods=[{','.join(REFERENCE)}]", "overrides={}"])] if reference else []
    for label, keys in VARIANTS.items():
        hp = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in {**BASE, **keys}.items())
        plans.append((slug(label), ["methods=[arf]", f"overrides={{methods: {{arf: {{hparams: {{{hp}}}}}}}}}"]))
    for i, (name, sets) in enumerate(plans, 1):
        print(f"[{i}/{len(plans)}] {name}", flush=True)
        cmd = common + ["--set", f"output={out / name}"] + [a for s in sets for a in ("--set", s)]
        subprocess.run(cmd, check=True, cwd=ROOT)


def anchor_makeup(hparams: dict, root: Path) -> tuple[float, float] | None:
    """(share of retrieved anchors whose image is of an unseen class, share whose caption names one)."""
    from bench import embedded
    from bench.cards import load_card
    from bench.data import build_task
    from bench.models import load_clip
    from methods.arf import ARF, anchors, embedded_corpus_pool

    h = ARF.Hparams(**{**BASE, **hparams})
    if not h.retrieval_anchors:
        return None
    task = build_task(load_card("embedded"), root, ("sketch",), 0.2, 0)  # retrieval ignores the trial seed
    clip = load_clip("TinyCLIP-32", "embedded")
    spec = anchors.RetrievalSpec(h.pool, h.pool_size, h.pool_seed, h.top_k, h.retrieve_by)
    idx, _ = anchors.retrieved_pairs(spec, clip, task.seen_names, list(task.templates), root, progress=False)
    pool = embedded_corpus_pool(root, h.pool_size, h.pool_seed)
    unseen = [c for c in embedded.CLASSES if c not in embedded.SEEN_CLASSES]
    unseen_idx = {embedded.CLASSES.index(c) for c in unseen}
    names = [embedded.prompt_name(c) for c in unseen]
    images = sum(int(pool.labels[i]) in unseen_idx for i in idx) / len(idx)
    captions = sum(any(n in pool.caption(int(i)) for n in names) for i in idx) / len(idx)
    return images, captions


def table(out: Path, root: Path) -> str:
    from bench import collect
    from bench import table_formats
    from bench import tables

    rows: list[tuple[str, list[str], str, str]] = []

    def add(folder: Path, method: str, label: str, makeup):
        report = tables.build(collect.load(folder), METRICS)
        sec = report.sections[0]
        cols = list(sec.columns)
        cells = [table_formats.cell_text(c, sec.cells[(method, c)]) if (method, c) in sec.cells else "—" for c in cols]
        img, cap = ("—", "—") if makeup is None else (f"{100 * makeup[0]:.0f}", f"{100 * makeup[1]:.0f}")
        rows.append((label, cells, img, cap))
        return [sec.headers.get(c, c) for c in cols]

    headers = None
    for m in REFERENCE:
        headers = add(out / "reference", m, m, None)
    for label, keys in VARIANTS.items():
        add(out / slug(label), "arf", label, anchor_makeup(keys, root))
    lines = ["| variant | " + " | ".join(headers) + " | anchors of unseen classes (%) | anchor captions naming one (%) |",
             "|---|" + "---:|" * (len(headers) + 2)]
    lines += [f"| {label} | " + " | ".join(cells) + f" | {img} | {cap} |" for label, cells, img, cap in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/arf_ablation", help="one folder per variant under this one")
    p.add_argument("--seeds", default="0, 1", help="trial seeds (default 0, 1: the quick start's)")
    p.add_argument("--workers", help="local jobs at once (default: the sweep file's)")
    p.add_argument("--root", default="data", help="data.root (the embedded benchmark, the caches)")
    p.add_argument("--table-only", action="store_true", help="run nothing; tabulate what is there")
    p.add_argument("--no-reference", action="store_true", help="run the ARF variants only")
    p.add_argument("--out", help="also write the table to this file")
    a = p.parse_args(argv)
    out = (ROOT / a.runs).resolve()
    if not a.table_only:
        run_sweeps(out, a.seeds, a.workers, reference=not a.no_reference)
    text = table(out, (ROOT / a.root).resolve())
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

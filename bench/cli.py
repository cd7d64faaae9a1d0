"""The `bench` command line."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from bench.errors import BenchError

log = logging.getLogger("bench")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:  # other libraries' chatter (open_clip, huggingface_hub retries) stays out of the way
        handler.addFilter(lambda r: r.name.startswith("bench") or r.levelno >= logging.CRITICAL)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("bench").setLevel(logging.INFO)


def cmd_run(args) -> None:
    from bench import config
    from bench import distributed
    from bench.prepare import prepare
    from bench.train import run

    cfg = config.load_run_config(args.config, args.set)
    source = args.config or "config"
    prep = prepare(cfg, source)
    out = Path(args.out) if args.out else Path("runs") / prep.job_id
    run(cfg, out, progress=not args.no_progress, source=source, prep=prep)
    if distributed.env_world()[0] == 0:  # under torchrun, one line for the job, not one per process
        print(out)


def _print_registry(registry) -> None:
    """One line per registered name: the name and the first line of its module's (or class's) docstring."""
    for name, cls in registry.items():
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        print(f"{name:12s} {doc[0] if doc else ''}")


def cmd_methods(args) -> None:
    from bench.method import METHODS, load_builtin_methods, load_plugin

    load_builtin_methods()
    for p in args.plugin:
        load_plugin(p)
    _print_registry(METHODS)


def cmd_datasets(args) -> None:
    from bench.cards import list_cards, load_card
    from bench.layouts import check_counts, decode_errors, image_paths

    bad_images = []
    for name in getattr(args, "cards", None) or list_cards():  # card names or paths to card YAMLs
        card = load_card(name)
        name = card.name
        counts = check_counts(args.root, card)
        found = sum(n for n, _ in counts.values())
        expected = sum(e or 0 for _, e in counts.values())
        state = "missing" if found == 0 else ("ok" if found == expected or not expected else f"{found}/{expected} images")
        print(f"{name:16s} {len(card.domains)} domains, {len(card.classes)} classes "
              f"({len(card.unseen_classes)} unseen)  [{state}]  {Path(args.root) / card.folder}")
        if args.check and found:
            for d, (n, e) in counts.items():
                flag = "" if e is None or n == e else f"  (expected {e})"
                print(f"    {d:20s} {n}{flag}")
        if getattr(args, "decode", False) and found:  # a full decode of every image: the files a run would fail on
            bad = decode_errors(image_paths(args.root, card), progress=sys.stderr.isatty(), desc=f"decode {name}")
            bad_images += bad
            print(f"    {len(bad)} unreadable images" + "".join(f"\n    bad: {p}  ({why})" for p, why in bad))
    if not getattr(args, "cards", None):  # the zero-shot suites' datasets, in CoOp's layouts (docs/ZEROSHOT_SUITE.md)
        from bench.zeroshot_suite import report_lines
        print("\n".join(report_lines(args.root, args.check)))
    if bad_images:
        raise BenchError(f"{len(bad_images)} unreadable images (listed above, first: {bad_images[0][0]}); replace or "
                         f"delete them (re-download the dataset)")
    if getattr(args, "sweep", None):
        _report_resources(args.sweep)


def _report_resources(path: str) -> None:
    """bench datasets --sweep FILE: each method's own files (captioner weights, pools: Method.check_resources)."""
    from bench import sweep

    problems = sweep.check_resources(sweep.expand(sweep.load_sweep(path), path, check_data=False), path)
    print(f"{path}: files the methods read besides the datasets")
    for label, err in problems:
        print(f"    {label:40s} {'ok' if err is None else 'missing: ' + err}")
    bad = [err for _, err in problems if err]
    if bad:
        raise BenchError(f"{len(bad)} method configs of {path} lack files (listed above); first: {bad[0]}")


def cmd_prepare_anchors(args) -> None:
    from bench import sweep
    from methods.arf import anchors

    sw = sweep.load_sweep(args.file, args.set)
    jobs = sweep.select(sweep.expand(sw, args.file, check_data=False), args.only, args.file)
    lines = anchors.prepare_sweep(jobs, device=args.device, progress=not args.no_progress)
    for line in lines:
        print(line)
    if not lines:
        print(f"{args.file}: no arf job selected; nothing to prepare", file=sys.stderr)


def cmd_data(args) -> None:
    from bench import embedded
    from bench.cards import load_card

    card = load_card(args.dataset)
    if card.generator is None:
        raise BenchError(f"{args.dataset} is not generated by the project; download it: {card.download or 'see its card'}")
    if args.preview:
        print(embedded.preview(args.preview, image_size=card.generator.get("image_size", 32)))
        return
    print(embedded.generate_benchmark(args.root, **card.generator, workers=args.workers, progress=True))


def cmd_pretrain(args) -> None:
    from bench.pretrain import PretrainConfig, default_output, pretrain

    cfg = PretrainConfig(steps=args.steps, corpus_size=args.corpus_size, batch_size=args.batch_size, lr=args.lr)
    out = args.out or default_output(cfg.model)
    info = pretrain(cfg, out, command="bench " + shlex.join(sys.argv[1:]))
    print(f"{info['path']}  sha256 {info['sha256']}  final loss {info['final_loss']:.4f}  {info['seconds']:.0f} s")
    if Path(out).resolve() == default_output(cfg.model).resolve():
        print("to release it as `pretrained: embedded`, set its sha256 in bench/models.py SHIPPED_SHA256 and its "
              "zero-shot table in docs/EMBEDDED.md (`bench zeroshot`)", file=sys.stderr)


def cmd_zeroshot(args) -> None:
    from bench.zeroshot_report import report

    print(report(args.model, args.pretrained, args.dataset, args.root))


def cmd_wise(args) -> None:
    from bench.wise import DEFAULT_ALPHAS, posthoc

    for run_dir in args.runs:
        n = posthoc(run_dir, args.alphas or DEFAULT_ALPHAS, device=args.device)
        print(f"{run_dir}: {n} rows")


def cmd_combine(args) -> None:
    from bench import config
    from bench.combine import build_combiner, combine_runs
    from bench.method import load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    options: dict = {}
    for text in args.opt:
        options = config.merge(options, config.parse_override(text, "--opt"))
    combiner = build_combiner(args.combiner, options)
    for folder in combine_runs(args.runs, combiner, args.out, args.group_by, args.method, args.device):
        print(folder)


def cmd_combiners(args) -> None:
    from bench.combine import COMBINERS, load_builtin_combiners
    from bench.method import load_plugin

    load_builtin_combiners()
    for p in args.plugin:
        load_plugin(p)
    _print_registry(COMBINERS)


def _sweep_plan(args):
    """Load, validate in full and plan a sweep (nothing is written)."""
    from bench import launch
    from bench import sweep

    sw = sweep.load_sweep(args.file, getattr(args, "set", None) or ())
    kind = getattr(args, "launcher", None) or sw.launcher.kind
    jobs = sweep.select(sweep.expand(sw, args.file), args.only, args.file)
    launch.check_processes(jobs, sw.launcher, kind, args.file)
    plan = launch.make_plan(jobs, retry=getattr(args, "retry", False), stale_after=sw.launcher.stale_after_s)
    return sw, kind, plan


def cmd_sweep(args) -> None:
    from bench import launch

    sw, kind, plan = _sweep_plan(args)
    if kind == "slurm" and plan.to_launch:  # before the plan is shown or any job folder written
        from bench import slurm

        plan.notes.append(slurm.check_submission(sw, len(plan.to_launch), args.file))
    print(launch.status_text(args.file, sw, plan, kind), file=sys.stderr)
    if args.dry_run or not plan.to_launch:
        return
    report = launch.launch(plan.to_launch, sw, kind, progress=not args.no_progress, workers=args.workers)
    if kind == "slurm":
        print(f"submitted {report.launched:,} jobs as Slurm array(s) {', '.join(report.slurm_ids)}; "
              f"follow them with `bench status {args.file}`", file=sys.stderr)
        return
    bad = report.failed + report.died
    if bad:
        raise BenchError(f"{len(bad)} of {report.launched} jobs did not finish (first: {bad[0]}; see its `failed` "
                         f"file or logs/); fix the cause and re-run with --retry")
    print(f"{report.done} jobs done in {sw.output}", file=sys.stderr)


def cmd_status(args) -> None:
    from bench import launch

    sw, kind, plan = _sweep_plan(args)
    print(launch.status_text(args.file, sw, plan, kind))


def _collect(args):
    """The runs under --runs (for table, plot, export-best)."""
    from bench import collect
    from bench import model_selection

    model_selection.check_selection(args.selection)
    coll = collect.load(args.runs, args.dataset, cache=not getattr(args, "no_cache", False))
    if not len(coll.jobs):
        raise BenchError(f"no runs under {args.runs}; run `bench sweep sweeps/quickstart.yaml` first "
                         f"(or point --runs at a sweep's output folder)")
    return coll


def cmd_table(args) -> None:
    from bench import metrics
    from bench import table_formats
    from bench import tables

    metrics.check_metric(args.metric)
    report = tables.build(_collect(args), args.metric, args.selection, args.cost, args.dataset, args.rows)
    text = table_formats.render(report, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(args.out, file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_plot(args) -> None:
    from bench.plot import plot, reliability

    draw, name = (reliability, "reliability") if args.kind == "reliability" else (plot, "id_vs_ood")
    for path in draw(_collect(args), args.out or Path(args.runs) / name, args.selection, args.dataset):
        print(path)


def cmd_export_best(args) -> None:
    import json

    import yaml

    from bench import model_selection

    best = model_selection.export_best(_collect(args), args.selection, args.dataset)
    if args.configs:
        folder = Path(args.configs)
        folder.mkdir(parents=True, exist_ok=True)
        for rec in best:
            path = folder / f"{rec['job_id']}.yaml"
            path.write_text(yaml.safe_dump(rec["config"], sort_keys=True))
            rec["rerun"] = f"bench run {path} --out runs/{rec['job_id']}"
    text = json.dumps(best, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"{args.out}: {len(best)} selected runs", file=sys.stderr)
    else:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="Robust fine-tuning benchmark for CLIP models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log everything, libraries included")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one run from a config")
    p.add_argument("config", nargs="?", help="run config YAML (defaults: the embedded benchmark, ERM)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.steps=50")
    p.add_argument("--out", help="run folder (default runs/<job id>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--plugin", action="append", default=[], help="a .py file registering more methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("datasets", help="list dataset cards and whether their data is present")
    p.add_argument("--root", default="data")
    p.add_argument("--check", action="store_true", help="count images per domain against the card")
    p.add_argument("cards", nargs="*", metavar="CARD", help="only these cards: names or paths to card YAMLs "
                                                            "(default: every card in datasets/)")
    p.add_argument("--decode", action="store_true", help="decode every image in full (PIL, with a progress bar) and "
                                                         "list the files that fail; exits non-zero if any")
    p.add_argument("--sweep", metavar="FILE", help="also check the files a sweep's methods read (ARF: captioner "
                                                   "weights or captions file, image-text pool)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("prepare-anchors", help="caption the images, index and embed the pool, retrieve: once for "
                                               "every ARF job of a sweep (docs/ARF.md)")
    p.add_argument("file")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help="as for `bench sweep`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for `bench sweep`")
    p.add_argument("--device", help="default: each job's train.device (auto: cuda if there is one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare_anchors)

    p = sub.add_parser("data", help="generate the embedded benchmark")
    p.add_argument("dataset", nargs="?", default="embedded")
    p.add_argument("--root", default="data")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preview", metavar="PNG", help="instead, draw one image of every class in every domain into PNG")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("pretrain", help="pretrain the tiny CLIP on the embedded caption corpus")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--corpus-size", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", help="checkpoint path (default: the shipped one in bench/assets)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy per domain on seen and unseen classes")
    p.add_argument("--model", default="TinyCLIP-32")
    p.add_argument("--pretrained", default="embedded")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--root", default="data")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("wise", help="add post-hoc WiSE-FT variants (wise:<alpha> rows) to finished runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--alphas", type=float, nargs="+", help="default: 0, 0.1, ..., 1")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_wise)

    p = sub.add_parser("combine", help="combine finished runs of each task post hoc (soup, model_stock, wise): "
                                       "new rows such as erm+soup:greedy (docs/METHODS.md)")
    p.add_argument("--runs", required=True, help="results folder, searched for done runs that kept final.pt")
    p.add_argument("--combiner", required=True, help="a registered combiner (`bench combiners`)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a combiner option, e.g. alphas=[0,0.5,1] for wise")
    p.add_argument("--group-by", default="method", choices=["method", "hp"],
                   help="members of a task: method (default: any hparams and training seeds of one method) or hp "
                        "(the same hparams, training seeds only); always one dataset, held-out set, trial seed")
    p.add_argument("--method", action="append", default=[], help="only runs of this method (repeatable)")
    p.add_argument("--out", help="folder of the combined runs (default <runs>/combined)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plugin", action="append", default=[], help="a .py file registering more combiners")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("combiners", help="list the registered post-hoc combiners")
    p.add_argument("--plugin", action="append", default=[], help="a .py file registering more combiners")
    p.set_defaults(func=cmd_combiners)

    p = sub.add_parser("sweep", help="launch every job of a sweep file that is not done, running or queued")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="print the counts and the compute estimate; launch nothing")
    p.add_argument("--retry", action="store_true", help="also relaunch failed and stale jobs")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="only these jobs, e.g. method=erm,flyp (keys: method, dataset, test_domains, draw, "
                        "trial_seed, job); repeat to combine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="edit a key of the sweep file for this call, e.g. base.data.root=/data or datasets=[pacs]")
    p.add_argument("--launcher", choices=["debug", "local", "slurm"], help="override the file's launcher.kind")
    p.add_argument("--workers", type=int, help="local launcher: jobs at once (default: launcher.local.workers)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="a sweep's job counts (done / running / failed / stale / to launch)")
    p.add_argument("file")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help="as for `bench sweep`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for `bench sweep`")
    p.add_argument("--launcher", choices=["debug", "local", "slurm"], help="for the compute estimate")
    p.set_defaults(func=cmd_status)

    def collector_args(p):  # what `table`, `plot` and `export-best` share
        p.add_argument("--runs", default="runs", help="results folder, searched recursively for run folders")
        # bench.model_selection.SELECTIONS (not imported here: pandas is slow to import)
        p.add_argument("--selection", default="train_val", choices=["train_val", "lodo", "oracle"],
                       help="training-domain validation (default), leave-one-domain-out, test-domain oracle")
        p.add_argument("--dataset", action="append", help="only this dataset (repeat for more)")

    p = sub.add_parser("table", help="ID / OOD / zero-shot table of finished runs, after DomainBed model selection")
    collector_args(p)
    p.add_argument("--metric", default="ood_avg",
                   help="ood_avg (default) | id | id_test | zs_avg | hm (of id and zs_avg) | ood (per held-out "
                        "domain) | ood_avg4 | ood_avg5 (ImageNet-style suites) | ood:<domain> | xd_avg (cross-dataset "
                        "zero-shot suite) | xd (per suite dataset) | xd:<dataset> | worst_ood | hm_id_ood | "
                        "{ece,ece_ts,nll,macro_f1}_{id,ood,zs} (calibration of the ID domains, the held-out ones, "
                        "the unseen classes); a comma list for several columns")
    p.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "json"])
    p.add_argument("--cost", action="store_true", help="add step time, peak memory and total compute columns")
    p.add_argument("--rows", action="append", help="only rows matching this pattern, e.g. 'erm*' (repeatable)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--no-cache", action="store_true",
                   help="parse every results file (default: reuse <runs>/.bench-table-cache.npz for unchanged ones)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("plot", help="ID-vs-OOD scatter (PNG and PDF): methods, zero-shot, WiSE-FT curves")
    collector_args(p)
    p.add_argument("--kind", default="id_vs_ood", choices=["id_vs_ood", "reliability"],
                   help="id_vs_ood (default): the scatter; reliability: reliability diagrams (ID and OOD, per method)")
    p.add_argument("--out", help="output path without extension (default <runs>/id_vs_ood or <runs>/reliability)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export-best", help="the selected run (job id, step, hparams, config) of every table cell")
    collector_args(p)
    p.add_argument("--out", help="write the JSON here instead of stdout")
    p.add_argument("--configs", help="also write each selected job's run config as <dir>/<job id>.yaml")
    p.set_defaults(func=cmd_export_best)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``robustkit sweep FILE.yaml``: train and evaluate a grid of runs, then one table and figure.

Parses flags and calls the library (``robustkit.sweep.load_sweep``, ``run``, ``collect``); the
file format is :mod:`robustkit.sweep.spec`'s docstring, shown by ``--help``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    from robustkit.sweep import spec

    p = sub.add_parser(
        "sweep", help="train and evaluate a grid of runs (locally or via submitit/SLURM)",
        description="Train and evaluate every unfinished run of a sweep file (finished runs "
        "are skipped, others resumed), then write summary.csv, tests.csv and tradeoff.png to "
        "its output root.", epilog="sweep file format:\n" + spec.__doc__.split("A sweep file "
        "is YAML::\n", 1)[1].split("\nExample:", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE.yaml", help="the sweep file")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    p.add_argument("--executor", choices=("none", "local", "slurm"), default="none",
                   help="none: processes here; local: submitit's LocalExecutor; slurm: "
                   "submitit on a SLURM cluster (the file's slurm: options)")
    p.add_argument("--out", metavar="DIR", help="output root (replaces the file's out:)")
    p.add_argument("--only", metavar="NAMES", help="comma-separated labels or run names: run "
                   "only those (split a sweep over processes sharing its output root)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    p.add_argument("--collect", action="store_true", help="only collect the finished runs")
    p.add_argument("--baseline", metavar="NAME", help="the paired tests' reference (a run "
                   "name without _seed<k>, or a label; default: the file's baseline:)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from robustkit import sweep

    spec = sweep.load_sweep(args.file, out=args.out)
    only = None if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    if args.dry_run or not args.collect:
        res = sweep.run(spec, jobs=args.jobs, executor=args.executor, dry_run=args.dry_run,
                        collect=False, only=only)
        for r in spec.runs:
            extra = " ".join(r.overrides[:-4])  # the last four: seed, out_dir, resume, progress
            print(f"{sweep.status(r, spec.eval):8s} {r.name}  ({r.config} {extra})")
        if args.dry_run:
            return 0
        print(f"ran {len(res.ran)}, skipped {len(res.skipped)} finished, failed "
              f"{len(res.failed)}" + "".join(f"\n  {k}: {v}" for k, v in res.failed.items()))
        if res.failed or any(sweep.status(r, spec.eval) != "done" for r in spec.runs):
            return 1  # with --only, the other part may still be running: collect later
    table = sweep.collect(spec, baseline=args.baseline)
    paths = table.save(spec.out)
    cols = ["run", "clean", "robust", "robust_lo", "robust_hi", "penalty_init", "train_s"]
    print(table.runs[[c for c in cols if c in table.runs]].to_string(index=False))
    if len(table.tests):
        print(f"\n{table.family}")
        print(table.tests[["run", "baseline", "diff", "b", "c", "p", "p_holm"]].to_string(
            index=False))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

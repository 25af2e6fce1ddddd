"""``robustkit train -c configs/train/<file>.yaml [key=value ...]``: parse, build, fit, print.

The run itself is ``robustkit.config.build(cfg)`` (config -> objects, architecture.md §4.1) and
``Run.fit()``; this module adds the flags, the early lock of the run directory (before any data
or model is loaded), the progress bar, ``--dry-run`` (build all of it, train nothing) and the
printed summary.

Example:
    >>> main(["train", "-c", "configs/smoke.yaml", "trainer.out_dir=/tmp/smoke"])
    >>> torchrun --nproc_per_node=4 -m robustkit train -c configs/train/cifar10_srd_dat.yaml
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from robustkit.config import Run, build, load_config

__all__ = ["add_parser", "run", "build", "Run"]  # build, Run: robustkit.config's, re-exported

_EPILOG = """\
overrides (key=value pairs, applied in order after the config file; values are YAML; put
flags such as --dry-run before or after all of them, not between):
  robustkit train -c configs/train/cifar10_trades.yaml trainer.epochs=1 objective.params.beta=3
  numbers, true/false, null, lists [0.5, 0.75], and fractions such as objective.params.eps=8/255.
  An unknown key fails with the nearest valid one; method hyper-parameters go under
  objective.params.<name> and are checked against the objective's constructor.

run directory: trainer.out_dir (default runs/<config name>/) gets config.yaml, last.pt, best.pt,
  metrics.jsonl and tb/ (tensorboard --logdir runs/); .lock refuses a second live run, and a
  folder holding last.pt is never overwritten: resume it or choose another out_dir.
  last.pt: every trainer.checkpoint_every epochs and always the final epoch, which is also always
  evaluated; best.pt: the best eval/pgd<k> so far (a tie keeps the earlier epoch).
resume: robustkit train -c <same config> trainer.resume=runs/<name>/last.pt
  (trainer.resume=auto: resume when out_dir holds last.pt, else start fresh)
multi-GPU: torchrun --nproc_per_node=4 -m robustkit train -c ... (data.batch_size is global)
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a model from a YAML config (key=value overrides)",
        description="Train a model from a YAML config: robustkit train -c FILE [key=value ...]",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="YAML config, e.g. configs/train/cifar10_pgd_at.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. trainer.epochs=1 objective.params.eps=8/255")
    p.add_argument("--dry-run", action="store_true",
                   help="build data, model, objective, optimizer and callbacks; train nothing")
    p.add_argument("--data-root", metavar="DIR", help="same as data.root=DIR")
    p.add_argument("--download", action="store_true", help="same as data.download=true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.download:
        overrides.append("data.download=true")
    cfg = load_config(args.config, overrides)
    from robustkit import distributed as dist
    from robustkit.cli.progress import ProgressCallback
    from robustkit.config.build import claim_run_dir

    # Rank 0 owns the folder; read from the environment because the process group starts in
    # build(), after this check (torchrun sets RANK; a single process is rank 0).
    rank0 = int(os.environ.get("RANK", "0")) == 0
    owner = rank0 and not args.dry_run
    rundir = claim_run_dir(Path(cfg.trainer.out_dir), owner)  # before any model or data
    try:
        # build() refuses to overwrite an earlier run before loading anything
        r = build(cfg, callbacks=[ProgressCallback()] if cfg.log.progress and rank0 else [])
        main = dist.is_main()  # read before cleanup(): afterwards every process says rank 0
        if args.dry_run:
            if main:
                print(OmegaConf.to_yaml(cfg), end="")
                print(f"dry run: {r.describe()}; nothing trained")
            return 0
        start = time.perf_counter()
        state = r.fit(rundir=rundir if owner else None)
        if main:
            print(r.summary(state, time.perf_counter() - start))
    finally:
        rundir.release()
        dist.cleanup()  # no-op without torchrun
    return 0


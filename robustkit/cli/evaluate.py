"""``robustkit evaluate``: the RobustBench protocol for one model (architecture.md §4.2).

Parse, call, print, save: a ``-c`` YAML and the flags (on top) become one typed ``EvalConfig``
(``robustkit.config.load_eval_config``: every value gets the same checks wherever it was
written); the first N test images go to ``robustkit.evaluate`` (the library call, which builds
the model and attacks and runs the checks). Prints its table, writes ``<out>/config.yaml``,
then ``EvalResult.save(out)``: ``results.json``, ``flags.json`` and
``model_info/<dataset>/<tm>/<name>.json``; ``<out>/state/`` makes an interrupted run resumable
(under torchrun, one ``state/rank<r>-of<world>/`` folder per process).

Under ``torchrun --nproc_per_node=N -m robustkit evaluate ...`` (or several nodes) every process
evaluates a contiguous run of whole batches (``evaluate_attacks(shard=True)``), the flags are
gathered, and rank 0 prints and writes the same files as a single process would.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from pathlib import Path

from robustkit.cli import MODEL_FORMS, CLIError, user_input
from robustkit.errors import ConfigError
from robustkit.evaluation.api import check_name, default_name

logger = logging.getLogger(__name__)

EPILOG = MODEL_FORMS + """\

attack forms (--attacks, comma separated, run in order; eps/norm from the evaluation):
  clean              always reported
  pgdK, pgdKxR       PGD-CE, K steps, alpha = eps/4, random start, R restarts, best iterate
                     (K <= 10,000, R <= 1,000)
  cwK, cwKxR         the same with the CW margin loss
  fgsm               one signed-gradient step
  autoattack         official AutoAttack (pyautoattack), --aa-version standard|plus|custom
  square             AutoAttack's Square alone (black-box gradient-masking check)
  torchattacks:NAME  any torchattacks class, e.g. torchattacks:Square(n_queries=1000)

defaults: eps from the dataset (CIFAR Linf 8/255, L2 0.5; MNIST Linf 0.3, L2 2.0; Tiny-ImageNet
Linf 8/255, L2 0.5); every test image (RobustBench: 10,000); attacks clean,pgd20,autoattack.
Each attack runs on all clean-correct points (its own accuracy); 'robust' is the per-example
worst case over all attacks. Re-running the same command resumes an interrupted run (the
state is tied to the settings, the weights, the model file, the images and --data-root;
--overwrite restarts).

example:
  robustkit evaluate --model preact_resnet18 --checkpoint runs/x/best.pt --dataset cifar10 \\
      --n-examples 1000 --attacks clean,pgd20,pgd100x5,cw30,autoattack --out runs/x/eval

several GPUs or nodes (whole batches per process; the same numbers and flags as one process):
  torchrun --nproc_per_node=4 -m robustkit evaluate --model ... --out runs/x/eval
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="RobustBench-protocol evaluation (clean, PGD, CW, AutoAttack)",
        description="Evaluate a model by the RobustBench protocol: clean accuracy, then each "
                    "attack on the first N test images, with AutoAttack-style sanity checks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-c", "--config", metavar="YAML", help="settings file (keys as the flags, with "
      "underscores, e.g. configs/evaluate/cifar10_Linf.yaml); flags override it")
    a("--model", help="NAME | FILE.py:FN | robustbench:NAME | robustkit:NAME (see below)")
    a("--checkpoint", metavar="PATH", help="weights file (loaded weights-only, strictly)")
    a("--dataset", help="mnist, cifar10, cifar100, tinyimagenet, sample-mnist, sample-cifar10")
    a("--data-root", metavar="DIR", help="data folder (default $ROBUSTKIT_DATA, else ./data)")
    a("--threat-model", choices=("Linf", "L2"), help="norm of the threat model (default Linf)")
    a("--eps", help="budget in [0,1] pixel units, number or fraction (default: the dataset's)")
    # Numbers stay strings here: load_eval_config checks flags and file values alike.
    a("--n-examples", metavar="N", help="first N test images (default: all)")
    a("--batch-size", metavar="B", help="images per attack call (default 256)")
    a("--attacks", help="comma-separated list (default clean,pgd20,autoattack)")
    a("--aa-version", choices=("standard", "plus", "custom"),
      help="AutoAttack version (default standard, the RobustBench one)")
    a("--aa-attacks", help="with --aa-version custom: e.g. apgd-ce,apgd-t")
    a("--protocol", choices=("standalone", "cascade"),
      help="standalone (default): every attack on all clean-correct points; cascade: each "
           "attack only on points still robust (faster; accuracies become cumulative)")
    a("--out", metavar="DIR", help="output folder (default runs/evaluate/<name>-<dataset>-<tm>)")
    a("--name", help="entry name in the RobustBench JSON (default: the model name, the "
      "function name of FILE.py:FN); a name, not a path: <out>/model_info/.../<name>.json "
      "gets it with characters other than letters, digits and _.@+- replaced")
    a("--seed", metavar="S", help="seed of the attacks' randomness (default 0)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--overwrite", action="store_true", help="discard a previous (partial) run in --out")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _settings(args: argparse.Namespace):
    """The ``-c`` file with the flags on top, validated as one ``EvalConfig``."""
    from robustkit.config import EvalConfig, load_eval_config

    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(EvalConfig)}
    return load_eval_config(args.config, flags)


def run(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from robustkit import distributed as dist
    from robustkit.cli.progress import tqdm_factory
    from robustkit.config import to_container
    from robustkit.config.build import save_eval_config
    from robustkit.evaluation.api import (
        EVAL_TIMEOUT_S,
        default_out,
        evaluate,
        load_eval_data,
        reset_state,
    )
    from robustkit.utils import check_writable, resolve_device

    cfg = _settings(args)  # every value a user can get wrong is checked here, before loading
    s = to_container(cfg)
    if s["checkpoint"] is not None and not Path(s["checkpoint"]).is_file():
        raise CLIError(f"--checkpoint {s['checkpoint']!r}: file not found")
    # torch.device("gpu") raises RuntimeError; a CUDA device without CUDA, ValueError.
    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(s["device"])
    name = check_name(s["name"]) if s["name"] is not None else default_name(s["model"])
    out = Path(s["out"] or default_out(name, s["dataset"], s["threat_model"]))
    # Before any model or data is loaded: a read-only, unwritable or mistyped --out costs nothing.
    check_writable(out, "--out")
    check_writable(out / "state", "--out state folder")
    # Under torchrun: one process per GPU (cuda:<LOCAL_RANK>, NCCL) or CPU process (Gloo); a
    # plain run creates no process group and keeps `device`.
    where = dist.init_from_env(device, timeout_s=EVAL_TIMEOUT_S)
    main = where.rank == 0  # rank 0 logs, prints and writes
    try:
        if not main:
            logging.getLogger().setLevel(logging.WARNING)
        reset_state(out, where.rank, where.world_size, args.overwrite)
        dist.barrier()  # no rank opens its state before every --overwrite is done
        data, n, data_root = load_eval_data(s["dataset"], s["data_root"], s["n_examples"])
        bars = not args.no_progress and main
        # log lines between the bars, not through them (only while there are bars to avoid)
        with logging_redirect_tqdm() if bars else contextlib.nullcontext():
            result = evaluate(
                s["model"], data, attacks=s["attacks"], eps=s["eps"],
                norm=s["threat_model"], dataset=s["dataset"], checkpoint=s["checkpoint"],
                name=name, subset=f"first {n} test images", batch_size=s["batch_size"],
                protocol=s["protocol"], aa_version=s["aa_version"], aa_attacks=s["aa_attacks"],
                seed=s["seed"], device=where.device, state_dir=out / "state",
                progress=tqdm_factory(None if bars else False),
                fingerprint={"data_root": data_root}, shard=True)
    finally:
        dist.cleanup()
    if main:
        save_eval_config(cfg, out / "config.yaml")  # the resolved settings, beside the results
        paths = result.save(out)
        print(result.table())
        print(f"results: {paths['results']}\nRobustBench JSON: {paths['model_info']}")
        logger.info("wrote %s and %s", paths["results"], paths["model_info"])
    return 0

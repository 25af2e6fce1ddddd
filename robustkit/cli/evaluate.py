"""``robustkit evaluate``: the RobustBench protocol for one model (architecture.md §4.2).

Wiring only: a ``-c`` YAML and the flags (on top) become one typed ``EvalConfig``
(``robustkit.config.load_eval_config``: every value gets the same checks wherever it was
written), then a dataset subset, a model and attacks; the library (``robustkit.evaluation``,
``checks``, ``results``) does the work. Prints a table, writes ``<out>/config.yaml``,
``<out>/results.json``, ``<out>/flags.json`` and
``<out>/model_info/<dataset>/<tm>/<name>.json``; ``<out>/state/`` makes an interrupted run
resumable (under torchrun, one ``state/rank<r>-of<world>/`` folder per process).

Under ``torchrun --nproc_per_node=N -m robustkit evaluate ...`` (or several nodes) every process
evaluates a contiguous run of whole batches (``evaluate_attacks(shard=True)``), the flags are
gathered, and rank 0 prints and writes the same files as a single process would.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from robustkit.cli import CLIError, user_input
from robustkit.errors import ConfigError, DataError, ModelError
from robustkit.utils import check_plain_name

logger = logging.getLogger(__name__)

EPILOG = """\
model forms:
  NAME               a registry model (robustkit.models.MODELS), usually with --checkpoint
  FILE.py:FN         FN() returns an nn.Module taking [0, 1] inputs (normalising itself)
  robustbench:NAME   a RobustBench zoo model (downloads its weights; no --checkpoint)

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
    a("--model", help="NAME | FILE.py:FN | robustbench:NAME (see below)")
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


def _default_name(spec: str) -> str:
    """The entry's name: the zoo name, the factory's function name (``archs.py:lenet5_pgd`` ->
    ``lenet5_pgd``: one file often holds several models) or the registry name."""
    if spec.startswith("robustbench:"):
        return spec.partition(":")[2]
    if ":" in spec:
        return spec.rpartition(":")[2]
    return spec


def check_name(name: str, flag: str = "--name") -> str:
    """``name`` when it is a name, not a path; a one-line ``CLIError`` naming ``flag`` otherwise.

    A name becomes part of file names (``<out>/model_info/.../<name>.json``, TensorBoard run
    folders), always through ``utils.safe_name``; a separator, ``.``/``..`` or a control
    character says the user meant a path, so it is refused rather than silently renamed.
    """
    try:
        return check_plain_name(name, flag)
    except ValueError as err:
        raise CLIError(f"{err}; it names the entry and its files inside --out") from None


def _model_code_sha256(spec: str) -> str | None:
    """sha256 of FILE.py of a ``FILE.py:FN`` model (None for registry and zoo models): an edited
    forward pass with the same weights must not resume the old flags (the weights' own hash
    cannot see it)."""
    from robustkit.evaluation.results import sha256_file

    if spec.startswith("robustbench:") or ":" not in spec:
        return None
    path = Path(spec.rpartition(":")[0])
    return sha256_file(path) if path.is_file() else None


def _architecture(spec: str, model) -> str:
    from torch import nn

    inner = getattr(model, "model", None) if isinstance(model, nn.Sequential) else None
    cls = type(inner if isinstance(inner, nn.Module) else model).__name__
    return cls if ":" in spec else f"{spec} ({cls})"


# Collective timeout of a sharded evaluation: on a resume, a rank whose state is complete waits
# at the first gather for the others' remaining AutoAttack batches, which can take hours; the
# default 30 minutes would kill a healthy run (torchrun already stops every rank when one dies).
# 7 days in milliseconds also stays below 2**31 for backends that keep an int32.
EVAL_TIMEOUT_S = 7 * 24 * 3600


def run(args) -> int:
    from robustkit import distributed as dist
    from robustkit.config import to_container
    from robustkit.utils import check_writable, resolve_device

    cfg = _settings(args)  # every value a user can get wrong is checked here, before loading
    s = to_container(cfg)
    tm = s["threat_model"]
    if s["checkpoint"] is not None and not Path(s["checkpoint"]).is_file():
        raise CLIError(f"--checkpoint {s['checkpoint']!r}: file not found")
    # torch.device("gpu") raises RuntimeError; a CUDA device without CUDA, ValueError.
    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(s["device"])
    name = check_name(s["name"]) if s["name"] is not None else _default_name(s["model"])
    out = Path(s["out"] or Path("runs", "evaluate", re.sub(r"[^\w.-]+", "_",
                                                           f"{name}-{s['dataset']}-{tm}")))
    # Before any model or data is loaded: a read-only, unwritable or mistyped --out costs nothing.
    check_writable(out, "--out")
    check_writable(out / "state", "--out state folder")
    # Under torchrun: one process per GPU (cuda:<LOCAL_RANK>, NCCL) or CPU process (Gloo); a
    # plain run creates no process group and keeps `device`.
    where = dist.init_from_env(device, timeout_s=EVAL_TIMEOUT_S)
    try:
        if where.world_size > 1 and where.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs, prints and writes
        return _run(args, cfg, s, name, out, where)
    finally:
        dist.cleanup()


def _run(args, cfg, s: dict[str, Any], name: str, out: Path, where) -> int:
    """The evaluation proper, on every rank (``where``: ``distributed.DistInfo``)."""
    import torch

    from robustkit import distributed as dist
    from robustkit.attacks.specs import build_attacks, parse_attacks, strength, targets_needed
    from robustkit.cli.progress import tqdm_factory
    from robustkit.data import DATASETS, first_n, load_dataset, resolve_root
    from robustkit.evaluation import evaluate_attacks, post_checks, pre_checks
    from robustkit.evaluation.results import (
        build_results,
        format_eps,
        sha256_file,
        write_model_info,
        write_results,
    )
    from robustkit.evaluation.state import discard_state, rank_dir
    from robustkit.models import load_model
    from robustkit.utils import clean_tmp, seed_everything

    main = where.rank == 0
    device = where.device
    info = DATASETS[s["dataset"]]
    tm = s["threat_model"]
    eps = s["eps"] if s["eps"] is not None else float(info.eps[tm])
    specs = parse_attacks(s["attacks"])
    aa_attacks = s["aa_attacks"]
    state = out / "state"
    if main:
        # Only rank 0 writes into --out itself; each rank's state folder is cleaned by its own
        # store. Another rank never writes here, so no live temporary file is removed.
        clean_tmp(out)
    if args.overwrite:  # before any rank opens its state (the barrier below)
        world = where.world_size
        if world > 1:  # each rank its own folder: right with or without a shared file system
            discard_state(rank_dir(state, where.rank, world))
        if main:  # the single-process state and other world sizes' folders
            discard_state(state, keep_world=world if world > 1 else None)
    dist.barrier()

    with user_input(DataError, f"--dataset {s['dataset']}"):
        test = load_dataset(s["dataset"], "test", s["data_root"])
    n = s["n_examples"] or len(test)
    if n > len(test):
        raise CLIError(f"--n-examples {n} exceeds the {len(test)} test images of "
                       f"{s['dataset']} found")
    data = first_n(test, n)
    subset = f"first {n} test images"
    seed_everything(s["seed"])
    c, h, _ = info.input_shape
    # ModelError passes through; a ValueError of create_model (e.g. a bad class count) is the
    # user's --model/--dataset pairing.
    with user_input(ModelError, f"--model {s['model']}"):
        model = load_model(s["model"], num_classes=info.num_classes, in_channels=c,
                           input_size=h, mean=info.mean, std=info.std,
                           checkpoint=s["checkpoint"], dataset=s["dataset"].removeprefix(
                               "sample-"), threat_model=tm, device=device)
    model.eval()
    with user_input(ConfigError, "--attacks"):  # e.g. torchattacks:X(k=v) with a bad k
        attacks, settings = build_attacks(specs, model, eps=eps, norm=tm, seed=s["seed"],
                                          aa_version=s["aa_version"], aa_attacks=aa_attacks)
    logger.info("%s on %s: %s (of %d), %s eps=%s, attacks: %s%s", s["model"], s["dataset"],
                subset, len(test), tm, format_eps(eps), ", ".join(attacks) or "none",
                f"; sharded over {where.world_size} processes" if where.world_size > 1 else "")

    # Every rank runs the same checks on the same first batch, so all agree on them.
    k = min(n, s["batch_size"])
    batch = [data[i] for i in range(k)]
    x0 = torch.stack([b[0] for b in batch]).to(device)
    y0 = torch.stack([torch.as_tensor(b[1]) for b in batch]).long().to(device)
    checks = pre_checks(model, x0, y0, num_targets=targets_needed(
        specs, s["aa_version"], aa_attacks))

    ckpt_hash = sha256_file(s["checkpoint"]) if s["checkpoint"] else None
    # The shipped samples ignore --data-root; for every other dataset the folder is part of
    # what was evaluated (evaluate_attacks adds the hashes of the images and the weights).
    data_root = (None if s["dataset"].startswith("sample-")
                 else str(resolve_root(s["data_root"]).resolve()))
    fingerprint = {"model": s["model"], "model_code_sha256": _model_code_sha256(s["model"]),
                   "checkpoint_sha256": ckpt_hash, "dataset": s["dataset"],
                   "data_root": data_root, "threat_model": tm, "eps": eps,
                   "attack_settings": settings}
    logger.info("per-batch state in %s: re-run the same command to resume", state)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        result = evaluate_attacks(
            model, data, attacks, batch_size=s["batch_size"], protocol=s["protocol"],
            seed=s["seed"], state_dir=state, fingerprint=fingerprint,
            progress=tqdm_factory(False if args.no_progress or not main else None),
            device=device, norm=tm, shard=True)
    checks += post_checks(result, eps=eps, strength=strength(specs))
    if not main:
        return 0

    results = build_results(
        result, model=s["model"], dataset=s["dataset"], threat_model=tm, eps=eps,
        seed=s["seed"], subset=subset, checkpoint=s["checkpoint"],
        architecture=_architecture(s["model"], model), attacks=settings, checks=checks,
        extra={"name": name, "batch_size": s["batch_size"], "device": str(device),
               "world_size": where.world_size})
    _save_config(cfg, out / "config.yaml")  # the resolved settings, beside their results
    path = write_results(out, results, result)
    info_path = write_model_info(out, results, name=name)
    _print_table(results, name)
    _print_checks(checks)
    print(f"results: {path}\nRobustBench JSON: {info_path}")
    logger.info("wrote %s and %s", path, info_path)
    return 0


def _save_config(cfg, path: Path) -> None:
    """``save_config``, with a failed write (full disk, read-only) as one ``OutputError`` line."""
    from robustkit.config import save_config
    from robustkit.utils import output_errors

    with output_errors(path, "; the evaluation state is intact: free space or fix the "
                             "permissions and rerun the same command (nothing is recomputed)"):
        save_config(cfg, path)


def _print_table(results: dict[str, Any], name: str) -> None:
    n = results["n_examples"]
    print(f"\n{name} on {results['dataset']}, {results['subset']}, {results['threat_model']} "
          f"eps = {results['eps_text']} ({results['eps']:.6f}), protocol "
          f"{results['protocol']['name']}")
    print(f"  {'attack':<28}{'accuracy':>10}{'correct':>14}{'time':>10}")
    for key, acc in results["accuracy"].items():
        t = results["time_s"].get(key)
        t_text = "" if t is None else f"{t:.1f} s"
        count = f"{results['n_correct'][key]}/{n}"
        print(f"  {key:<28}{100 * acc:>9.2f}%{count:>14}{t_text:>10}")
        # AutoAttack's sub-attacks, in run order: accuracy after each (cumulative, as AA counts)
        for sub, sub_acc in results.get("components", {}).get(key, {}).items():
            broken = results.get("broken_by", {}).get(key, {}).get(sub)
            note = "" if broken is None else f"{broken} broken"
            print(f"    {'after ' + sub:<26}{100 * sub_acc:>9.2f}%{note:>14}")


def _print_checks(checks) -> None:
    """Failed checks first, then warnings; a failure says the numbers above are not trustworthy."""
    order = {"fail": 0, "warning": 1}
    shown = sorted((c for c in checks if c.severity in order), key=lambda c: order[c.severity])
    if not shown:
        print(f"  checks: all {len(checks)} passed")
        return
    for c in shown:
        print(f"  {c.severity.upper()} [{c.name}]: {c.message}")
    if any(c.severity == "fail" for c in shown):
        print("  A check FAILED: the robust accuracy above is likely an overestimate (see "
              "results.json['checks'] and the footnote); try adaptive attacks.")

"""``robustkit evaluate``: the RobustBench protocol for one model (architecture.md §4.2).

Wiring only: flags (or a ``-c`` YAML) become a dataset subset, a model and attacks; the library
(``robustkit.evaluation``, ``checks``, ``results``) does the work. Prints a table, writes
``<out>/results.json``, ``<out>/flags.json`` and ``<out>/model_info/<dataset>/<tm>/<name>.json``;
``<out>/state/`` makes an interrupted run resumable.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from robustkit.cli import CLIError

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "model": None, "checkpoint": None, "dataset": None, "data_root": None,
    "threat_model": "Linf", "eps": None, "n_examples": None, "batch_size": 256,
    # RobustBench's number (AutoAttack standard) plus PGD-20 as a quick cross-check.
    "attacks": "clean,pgd20,autoattack", "aa_version": "standard", "aa_attacks": None,
    "protocol": "standalone", "out": None, "name": None, "seed": 0, "device": None,
}  # fmt: skip

EPILOG = """\
model forms:
  NAME               a registry model (robustkit.models.MODELS), usually with --checkpoint
  FILE.py:FN         FN() returns an nn.Module taking [0, 1] inputs (normalising itself)
  robustbench:NAME   a RobustBench zoo model (downloads its weights; no --checkpoint)

attack forms (--attacks, comma separated, run in order; eps/norm from the evaluation):
  clean              always reported
  pgdK, pgdKxR       PGD-CE, K steps, alpha = eps/4, random start, R restarts, best iterate
  cwK, cwKxR         the same with the CW margin loss
  fgsm               one signed-gradient step
  autoattack         official AutoAttack (pyautoattack), --aa-version standard|plus|custom
  square             AutoAttack's Square alone (black-box gradient-masking check)
  torchattacks:NAME  any torchattacks class, e.g. torchattacks:Square(n_queries=1000)

defaults: eps from the dataset (CIFAR Linf 8/255, L2 0.5; MNIST Linf 0.3, L2 2.0; Tiny-ImageNet
Linf 8/255, L2 0.5); every test image (RobustBench: 10,000); attacks clean,pgd20,autoattack.
Each attack runs on all clean-correct points (its own accuracy); 'robust' is the per-example
worst case over all attacks. Re-running the same command resumes an interrupted run.

example:
  robustkit evaluate --model preact_resnet18 --checkpoint runs/x/best.pt --dataset cifar10 \\
      --n-examples 1000 --attacks clean,pgd20,pgd100x5,cw30,autoattack --out runs/x/eval
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
    a("--n-examples", type=int, metavar="N", help="first N test images (default: all)")
    a("--batch-size", type=int, metavar="B", help="images per attack call (default 256)")
    a("--attacks", help="comma-separated list (default clean,pgd20,autoattack)")
    a("--aa-version", choices=("standard", "plus", "custom"),
      help="AutoAttack version (default standard, the RobustBench one)")
    a("--aa-attacks", help="with --aa-version custom: e.g. apgd-ce,apgd-t")
    a("--protocol", choices=("standalone", "cascade"),
      help="standalone (default): every attack on all clean-correct points; cascade: each "
           "attack only on points still robust (faster; accuracies become cumulative)")
    a("--out", metavar="DIR", help="output folder (default runs/evaluate/<name>-<dataset>-<tm>)")
    a("--name", help="entry name in the RobustBench JSON (default: from --model)")
    a("--seed", type=int, help="seed of the attacks' randomness (default 0)")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--overwrite", action="store_true", help="discard a previous (partial) run in --out")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _settings(args) -> dict[str, Any]:
    """Flags over the ``-c`` file over DEFAULTS."""
    cfg: dict[str, Any] = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config {args.config!r}: file not found")
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            raise CLIError(f"--config {args.config!r}: expected a mapping of settings")
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise CLIError(f"--config {args.config!r}: unknown keys {', '.join(unknown)}; "
                           f"accepted: {', '.join(DEFAULTS)}")
    out = {}
    for key, default in DEFAULTS.items():
        flag = getattr(args, key, None)
        out[key] = flag if flag is not None else cfg.get(key, default)
    for key in ("attacks", "aa_attacks"):
        if isinstance(out[key], list | tuple):
            out[key] = ",".join(map(str, out[key]))
    return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _default_name(spec: str) -> str:
    if spec.startswith("robustbench:"):
        return spec.partition(":")[2]
    if ":" in spec:
        return Path(spec.rpartition(":")[0]).stem
    return spec


def _architecture(spec: str, model) -> str:
    from torch import nn

    inner = getattr(model, "model", None) if isinstance(model, nn.Sequential) else None
    cls = type(inner if isinstance(inner, nn.Module) else model).__name__
    return cls if ":" in spec else f"{spec} ({cls})"


def run(args) -> int:
    import torch

    from robustkit.attacks.specs import build_attacks, parse_attacks, strength, targets_needed
    from robustkit.cli.progress import tqdm_factory
    from robustkit.data import DATASETS, first_n, load_dataset
    from robustkit.evaluation import evaluate_attacks
    from robustkit.evaluation.checks import post_checks, pre_checks
    from robustkit.evaluation.results import (
        build_results,
        format_eps,
        sha256_file,
        write_model_info,
        write_results,
    )
    from robustkit.models import load_model
    from robustkit.utils import parse_number, resolve_device, seed_everything

    s = _settings(args)
    # Everything a user can get wrong is checked before any model or data is loaded.
    if not s["model"]:
        raise CLIError("--model is required (NAME, FILE.py:FN or robustbench:NAME)")
    if s["dataset"] not in DATASETS:
        raise CLIError(f"--dataset must be one of {', '.join(DATASETS)}, got {s['dataset']!r}")
    info = DATASETS[s["dataset"]]
    tm = s["threat_model"]
    if tm not in ("Linf", "L2"):
        raise CLIError(f"--threat-model must be Linf or L2, got {tm!r}")
    try:
        eps = parse_number(s["eps"]) if s["eps"] is not None else float(info.eps[tm])
    except ValueError as err:
        raise CLIError(f"--eps: {err}") from None
    if not eps > 0 or (tm == "Linf" and eps > 1):
        raise CLIError(f"--eps must be > 0 (and <= 1 for Linf) in pixel units, got {eps}")
    for key in ("batch_size", "seed", "n_examples"):
        if s[key] is not None and (not isinstance(s[key], int) or s[key] < (key != "seed")):
            raise CLIError(f"--{key.replace('_', '-')} must be a positive integer, got {s[key]!r}")
    if s["aa_version"] not in ("standard", "plus", "custom"):
        raise CLIError(f"--aa-version must be standard, plus or custom, got {s['aa_version']!r}")
    if s["protocol"] not in ("standalone", "cascade"):
        raise CLIError(f"--protocol must be standalone or cascade, got {s['protocol']!r}")
    specs = parse_attacks(s["attacks"])
    aa_attacks = [a.strip() for a in s["aa_attacks"].split(",")] if s["aa_attacks"] else None
    if s["checkpoint"] is not None and not Path(s["checkpoint"]).is_file():
        raise CLIError(f"--checkpoint {s['checkpoint']!r}: file not found")
    device = resolve_device(s["device"])
    name = s["name"] or _default_name(s["model"])
    out = Path(s["out"] or Path("runs", "evaluate", re.sub(r"[^\w.-]+", "_",
                                                           f"{name}-{s['dataset']}-{tm}")))

    test = load_dataset(s["dataset"], "test", s["data_root"])
    n = s["n_examples"] or len(test)
    if n > len(test):
        raise CLIError(f"--n-examples {n} exceeds the {len(test)} test images of "
                       f"{s['dataset']} found")
    data = first_n(test, n)
    subset = f"first {n} test images"
    seed_everything(s["seed"])
    try:
        c, h, _ = info.input_shape
        model = load_model(s["model"], num_classes=info.num_classes, in_channels=c,
                           input_size=h, mean=info.mean, std=info.std,
                           checkpoint=s["checkpoint"], dataset=s["dataset"].removeprefix(
                               "sample-"), threat_model=tm, device=device)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        raise CLIError(_one_line(err)) from None
    model.eval()
    attacks, settings = build_attacks(specs, model, eps=eps, norm=tm, seed=s["seed"],
                                      aa_version=s["aa_version"], aa_attacks=aa_attacks)
    logger.info("%s on %s: %s (of %d), %s eps=%s, attacks: %s", s["model"], s["dataset"],
                subset, len(test), tm, format_eps(eps), ", ".join(attacks) or "none")

    k = min(n, s["batch_size"])
    batch = [data[i] for i in range(k)]
    x0 = torch.stack([b[0] for b in batch]).to(device)
    y0 = torch.stack([torch.as_tensor(b[1]) for b in batch]).long().to(device)
    checks = pre_checks(model, x0, y0, num_targets=targets_needed(
        specs, s["aa_version"], aa_attacks))

    ckpt_hash = sha256_file(s["checkpoint"]) if s["checkpoint"] else None
    state = out / "state"
    if args.overwrite and state.is_dir():
        for f in [*state.glob("flags_*.json"), *state.glob("aastate_*.json"),
                  *state.glob("fingerprint.json")]:
            f.unlink()
    fingerprint = {"model": s["model"], "checkpoint_sha256": ckpt_hash, "dataset": s["dataset"],
                   "threat_model": tm, "eps": eps, "attack_settings": settings}
    logger.info("per-batch state in %s: re-run the same command to resume", state)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        result = evaluate_attacks(
            model, data, attacks, batch_size=s["batch_size"], protocol=s["protocol"],
            seed=s["seed"], state_dir=state, fingerprint=fingerprint,
            progress=tqdm_factory(False if args.no_progress else None), device=device, norm=tm)
    checks += post_checks(result, eps=eps, strength=strength(specs))

    results = build_results(
        result, model=s["model"], dataset=s["dataset"], threat_model=tm, eps=eps,
        seed=s["seed"], subset=subset, checkpoint=s["checkpoint"],
        architecture=_architecture(s["model"], model), attacks=settings, checks=checks,
        extra={"name": name, "batch_size": s["batch_size"], "device": str(device)})
    path = write_results(out, results, result)
    info_path = write_model_info(out, results, name=name)
    _print_table(results, name)
    for c in checks:
        if not c.passed:
            print(f"  warning [{c.name}]: {c.message}")
    print(f"results: {path}\nRobustBench JSON: {info_path}")
    logger.info("wrote %s and %s", path, info_path)
    return 0


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

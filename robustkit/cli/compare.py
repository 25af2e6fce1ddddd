"""Flags shared by ``robustkit sensitivity`` and ``robustkit inspect``: repeated ``--model``/
``--checkpoint``/``--name`` tied to the model before them, data, budget, attack and output; the
labels, images and models come from ``robustkit.evaluation.api``.

Example:
    >>> c = parse(args, n_min=2); out, device, x, y, boxes, models = load(args, c)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from robustkit.cli import CLIError, user_input
from robustkit.errors import ConfigError

__all__ = ["PerModel", "add_flags", "integer", "load", "model_entries", "parse"]


class PerModel(argparse.Action):
    """Records ``--model``/``--checkpoint``/``--name`` in command-line order, so a checkpoint
    or a name is tied to the ``--model`` just before it (checked in ``model_entries``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.entries = [*(getattr(namespace, "entries", None) or []), (self.dest, values)]


def add_flags(p, what: str, n: str, batch: str, attack: str) -> None:
    """The shared flags; ``what`` completes "--model: model to ...", the rest are defaults."""
    a = p.add_argument
    a("--model", action=PerModel, metavar="SPEC", help=f"model to {what} (repeatable): NAME | "
      "FILE.py:FN | robustbench:NAME | robustkit:NAME (see model forms below)")
    a("--checkpoint", action=PerModel, metavar="PATH",
      help="weights of the --model just before it (loaded weights-only, strictly)")
    a("--name", action=PerModel, metavar="LABEL",
      help="label of the --model just before it (default: as robustkit evaluate names it)")
    a("--dataset", help="mnist, cifar10, cifar100, tinyimagenet, sample-mnist, sample-cifar10")
    a("--data-root", metavar="DIR", help="data folder (default $ROBUSTKIT_DATA, else ./data)")
    a("--n-examples", metavar="N", default=n, help=f"first N test images (default {n})")
    a("--attack", default=None, help=f"pgdK or cwK: K steps, alpha = eps/4, random start, "
                                        f"last iterate{attack} (default pgd20)")
    a("--eps", help="L-inf budget in [0, 1] pixel units, number or fraction (default: the "
                    "dataset's, as robustkit evaluate: CIFAR/Tiny-ImageNet 8/255, MNIST 0.3)")
    a("--batch-size", metavar="B", default=batch,
      help=f"images per forward/attack batch (default {batch})")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--seed", default="0", help="seed of the random starts, random draws and bootstrap "
                                  "(default 0); the same seed gives the same results")
    a("--out", metavar="DIR", required=True, help="output folder (created)")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(entries=None)


def integer(text: str, flag: str, lo: int) -> int:
    """``int(text)``, at least ``lo``; a one-line ``CLIError`` naming ``flag`` otherwise."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected an integer") from None
    if value < lo:
        raise CLIError(f"{flag} {text!r}: must be >= {lo}")
    return value


def model_entries(raw: list[tuple[str, str]] | None) -> list[dict[str, Any]]:
    """``[{"spec", "checkpoint", "name"}]`` from the flags in command-line order."""
    models: list[dict[str, Any]] = []
    for dest, value in raw or []:
        if dest == "model":
            models.append({"spec": value, "checkpoint": None, "name": None})
        elif not models:
            raise CLIError(f"--{dest} {value!r} comes before any --model; it applies to the "
                           "--model just before it")
        elif models[-1][dest] is not None:
            raise CLIError(f"--model {models[-1]['spec']} has two --{dest} values; give one "
                           "after each --model")
        else:
            models[-1][dest] = value
    if not models:
        raise CLIError("give at least one --model")
    for m in models:
        if m["checkpoint"] is not None and not Path(m["checkpoint"]).is_file():
            raise CLIError(f"--checkpoint {m['checkpoint']!r}: file not found")
    return models


def parse(args, n_min: int) -> SimpleNamespace:
    """The shared flags checked (nothing loaded): entries, labels, info, eps, attack, n,
    batch_size, seed."""
    from robustkit.evaluation.api import dataset_eps, model_labels
    from robustkit.sensitivity.pairs import parse_pair_attack

    entries = model_entries(args.entries)
    labels = model_labels(entries)
    info, eps = dataset_eps(args.dataset, args.eps)
    with user_input(ConfigError, "--attack"):
        attack = parse_pair_attack(args.attack or "pgd20").name
    return SimpleNamespace(entries=entries, labels=labels, info=info, eps=eps, attack=attack,
                           n=integer(args.n_examples, "--n-examples", n_min),
                           batch_size=integer(args.batch_size, "--batch-size", 1),
                           seed=integer(args.seed, "--seed", 0))


def load(args, c: SimpleNamespace):
    """``(out, device, x, y, boxes, models)``: --out checked before any data or model loads."""
    from robustkit.evaluation.api import load_models, load_test_images
    from robustkit.utils import check_writable, resolve_device, seed_everything

    with user_input(ConfigError, "--device", (ValueError, RuntimeError)):
        device = resolve_device(args.device)
    out = check_writable(Path(args.out), "--out")
    x, y, boxes = load_test_images(args.dataset, args.data_root, c.n)
    seed_everything(c.seed)  # a FILE.py:FN factory that does not seed still builds the same model
    c.model_info = {lb: {"model": e["spec"], "checkpoint": e["checkpoint"]}
                    for lb, e in zip(c.labels, c.entries, strict=True)}
    c.about = {"dataset": args.dataset, "split": "test", "device": str(device)}
    return out, device, x, y, boxes, load_models(c.entries, c.labels, args.dataset, device)

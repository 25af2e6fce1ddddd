"""What the commands that compare several models share (``robustkit sensitivity`` and
``robustkit inspect``): repeated ``--model``/``--checkpoint``/``--name`` flags tied to the model
before them, labels as ``robustkit evaluate`` names models, ``--dataset``/``--eps`` parsing, and
the full-strength white-box PGD both commands measure on (methods.md §4.1 [R]: α = ε/4, uniform
random start, no early stop, last iterate).

Example:
    >>> entries = model_entries(args.entries); labels = model_labels(entries)
    >>> x_adv = attack_all(attack_spec("pgd20"), model, x, y, 0.3, 0, 64, "cpu", bar)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustkit.cli import CLIError, user_input
from robustkit.errors import ConfigError, ModelError

__all__ = ["PerModel", "attack_all", "attack_kwargs", "attack_spec", "build_attack",
           "dataset_and_eps", "integer", "load_model_arg", "model_entries",
           "model_labels"]


class PerModel(argparse.Action):
    """Records ``--model``/``--checkpoint``/``--name`` in command-line order, so a checkpoint
    or a name is tied to the ``--model`` just before it (checked in ``model_entries``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        entries = list(getattr(namespace, "entries", None) or [])
        entries.append((self.dest, values))
        namespace.entries = entries


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
            continue
        if not models:
            raise CLIError(f"--{dest} {value!r} comes before any --model; it applies to the "
                           "--model just before it")
        if models[-1][dest] is not None:
            raise CLIError(f"--model {models[-1]['spec']} has two --{dest} values; give one "
                           "after each --model")
        models[-1][dest] = value
    if not models:
        raise CLIError("give at least one --model")
    for m in models:
        if m["checkpoint"] is not None and not Path(m["checkpoint"]).is_file():
            raise CLIError(f"--checkpoint {m['checkpoint']!r}: file not found")
    return models


def model_labels(models: list[dict[str, Any]]) -> list[str]:
    """As ``robustkit evaluate`` names each model; repeated default names get the checkpoint's
    folder (else its stem) appended, so two checkpoints of one architecture stay apart."""
    from robustkit.cli.evaluate import _default_name, check_name

    labels = [check_name(m["name"]) if m["name"] is not None else _default_name(m["spec"])
              for m in models]
    for label in sorted(set(labels)):
        group = [i for i, lb in enumerate(labels) if lb == label and models[i]["name"] is None]
        if len(group) < 2:
            continue
        for tag in (lambda p: Path(p).parent.name, lambda p: Path(p).stem):
            cand = [f"{label}@{tag(models[i]['checkpoint'])}" if models[i]["checkpoint"]
                    else label for i in group]
            if len(set(cand)) == len(group) and all(c != f"{label}@" for c in cand):
                for i, c in zip(group, cand, strict=True):
                    labels[i] = c
                break
    seen = [lb for lb in labels if labels.count(lb) > 1]
    if seen:
        raise CLIError(f"two models are labelled {seen[0]!r}; give each a --name after its "
                       "--model")
    return labels


def attack_spec(text: str):
    from robustkit.attacks.specs import parse_attacks

    with user_input(ConfigError, "--attack"):
        specs = parse_attacks(text)
    if len(specs) != 1 or specs[0].kind not in ("pgd", "cw") or specs[0].restarts != 1:
        raise CLIError(f"--attack {text!r}: expected one pgdK or cwK (K steps, e.g. pgd20); "
                       "restarts and other attacks do not apply (one run's last iterate is kept)")
    return specs[0]


def attack_kwargs(spec, eps: float) -> dict[str, Any]:
    """The paper's full-strength PGD (methods.md §4.1 [R]), as ``PGD`` keyword arguments."""
    from robustkit.attacks.specs import ALPHA_FRACTION

    return dict(eps=eps, alpha=ALPHA_FRACTION * eps, steps=spec.steps, random_start=True,
                norm="Linf", loss="ce" if spec.kind == "pgd" else "cw", restarts=1,
                # every image attacked for all K steps and the last iterate kept: sigma measures
                # the full-strength perturbation, not the first one that fooled the model
                stop_on_success=False, select="last")


def build_attack(spec, model, eps: float, seed: int):
    """The attack; its random starts come from a CPU generator seeded with ``seed`` (the same
    draws on CPU and GPU)."""
    import torch

    from robustkit.attacks import PGD

    return PGD(model, generator=torch.Generator().manual_seed(seed), **attack_kwargs(spec, eps))


def dataset_and_eps(args):
    """``--dataset`` (its ``DATASETS`` entry) and ``--eps`` (default: the dataset's L-inf eps)."""
    from robustkit.data import DATASETS
    from robustkit.utils import parse_number

    if args.dataset is None:
        raise CLIError("--dataset is required")
    if args.dataset not in DATASETS:
        raise CLIError(f"--dataset {args.dataset!r}: unknown; valid: {', '.join(DATASETS)}")
    info = DATASETS[args.dataset]
    if args.eps is None:
        eps = float(info.eps["Linf"])
    else:
        with user_input(ConfigError, "--eps"):
            eps = parse_number(args.eps)
        if not 0 < eps <= 1:
            raise CLIError(f"--eps {args.eps!r}: must lie in (0, 1] (pixel units)")
    return info, eps


def load_model_arg(spec: str, checkpoint: str | None, info, dataset: str, device):
    from robustkit.models import load_model

    c, h, _ = info.input_shape
    # load_model runs one forward on a zero image of the dataset's shape: a wrong class count or
    # input shape is a one-line ModelError here, before any attack.
    with user_input(ModelError, f"--model {spec}"):
        return load_model(spec, num_classes=info.num_classes, in_channels=c, input_size=h,
                          mean=info.mean, std=info.std, checkpoint=checkpoint,
                          dataset=dataset.removeprefix("sample-"), threat_model="Linf",
                          device=device)


def attack_all(spec, model, x, y, eps: float, seed: int, batch_size: int, device, bar):
    """x' for every image, batch by batch (the generator is seeded once per model)."""
    import torch

    attack = build_attack(spec, model, eps, seed)
    parts = []
    with bar:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            parts.append(attack(xb, yb).cpu())
            bar.update(xb.shape[0])
    return torch.cat(parts)

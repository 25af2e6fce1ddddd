"""What the commands that compare several models share (``robustkit sensitivity`` and
``robustkit inspect``): repeated ``--model``/``--checkpoint``/``--name`` flags tied to the model
before them, labels as ``robustkit evaluate`` names models, ``--dataset``/``--eps``/``--attack``
parsing and the first N test images. The attack itself (the full-strength PGD of methods.md §4.1)
is the library's (``robustkit.sensitivity.pairs``).

Example:
    >>> entries = model_entries(args.entries); labels = model_labels(entries)
    >>> x, y, boxes = load_images("sample-mnist", None, 16)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustkit.cli import CLIError, user_input
from robustkit.errors import ConfigError, DataError, ModelError

__all__ = ["PerModel", "attack_spec", "dataset_and_eps", "integer", "load_images",
           "load_model_arg", "model_entries", "model_labels"]


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
    """``--attack``: one ``pgdK`` or ``cwK`` (``sensitivity.pairs.parse_pair_attack``)."""
    from robustkit.sensitivity.pairs import parse_pair_attack

    with user_input(ConfigError, "--attack"):
        return parse_pair_attack(text)


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


def load_images(dataset: str, root: str | None, n: int):
    """``(x, y, boxes)``: the first ``n`` test images of ``dataset`` in file order, as tensors
    (``boxes`` ``(n, 4)`` or ``None``); ``--n-examples`` beyond the split is one line."""
    import torch

    from robustkit.data import first_n, load_dataset

    with user_input(DataError, f"--dataset {dataset}"):
        test = load_dataset(dataset, "test", root)
    if n > len(test):
        raise CLIError(f"--n-examples {n} exceeds the {len(test)} test images of {dataset} found")
    data = first_n(test, n)
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(n)]).long()
    return x, y, getattr(data, "boxes", None)

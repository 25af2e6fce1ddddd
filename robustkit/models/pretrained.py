"""Reference models trained by robustkit and shipped with it: ``robustkit:<name>`` models.

Each shipped model is two files in ``robustkit/assets/models/``: ``<name>.pt``, a plain state dict
(float16 to keep the wheel small; loaded back as float32), and ``<name>.json``, its model card
(architecture, dataset, objective and full config, the command that trained it, training wall
and CPU time, torch version, and the evaluation numbers with n and ε). The sha256 of both files
is recorded in ``assets/checksums.json`` and checked on each read: weights that are not
byte-for-byte the ones the card describes are refused, and so is an edited card (it decides the
architecture built, and ``robustkit inspect`` reads "standard" or "robust" from its objective).

Example:
    >>> model = load_pretrained("mnist_smallcnn_robust")          # eval mode, float32, CPU
    >>> model_card("mnist_smallcnn_robust")["evaluation"]
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from robustkit.errors import ModelError
from robustkit.models._keys import state_dict_mismatch
from robustkit.models.registry import create_model
from robustkit.utils import torch_load_plain_bytes

__all__ = ["PRETRAINED", "load_pretrained", "model_card", "available_pretrained"]

# Shipped name -> file stem in robustkit/assets/models/ (a dict literal: greppable, testable).
# Trained, evaluated and shipped by experiments/mnist_reference_models.sh (train/ship_model.py);
# a new entry is added together with its two files and its checksum.
PRETRAINED: dict[str, str] = {
    "mnist_smallcnn_standard": "mnist_smallcnn_standard",  # natural training, full MNIST
    "mnist_smallcnn_robust": "mnist_smallcnn_robust",  # PGD-AT, L-inf eps 0.3, full MNIST
}

_PACKAGE = "robustkit.assets"
_FOLDER = "models"


def _root():
    """The folder of the shipped assets (a Traversable: works from a wheel or a checkout)."""
    return resources.files(_PACKAGE)


def _asset(filename: str):
    return _root().joinpath(_FOLDER, filename)


def available_pretrained() -> list[str]:
    """The shipped names whose weights and card are present in this installation."""
    return [n for n, stem in PRETRAINED.items()
            if _asset(f"{stem}.pt").is_file() and _asset(f"{stem}.json").is_file()]


def _lookup(name: str) -> str:
    if name not in PRETRAINED:
        shipped = ", ".join(f"robustkit:{n}" for n in PRETRAINED) or "none yet"
        raise ModelError(f"unknown shipped model {name!r}; shipped: {shipped}")
    stem = PRETRAINED[name]
    if not (_asset(f"{stem}.pt").is_file() and _asset(f"{stem}.json").is_file()):
        raise ModelError(f"robustkit:{name} is registered but its files are missing from "
                         f"robustkit/assets/{_FOLDER}/ (a broken installation?)")
    return stem


def model_card(name: str) -> dict[str, Any]:
    """The model card of shipped model ``name`` (a dict read from its JSON, sha256 checked).

    Raises:
        ModelError: unknown name, missing files, or a card whose sha256 differs from the
            recorded one.
    """
    data = _verified(name, f"{_lookup(name)}.json", "model card")
    try:
        card = json.loads(data)
    except ValueError as err:  # a card that matches its checksum but is not JSON
        raise ModelError(f"robustkit:{name}: its model card is not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise ModelError(f"robustkit:{name}: its model card holds a {type(card).__name__}, "
                         "not an object")
    return card


def _verified(name: str, filename: str, what: str) -> bytes:
    """The bytes of ``models/<filename>`` after checking them against ``checksums.json``."""
    data = _asset(filename).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = _expected_sha256(filename)
    if digest != expected:
        raise ModelError(f"robustkit:{name}: the {what}'s sha256 {digest[:12]}… differs from "
                         f"the recorded one {expected[:12]}… (robustkit/assets/checksums.json); "
                         f"{_FOLDER}/{filename} was changed or damaged, reinstall robustkit")
    return data


def _expected_sha256(filename: str) -> str:
    try:
        sums = json.loads(_root().joinpath("checksums.json").read_text())
        entry = sums["files"].get(f"{_FOLDER}/{filename}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(f"robustkit/assets/checksums.json is unreadable ({type(err).__name__}: "
                         f"{err}); reinstall robustkit") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelError(f"no sha256 recorded for {_FOLDER}/{filename} in "
                         "robustkit/assets/checksums.json; every shipped file must have one "
                         "(train/ship_model.py records them)")
    return entry["sha256"]


def _build(name: str, card: dict[str, Any]) -> nn.Module:
    """The card's architecture, as ``create_model`` builds it; ``ModelError`` if it cannot."""
    try:
        arch = card["architecture"]
        return create_model(arch["name"], arch["num_classes"], mean=arch.get("mean"),
                            std=arch.get("std"), in_channels=arch["in_channels"],
                            input_size=arch["input_size"], **arch.get("params", {}))
    except (KeyError, TypeError, ValueError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ModelError(f"robustkit:{name}: its model card's architecture cannot be built "
                         f"({detail})") from None


def load_pretrained(name: str, device: str | torch.device | None = None) -> nn.Module:
    """Build shipped model ``name`` and load its weights (sha256 checked, weights_only).

    Args:
        name: a key of ``PRETRAINED``.
        device: where the model goes (default CPU).

    Returns:
        ``Normalize → architecture`` in eval mode, float32, taking ``(N, C, H, W)`` in [0, 1].

    Raises:
        ModelError: unknown name (the shipped ones listed), missing files, a card or weights
            whose sha256 differs from the recorded one, weights that pickle anything but
            tensors (refused, never run), or a card whose architecture does not match the
            weights (the mismatching keys and shapes named).
    """
    stem = _lookup(name)
    card = model_card(name)
    data = _verified(name, f"{stem}.pt", "weights")
    try:
        state = torch_load_plain_bytes(data, f"robustkit:{name}'s weights {_FOLDER}/{stem}.pt")
    except ValueError as err:  # "refused" (pickled code, never run) or "corrupt"
        raise ModelError(f"{err}; reinstall robustkit") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"robustkit:{name}: {_FOLDER}/{stem}.pt holds a "
                         f"{type(state).__name__}, not a state dict; reinstall robustkit")
    model = _build(name, card)
    # float16 on disk halves the wheel; compute happens in float32 as during training
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    problem = state_dict_mismatch(model, state)
    if problem:
        arch = card["architecture"]
        raise ModelError(f"robustkit:{name}: the model card's architecture ({arch.get('name')}, "
                         f"num_classes={arch.get('num_classes')}, in_channels="
                         f"{arch.get('in_channels')}, input_size={arch.get('input_size')}) does "
                         f"not match its weights ({problem}); reinstall robustkit")
    model.load_state_dict(state, strict=True)
    return model.to(device or "cpu").eval()

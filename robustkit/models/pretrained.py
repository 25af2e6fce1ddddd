"""Reference models trained by robustkit and shipped with it: ``robustkit:<name>`` models.

Each shipped model is two files in ``robustkit/assets/models/``: ``<name>.pt``, a plain state dict
(float16 to keep the wheel small; loaded back as float32), and ``<name>.json``, its model card
(architecture, dataset, objective and full config, the command that trained it, training wall
and CPU time, torch version, and the evaluation numbers with n and ε). The sha256 of every
weights file is recorded in ``assets/checksums.json`` and checked on each load, so weights that
are not byte-for-byte the ones the card describes are refused.

Example:
    >>> model = load_pretrained("mnist_smallcnn_robust")          # eval mode, float32, CPU
    >>> model_card("mnist_smallcnn_robust")["evaluation"]
"""

from __future__ import annotations

import hashlib
import io
import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from robustkit.errors import ModelError
from robustkit.models.registry import create_model

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
    """The model card of shipped model ``name`` (a dict read from its JSON)."""
    return json.loads(_asset(f"{_lookup(name)}.json").read_text())


def _expected_sha256(filename: str) -> str:
    sums = json.loads(_root().joinpath("checksums.json").read_text())
    entry = sums.get("files", {}).get(f"{_FOLDER}/{filename}")
    if entry is None:
        raise ModelError(f"no sha256 recorded for {_FOLDER}/{filename} in "
                         "robustkit/assets/checksums.json")
    return entry["sha256"]


def load_pretrained(name: str, device: str | torch.device | None = None) -> nn.Module:
    """Build shipped model ``name`` and load its weights (sha256 checked, weights_only).

    Args:
        name: a key of ``PRETRAINED``.
        device: where the model goes (default CPU).

    Returns:
        ``Normalize → architecture`` in eval mode, float32, taking ``(N, C, H, W)`` in [0, 1].

    Raises:
        ModelError: unknown name (the shipped ones listed), missing files, or weights whose
            sha256 differs from the recorded one.
    """
    stem = _lookup(name)
    card = model_card(name)
    data = _asset(f"{stem}.pt").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _expected_sha256(f"{stem}.pt"):
        raise ModelError(f"robustkit:{name}: the weights' sha256 {digest[:12]}… differs from the "
                         "recorded one; the file was changed or damaged, reinstall robustkit")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    arch = card["architecture"]
    model = create_model(arch["name"], arch["num_classes"], mean=arch.get("mean"),
                         std=arch.get("std"), in_channels=arch["in_channels"],
                         input_size=arch["input_size"], **arch.get("params", {}))
    # float16 on disk halves the wheel; compute happens in float32 as during training
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device or "cpu").eval()

"""robustkit: adversarial training, RobustBench-protocol evaluation and saliency for PyTorch.

Every command is a library call: ``robustkit.evaluate`` (``robustkit evaluate``),
``robustkit.config.build(cfg).fit()`` (``robustkit train``); data as tensors with
``robustkit.data.load``. Public names are re-exported by the subpackages (``robustkit.attacks``,
``robustkit.models``, ``robustkit.data``, ``robustkit.objectives``, ...), which load on first
use: importing this package does no work (no torch import).

Example:
    >>> x, y = robustkit.data.load("sample-mnist", n=100)
    >>> robustkit.evaluate("robustkit:mnist_smallcnn_robust", x, y, attacks="clean,pgd20")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Top-level name -> (module, attribute), imported on first access (PEP 562).
_EXPORTS = {
    "evaluate": ("robustkit.evaluation.api", "evaluate"),
    "EvalResult": ("robustkit.evaluation.protocol", "EvalResult"),
}
# Subpackages reachable as attributes after a bare ``import robustkit``.
_SUBPACKAGES = ("attacks", "config", "data", "evaluation", "models", "objectives", "saliency",
                "sensitivity", "training", "reports")

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # once: later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"robustkit.{name}")
    raise AttributeError(f"module 'robustkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBPACKAGES])

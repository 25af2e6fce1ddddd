"""Comparing a state dict with a model's keys and shapes (checkpoint and shipped-weight loading).

Its own module so that ``loading.py`` and ``pretrained.py`` both use it without importing each
other (``loading`` imports ``pretrained`` lazily for ``robustkit:NAME``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Missing, unexpected and shape-mismatching keys, a few of each, or '' if none."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label} keys: {', '.join(items[:5])}{more}")
    return "; ".join(parts)

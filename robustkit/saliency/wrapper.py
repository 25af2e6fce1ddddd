"""The base of explainers built on an inner explainer (SmoothGrad, AdaptGrad, IG, Gradient x Input).

A module of its own so that ``base.py`` (the ``Explainer`` contract) and ``gradient.py`` (the
plain gradient, the default inner explainer) do not import each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from robustkit.saliency.base import Explainer
from robustkit.saliency.gradient import Gradient


class _Wrapper(Explainer):
    """An explainer built on an inner one; a bare ``nn.Module`` inner means ``Gradient(inner)``."""

    def __init__(self, inner: Explainer | nn.Module,
                 internal_batch_size: int | None = None) -> None:
        if isinstance(inner, nn.Module):
            inner = Gradient(inner, internal_batch_size=internal_batch_size)
        if not isinstance(inner, Explainer):
            raise ValueError(f"inner must be an Explainer or an nn.Module, got "
                             f"{type(inner).__name__}")
        super().__init__(inner.model, internal_batch_size=internal_batch_size)
        self.inner = inner

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.inner.stochastic

    @contextmanager
    def _random_scope(self, device: torch.device) -> Iterator[None]:
        with self.inner._random_scope(device):
            yield

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "inner": self.inner.settings()}

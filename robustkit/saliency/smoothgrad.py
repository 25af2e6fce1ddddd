"""SmoothGrad with the AdaptGrad repository's conventions (methods.md §6.2 and §8)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustkit.saliency.base import Explainer
from robustkit.saliency.noise import _check_bounds, _NoiseAverage

__all__ = ["SmoothGrad"]


class SmoothGrad(_NoiseAverage):
    """SmoothGrad (Smilkov et al., https://arxiv.org/abs/1706.03825): the inner map averaged over
    ``x + ξ``, ``ξ ~ N(0, σ²I)`` with ``σ = stdev · (U − L)``.

    ``stdev`` is a **fraction of the data range** ``bounds = (L, U)`` (the paper's "noise level",
    the repository's ``FixedSigma``), not of each image's own max − min; on [0, 1] pixels the two
    readings of "absolute" and "fraction" coincide. methods.md §8 uses 0.15 and 0.2, the
    AdaptGrad repository 0.2. As in the repository the clean map counts as one of n + 1 samples
    (``include_clean=False`` gives captum's ``NoiseTunnel(..., nt_type="smoothgrad")``), a
    sample whose map holds a NaN is dropped, and noisy inputs are not clipped.

    Args:
        inner: explainer to smooth (an ``nn.Module`` means ``Gradient(inner)``).
        n_samples: noisy samples n (default 50).
        stdev: noise standard deviation as a fraction of ``U − L`` (default 0.15).
        bounds: data range ``(L, U)`` in model-input units (default ``(0.0, 1.0)``, pixels).
        include_clean: average the clean map in, as one of n + 1 samples (default True).
        seed: fresh generator per call seeded with it: the same x always gets the same map.
        generator: a ``torch.Generator`` on x's device, consumed call after call (not with seed).
        internal_batch_size: most noisy rows per inner call (default N); results do not depend
            on it.

    Shape:
        x: ``(N, C, H, W)``; returned map: like x.

    Example:
        >>> sg = SmoothGrad(Gradient(model), n_samples=50, stdev=0.15, seed=0)
        >>> maps = sg.attribute(x, target=y)
    """

    def __init__(self, inner: Explainer | nn.Module, n_samples: int = 50, stdev: float = 0.15,
                 bounds: tuple[float, float] = (0.0, 1.0), include_clean: bool = True,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 internal_batch_size: int | None = None) -> None:
        super().__init__(inner, n_samples=n_samples, include_clean=include_clean, seed=seed,
                         generator=generator, internal_batch_size=internal_batch_size)
        stdev = float(stdev)
        if not stdev >= 0:
            raise ValueError(f"stdev must be >= 0 (a fraction of the range), got {stdev}")
        self.stdev = stdev
        self.bounds = _check_bounds(bounds)

    def sigma(self, x: Tensor) -> Tensor:
        """``stdev · (U − L)``, one value for every element (a 0-dim tensor)."""
        low, high = self.bounds
        return torch.tensor(self.stdev * (high - low), dtype=x.dtype, device=x.device)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "stdev": self.stdev, "bounds": self.bounds}


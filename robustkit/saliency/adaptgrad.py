"""AdaptGrad: SmoothGrad with a per-element noise scale that keeps samples in the data domain
(methods.md §6)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.saliency.base import Explainer
from robustkit.saliency.noise import _check_bounds, _NoiseAverage

__all__ = ["AdaptGrad"]


class AdaptGrad(_NoiseAverage):
    """AdaptGrad (Zhou et al., NeurIPS 2025, https://arxiv.org/abs/2410.07711).

    Per element, ``t_i = min(|x_i − L|, |x_i − U|)`` is the distance to the nearer bound and
    ``σ_i = t_i / (√2 · erfinv(c))``, so ``P(|ξ_i| ≤ t_i) = c`` and a sample leaves ``[L, U]``
    along any coordinate with probability at most ``1 − c``; a pixel at a bound gets no noise.
    The estimate is the repository's: ``AG(x) = 1/(n+1) [G̃(x) + Σ_{j=1..n} G̃(x + ξ_j)]``, a
    sample whose map holds a NaN is dropped (per image), and noisy inputs are not clipped.
    On [0, 1] pixels (normalisation inside the model) the bounds are exactly ``(0, 1)``; an x
    outside them still gets the distance to the nearer bound, as in the repository.

    Args:
        inner: explainer evaluated at every sample (an ``nn.Module`` means ``Gradient(inner)``).
        n_samples: noisy samples n (default 50); the clean map comes on top.
        confidence: c in (0, 1), per-coordinate probability of staying in the box
            (default 0.95; the repository also lists 0.99, 0.995, 0.999).
        bounds: data domain ``(L, U)`` in model-input units (default ``(0.0, 1.0)``, pixels).
        include_clean: average the clean map in, as one of n + 1 samples (default True, §6.2).
        seed: fresh generator per call seeded with it: the same x always gets the same map.
        generator: a ``torch.Generator`` on x's device, consumed call after call (not with seed).
        internal_batch_size: most noisy rows per inner call (default N); results do not depend
            on it.

    Shape:
        x: ``(N, C, H, W)`` inside ``bounds``; returned map: like x.

    Example:
        >>> ag = AdaptGrad(Gradient(model), n_samples=50, confidence=0.95, seed=0)
        >>> maps = ag.attribute(x, target=y)
    """

    def __init__(self, inner: Explainer | nn.Module, n_samples: int = 50,
                 confidence: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0),
                 include_clean: bool = True, seed: int | None = None,
                 generator: torch.Generator | None = None,
                 internal_batch_size: int | None = None) -> None:
        super().__init__(inner, n_samples=n_samples, include_clean=include_clean, seed=seed,
                         generator=generator, internal_batch_size=internal_batch_size)
        confidence = float(confidence)
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
        self.confidence = confidence
        self.bounds = _check_bounds(bounds)
        # √2·erfinv(c) = z_{(1+c)/2}, the two-sided normal quantile: 1.95996 for c = 0.95
        self._z = math.sqrt(2) * torch.special.erfinv(
            torch.tensor(confidence, dtype=torch.float64)).item()

    def sigma(self, x: Tensor) -> Tensor:
        """Per-element noise scale ``min(|x − L|, |x − U|) / (√2·erfinv(c))``, shaped like x."""
        low, high = self.bounds
        t = torch.minimum((x - low).abs(), (x - high).abs())
        return t / self._z

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "confidence": self.confidence, "bounds": self.bounds}

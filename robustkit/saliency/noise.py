"""Gaussian noise averaging, the machinery SmoothGrad and AdaptGrad share (methods.md §6.2).

``AG(x) = 1/(n+1) [G̃(x) + Σ_{j=1..n} G̃(x + ξ_j)]``, ``ξ_j ~ N(0, diag σ²(x))``: the two methods
differ only in σ. The repository form is kept exactly: the clean map counts as one sample, a
sample whose map holds a NaN is dropped before averaging, and the noisy input is not clipped.

Noise order, the reproducibility contract: sample j's noise is one ``torch.randn(x.shape)``
draw, j = 1..n in order, from the explainer's generator; the model sees the samples in chunks of
``internal_batch_size`` rows, so the noise, and hence the result, does not depend on the chunking.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.saliency.base import Explainer, _accumulate
from robustkit.saliency.wrapper import _Wrapper

__all__: list[str] = []  # private plumbing: SmoothGrad and AdaptGrad are the public names

logger = logging.getLogger(__name__)


class _NoiseAverage(_Wrapper):
    """Average of an inner map over Gaussian perturbations of x with a per-element ``sigma(x)``.

    Args:
        inner: explainer evaluated at every sample (an ``nn.Module`` means ``Gradient(inner)``).
        n_samples: noisy samples n (the clean input comes on top when ``include_clean``).
        include_clean: count the clean map as one sample, the (n+1)-average of §6.2.
        seed: each ``attribute`` call draws from a fresh generator seeded with it (the same x
            then always gets the same map); ``None``: ``generator``, else torch's global one.
        generator: a ``torch.Generator`` on x's device, consumed call after call.
        internal_batch_size: most noisy rows per inner call (default N).
    """

    def __init__(self, inner: Explainer | nn.Module, n_samples: int, include_clean: bool,
                 seed: int | None, generator: torch.Generator | None,
                 internal_batch_size: int | None) -> None:
        super().__init__(inner, internal_batch_size=internal_batch_size)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got "
                             f"{type(generator).__name__}")
        self.n_samples = n_samples
        self.include_clean = bool(include_clean)
        self.seed = seed
        self.generator = generator
        self._rng: torch.Generator | None = None

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return True

    def sigma(self, x: Tensor) -> Tensor:
        """The noise's standard deviation, broadcastable to x."""
        raise NotImplementedError

    @contextmanager
    def _random_scope(self, device: torch.device) -> Iterator[None]:
        if self.seed is not None:
            rng = torch.Generator(device=device)
            rng.manual_seed(self.seed)
        else:
            rng = self.generator
            if rng is not None and rng.device.type != torch.device(device).type:
                raise ValueError(f"generator is on {rng.device}, x on {device}")
        previous, self._rng = self._rng, rng
        try:
            with self.inner._random_scope(device):
                yield
        finally:
            self._rng = previous

    def _attribute(self, x: Tensor, target: Tensor) -> Tensor:
        sigma = self.sigma(x)

        def blocks() -> Iterator[tuple[Tensor, float]]:
            if self.include_clean:
                yield x, 1.0
            for _ in range(self.n_samples):
                noise = torch.randn(x.shape, generator=self._rng, dtype=x.dtype, device=x.device)
                # not clipped to the box: for AdaptGrad σ alone keeps samples inside (§6.2)
                yield x + sigma * noise, 1.0

        total, count = _accumulate(self.inner, target, blocks(), self._rows(x.shape[0]),
                                   drop_nan=True)
        dropped = (self.n_samples + self.include_clean) * x.shape[0] - int(count.sum().item())
        if dropped:
            logger.warning("%s: dropped %d of %d samples whose map holds a NaN (methods.md "
                           "§6.2); %d image(s) have none left and get NaN", type(self).__name__,
                           dropped, (self.n_samples + self.include_clean) * x.shape[0],
                           int((count == 0).sum()))
        return total / count.view((-1,) + (1,) * (x.dim() - 1))

    def _settings(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "include_clean": self.include_clean,
                "seed": self.seed}


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be two numbers (L, U), got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"bounds must be finite with L < U, got {bounds!r}")
    return low, high

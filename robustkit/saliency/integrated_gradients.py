"""Integrated Gradients over any inner explainer, standard and repository forms (methods.md §6.2).

Standard form (Sundararajan et al.): ``IG(x) = (x − b) ⊙ ∫_0^1 G̃(b + α(x − b)) dα``, by a
quadrature ``Σ_k w_k G̃(b + α_k(x − b))``. Repository form (AdaptGrad's ``IntegratedGradient``,
kept only to reproduce the paper): ``(x − b) ⊙ 1/(n+1) [G(x) + Σ_{j=0}^{n−1} G̃(b + j/n (x − b))]``
with the **vanilla** gradient G at x, whatever G̃ is, and NaN maps dropped as in AdaptGrad.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.saliency.base import Explainer, _accumulate
from robustkit.saliency.gradient import Gradient
from robustkit.saliency.wrapper import _Wrapper

__all__ = ["IntegratedGradients"]

Method = Literal["gausslegendre", "riemann", "riemann_left", "riemann_right", "riemann_middle",
                 "repo"]
_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "repo")


class IntegratedGradients(_Wrapper):
    """Integrated Gradients (Sundararajan et al., https://arxiv.org/abs/1703.01365) along the
    straight path from ``baseline`` to x, over any inner explainer: ``IntegratedGradients(
    AdaptGrad(model))`` is the AdaptGrad paper's IG-AdaptGrad, and no special code.

    The standard methods satisfy completeness, ``Σ_i IG_i(x) ≈ f_c(x) − f_c(b)``, for a gradient
    inner; they match captum's ``IntegratedGradients`` of the same ``method`` and ``n_steps``:

    - ``"gausslegendre"`` (default, captum's): n Gauss–Legendre nodes on [0, 1] and weights;
    - ``"riemann"`` = ``"riemann_right"``: ``α_k = k/n``, k = 1..n, weights 1/n (the IG paper's
      sum); ``"riemann_left"``: ``α_k = k/n``, k = 0..n−1; ``"riemann_middle"``: ``(k+½)/n``.
    - ``"repo"``: the AdaptGrad repository's form (module docstring), for reproducing the paper
      only: it is a left Riemann sum that also averages in the vanilla gradient at x, so it does
      not satisfy completeness.

    With a deterministic inner, path points of all images are sent ``internal_batch_size`` rows
    at a time; a stochastic inner (SmoothGrad, AdaptGrad) gets one path point for all N images
    per call, in path order, and batches its noisy rows by its own ``internal_batch_size``, so
    its noise never depends on IG's batching.

    Args:
        inner: explainer integrated along the path (an ``nn.Module`` means ``Gradient(inner)``).
        baseline: b, a float or a tensor broadcastable to x, in model-input units (default 0.0,
            a black image; the repository also uses 1.0).
        n_steps: quadrature points n (default 50).
        method: one of the above (default ``"gausslegendre"``).
        internal_batch_size: most path rows per inner call for a deterministic inner (default N).

    Shape:
        x: ``(N, C, H, W)``; baseline: ``()``, ``(C, H, W)`` or ``(N, C, H, W)``; map: like x.

    Example:
        >>> ig = IntegratedGradients(Gradient(model), baseline=0.0, n_steps=50)
        >>> ig_ag = IntegratedGradients(AdaptGrad(Gradient(model), seed=0)).attribute(x)
    """

    def __init__(self, inner: Explainer | nn.Module, baseline: float | Tensor = 0.0,
                 n_steps: int = 50, method: Method = "gausslegendre",
                 internal_batch_size: int | None = None) -> None:
        super().__init__(inner, internal_batch_size=internal_batch_size)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        method = "riemann_right" if method == "riemann" else method
        if method not in _METHODS:
            raise ValueError(f"method must be one of {['riemann', *_METHODS]}, got {method!r}")
        if isinstance(baseline, Tensor):
            if not baseline.is_floating_point() or not bool(torch.isfinite(baseline).all()):
                raise ValueError("baseline must be a finite floating-point tensor")
            baseline = baseline.detach()
        else:
            try:
                baseline = float(baseline)
            except (TypeError, ValueError):
                raise ValueError(f"baseline must be a float or a tensor, got "
                                 f"{type(baseline).__name__}") from None
        self.baseline = baseline
        self.n_steps = n_steps
        self.method = method

    def _attribute(self, x: Tensor, target: Tensor) -> Tensor:
        b = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            fits = torch.broadcast_shapes(b.shape, x.shape) == x.shape
        except RuntimeError:  # torch's way of saying "not broadcastable"
            fits = False
        if not fits:
            raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to x's "
                             f"{tuple(x.shape)}")
        b = b.expand_as(x)
        diff = x - b
        alphas, weights = _quadrature(self.method, self.n_steps)

        def blocks() -> Iterator[tuple[Tensor, float]]:
            for alpha, weight in zip(alphas, weights, strict=True):
                yield b + alpha * diff, weight

        # a stochastic inner gets exactly one path point (N rows) per call: see the class docs
        rows = x.shape[0] if self.inner.stochastic else self._rows(x.shape[0])
        total, count = _accumulate(self.inner, target, blocks(), rows,
                                   drop_nan=self.method == "repo")
        if self.method == "repo":
            # the repository's grads[0]: the vanilla gradient at x, not the inner map
            clean = Gradient(self.model, self.internal_batch_size)._attribute(x, target)
            keep = ~torch.isnan(clean.flatten(1)).any(dim=1)
            shape = (-1,) + (1,) * (x.dim() - 1)
            total = total + torch.where(keep.view(shape), clean, torch.zeros_like(clean))
            count = count + keep.to(count.dtype)
            total = total / count.view(shape)
        return diff * total

    def _settings(self) -> dict[str, Any]:
        baseline = (self.baseline if isinstance(self.baseline, float)
                    else f"tensor{tuple(self.baseline.shape)}")
        return {"baseline": baseline, "n_steps": self.n_steps, "method": self.method}


def _quadrature(method: str, n: int) -> tuple[list[float], list[float]]:
    """Nodes α_k in [0, 1] and weights w_k (in float64) of ``∫_0^1 g(α) dα ≈ Σ_k w_k g(α_k)``."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)  # on [−1, 1]; map to [0, 1]
        return (0.5 * (nodes + 1)).tolist(), (0.5 * weights).tolist()
    k = np.arange(n, dtype=np.float64)
    start = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5, "repo": 0.0}[method]
    # repo: weights 1 here, the (n+1)-average with the clean gradient is taken afterwards
    weight = 1.0 if method == "repo" else 1.0 / n
    return ((k + start) / n).tolist(), [weight] * n

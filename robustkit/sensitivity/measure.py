"""Neuron sensitivity σ (methods.md §4.1-4.2): how much each neuron's behaviour changes between
benign and adversarial inputs, its ranking, and overlaps between rankings.

Zhang, Liu, Liu, Xu, Yu, Ma & Li, "Interpreting and Improving Adversarial Robustness of Deep
Neural Networks With Neuron Sensitivity", IEEE TIP 30, 2021 (https://arxiv.org/abs/1909.06978).
Neuron m of layer l is channel m of its output ``F_l^m(x) ∈ R^{H·W}`` (a linear unit: H = W = 1).

Two conventions, both accumulated exactly over batches (the result does not depend on how the
N pairs are split):

- ``"elementwise"`` (paper style, the default): ``σ_m = 1/N Σ_n 1/(HW) ‖F_m(x_n) − F_m(x'_n)‖₁``;
- ``"spatial_mean"`` (MindSpore MindArmour's ``NeuronMetric``): average each map over space
  first, then the L1 norm over the batch without 1/N: ``σ_m = Σ_n |mean F_m(x_n) − mean
  F_m(x'_n)|``. Changes of opposite sign inside a map cancel, so it is smaller.

``relative=True`` divides by the same reduction of the clean features (plus 1e-8), e.g.
``σ̃_m = σ_m / (1/N Σ_n 1/(HW) ‖F_m(x_n)‖₁ + 1e-8)``: adversarial training rescales
activations, so only relative values compare across models [R].

Example:
    >>> sigma = neuron_sensitivity(model, x, x_adv, "auto")          # {layer: (C,)}
    >>> top = top_k_neurons(sigma["model.feature_extractor.conv2"], ratio=0.1)  # SmallCNN
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from robustkit.sensitivity.tap import FeatureTap, resolve_layers
from robustkit.utils import eval_mode

__all__ = ["SensitivityMeter", "neuron_sensitivity", "per_sample_sensitivity", "top_k_neurons",
           "jaccard"]

Reduction = Literal["elementwise", "spatial_mean"]
_REL_EPS = 1e-8  # keeps the relative form finite for dead neurons (methods.md §4.1)


def _check_pairs(x: Tensor, x_adv: Tensor) -> None:
    """Refuse pairs that would give σ without a word: different shapes, NaN or infinite pixels
    (a NaN in one x' turns every σ of a layer into NaN, and a ranking of NaNs is arbitrary)."""
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_adv.shape)}")
    for name, t in (("x", x), ("x_adv", x_adv)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            why = "; the attack that made it failed or diverged" if name == "x_adv" else ""
            raise ValueError(f"{name} contains NaN or infinite values (pair(s) {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}){why}")


def _per_neuron(feat: Tensor, reduction: Reduction) -> Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: the per-sample quantity each convention sums."""
    flat = feat.flatten(2) if feat.dim() > 2 else feat.unsqueeze(-1)
    if reduction == "elementwise":
        return flat.abs().mean(-1)  # 1/(HW) ‖·‖₁ of the map (the input is a difference)
    return flat.mean(-1)  # spatial mean first (MindArmour); abs is taken after differencing


class SensitivityMeter:
    """Exact accumulation of σ over batches of ``(x, x')`` pairs.

    Args:
        model: the measured model (run in eval mode, without gradients; its mode is restored).
        layers: module names, unique aliases (``resolve_layers``: ``"conv2"``) or ``"auto"``
            (every conv and linear module); results are keyed by the full names.
        reduction: ``"elementwise"`` (paper style) or ``"spatial_mean"`` (MindArmour).

    Example:
        >>> meter = SensitivityMeter(model, "auto")
        >>> for x, x_adv in pairs: meter.update(x, x_adv)
        >>> sigma, rel = meter.compute(), meter.compute(relative=True)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | Literal["auto"] = "auto",
                 reduction: Reduction = "elementwise") -> None:
        if reduction not in ("elementwise", "spatial_mean"):
            raise ValueError(f"reduction must be 'elementwise' or 'spatial_mean', "
                             f"got {reduction!r}")
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.reduction: Reduction = reduction
        self.n = 0
        self._diff: dict[str, Tensor] = {}
        self._clean: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, x: Tensor, x_adv: Tensor) -> None:
        """Add the pairs ``(x_n, x'_n)``; ``x`` and ``x_adv`` are ``(N, C, H, W)`` in [0, 1].

        Raises:
            ValueError: naming ``x`` or ``x_adv``: different shapes, NaN or infinite values.
        """
        _check_pairs(x, x_adv)
        with eval_mode(self.model), FeatureTap(self.model, self.layers) as tap:
            self.model(x)
            clean = tap.take()
            self.model(x_adv)
            adv = tap.take()
        for name in self.layers:
            a, b = clean[name].double(), adv[name].double()  # float64 sums: order-independent
            if self.reduction == "elementwise":
                diff = _per_neuron(a - b, "elementwise")
                mag = _per_neuron(a, "elementwise")
            else:
                diff = (_per_neuron(a, "spatial_mean") - _per_neuron(b, "spatial_mean")).abs()
                mag = _per_neuron(a, "spatial_mean").abs()
            self._diff[name] = self._diff.get(name, 0) + diff.sum(0)
            self._clean[name] = self._clean.get(name, 0) + mag.sum(0)
        self.n += x.shape[0]

    def compute(self, relative: bool = False) -> dict[str, Tensor]:
        """σ per layer, ``(C,)`` float64 on the CPU (see the module docstring)."""
        if self.n == 0:
            raise ValueError("SensitivityMeter.compute(): no pairs were added")
        out = {}
        for name in self.layers:
            s = self._diff[name].cpu()
            norm = self._clean[name].cpu()
            if self.reduction == "elementwise":  # means over the N pairs; MindArmour sums
                s, norm = s / self.n, norm / self.n
            out[name] = s / (norm + _REL_EPS) if relative else s
        return out


def neuron_sensitivity(model: nn.Module, x: Tensor, x_adv: Tensor,
                       layers: Sequence[str] | Literal["auto"] = "auto",
                       reduction: Reduction = "elementwise", relative: bool = False,
                       batch_size: int = 256) -> dict[str, Tensor]:
    """σ of every neuron of ``layers`` over the pairs ``(x_n, x'_n)`` (methods.md §4.1).

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits.
        x, x_adv: benign and adversarial inputs, same shape.
        layers: module names, unique aliases (``resolve_layers``) or ``"auto"``; results are
            keyed by the full module names.
        reduction: ``"elementwise"`` (default) or ``"spatial_mean"`` (MindArmour).
        relative: divide by the clean features' magnitude (compare models).
        batch_size: pairs per forward pass (the result does not depend on it).

    Returns:
        ``{layer: (C,) float64}``.

    Raises:
        ValueError: naming the argument: ``x``/``x_adv`` of different shapes or holding NaN or
            infinite values, unknown layers, a bad reduction.
    """
    _check_pairs(x, x_adv)  # once over all pairs: the message gives their global indices
    meter = SensitivityMeter(model, layers, reduction)
    for i in range(0, x.shape[0], batch_size):
        meter.update(x[i:i + batch_size], x_adv[i:i + batch_size])
    return meter.compute(relative)


def top_k_neurons(sigma: Tensor, ratio: float = 0.1, k: int | None = None) -> Tensor:
    """Indices of the ``k = ceil(ratio · C)`` most sensitive neurons, most sensitive first.

    Ties break by the lower index (a stable sort), so the set is reproducible.

    Raises:
        ValueError: ``sigma`` not a non-empty ``(C,)`` tensor, or holding NaN or infinite
            values (a descending sort puts NaN first: the "most sensitive" neurons would be
            the broken ones); ``ratio`` or ``k`` out of range.
    """
    if not isinstance(sigma, Tensor) or sigma.dim() != 1 or sigma.numel() == 0:
        shape = tuple(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__
        raise ValueError(f"sigma must be a non-empty (C,) tensor, got {shape}")
    finite = torch.isfinite(sigma)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"sigma contains NaN or infinite values (neuron(s) {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}): it was measured on broken pairs "
                         "or a diverged model")
    if k is None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        k = math.ceil(ratio * sigma.numel())
    if not 1 <= k <= sigma.numel():
        raise ValueError(f"k must lie in [1, {sigma.numel()}], got {k}")
    return torch.sort(sigma, descending=True, stable=True).indices[:k]


def jaccard(a: Tensor, b: Tensor) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two index sets (1.0 for two empty sets)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


@torch.no_grad()
def per_sample_sensitivity(model: nn.Module, x: Tensor, x_adv: Tensor,
                           layers: Sequence[str] | Literal["auto"] = "auto",
                           reduction: Reduction = "elementwise",
                           batch_size: int = 256) -> dict[str, Tensor]:
    """Each pair's own term of σ: ``{layer: (N, C) float64}``, for statistics over images.

    Row n holds what pair ``(x_n, x'_n)`` adds to every neuron's σ, so ``σ = out.mean(0)`` for
    ``"elementwise"`` and ``σ = out.sum(0)`` for ``"spatial_mean"`` (it sums over pairs), and a
    layer's mean σ is the mean (or the sum) over images of ``out.mean(1)``: a bootstrap over
    images resamples the rows.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits (run in eval mode, mode restored).
        x, x_adv: benign and adversarial inputs, same shape.
        layers: module names, unique aliases (``resolve_layers``) or ``"auto"``; results are
            keyed by the full module names.
        reduction: ``"elementwise"`` (default) or ``"spatial_mean"`` (MindArmour).
        batch_size: pairs per forward pass (the result does not depend on it).

    Shape: returns ``{layer: (N, C)}`` on the CPU.

    Example:
        >>> rows = per_sample_sensitivity(model, x, x_adv, ["conv2"])  # {full name: (N, C)}
        >>> per_image_mean = rows["model.feature_extractor.conv2"].mean(1)  # (N,): bootstrap
    """
    _check_pairs(x, x_adv)
    if reduction not in ("elementwise", "spatial_mean"):
        raise ValueError(f"reduction must be 'elementwise' or 'spatial_mean', got {reduction!r}")
    names = resolve_layers(model, layers)
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    with eval_mode(model), FeatureTap(model, names) as tap:
        for i in range(0, x.shape[0], batch_size):
            model(x[i:i + batch_size])
            clean = tap.take()
            model(x_adv[i:i + batch_size])
            adv = tap.take()
            for name in names:
                a, b = clean[name].double(), adv[name].double()
                if reduction == "elementwise":
                    diff = _per_neuron(a - b, "elementwise")
                else:  # spatial means first, then |·| (MindArmour), as SensitivityMeter does
                    diff = (_per_neuron(a, "spatial_mean") - _per_neuron(b, "spatial_mean")).abs()
                rows[name].append(diff.cpu())
    return {name: torch.cat(parts) for name, parts in rows.items()}

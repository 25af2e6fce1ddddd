"""Complexity of one map (methods.md §8.2 items 1-3; Quantus' "complexity" family): how
concentrated and how noisy the relevance is: sparseness (Gini), complexity (entropy), total
variation, high-frequency energy ratio, and the share of the gradient AdaptGrad removes.

Example:
    >>> from robustkit.saliency.metrics import sparseness, complexity
    >>> sparseness(maps), complexity(maps)        # two (N,) tensors
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustkit.saliency.metrics._common import _float, _maps

__all__ = ["sparseness", "complexity", "total_variation", "hfer", "adaptgrad_residual"]

_GINI_EPS = 1e-7  # Quantus Sparseness adds it to |a| before sorting (AdaptGrad's sparseness.py too)
_LOG_EPS = 1e-12  # Quantus Complexity takes log(P + 1e-12)


def sparseness(a: Tensor) -> Tensor:
    """Gini index of ``|a|`` (Chalasani et al. 2020, https://arxiv.org/abs/1810.06583).

    Exactly Quantus' ``Sparseness`` (and the AdaptGrad repo's ``metrics/sparseness.py``): with
    ``v = |a| + 1e-7`` sorted ascending over the n pixels,
    ``Gini = Σ_k (2k − n − 1) v_(k) / (n Σ_k v_(k))``. In [0, 1); higher is sparser: a uniform
    map gives 0, a one-hot map ``(n − 1) / (n (1 + n·1e-7)) ≈ 1 − 1/n``.

    Args:
        a: attribution maps; ``(N, C, H, W)`` becomes ``Σ_c |a_c|`` first.

    Shape: ``(N, H, W)`` or ``(N, C, H, W)`` -> ``(N,)``.

    Example:
        >>> sparseness(torch.ones(2, 4, 4))
        tensor([0., 0.])
    """
    v = _maps(a, "a", "magnitude").flatten(1) + _GINI_EPS
    v, _ = torch.sort(v, dim=1)
    n = v.shape[1]
    k = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    return ((2 * k - n - 1) * v).sum(1) / (n * v.sum(1))


def complexity(a: Tensor) -> Tensor:
    """Entropy of the relevance distribution (Bhatt et al. 2020, https://arxiv.org/abs/2005.00631).

    Exactly Quantus' ``Complexity``: ``P_i = |a_i| / Σ_j |a_j|``,
    ``H = −Σ_i P_i log(P_i + 1e-12)`` (natural log). A uniform map gives ``log n``, a one-hot map
    0; lower is more concentrated. An all-zero map gives NaN (0/0), as in Quantus.

    Args:
        a: attribution maps; ``(N, C, H, W)`` becomes ``Σ_c |a_c|`` first.

    Shape: ``(N, H, W)`` or ``(N, C, H, W)`` -> ``(N,)``.

    Example:
        >>> complexity(torch.ones(1, 4, 4))  # log 16
        tensor([2.7726])
    """
    v = _maps(a, "a", "magnitude").flatten(1)
    p = v / v.sum(1, keepdim=True)
    return -(p * torch.log(p + _LOG_EPS)).sum(1)


def total_variation(a: Tensor) -> Tensor:
    """Normalised anisotropic total variation, ``TV(a) / ‖a‖₁`` (methods.md §8.2 item 3).

    ``Σ_{h,w} (|a_{h+1,w} − a_{h,w}| + |a_{h,w+1} − a_{h,w}|) / Σ |a|`` over the signed map, both
    axes, no wrap-around. A ±1 checkerboard of H x W gives
    ``2((H − 1)W + H(W − 1)) / (HW)``; a constant map 0; an all-zero map NaN.

    Args:
        a: attribution maps; ``(N, C, H, W)`` becomes ``Σ_c a_c`` (signed) first.

    Shape: ``(N, H, W)`` or ``(N, C, H, W)`` -> ``(N,)``.

    Example:
        >>> total_variation(torch.tensor([[[1., -1.], [-1., 1.]]]))  # 4 edges of 2 over 4
        tensor([2.])
    """
    m = _maps(a, "a", "signed")
    down = (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).sum(1)
    right = (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).sum(1)
    return (down + right) / m.abs().flatten(1).sum(1)


def hfer(a: Tensor, cutoff: float = 0.25) -> Tensor:
    """High-frequency energy ratio ``Σ_{‖ω‖>ω_c} |â(ω)|² / Σ_ω |â(ω)|²`` (methods.md §8.2).

    ``â`` is the 2-D DFT of the signed map (no windowing, no mean removal); ``ω`` the radial
    frequency ``sqrt(f_h² + f_w²)`` in cycles per pixel (``torch.fft.fftfreq``, Nyquist 0.5 per
    axis); ``ω_c = cutoff · 0.5``, a quarter of Nyquist (0.125 cycles/pixel) by default; a
    frequency exactly at ``ω_c`` counts as low. A constant map gives 0, a ±1 checkerboard 1, an
    all-zero map NaN.

    Args:
        a: attribution maps; ``(N, C, H, W)`` becomes ``Σ_c a_c`` (signed) first.
        cutoff: ``ω_c`` as a fraction of the Nyquist frequency, in (0, √2]; default 0.25.

    Shape: ``(N, H, W)`` or ``(N, C, H, W)`` -> ``(N,)``.

    Example:
        >>> hfer(torch.ones(1, 8, 8))
        tensor([0.])
    """
    if not 0 < cutoff <= math.sqrt(2):
        raise ValueError(f"cutoff must be in (0, sqrt(2)] (a fraction of Nyquist), got {cutoff!r}")
    m = _maps(a, "a", "signed")
    h, w = m.shape[-2:]
    energy = torch.fft.fft2(m).abs().square()
    fh = torch.fft.fftfreq(h, device=m.device, dtype=energy.dtype).view(h, 1)
    fw = torch.fft.fftfreq(w, device=m.device, dtype=energy.dtype).view(1, w)
    high = (fh.square() + fw.square()).sqrt() > cutoff * 0.5
    return (energy * high).flatten(1).sum(1) / energy.flatten(1).sum(1)


def adaptgrad_residual(grad: Tensor, adaptgrad: Tensor) -> Tensor:
    """``‖G − AG‖₂ / ‖G‖₂``: the share of the raw gradient AdaptGrad removes as noise (§8.2).

    Args:
        grad: the vanilla gradients G, any shape ``(N, ...)``; each item is one vector.
        adaptgrad: the AdaptGrad maps AG of the same inputs and targets, same shape.

    Shape: ``(N, ...)`` twice -> ``(N,)``; 0 when AG = G, 1 when AG = 0 or AG = 2G.

    Example:
        >>> adaptgrad_residual(g, create_explainer("adaptgrad", model)(x, y))
    """
    g, ag = _float(grad, "grad"), _float(adaptgrad, "adaptgrad")
    if g.shape != ag.shape or g.dim() < 2:
        raise ValueError(f"grad and adaptgrad must be equal (N, ...) shapes, got "
                         f"{tuple(g.shape)} and {tuple(ag.shape)}")
    g, ag = g.flatten(1), ag.flatten(1)
    return (g - ag).norm(dim=1) / g.norm(dim=1)

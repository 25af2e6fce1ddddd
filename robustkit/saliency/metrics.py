"""Saliency-map metrics (methods.md §6.3 and §8.2) as pure functions on batches of maps.

Every metric takes a batch and returns one value per image, an ``(N,)`` tensor; the metric of a
batch equals the metrics of its items stacked. Maps are ``(N, H, W)`` or ``(N, C, H, W)``; a
4-D map is reduced over channels the way the metric's definition reads the map (§8.1 keeps both
reduced forms; pass an ``(N, H, W)`` map to choose another one):

===================================================================  ==========================
metric                                                               ``(N, C, H, W)`` becomes
===================================================================  ==========================
``sparseness complexity edge_spearman mass_in_box pointing_game``    ``Σ_c |a_c|`` (magnitude;
``topk_intersection deletion_auc insertion_auc``                     a 3-D map: ``|a|``)
``cascading_randomisation``
``total_variation hfer stability_spearman ssim stability_cos``       ``Σ_c a_c`` (signed, the
                                                                     §6.2 display reduction; a
                                                                     3-D map is used as given)
``alignment_cos adaptgrad_residual max_sensitivity``                 not reduced: the whole map
                                                                     is one vector
===================================================================  ==========================

Tiny-ImageNet boxes come from ``robustkit.data`` (``load_dataset("tinyimagenet", "test").boxes``,
``(N, 4)`` ``x0, y0, x1, y1``, inclusive pixel coordinates, x = column, y = row), so this module
has no box loader of its own.

Example:
    >>> from robustkit.saliency import metrics as M
    >>> M.sparseness(maps), M.mass_in_box(maps, val.boxes[:len(maps)])    # two (N,) tensors
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.utils import eval_mode

__all__ = [
    "sparseness", "complexity", "total_variation", "hfer", "adaptgrad_residual",
    "alignment_cos", "edge_spearman", "mass_in_box", "pointing_game", "box_area_fraction",
    "stability_spearman", "topk_intersection", "ssim", "stability_cos", "max_sensitivity",
    "deletion_auc", "insertion_auc", "cascading_randomisation",
]

_GINI_EPS = 1e-7  # Quantus Sparseness adds it to |a| before sorting (AdaptGrad's sparseness.py too)
_LOG_EPS = 1e-12  # Quantus Complexity takes log(P + 1e-12)
# SSIM constants of Wang et al. 2004 (skimage's defaults with gaussian_weights=True).
_SSIM_SIGMA, _SSIM_RADIUS, _SSIM_K1, _SSIM_K2 = 1.5, 5, 0.01, 0.03
Scale = Literal["abs", "signed"]


# --------------------------------------------------------------------------------------------
# Input handling


def _float(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _maps(a: Tensor, name: str, reduce: Literal["magnitude", "signed"]) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` -> ``(N, H, W)`` (see the module docstring)."""
    a = _float(a, name)
    if a.dim() not in (3, 4):
        raise ValueError(f"{name} must be (N, H, W) or (N, C, H, W), got {tuple(a.shape)}")
    if reduce == "magnitude":
        a = a.abs()
    return a.sum(1) if a.dim() == 4 else a


def _pair(a: Tensor, b: Tensor, reduce: Literal["magnitude", "signed"]) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _maps(a, "a", reduce), _maps(b, "b", reduce)


def _image_gray(x: Tensor, name: str) -> Tensor:
    """An image ``(N, C, H, W)`` (or ``(N, H, W)``) -> ``(N, H, W)``, the mean over channels."""
    x = _float(x, name)
    if x.dim() not in (3, 4):
        raise ValueError(f"{name} must be (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    return x.mean(1) if x.dim() == 4 else x


def _boxes(boxes: Tensor | Sequence[Sequence[int]], n: int | None,
           device: torch.device | None) -> Tensor:
    b = torch.as_tensor(boxes, device=device)
    if b.dim() != 2 or b.shape[1] != 4 or (n is not None and b.shape[0] != n):
        raise ValueError(f"boxes must be ({n if n is not None else 'N'}, 4) rows x0, y0, x1, y1, "
                         f"got {tuple(b.shape)}")
    if b.is_floating_point() or b.is_complex():
        raise ValueError("boxes must hold integer pixel coordinates")
    if bool(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any()):
        raise ValueError("boxes must satisfy x0 <= x1 and y0 <= y1 (inclusive x0, y0, x1, y1)")
    return b.long()


def _box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, H, W)`` bool: pixel (row h, column w) lies in ``[y0, y1] x [x0, x1]``, inclusive."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    x0, y0, x1, y1 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)


def _cosine(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise cosine of ``(N, d)`` matrices; a zero row gives NaN (0/0), never a silent 0."""
    return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))


def _ranks(v: Tensor) -> Tensor:
    """Row-wise ranks 1..n of ``(N, n)``, ties sharing their average rank (scipy's default)."""
    n = v.shape[1]
    values, order = torch.sort(v, dim=1, stable=True)
    pos = torch.arange(n, device=v.device).expand_as(values)
    differs = values[:, 1:] != values[:, :-1]
    edge = torch.ones_like(differs[:, :1])
    starts = torch.cat([edge, differs], 1)  # first position of each run of equal values
    ends = torch.cat([differs, edge], 1)  # last position
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    avg = (first + last).double() / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def _spearman(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Spearman ρ of ``(N, n)`` matrices in float64: Pearson of average ranks.

    NaN where a row holds a NaN or is constant (scipy.stats.spearmanr gives NaN there too).
    """
    ru, rv = _ranks(u), _ranks(v)
    ru, rv = ru - ru.mean(1, keepdim=True), rv - rv.mean(1, keepdim=True)
    rho = (ru * rv).sum(1) / torch.sqrt((ru * ru).sum(1) * (rv * rv).sum(1))
    has_nan = u.isnan().any(1) | v.isnan().any(1)
    return rho.masked_fill(has_nan, math.nan)


# --------------------------------------------------------------------------------------------
# Concentration and visual noise (§8.2 items 1-3)


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


# --------------------------------------------------------------------------------------------
# Perceptual alignment (§8.2 item 4)


def alignment_cos(a: Tensor, x: Tensor, center: bool = False) -> Tensor:
    """Scale-free Etmann alignment ``|⟨x, a⟩| / (‖x‖ ‖a‖)`` (https://arxiv.org/abs/1905.04172).

    Etmann et al. define ``|⟨x, g⟩| / ‖g‖`` with ``g = ∇_x z_y``; dividing by ‖x‖ as well makes
    it the absolute cosine, in [0, 1] (methods.md §8.2 item 4).

    Args:
        a: maps, the same shape as ``x`` (used whole: no channel reduction), or ``(N, H, W)``
            against an ``(N, C, H, W)`` image, which is then replaced by its channel mean.
        x: images in [0, 1].
        center: subtract each image's mean per channel first (the "centred image" of §8.2).

    Shape: ``(N, C, H, W)`` (or ``(N, H, W)``) twice -> ``(N,)``.

    Example:
        >>> alignment_cos(gradients, x), alignment_cos(gradients, x, center=True)
    """
    a, x = _float(a, "a"), _float(x, "x")
    if a.shape != x.shape:
        if a.dim() == 3 and x.dim() == 4 and a.shape == x.shape[:1] + x.shape[2:]:
            x = x.mean(1)
        else:
            raise ValueError(f"a must have x's shape, or be (N, H, W) for an (N, C, H, W) x; "
                             f"got a {tuple(a.shape)} and x {tuple(x.shape)}")
    if a.dim() < 3:
        raise ValueError(f"a must be (N, H, W) or (N, C, H, W), got {tuple(a.shape)}")
    if center:
        x = x - x.mean(dim=(-2, -1), keepdim=True)  # per image and channel
    return _cosine(a.flatten(1), x.flatten(1)).abs()


def _sobel_magnitude(x: Tensor) -> Tensor:
    """``(N, H, W)`` -> ``(N, H, W)`` ``sqrt(S_h² + S_w²)`` with 3 x 3 Sobel kernels; edges are
    replicated (skimage.filters.sobel's default ``mode="reflect"`` for a 1-pixel pad)."""
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    diff = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    kernels = torch.stack([torch.outer(diff, smooth), torch.outer(smooth, diff)]).unsqueeze(1)
    padded = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels)  # (N, 2, H, W): along rows, along columns
    return grads.square().sum(1).sqrt()


def edge_spearman(a: Tensor, x: Tensor) -> Tensor:
    """Spearman ρ between ``|a|`` and the Sobel edge magnitude of x (methods.md §8.2 item 4).

    Average ranks for ties (scipy.stats.spearmanr); a constant map or image gives NaN.

    Args:
        a: maps; ``(N, C, H, W)`` becomes ``Σ_c |a_c|`` first.
        x: images ``(N, C, H, W)`` in [0, 1], turned into their channel mean (or ``(N, H, W)``).

    Shape: -> ``(N,)``, in [−1, 1].

    Example:
        >>> edge_spearman(maps, x)
    """
    m = _maps(a, "a", "magnitude")
    g = _image_gray(x, "x")
    if g.shape != m.shape:
        raise ValueError(f"a and x must share N, H, W; got a {tuple(a.shape)} and x "
                         f"{tuple(x.shape)}")
    return _spearman(m.flatten(1), _sobel_magnitude(g).flatten(1)).to(m.dtype)


# --------------------------------------------------------------------------------------------
# Localisation (§8.2 item 5)


def mass_in_box(a: Tensor, boxes: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """Relevance mass inside the box, ``Σ_{i∈box} |a_i| / Σ_i |a_i|`` (Arras et al. 2022).

    Args:
        a: maps ``(N, H, W)``/``(N, C, H, W)``; a 4-D map becomes ``Σ_c |a_c|`` first.
        boxes: ``(N, 4)`` integer rows ``x0, y0, x1, y1``: inclusive pixel coordinates, x the
            column and y the row (Tiny-ImageNet's ``val_annotations.txt``, ``dataset.boxes``).

    Shape: -> ``(N,)`` in [0, 1]; chance level ``box_area_fraction(boxes, H, W)``; NaN for an
        all-zero map.

    Example:
        >>> mass_in_box(maps, val.boxes[:len(maps)])
    """
    m = _maps(a, "a", "magnitude")
    mask = _box_mask(_boxes(boxes, m.shape[0], m.device), *m.shape[-2:])
    return (m * mask).flatten(1).sum(1) / m.flatten(1).sum(1)


def pointing_game(a: Tensor, boxes: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """Whether the arg-max of ``|a|`` lies in the box (Zhang et al. 2016, without tolerance).

    Ties: the fraction of the maximal pixels that lie in the box, so a unique maximum scores 1
    or 0 and a constant map scores the chance level ``box_area_fraction``.

    Args:
        a: maps ``(N, H, W)``/``(N, C, H, W)``; a 4-D map becomes ``Σ_c |a_c|`` first.
        boxes: ``(N, 4)`` inclusive ``x0, y0, x1, y1`` (see ``mass_in_box``).

    Shape: -> ``(N,)`` float, 1.0 hit and 0.0 miss.

    Example:
        >>> pointing_game(maps, val.boxes[:len(maps)]).mean()  # hit rate
    """
    m = _maps(a, "a", "magnitude")
    mask = _box_mask(_boxes(boxes, m.shape[0], m.device), *m.shape[-2:]).flatten(1)
    flat = m.flatten(1)
    top = flat == flat.max(1, keepdim=True).values
    return (top & mask).sum(1).to(m.dtype) / top.sum(1).to(m.dtype)


def box_area_fraction(boxes: Tensor | Sequence[Sequence[int]], height: int,
                      width: int) -> Tensor:
    """Share of the ``height x width`` image that each inclusive box covers: the chance level of
    ``mass_in_box`` and ``pointing_game`` (methods.md §8.2 item 5).

    Shape: ``(N, 4)`` -> ``(N,)`` float64.

    Example:
        >>> box_area_fraction(torch.tensor([[0, 0, 31, 63]]), 64, 64)
        tensor([0.5000], dtype=torch.float64)
    """
    return _box_mask(_boxes(boxes, None, None), height, width).flatten(1).double().mean(1)


# --------------------------------------------------------------------------------------------
# Stability between the maps of x and x' (§8.2 item 6)


def stability_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman ρ between two maps of each image, e.g. ``a(x)`` and ``a(x')`` (Ghorbani et al.,
    AAAI 2019, https://arxiv.org/abs/1710.10547). Average ranks for ties, as scipy.

    Args:
        a, b: maps of the same shape; ``(N, C, H, W)`` becomes ``Σ_c a_c`` (signed). Pass
            ``|a|`` maps to compare magnitudes.

    Shape: -> ``(N,)`` in [−1, 1]; NaN for a constant map.

    Example:
        >>> stability_spearman(explain(x).abs(), explain(x_adv).abs())
    """
    m, n = _pair(a, b, "signed")
    return _spearman(m.flatten(1), n.flatten(1)).to(m.dtype)


def topk_intersection(a: Tensor, b: Tensor, k: float = 0.05) -> Tensor:
    """Top-k intersection (Ghorbani et al. 2019): the share of the k most relevant pixels of
    ``a`` (by magnitude) that are also among the k most relevant of ``b``.

    Args:
        a, b: maps of the same shape; ``(N, C, H, W)`` becomes ``Σ_c |a_c|``.
        k: fraction of the n pixels, in (0, 1]; the count is ``round(k·n)`` (at least 1). Ties at
            the k-th value are broken arbitrarily (``torch.topk``).

    Shape: -> ``(N,)`` in [0, 1].

    Example:
        >>> topk_intersection(explain(x), explain(x_adv), k=0.05)
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must be a fraction of the pixels in (0, 1], got {k!r}")
    m, n = _pair(a, b, "magnitude")
    m, n = m.flatten(1), n.flatten(1)
    count = max(1, round(k * m.shape[1]))
    in_a = torch.zeros_like(m, dtype=torch.bool).scatter_(1, m.topk(count, 1).indices, True)
    in_b = torch.zeros_like(n, dtype=torch.bool).scatter_(1, n.topk(count, 1).indices, True)
    return (in_a & in_b).sum(1).to(m.dtype) / count


def _display_scale(m: Tensor, scale: Scale) -> Tensor:
    """Per-map display scaling of methods.md §6.2 (the AdaptGrad repo's ``absscale`` and
    ``noabsscale``), with ``p99`` the 99th percentile of the map (linear interpolation):

    - ``"abs"``: ``clip((m − min m) / (|p99| − min m), 0, 1)``;
    - ``"signed"``: ``clip(m / (2 |p99|), −1, 1)``.

    Where the repo divides by zero (a map that is at least 99 % at its minimum, or at 0 in
    signed mode: a very sparse map), the maximum stands in for p99, so two different sparse maps
    do not both collapse to zeros; a constant map becomes all zeros.
    """
    flat = m.flatten(1)
    # numpy's default ("linear") percentile, by hand: torch.quantile refuses inputs over 2**24
    values = flat.sort(dim=1).values
    pos = 0.99 * (values.shape[1] - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    hi = min(lo + 1, values.shape[1] - 1)
    p99 = (values[:, lo] + frac * (values[:, hi] - values[:, lo])).abs()
    if scale == "abs":
        low = values[:, 0]
        span, fallback, shifted = p99 - low, values[:, -1] - low, m - low.view(-1, 1, 1)
        lower = 0.0
    else:
        span, fallback, shifted = 2 * p99, 2 * values.abs().amax(1), m
        lower = -1.0
    span = torch.where(span == 0, fallback, span)
    span = torch.where(span == 0, torch.ones_like(span), span)  # constant map: shifted is 0
    return (shifted / span.view(-1, 1, 1)).clamp(lower, 1.0)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _ssim_raw(m: Tensor, n: Tensor, data_range: float) -> Tensor:
    """Mean SSIM of ``(N, H, W)`` pairs, Gaussian window σ = 1.5 of 11 taps, K1 = 0.01,
    K2 = 0.03, population covariances, mean over the valid (un-padded) positions: skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``."""
    h, w = m.shape[-2:]
    size = 2 * _SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"ssim needs maps of at least {size} x {size} pixels, got {h} x {w}")
    g = _gaussian_window(m.dtype, m.device)
    rows, cols = g.view(1, 1, size, 1), g.view(1, 1, 1, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t.unsqueeze(1), rows), cols).squeeze(1)

    mu_m, mu_n = blur(m), blur(n)
    var_m = blur(m * m) - mu_m * mu_m
    var_n = blur(n * n) - mu_n * mu_n
    cov = blur(m * n) - mu_m * mu_n
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    num = (2 * mu_m * mu_n + c1) * (2 * cov + c2)
    s = num / ((mu_m**2 + mu_n**2 + c1) * (var_m + var_n + c2))
    return s.flatten(1).mean(1)


def ssim(a: Tensor, b: Tensor, scale: Scale | None = "abs",
         data_range: float | None = None) -> Tensor:
    """Structural similarity of two maps of each image (Wang et al. 2004), as Adebayo et al.
    2018 (https://arxiv.org/abs/1810.03292) compare saliency maps.

    Each map is first put on the display scale of methods.md §6.2 / §6.3 (the AdaptGrad repo's
    ``absscale``/``noabsscale``, per map, by its own 99th percentile p99):

    - ``scale="abs"`` (default): ``clip((a − min a) / (|p99| − min a), 0, 1)``, data range 1;
    - ``scale="signed"``: ``clip(a / (2|p99|), −1, 1)``, data range 2;
    - ``scale=None``: no scaling; ``data_range`` must be given.

    Then the standard Gaussian-window SSIM (σ = 1.5, 11 x 11, K1 = 0.01, K2 = 0.03, mean over
    the valid positions), equal to skimage's ``structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=...)``.

    Args:
        a, b: maps of the same shape, at least 11 x 11; ``(N, C, H, W)`` becomes ``Σ_c a_c``.
        scale: ``"abs"``, ``"signed"`` or ``None`` (see above).
        data_range: only with ``scale=None``: the value range of the maps.

    Shape: -> ``(N,)``, 1 for identical maps (and for ``b = 3a``, ``b = a + 1`` in abs scale).

    Example:
        >>> ssim(explain(x).abs(), explain(x_adv).abs())
    """
    m, n = _pair(a, b, "signed")
    if scale is None:
        if data_range is None or not data_range > 0:
            raise ValueError(f"data_range must be a positive number when scale=None, "
                             f"got {data_range!r}")
        return _ssim_raw(m, n, float(data_range))
    if scale not in ("abs", "signed"):
        raise ValueError(f"scale must be 'abs', 'signed' or None, got {scale!r}")
    if data_range is not None:
        raise ValueError("data_range is fixed by scale (1 for 'abs', 2 for 'signed'); pass it "
                         "only with scale=None")
    return _ssim_raw(_display_scale(m, scale), _display_scale(n, scale),
                     1.0 if scale == "abs" else 2.0)


def stability_cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two maps of each image (signed; pass ``|a|`` for magnitudes).

    Args:
        a, b: maps of the same shape; ``(N, C, H, W)`` becomes ``Σ_c a_c``.

    Shape: -> ``(N,)`` in [−1, 1]; NaN if a map is all zero.

    Example:
        >>> stability_cos(explain(x), explain(x_noisy))
    """
    m, n = _pair(a, b, "signed")
    return _cosine(m.flatten(1), n.flatten(1))


def max_sensitivity(explain: Callable[[Tensor], Tensor], x: Tensor, r: float = 2 / 255,
                    samples: int = 10, generator: torch.Generator | None = None,
                    clip: bool = False) -> Tensor:
    """Max-Sensitivity (Yeh et al., NeurIPS 2019, https://arxiv.org/abs/1901.09392):
    ``max_j ‖e(x + δ_j) − e(x)‖₂ / ‖e(x)‖₂`` over ``samples`` uniform ``δ_j ∈ [−r, r]^d``.

    As Quantus' ``MaxSensitivity`` with its defaults (uniform noise of half-width ``r``, Frobenius
    norms of the whole maps, no normalisation or abs of the maps, NaN samples skipped by the
    max): §8.2 uses r = 2/255 and 10 samples. The noise is ``δ_j = (2U − 1)·r`` with
    ``U = torch.rand(x.shape, generator=generator)``, drawn for j = 0, 1, ... in turn.

    Args:
        explain: ``explain(x) -> maps`` (``(N, ...)``, any shape; a closure over model and
            target, e.g. ``lambda t: explainer(t, y)``), called ``samples + 1`` times.
        x: inputs ``(N, ...)`` in [0, 1].
        r: L∞ radius, in pixel units; default 2/255.
        samples: number of random δ; default 10.
        generator: torch generator on x's device for the noise (default: the global RNG).
        clip: clip ``x + δ`` to [0, 1] (Quantus does not; default False).

    Shape: -> ``(N,)``.

    Example:
        >>> max_sensitivity(lambda t: explainer(t, y), x, r=2 / 255, samples=10)
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not r > 0:
        raise ValueError(f"r must be positive (pixel units), got {r!r}")
    x = _float(x, "x")
    base = explain(x).detach().flatten(1)
    norm = base.norm(dim=1)
    ratios = []
    for _ in range(samples):
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_pert = x + (2 * u - 1) * r
        if clip:
            x_pert = x_pert.clamp(0, 1)
        e = explain(x_pert).detach().flatten(1)
        ratios.append((base - e).norm(dim=1) / norm)
    stacked = torch.stack(ratios)
    best = stacked.masked_fill(stacked.isnan(), -math.inf).max(0).values
    return best.masked_fill(stacked.isnan().all(0), math.nan)  # numpy's nanmax


# --------------------------------------------------------------------------------------------
# Faithfulness (§8.2 item 7)


def _perturbation_curve(model: nn.Module, x: Tensor, a: Tensor, target: Tensor | int,
                        steps: int, baseline: float | Tensor, insert: bool) -> Tensor:
    x = _float(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
    m = _maps(a, "a", "magnitude")
    if m.shape != x.shape[:1] + x.shape[2:]:
        raise ValueError(f"a must share x's N, H, W; got a {tuple(a.shape)} and x "
                         f"{tuple(x.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    n_img, n_pix = m.shape[0], m[0].numel()
    target = torch.as_tensor(target, device=x.device).long().expand(n_img)
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    # rank[i, p]: position of pixel p in the descending |a| order (ties: lower index first).
    order = m.flatten(1).argsort(dim=1, descending=True, stable=True)
    pos = torch.arange(n_pix, device=x.device).expand(n_img, n_pix)
    rank = torch.empty_like(order).scatter_(1, order, pos).view(n_img, 1, *m.shape[1:])
    probs = []
    with torch.no_grad(), eval_mode(model):
        for s in range(steps + 1):
            chosen = rank < (s * n_pix) // steps  # the top floor(s n / S) pixels, all channels
            xs = torch.where(chosen, x, base) if insert else torch.where(chosen, base, x)
            p = torch.softmax(model(xs), dim=1)
            probs.append(p.gather(1, target.view(-1, 1)).squeeze(1))
    curve = torch.stack(probs)  # (steps + 1, N)
    return (curve.sum(0) - (curve[0] + curve[-1]) / 2) / steps  # trapezoid on [0, 1]


def deletion_auc(model: nn.Module, x: Tensor, a: Tensor, target: Tensor | int, steps: int = 32,
                 baseline: float | Tensor = 0.0) -> Tensor:
    """Deletion AUC (Petsiuk et al., RISE, BMVC 2018, https://arxiv.org/abs/1806.07421).

    Pixels are removed in decreasing order of ``|a|`` (all channels of a pixel at once): at step
    ``s = 0..steps`` the top ``⌊s·n/steps⌋`` pixels are replaced by ``baseline``; the curve is
    the softmax probability of ``target``, and the AUC its trapezoidal area over the removed
    fraction in [0, 1]. Lower is more faithful. Ties in ``|a|`` go to the lower pixel index.

    Args:
        model: ``(N, C, H, W)`` in [0, 1] -> logits; run in eval mode without gradients (every
            submodule's mode restored), ``steps + 1`` forward passes of the batch.
        x: images ``(N, C, H, W)`` in [0, 1].
        a: maps ``(N, H, W)``/``(N, C, H, W)``; a 4-D map becomes ``Σ_c |a_c|``.
        target: class per image, ``(N,)`` or an int.
        steps: number of steps; default 32 (32 pixels per step on 32 x 32 images).
        baseline: replacement value in pixel units (default 0.0, black, as RISE), or a tensor
            broadcastable to x (e.g. a blurred copy).

    Shape: -> ``(N,)`` in [0, 1].

    Example:
        >>> deletion_auc(model, x, maps, y, steps=32)
    """
    return _perturbation_curve(model, x, a, target, steps, baseline, insert=False)


def insertion_auc(model: nn.Module, x: Tensor, a: Tensor, target: Tensor | int, steps: int = 32,
                  baseline: float | Tensor = 0.0) -> Tensor:
    """Insertion AUC (Petsiuk et al., RISE, BMVC 2018, https://arxiv.org/abs/1806.07421).

    Start from ``baseline`` everywhere and reveal the pixels of x in decreasing order of ``|a|``:
    at step ``s = 0..steps`` the top ``⌊s·n/steps⌋`` pixels (all channels) come from x. The AUC
    is the trapezoidal area of the target's softmax probability over the revealed fraction.
    Higher is more faithful. Same conventions as ``deletion_auc`` (RISE itself inserts into a
    blurred image: pass one as ``baseline``).

    Args:
        model: ``(N, C, H, W)`` in [0, 1] -> logits (eval mode, no gradients, modes restored).
        x: images ``(N, C, H, W)`` in [0, 1].
        a: maps ``(N, H, W)``/``(N, C, H, W)``; a 4-D map becomes ``Σ_c |a_c|``.
        target: class per image, ``(N,)`` or an int.
        steps: number of steps; default 32.
        baseline: starting value (default 0.0) or a tensor broadcastable to x.

    Shape: -> ``(N,)`` in [0, 1].

    Example:
        >>> insertion_auc(model, x, maps, y, baseline=blurred)
    """
    return _perturbation_curve(model, x, a, target, steps, baseline, insert=True)


# --------------------------------------------------------------------------------------------
# Sanity check (§8.2 item 8)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU (and of ``device`` when it is a GPU) seeded for the block; the
    caller's RNG states come back afterwards, and other GPUs' generators are not touched."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda \
        else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _default_layers(model: nn.Module) -> list[str]:
    """Every module with parameters of its own, output side first (reverse registration)."""
    names = [name for name, mod in model.named_modules()
             if any(True for _ in mod.parameters(recurse=False))]
    return names[::-1]


def _randomise(module: nn.Module) -> None:
    """Re-initialise every parameter of ``module`` and its submodules: PyTorch's default
    initialisation for leaf modules that have one (``reset_parameters``; BatchNorm goes back to
    weight 1, bias 0 and fresh running statistics), else N(0, 1) (AdaptGrad's
    ``metrics/consistency.py``)."""
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        if hasattr(sub, "reset_parameters") and not any(True for _ in sub.children()):
            sub.reset_parameters()
            continue
        with torch.no_grad():
            for p in own:
                p.normal_()


def cascading_randomisation(model: nn.Module, x: Tensor, target: Tensor | int,
                            explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
                            layers: Sequence[str] | None = None,
                            seed: int = 0) -> dict[str, Tensor]:
    """Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018,
    https://arxiv.org/abs/1810.03292): randomise layers from the output down, cumulatively, and
    score each map against the original map by the Spearman ρ of their magnitudes.

    Works on a deep copy: ``model`` itself (parameters, buffers, modes) is never changed. The
    copy is in eval mode. Every ``explain`` call runs with the global RNG seeded by ``seed`` (and
    the caller's RNG state restored), so a stochastic explainer draws the same noise at every
    step and only the weights change; the re-initialisation of the k-th layer (k = 1, 2, ...) is
    seeded by ``seed + k``.

    Args:
        model: the model to explain.
        x: inputs ``(N, C, H, W)`` in [0, 1].
        target: classes ``(N,)`` or an int.
        explain: ``explain(model, x, target) -> maps`` (``(N, H, W)`` or ``(N, C, H, W)``;
            4-D maps become ``Σ_c |a_c|``, 3-D ones ``|a|``).
        layers: module names, randomised in the given order (give them output side first); a
            block (``"model.layer4"``) is randomised whole. Default: every module with
            parameters of its own, in reverse registration order.
        seed: see above; default 0.

    Returns:
        ``{"original": ρ, layer_1: ρ, ...}`` in randomisation order, each ``(N,)``: "original" is
        a second explanation by the untouched copy (1 for a deterministic explainer), entry k
        the map after randomising layers 1..k.

    Example:
        >>> cascading_randomisation(model, x, y, lambda m, t, c: input_gradient(m, t, c))
        {'original': tensor([1., 1.]), 'model.fc': tensor([0.41, 0.37]), ...}
    """
    x = _float(x, "x")
    work = copy.deepcopy(model).eval()
    target = torch.as_tensor(target, device=x.device).long().expand(x.shape[0])
    names = list(_default_layers(work) if layers is None else layers)
    known = dict(work.named_modules())
    unknown = [name for name in names
               if name not in known or not any(True for _ in known[name].parameters())]
    if unknown:
        raise ValueError(f"layers names modules the model does not have, or that have no "
                         f"parameters: {unknown}; modules with parameters of their own: "
                         f"{_default_layers(work)[::-1]}")

    def flat_map() -> Tensor:
        with _seeded(seed, x.device):
            maps = explain(work, x, target).detach()
        return _maps(maps, "explain(model, x, target)", "magnitude").flatten(1)

    reference = flat_map()
    out = {"original": _spearman(reference, flat_map()).to(reference.dtype)}
    for k, name in enumerate(names):
        module = known[name]
        device = next(iter(module.parameters(recurse=False)), x).device
        with _seeded(seed + 1 + k, device):
            _randomise(module)
        out[name] = _spearman(reference, flat_map()).to(reference.dtype)
    return out

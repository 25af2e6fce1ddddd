"""Robustness (stability) of maps (methods.md §8.2 item 6; Quantus' "robustness" family): how
much the map of an image changes when the image does, between two given maps (x and x', x and a
noisy copy: Spearman ρ, top-k intersection, SSIM, cosine) or under random noise drawn here
(Max-Sensitivity).

Example:
    >>> from robustkit.saliency.metrics import stability_spearman, max_sensitivity
    >>> stability_spearman(maps_x, maps_x_adv), max_sensitivity(lambda t: explain(t, y), x)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.saliency.metrics._common import _cosine, _float, _pair, _spearman

__all__ = ["stability_spearman", "topk_intersection", "ssim", "stability_cos",
           "max_sensitivity"]

# SSIM constants of Wang et al. 2004 (skimage's defaults with gaussian_weights=True).
_SSIM_SIGMA, _SSIM_RADIUS, _SSIM_K1, _SSIM_K2 = 1.5, 5, 0.01, 0.03
Scale = Literal["abs", "signed"]


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

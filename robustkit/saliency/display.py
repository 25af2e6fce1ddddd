"""Reductions of attributions to ``(N, H, W)`` maps and their display scalings (methods.md §6.2,
§8.1): pure functions, tensors in and out.

- ``signed_map``: sum over channels keeping signs (the AdaptGrad repository's map);
- ``absolute_map``: sum over channels of |a|;
- ``percentile_scale``: robustkit's display scaling, by the q-th percentile of |map|;
- ``repo_scale``: the AdaptGrad repository's two scalings, for reproducing its figures and its
  consistency scores (Spearman ρ is taken after scaling there, and clipping creates ties).

Example:
    >>> maps = percentile_scale(signed_map(Gradient(model).attribute(x)))   # in [-1, 1]
    >>> heat = percentile_scale(absolute_map(a), signed=False)              # in [0, 1]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["signed_map", "absolute_map", "percentile_scale", "repo_scale"]


def signed_map(attributions: Tensor) -> Tensor:
    """Sum over channels keeping signs: ``(N, C, H, W) -> (N, H, W)``."""
    return _check_nchw(attributions).sum(dim=1)


def absolute_map(attributions: Tensor) -> Tensor:
    """Sum over channels of the absolute value: ``(N, C, H, W) -> (N, H, W)``, non-negative."""
    return _check_nchw(attributions).abs().sum(dim=1)


def percentile_scale(maps: Tensor, q: float = 99.0, signed: bool = True) -> Tensor:
    """Divide each map by the q-th percentile of its |values| and clip.

    A few extreme pixels would otherwise squash a display: the top ``100 − q`` % saturate at ±1.
    Signed maps land in [−1, 1] with 0 kept at 0; with ``signed=False`` in [0, 1], negatives
    clipped to 0 (give |a| maps, or see only the positive evidence). A map whose percentile is 0
    is divided by its largest |value| instead; an all-zero map stays zero.

    Args:
        maps: ``(N, ...)``, one map per leading index (usually ``(N, H, W)``).
        q: percentile in (0, 100] (default 99; numpy's linear interpolation).
        signed: clip to [−1, 1] (default) or to [0, 1].

    Shape:
        maps: ``(N, ...)``; returned: like maps.
    """
    flat = _check_maps(maps, q)
    mags = flat.abs()
    scale = torch.quantile(mags, q / 100, dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, mags.amax(dim=1, keepdim=True))
    scaled = torch.where(scale > 0, flat / scale.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.clamp(-1.0 if signed else 0.0, 1.0).view_as(maps)


def repo_scale(maps: Tensor, signed: bool = True, q: float = 99.0) -> Tensor:
    """The AdaptGrad repository's display scalings (``utils.py``), per map.

    - signed (``visualize_noabsscale``): ``s = |percentile_q(map)|`` of the *signed* values,
      then ``clip(map / (2s), −1, 1)``;
    - ``signed=False`` (``visualize_absscale``): ``v = |percentile_q(map)|``, ``m = min(map)``,
      then ``clip((map − m) / (v − m), 0, 1)``.

    A zero denominator (constant map) gives zeros rather than the repository's NaNs.

    Shape:
        maps: ``(N, ...)``; returned: like maps.
    """
    flat = _check_maps(maps, q)
    top = torch.quantile(flat, q / 100, dim=1, keepdim=True).abs()
    if signed:
        num, den, low = flat, 2 * top, -1.0
    else:
        low_val = flat.amin(dim=1, keepdim=True)
        num, den, low = flat - low_val, top - low_val, 0.0
    out = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return out.clamp(low, 1.0).view_as(maps)


def _check_nchw(a: Tensor) -> Tensor:
    if not isinstance(a, Tensor) or a.dim() != 4:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"attributions must have shape (N, C, H, W), got {shape}")
    return a


def _check_maps(maps: Tensor, q: float) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() < 2 or not maps.is_floating_point():
        raise ValueError("maps must be a floating-point tensor of shape (N, ...)")
    if not 0 < q <= 100:
        raise ValueError(f"q must lie in (0, 100], got {q}")
    return maps.reshape(maps.shape[0], -1)

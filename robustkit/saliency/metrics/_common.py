"""Input handling shared by the saliency metric families: float conversion, the channel
reductions of a 4-D map, image greyscale, cosine and Spearman rows.

Private to ``robustkit.saliency.metrics``; the public metrics live in the family modules.

Example:
    >>> m = _maps(a, "a", "magnitude")          # (N, C, H, W) -> (N, H, W), sum of |a_c|
    >>> rho = _spearman(m.flatten(1), n.flatten(1))
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


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

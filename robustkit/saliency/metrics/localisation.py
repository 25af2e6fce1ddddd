"""Localisation of one map (methods.md §8.2 items 4-5; Quantus' "localisation" family): where
the relevance lies against a reference taken from the image itself: its pixels (Etmann
alignment), its edges (Sobel), or its object box (relevance mass, pointing game).

Tiny-ImageNet boxes come from ``robustkit.data`` (``load_dataset("tinyimagenet", "test").boxes``,
``(N, 4)`` ``x0, y0, x1, y1``, inclusive pixel coordinates, x = column, y = row), so this module
has no box loader of its own.

Example:
    >>> from robustkit.saliency.metrics import mass_in_box, edge_spearman
    >>> mass_in_box(maps, val.boxes[:len(maps)]), edge_spearman(maps, x)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.saliency.metrics._common import _cosine, _float, _image_gray, _maps, _spearman

__all__ = ["alignment_cos", "edge_spearman", "mass_in_box", "pointing_game",
           "box_area_fraction"]


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

"""Faithfulness of a map to its model (methods.md §8.2 item 7; Quantus' "faithfulness"
family): does removing (deletion) or revealing (insertion) the most relevant pixels first move
the model's probability of the target fastest? RISE's deletion and insertion AUCs.

Example:
    >>> from robustkit.saliency.metrics import deletion_auc, insertion_auc
    >>> deletion_auc(model, x, maps, y, steps=32), insertion_auc(model, x, maps, y)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.saliency.metrics._common import _float, _maps
from robustkit.utils import eval_mode

__all__ = ["deletion_auc", "insertion_auc"]


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

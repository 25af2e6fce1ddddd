"""Gradient × Input, ``G̃(x) ⊙ x`` for any inner gradient ``G̃`` (methods.md §6.2)."""

from __future__ import annotations

from torch import Tensor, nn

from robustkit.saliency.base import Explainer
from robustkit.saliency.wrapper import _Wrapper

__all__ = ["GradientXInput"]


class GradientXInput(_Wrapper):
    """Inner map times the input (Shrikumar et al., https://arxiv.org/abs/1605.01713).

    With ``Gradient`` inside it equals captum's ``InputXGradient``; with ``SmoothGrad`` or
    ``AdaptGrad`` inside it is the AdaptGrad repository's ``GradientxInput(backgrad)``.

    Args:
        inner: explainer whose map is multiplied by x; an ``nn.Module`` means ``Gradient(inner)``.
        internal_batch_size: for an ``nn.Module`` inner, most images per forward (default all).

    Shape:
        x: ``(N, C, H, W)``; returned map: like x.

    Example:
        >>> gxi = GradientXInput(Gradient(model)).attribute(x)
        >>> sg_x_input = GradientXInput(SmoothGrad(model)).attribute(x)
    """

    def __init__(self, inner: Explainer | nn.Module,
                 internal_batch_size: int | None = None) -> None:
        super().__init__(inner, internal_batch_size=internal_batch_size)

    def _attribute(self, x: Tensor, target: Tensor) -> Tensor:
        return self.inner._attribute(x, target) * x

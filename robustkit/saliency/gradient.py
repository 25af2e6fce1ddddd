"""The vanilla input gradient of a logit, ``G(x) = ∇_x f_c(x)`` (methods.md §6.2)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from robustkit.saliency.base import Explainer, _check_logits

__all__ = ["Gradient"]

logger = logging.getLogger(__name__)


class Gradient(Explainer):
    """Signed input gradient of the target logit (Simonyan et al., https://arxiv.org/abs/1312.6034).

    The signed gradient, not its absolute value: the display reductions (``saliency.display``)
    take |·| where a figure wants it. Equals captum's ``Saliency(model).attribute(x, target,
    abs=False)``.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``.
        internal_batch_size: most images per forward/backward (default ``None``: all N).

    Shape:
        x: ``(N, C, H, W)``; target: int or ``(N,)``; returned map: like x.

    Example:
        >>> g = Gradient(model).attribute(x, target=y)
        >>> g.shape == x.shape
    """

    def _attribute(self, x: Tensor, target: Tensor) -> Tensor:
        rows = self._rows(x.shape[0])
        return torch.cat([self._chunk(x[i:i + rows], target[i:i + rows])
                          for i in range(0, x.shape[0], rows)])

    def _chunk(self, x: Tensor, target: Tensor) -> Tensor:
        # a fresh leaf: the graph and its .grad are local, the caller's x is never a leaf of it;
        # cloned so a model that writes into its input in place cannot alter the caller's x
        leaf = x.detach().clone().requires_grad_(True)
        logits = _check_logits(self.model(leaf), leaf)
        if int(target.max()) >= logits.shape[1]:
            raise ValueError(f"target must be < {logits.shape[1]} (the number of logits), got "
                             f"{int(target.max())}")
        # summing the samples' logits: in eval mode sample i's logit depends on x_i alone, so the
        # gradient of the sum w.r.t. x_i is that sample's own gradient
        score = logits.gather(1, target[:, None]).sum()
        if not score.requires_grad:
            logger.warning("%s: the logits do not depend on x through autograd; the gradient is "
                           "zero", type(self).__name__)
            return torch.zeros_like(x)
        # autograd.grad, not backward(): parameters' .grad are never written
        (grad,) = torch.autograd.grad(score, leaf, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

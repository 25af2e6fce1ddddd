"""Input-gradient regularisation (methods.md §5.2): ``CE + λ·‖∇ₓCE‖²₂``.

Ross & Doshi-Velez, "Improving the Adversarial Robustness and Interpretability of Deep Neural
Networks by Regularizing their Input Gradients", AAAI 2018 (https://arxiv.org/abs/1711.09404):
double backpropagation. Finlay & Oberman, "Scaleable input gradient regularization for
adversarial robustness", 2019 (https://arxiv.org/abs/1905.11468): the same penalty from a finite
difference along the detached gradient direction, without a second-order graph.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import check_hparam

__all__ = ["IGR", "input_gradient_penalty"]

Method = Literal["double_backprop", "finite_difference"]
_METHODS = ("double_backprop", "finite_difference")


def input_gradient_penalty(
    model: nn.Module, x: Tensor, y: Tensor, *, method: Method = "double_backprop", h: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``‖∇ₓ ℓ_i‖²₂`` with ``ℓ_i = CE(f(x_i), y_i)``, differentiable in the parameters.

    The gradient is that of the *sum* of the per-sample losses, so sample i's gradient is
    ``∇ ℓ_i`` whatever the batch size (a mean-CE gradient would shrink it by 1/N); BatchNorm in
    train mode still couples the samples through the batch statistics. One forward; ``x``
    itself is never marked as requiring grad and no ``.grad`` is written.

    - ``"double_backprop"``: ``g = ∇ₓ Σ ℓ_i`` with ``create_graph=True``; ``‖g_i‖²``.
    - ``"finite_difference"`` (Finlay & Oberman): ``d_i = g_i/‖g_i‖`` detached (one ordinary
      backward), one more forward at ``x + h·d`` (not clipped to [0, 1]), and
      ``((ℓ_i(x + h d_i) - ℓ_i(x))/h)²`` (0 where ``g_i = 0``). Error O(h). In train mode that
      forward also moves BatchNorm's running statistics.

    Args:
        model: maps ``(N, ...)`` in [0, 1] to logits ``(N, K)``; used in its current mode.
        x: inputs (pixel units); y: ``(N,)`` labels.
        method: ``"double_backprop"`` (default) or ``"finite_difference"``.
        h: finite-difference step in pixel units (default 0.01, Finlay & Oberman).

    Shape: returns ``(penalty (N,), ce (N,), logits (N, K))``, all with their graphs.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    x = x.detach().requires_grad_(True)  # a new leaf: the caller's x and x.grad stay untouched
    with torch.enable_grad():
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        if method == "double_backprop":
            (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
            return g.flatten(1).pow(2).sum(1), ce, logits
        # the direction only: no graph through it (the point of the finite difference)
        (g,) = torch.autograd.grad(ce.sum(), x, retain_graph=True)
        g = g.flatten(1)
        norm = g.norm(dim=1, keepdim=True)
        d = torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
        ce_h = F.cross_entropy(model(x.detach() + h * d.view_as(x)), y, reduction="none")
        return ((ce_h - ce) / h).pow(2), ce, logits


class IGR(Objective):
    """Input-gradient regularisation: ``mean_i CE_i + λ·mean_i ‖∇ₓ CE_i‖²₂`` (no perturbation).

    The CE inside the gradient is per sample (the gradient of the batch *sum*), so each sample's
    penalty does not depend on the batch size. The references scale differently: Ross &
    Doshi-Velez's ``l2_double_backprop = l2_loss(∇ₓ mean-CE)`` equals
    ``1/(2B)·mean_i ‖∇ℓ_i‖²`` (their weight ``c`` is ``λ = c/(2B)`` here); Finlay & Oberman's
    ``penalty·mean(dl²)/2`` is ``λ = penalty/2``.

    Metrics: ``loss/ce`` and ``loss/igr`` (``mean_i ‖∇ₓ CE_i‖²``, before λ).

    Args:
        model: the trained module (may be a DDP wrapper).
        attack: must be ``None`` (IGR trains on clean inputs).
        lam: λ, weight of the penalty (default 0.05: Finlay & Oberman's CIFAR-10 ``penalty 0.1``
            with their ½; inputs in [0, 1]).
        method: ``"double_backprop"`` (default, exact; ≈2× standard training) or
            ``"finite_difference"`` (two forwards and one first-order backward before the loss).
        h: finite-difference step in pixel units (default 0.01).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the clean logits ``(N, K)``.

    Example:
        >>> objective = IGR(model, lam=0.05)
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        lam: float = 0.05,
        method: Method = "double_backprop",
        h: float = 0.01,
    ) -> None:
        if attack is not None:
            raise ValueError("attack must be None for 'igr' (it trains on clean inputs only)")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
        self.lam = check_hparam("lam", lam, 0.0)
        self.method = method
        self.h = check_hparam("h", h, 0.0, low_open=True)
        super().__init__(model, None)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        penalty, ce, logits = input_gradient_penalty(self.model, x, y, method=self.method,
                                                     h=self.h)
        ce, reg = ce.mean(), penalty.mean()
        loss = ce + self.lam * reg
        return ObjectiveOutput(loss, logits, detach_metrics({"loss/ce": ce, "loss/igr": reg}))

    def __repr__(self) -> str:
        return f"IGR(lam={self.lam:g}, method={self.method!r}, h={self.h:g})"

"""Fast gradient sign method: one step of size ε from x (methods.md §1.1 with K = 1)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from robustkit.attacks.base import AttackResult, Norm
from robustkit.attacks.pgd import PGD

__all__ = ["FGSM"]


class FGSM(PGD):
    """FGSM (Goodfellow et al., https://arxiv.org/abs/1412.6572): ``x + eps·sign(∇x loss)``.

    PGD with one step of size ``eps``, no random start and the last iterate. With ``norm="L2"``
    the step is ``eps·g/‖g‖`` (the fast gradient method), clipped to [0, 1].

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits.
        eps: budget and step size in pixel units (default 8/255).
        norm: ``"Linf"`` (default) or ``"L2"``.
        loss: attack loss (default ``"ce"``), see ``robustkit.attacks.losses``.
        targeted: step towards ``perturb(..., target=t)``.

    Shape:
        x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)``; x_adv: like x.

    Example:
        >>> x_adv = FGSM(model, eps=8/255)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: Norm = "Linf",
                 loss: Literal["ce", "cw", "kl", "dlr"] = "ce", targeted: bool = False) -> None:
        super().__init__(model, eps=eps, alpha=eps, steps=1, random_start=False, norm=norm,
                         loss=loss, targeted=targeted, select="last")

    def perturb(self, x: Tensor, y: Tensor, *, eps: float | Tensor | None = None,
                target: Tensor | None = None,
                clean_logits: Tensor | None = None) -> AttackResult:
        """Attack ``(x, y)``; ``eps`` (float or ``(N,)``) overrides the budget and the step."""
        return super().perturb(x, y, eps=eps, alpha=eps, target=target, clean_logits=clean_logits)

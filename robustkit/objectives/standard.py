"""Standard training and PGD adversarial training (methods.md §2.1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import (
    Objective,
    ObjectiveOutput,
    TrainContext,
    detach_metrics,
)
from robustkit.objectives.functional import accuracy, attack_metrics
from robustkit.objectives.pgd_objective import PGDObjective

__all__ = ["Natural", "PGDAT"]


class Natural(Objective):
    """Standard training: ``CE(f(x), y)`` with no perturbation (the null generator).

    Args:
        model: the trained module (may be a DDP wrapper).
        attack: must be ``None``: natural training has no perturbation.

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``.

    Example:
        >>> objective = Natural(model)
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(self, model: nn.Module, attack: Attack | None = None) -> None:
        if attack is not None:
            raise ValueError("attack must be None for 'natural' (it trains on clean inputs only)")
        super().__init__(model, None)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        return ObjectiveOutput(loss, logits, detach_metrics({"loss/ce": loss}))


class PGDAT(PGDObjective):
    """PGD adversarial training: ``CE(f(x'), y)`` on PGD examples.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
    (https://arxiv.org/abs/1706.06083).

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator; ``None`` builds ``PGD(eps, alpha, steps, loss="ce",
            random_start=True, select="last")`` (uniform start, Madry).
        eps: L∞ budget in [0, 1] pixel units (default 8/255).
        alpha: step size (default 2/255).
        steps: PGD steps (default 10).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the adversarial logits ``(N, K)``.

    Example:
        >>> objective = PGDAT(model, eps=8/255, alpha=2/255, steps=10)
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
    ) -> None:
        super().__init__(model, attack, eps=eps, alpha=alpha, steps=steps)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("PGDAT.loss needs the AttackResult of perturb()")
        logits_adv = self.model(adv.x_adv)
        loss = F.cross_entropy(logits_adv, y)
        metrics = {"loss/ce_adv": loss, "acc_adv": accuracy(logits_adv, y),
                   **attack_metrics(adv.info)}
        return ObjectiveOutput(loss, logits_adv, detach_metrics(metrics))

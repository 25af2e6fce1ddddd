"""TRADES (methods.md §2.2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import (
    ObjectiveOutput,
    TrainContext,
    detach_metrics,
)
from robustkit.objectives.functional import (
    accuracy,
    attack_metrics,
    check_hparam,
    per_sample_kl,
)
from robustkit.objectives.pgd_objective import PGDObjective

__all__ = ["TRADES"]


class TRADES(PGDObjective):
    """TRADES: ``CE(f(x), y) + β·KL(p(x) ‖ p(x'))``, KL summed over classes, mean over the batch.

    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019
    (https://arxiv.org/abs/1901.08573). Gradients flow through both distributions; the clean and
    adversarial train-mode passes are separate forwards (BatchNorm never mixes them).

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator; ``None`` builds ``PGD(eps, alpha, steps, loss="kl",
            random_start="normal", select="last")`` (start x + 0.001·N(0, I), p(x) fixed).
        beta: weight of the KL term (default 6.0; 1 favours clean accuracy).
        eps: L∞ budget in pixel units (default 8/255; the reference uses 0.031).
        alpha: step size (default 0.007).
        steps: PGD steps (default 10).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the clean logits ``(N, K)``.

    Example:
        >>> objective = TRADES(model, beta=6.0)
        >>> out = objective(x, y); out.loss.backward()
    """

    inner_loss = "kl"
    random_start = "normal"

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        beta: float = 6.0,
        eps: float = 8 / 255,
        alpha: float = 0.007,
        steps: int = 10,
    ) -> None:
        self.beta = check_hparam("beta", beta, 0.0)
        super().__init__(model, attack, eps=eps, alpha=alpha, steps=steps)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("TRADES.loss needs the AttackResult of perturb()")
        logits = self.model(x)  # two forwards: BN statistics of clean and x' stay apart
        logits_adv = self.model(adv.x_adv)
        ce = F.cross_entropy(logits, y)
        kl = per_sample_kl(logits, logits_adv).mean()
        loss = ce + self.beta * kl
        metrics = {"loss/ce": ce, "loss/kl": kl, "acc_adv": accuracy(logits_adv, y),
                   **attack_metrics(adv.info)}
        return ObjectiveOutput(loss, logits, detach_metrics(metrics))

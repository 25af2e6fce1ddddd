"""MART (methods.md §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import (
    ObjectiveOutput,
    TrainContext,
    detach_metrics,
)
from robustkit.objectives.functional import accuracy, attack_metrics, check_hparam
from robustkit.objectives.pgd_objective import PGDObjective

__all__ = ["MART"]

# Stability constants of the reference code (YisenWang/MART:mart.py): they keep the logs finite
# when a probability reaches 1 (BCE) or 0 (KL), and keep the weight 1 - p_y(x) strictly positive.
_BCE_ONE = 1.0001
_LOG_EPS = 1e-12
_WEIGHT_ONE = 1.0000001


class MART(PGDObjective):
    """MART: ``BCE(f(x'), y) + β·KL(p(x) ‖ p(x'))·(1 - p_y(x))``, mean over the batch.

    Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
    ICLR 2020 (https://openreview.net/forum?id=rklOg6EFwS). BCE is
    ``-log p_y(x') - log(1 - max_{k≠y} p_k(x'))``. The weight ``1 - p_y(x)`` is **not** detached,
    as in the reference code, so gradients flow through it.

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator; ``None`` builds ``PGD(eps, alpha, steps, loss="ce",
            random_start="normal", select="last")`` (start x + 0.001·N(0, I)).
        beta: weight of the KL term (default 6.0; a ResNet-18 reproduction uses 5).
        eps: L∞ budget in pixel units (default 8/255; the reference uses 0.031).
        alpha: step size (default 0.007).
        steps: PGD steps (default 10).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the clean logits ``(N, K)``.

    Example:
        >>> objective = MART(model, beta=6.0)
        >>> out = objective(x, y); out.loss.backward()
    """

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
            raise ValueError("MART.loss needs the AttackResult of perturb()")
        logits = self.model(x)  # two forwards: BN statistics of clean and x' stay apart
        logits_adv = self.model(adv.x_adv)
        probs_adv = F.softmax(logits_adv, dim=1)
        # the most likely wrong class of x' (the true class masked out)
        other = probs_adv.scatter(1, y[:, None], -1.0).argmax(dim=1)
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(
            torch.log(_BCE_ONE - probs_adv + _LOG_EPS), other)
        probs = F.softmax(logits, dim=1)
        kl = F.kl_div(torch.log(probs_adv + _LOG_EPS), probs, reduction="none").sum(dim=1)
        weight = _WEIGHT_ONE - probs.gather(1, y[:, None]).squeeze(1)  # not detached (reference)
        robust = (kl * weight).mean()
        loss = bce + self.beta * robust
        metrics = {"loss/bce": bce, "loss/kl": robust, "acc_adv": accuracy(logits_adv, y),
                   **attack_metrics(adv.info)}
        return ObjectiveOutput(loss, logits, detach_metrics(metrics))

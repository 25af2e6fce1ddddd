"""GAIRAT: geometry-aware instance-reweighted adversarial training (methods.md §2.4)."""

from __future__ import annotations

import math
from typing import Literal

import torch
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
    gair_weights,
)
from robustkit.objectives.pgd_objective import PGDObjective
from robustkit.objectives.schedules import gairat_lambda

__all__ = ["GAIRAT"]


class GAIRAT(PGDObjective):
    """GAIRAT: ``mean_i ω_i·CE(f(x'_i), y_i)`` with weights from the geometry value κ_i.

    Zhang et al., "Geometry-aware Instance-reweighted Adversarial Training", ICLR 2021
    (https://arxiv.org/abs/2010.01736). κ_i counts the PGD iterates x_0..x_{K-1} still classified
    correctly (``AttackResult.info["kappa"]``); ``ω_i = ½(1 + tanh(λ_t + 5(1 - κ_i/⌊K/2⌋)))``,
    renormalised to sum B, detached. During burn-in λ_t = +inf (uniform weights, plain PGD-AT).
    The authors note GAIRAT without extra data does not hold up under AutoAttack: always report AA.

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator filling ``info["kappa"]``; ``None`` builds ``PGD(eps,
            alpha, steps, loss="ce", random_start=True, select="last")``.
        eps: L∞ budget in pixel units (default 8/255; the reference uses 0.031).
        alpha: step size (default 0.007).
        steps: PGD steps K (default 10); also the K of the weight formula.
        lam: λ after burn-in (default -1.0).
        burn_in: fraction of T before reweighting starts (default 0.5: epoch 60 of 120, WRN;
            the reference's ResNet setting is 30 of 120, i.e. 0.25).
        lambda_max: λ during burn-in (default +inf: uniform weights).
        lambda_schedule: ``"fixed"`` (λ = lam after burn-in) or ``"linear"`` (from lambda_max).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the adversarial logits ``(N, K)``.

    Example:
        >>> objective = GAIRAT(model, lam=-1.0, burn_in=0.5)
        >>> out = objective(x, y, TrainContext(epoch=70, epochs=120)); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        eps: float = 8 / 255,
        alpha: float = 0.007,
        steps: int = 10,
        lam: float = -1.0,
        burn_in: float = 0.5,
        lambda_max: float = math.inf,
        lambda_schedule: Literal["fixed", "linear"] = "fixed",
    ) -> None:
        self.lam = check_hparam("lam", lam, -math.inf)
        self.burn_in = check_hparam("burn_in", burn_in, 0.0, 1.0)
        self.lambda_max = float(lambda_max)
        if lambda_schedule not in ("fixed", "linear"):
            raise ValueError(
                f"lambda_schedule must be 'fixed' or 'linear', got {lambda_schedule!r}")
        if lambda_schedule == "linear" and math.isinf(self.lambda_max):
            raise ValueError("lambda_schedule='linear' needs a finite lambda_max")
        self.lambda_schedule = lambda_schedule
        super().__init__(model, attack, eps=eps, alpha=alpha, steps=steps)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("GAIRAT.loss needs the AttackResult of perturb()")
        lam = gairat_lambda(ctx.epoch, ctx.epochs, self.lam, self.burn_in, self.lambda_max,
                            self.lambda_schedule)
        logits_adv = self.model(adv.x_adv)
        ce = F.cross_entropy(logits_adv, y, reduction="none")
        if "kappa" in adv.info:
            kappa = adv.info["kappa"].to(ce.device)
            omega = gair_weights(kappa, self.steps, lam)  # detached: constants (GAIR.py)
        elif math.isinf(lam) and lam > 0:
            kappa, omega = None, torch.ones_like(ce)
        else:
            raise ValueError("GAIRAT needs an attack that reports info['kappa']")
        loss = (omega * ce).mean()
        reweight = not (math.isinf(lam) and lam > 0)
        metrics = {"loss/ce_adv": loss, "acc_adv": accuracy(logits_adv, y),
                   "reweight": torch.tensor(float(reweight), device=ce.device),
                   "omega_max": omega.max(), "omega_min": omega.min(), "omega_i": omega,
                   **attack_metrics(adv.info)}
        if reweight:  # +inf during burn-in would be an unloggable scalar
            metrics["lambda_t"] = torch.tensor(lam, device=ce.device)
        if kappa is not None:
            metrics["kappa"] = kappa.float()
        return ObjectiveOutput(loss, logits_adv, detach_metrics(metrics))

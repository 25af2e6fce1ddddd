"""FAT: friendly adversarial training with early-stopped PGD (methods.md §2.4)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.distributed import unwrap
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import (
    accuracy,
    attack_metrics,
    check_hparam,
    per_sample_kl,
)
from robustkit.objectives.schedules import FAT_TAU, TauSchedule, check_tau_schedule, tau_schedule

__all__ = ["FAT"]


class FAT(Objective):
    """Friendly adversarial training: early-stopped PGD with a τ schedule, over AT or TRADES.

    Zhang et al., "Attacks Which Do Not Kill Training Make Adversarial Learning Stronger",
    ICML 2020 (https://arxiv.org/abs/2002.11242). Before each PGD step a misclassified sample
    spends one unit of a counter starting at τ_t; once it is exhausted the sample is frozen (its
    current iterate is the "friendly" example). τ_t follows FAT's 50/90/120 rule rescaled to T
    epochs; τ = K recovers PGD-AT (base "at") or TRADES (base "trades").

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator accepting ``perturb(x, y, tau=...)``; ``None`` builds PGD
            with ``loss="ce"`` and a uniform start (base "at") or ``loss="kl"`` and the
            0.001·N(0, I) start (base "trades"), ``select="last"``.
        base: ``"at"`` (CE on x', FAT) or ``"trades"`` (CE(x) + β·KL, FAT-for-TRADES).
        eps: L∞ budget in pixel units (default 8/255; the reference uses 0.031).
        alpha: step size (default 0.007, the reference's).
        steps: maximum PGD steps K (default 10).
        tau_schedule: ``((fraction of T, τ), ...)`` breakpoints (default (50/120, 0),
            (90/120, 1), (1, 2)), or an int for a constant τ.
        beta: KL weight for base "trades" (default 6.0; unused for "at").
        omega: std of Gaussian noise added at each step (default ``None``: the references' 0.001
            for "at", 0 for "trades"), the built-in PGD's ``step_noise``. Needs the built-in
            attack.

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the adversarial logits (base "at")
    or the clean ones (base "trades"), ``(N, K)``.

    Example:
        >>> objective = FAT(model, base="trades", beta=6.0)
        >>> out = objective(x, y, TrainContext(epoch=3, epochs=120)); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        base: Literal["at", "trades"] = "at",
        eps: float = 8 / 255,
        alpha: float = 0.007,
        steps: int = 10,
        tau_schedule: TauSchedule = FAT_TAU,
        beta: float = 6.0,
        omega: float | None = None,
    ) -> None:
        if base not in ("at", "trades"):
            raise ValueError(f"base must be 'at' or 'trades', got {base!r}")
        check_tau_schedule(tau_schedule)
        self.base = base
        self.eps = check_hparam("eps", eps, 0.0, 1.0)
        self.alpha = check_hparam("alpha", alpha, 0.0, low_open=True)
        self.steps = int(check_hparam("steps", steps, 1))
        self.tau_schedule = tau_schedule
        self.beta = check_hparam("beta", beta, 0.0)
        if omega is None:  # FAT.py uses 0.001, FAT_for_TRADES.py 0.0
            omega = 0.001 if base == "at" else 0.0
        self.omega = check_hparam("omega", omega, 0.0)
        if attack is None:
            attack = PGD(unwrap(model), eps=self.eps, alpha=self.alpha, steps=self.steps,
                         select="last", loss="ce" if base == "at" else "kl",
                         random_start=True if base == "at" else "normal", step_noise=self.omega)
        elif self.omega > 0:
            raise ValueError("omega > 0 needs the built-in attack (attack=None); pass omega=0 "
                             "and give your attack its own step noise (PGD(step_noise=...))")
        super().__init__(model, attack)

    def perturb(self, x: Tensor, y: Tensor, ctx: TrainContext) -> AttackResult:
        tau = tau_schedule(ctx.epoch, ctx.epochs, self.tau_schedule)
        return self.attack.perturb(x, y, tau=tau)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("FAT.loss needs the AttackResult of perturb()")
        metrics = dict(attack_metrics(adv.info))
        tau = tau_schedule(ctx.epoch, ctx.epochs, self.tau_schedule)
        if tau is not None:
            metrics["tau_t"] = torch.tensor(float(tau), device=x.device)
        if self.base == "at":
            logits_adv = self.model(adv.x_adv)
            loss = F.cross_entropy(logits_adv, y)
            metrics.update({"loss/ce_adv": loss, "acc_adv": accuracy(logits_adv, y)})
            return ObjectiveOutput(loss, logits_adv, detach_metrics(metrics))
        logits = self.model(x)  # two forwards: BN statistics of clean and x' stay apart
        logits_adv = self.model(adv.x_adv)
        ce = F.cross_entropy(logits, y)
        kl = per_sample_kl(logits, logits_adv).mean()
        loss = ce + self.beta * kl
        metrics.update({"loss/ce": ce, "loss/kl": kl, "acc_adv": accuracy(logits_adv, y)})
        return ObjectiveOutput(loss, logits, detach_metrics(metrics))


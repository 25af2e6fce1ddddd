"""SRD-DAT: dynamic adversarial training from sample robustness disparity (methods.md §3)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.distributed import unwrap
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import (
    accuracy,
    attack_metrics,
    budget_map,
    build_pgd,
    check_hparam,
    confidence_gap,
    normalized_skewness,
    per_sample_kl,
    power_weights,
    robustness_score,
    skewness,
)
from robustkit.objectives.memory import SampleMemory
from robustkit.objectives.schedules import SRD_TAU, TauSchedule, check_tau_schedule, gamma_t
from robustkit.objectives.schedules import tau_schedule as tau_at
from robustkit.utils import eval_mode

__all__ = ["SRDDAT"]

# μ of the per-sample score EMA when score_ema=True (methods.md §3.3, Module A, item 4).
_DEFAULT_EMA = 0.7


class SRDDAT(Objective):
    """SRD-DAT: per-sample budgets from a robustness score (Module A), KL weights (Module B).

    Our reconstruction (methods.md §3, "inspired by", not a reproduction) of Wang, Zhang & Mei,
    "基于样本鲁棒差异的动态对抗训练方法", Journal of Computer Applications, 2026
    (DOI 10.11772/j.issn.1001-9081.2026010036; abstract only).

    **Module A** (``perturb``): an eval-mode no-grad clean pass gives ``p_i``; correctness
    ``c_i``, gap ``g_i = p_(1) - p_(2)``, normalised skewness ``ŝ_i`` (one-hot 1, uniform ½),
    score ``r_i = λ_g·g_i + (1-λ_g)·ŝ_i`` (optionally an EMA over epochs in ``SampleMemory``),
    budget ``ε_i = c_i·[ε_lo + (ε_hi - ε_lo)·r_i^q]`` (misclassified: 0 or ``eps_hi``), step
    ``α_i = step_ratio·ε_i``; PGD maximises KL (or CE) from ``x + 0.001·N(0, I)`` with per-sample
    projection and FAT early stopping with τ_t; samples with ε_i = 0 or frozen leave the batch.

    **Module B** (``loss``): separate train-mode passes on x and x̃; ``d_i = KL(p(x_i)‖p(x̃_i))``
    detached, ``v_i = d_i / max((ε_i/ε_hi)², η0)`` (× ``1 - p_y(x_i)`` with ``mart_factor``),
    ``ω_i ∝ v_i^γ_t`` over ``P = {ε_i > 0}``, clipped to ``[0, omega_max]`` and renormalised to
    mean 1 over P (iterated to the fixed point, so both hold exactly), ``ω_i = 1`` outside P;
    ``L = mean CE(f(x)) + β·mean(ω·KL) [+ beta_ce·mean(ω·CE(f(x̃)))]``, ω constant.

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: accepts ``perturb(x, y, eps=(N,), alpha=(N,), tau=, clean_logits=)``; ``None``
            builds ``PGD(eps_hi, step_ratio·eps_hi, k_max, loss=inner_loss,
            random_start="normal", select="last")``.
        eps_hi: largest budget, = evaluation ε (default 8/255).
        eps_lo: smallest budget of a correct sample (default 4/255).
        q: curvature of the map from r to ε (default 1.0).
        lambda_gap: weight of the gap vs skewness in r (default 0.7).
        step_ratio: α_i = step_ratio·ε_i (default 0.25).
        k_max: maximum PGD steps (default 10).
        tau_schedule: ``((fraction of T, τ), ...)`` (default (0.4, 0), (0.75, 1), (1.0, 2)); an
            int is a constant τ (``k_max`` never stops); ``None`` disables early stopping.
        inner_loss: ``"kl"`` or ``"ce"`` (default ``"kl"``).
        misclassified: ``"clean"`` (ε = 0, default) or ``"uniform"`` (ε = eps_hi).
        invert_budget: the ablation ``ε_i = c_i·[ε_lo + (ε_hi - ε_lo)·(1 - r_i^q)]``: fragile
            correct samples get the larger budget (default False; ``budget_map(invert=)``).
        beta: weight of the KL term (default 6.0).
        gamma_max: largest weight exponent (default 1.0; 0 = uniform weights).
        gamma_ramp: (start, end) of the γ ramp as fractions of T (default (0.3, 0.6)).
        omega_max: weight clip, >= 1 (default 5.0).
        eta0: floor of the budget normalisation (default 1/16).
        score_ema: ``None``/``False`` (off, default), ``True`` (μ = 0.7) or μ in [0, 1);
            needs ``ctx.idx``.
        mart_factor: multiply v by the detached ``1 - p_y(x)`` (default False).
        beta_ce: weight of the ``adv_ce`` term ``mean(ω·CE(f(x̃)))`` (default 0: off).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the clean logits ``(N, K)``.

    Example:
        >>> objective = SRDDAT(model, eps_hi=8/255, eps_lo=4/255, beta=6.0)
        >>> out = objective(x, y, TrainContext(epoch=5, epochs=100, idx=idx)); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        eps_hi: float = 8 / 255,
        eps_lo: float = 4 / 255,
        q: float = 1.0,
        lambda_gap: float = 0.7,
        step_ratio: float = 0.25,
        k_max: int = 10,
        tau_schedule: TauSchedule = SRD_TAU,
        inner_loss: Literal["kl", "ce"] = "kl",
        misclassified: Literal["clean", "uniform"] = "clean",
        beta: float = 6.0,
        gamma_max: float = 1.0,
        gamma_ramp: tuple[float, float] = (0.3, 0.6),
        omega_max: float = 5.0,
        eta0: float = 1 / 16,
        score_ema: float | bool | None = None,
        mart_factor: bool = False,
        beta_ce: float = 0.0,
        invert_budget: bool = False,
    ) -> None:
        self.eps_hi = check_hparam("eps_hi", eps_hi, 0.0, 1.0, low_open=True)
        self.eps_lo = check_hparam("eps_lo", eps_lo, 0.0, self.eps_hi)
        self.q = check_hparam("q", q, 0.0, low_open=True)
        self.lambda_gap = check_hparam("lambda_gap", lambda_gap, 0.0, 1.0)
        self.step_ratio = check_hparam("step_ratio", step_ratio, 0.0, low_open=True)
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
        self.k_max = k_max
        check_tau_schedule(tau_schedule)
        self.tau_schedule = tau_schedule
        if inner_loss not in ("kl", "ce"):
            raise ValueError(f"inner_loss must be 'kl' or 'ce', got {inner_loss!r}")
        self.inner_loss = inner_loss
        if misclassified not in ("clean", "uniform"):
            raise ValueError(f"misclassified must be 'clean' or 'uniform', got {misclassified!r}")
        self.misclassified = misclassified
        if not isinstance(invert_budget, bool):
            raise ValueError(f"invert_budget must be true or false, got {invert_budget!r}")
        self.invert_budget = invert_budget
        self.beta = check_hparam("beta", beta, 0.0)
        self.gamma_max = check_hparam("gamma_max", gamma_max, 0.0)
        if len(tuple(gamma_ramp)) != 2:
            raise ValueError(f"gamma_ramp must be (start, end), got {gamma_ramp!r}")
        start = check_hparam("gamma_ramp[0]", gamma_ramp[0], 0.0, 1.0)
        self.gamma_ramp = (start, check_hparam("gamma_ramp[1]", gamma_ramp[1], start, 1.0))
        self.omega_max = check_hparam("omega_max", omega_max, 1.0)  # mean 1 needs a clip >= 1
        self.eta0 = check_hparam("eta0", eta0, 0.0, 1.0, low_open=True)
        if score_ema is True:
            score_ema = _DEFAULT_EMA
        elif score_ema is False:
            score_ema = None
        self.score_ema = None if score_ema is None else check_hparam(
            "score_ema", score_ema, 0.0, 1.0)
        if self.score_ema == 1.0:
            raise ValueError("score_ema must be < 1 (μ = 1 would never update the score)")
        self.mart_factor = bool(mart_factor)
        self.beta_ce = check_hparam("beta_ce", beta_ce, 0.0)
        self.memory = SampleMemory() if self.score_ema is not None else None
        if attack is None:
            attack = build_pgd(model, eps=self.eps_hi, alpha=self.step_ratio * self.eps_hi,
                               steps=self.k_max, loss=self.inner_loss, random_start="normal")
        super().__init__(model, attack)

    # ------------------------------------------------------------------ Module A
    def perturb(self, x: Tensor, y: Tensor, ctx: TrainContext) -> AttackResult:
        # eval mode, no grad: BN running statistics, and this pass is not trained on (§3.3 A);
        # the bare module, so no DDP collective runs for it
        with torch.no_grad(), eval_mode(unwrap(self.model)) as bare:
            logits_clean = bare(x)
        probs = F.softmax(logits_clean.float(), dim=1)
        correct = probs.argmax(dim=1) == y
        gap = confidence_gap(probs)
        skew = skewness(probs)
        score = robustness_score(gap, normalized_skewness(probs), self.lambda_gap)
        if self.memory is not None:
            if ctx.idx is None:
                raise ValueError("score_ema needs ctx.idx (a loader yielding (x, y, idx))")
            prev = self.memory.get("score", ctx.idx).to(score.device)
            mu = self.score_ema
            score = torch.where(torch.isnan(prev), score, mu * prev + (1 - mu) * score)
            self.memory.update("score", ctx.idx, score)
        eps_i = budget_map(score, correct, self.eps_lo, self.eps_hi, self.q, self.misclassified,
                           invert=self.invert_budget)
        eps_i = eps_i.to(x.dtype)
        tau = tau_at(ctx.epoch, ctx.epochs, self.tau_schedule)
        # clean_logits: PGD-KL's fixed p(x) is this same eval-mode pass, so no second forward
        res = self.attack.perturb(x, y, eps=eps_i, alpha=self.step_ratio * eps_i, tau=tau,
                                  clean_logits=logits_clean)
        res.info.update(eps=eps_i, gap=gap, skew=skew, score=score, correct=correct)
        return res

    # ------------------------------------------------------------------ Module B
    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None or "eps" not in adv.info:
            raise ValueError("SRDDAT.loss needs the AttackResult of SRDDAT.perturb()")
        eps_i = adv.info["eps"].to(device=x.device, dtype=torch.float)
        logits = self.model(x)  # two forwards: BN statistics of clean and x̃ stay apart
        logits_adv = self.model(adv.x_adv)
        kl = per_sample_kl(logits, logits_adv)  # gradients through both, as in TRADES
        ce = F.cross_entropy(logits, y)
        ce_adv = F.cross_entropy(logits_adv, y, reduction="none")
        perturbed = eps_i > 0
        gamma = gamma_t(ctx.epoch, ctx.epochs, self.gamma_max, self.gamma_ramp)
        with torch.no_grad():  # the weights are constants (methods.md §3.3 B, item 6)
            # KL grows like ε² for small ε: dividing by (ε_i/ε_hi)² keeps small-budget samples
            # from looking safe; η0 bounds the correction
            v = kl.detach() / ((eps_i / self.eps_hi) ** 2).clamp_min(self.eta0)
            if self.mart_factor:
                p_y = F.softmax(logits.detach(), dim=1).gather(1, y[:, None]).squeeze(1)
                v = v * (1 - p_y)
            omega = power_weights(v, perturbed, gamma, self.omega_max)
        kl_term = (omega * kl).mean()
        ce_adv_term = (omega * ce_adv).mean()
        loss = ce + self.beta * kl_term
        if self.beta_ce > 0:  # the adv_ce option
            loss = loss + self.beta_ce * ce_adv_term
        om = omega[perturbed] if bool(perturbed.any()) else torch.ones(1, device=omega.device)
        tau = tau_at(ctx.epoch, ctx.epochs, self.tau_schedule)
        metrics = {
            "loss/ce": ce, "loss/kl": kl_term, "loss/ce_adv": ce_adv_term,
            "acc_adv": accuracy(logits_adv, y), **attack_metrics(adv.info),
            "omega_mean": om.mean(), "omega_max": om.max(), "omega_min": om.min(),
            "gamma_t": torch.tensor(gamma, device=x.device), "eps_i": eps_i, "omega_i": omega,
        }
        if tau is not None:
            metrics["tau_t"] = torch.tensor(float(tau), device=x.device)
        for key in ("gap", "skew", "score", "kappa"):
            if key in adv.info:
                metrics[key] = adv.info[key].float()
        return ObjectiveOutput(loss, logits, detach_metrics(metrics))

    def state_dict(self) -> dict[str, Tensor]:
        if self.memory is None:
            return {}
        return {f"memory.{k}": v for k, v in self.memory.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.memory is None:
            super().load_state_dict(state)
            return
        bad = [k for k in state if not k.startswith("memory.")]
        if bad:
            raise ValueError(f"unexpected SRDDAT state keys {bad}")
        self.memory.load_state_dict({k[len("memory."):]: v for k, v in state.items()})

    def __repr__(self) -> str:
        return (f"SRDDAT(eps_lo={self.eps_lo:.6g}, eps_hi={self.eps_hi:.6g}, beta={self.beta}, "
                f"tau_schedule={self.tau_schedule!r}, attack={self.attack!r})")

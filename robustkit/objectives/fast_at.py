"""Single-step adversarial training: FGSM with a random start, and N-FGSM (methods.md §2.1).

Both take one signed-gradient step from a noisy start and train on the result with CE, so an
epoch costs two forward/backward passes instead of PGD-10's eleven: adversarial training for
machines without a GPU.

- **FGSM-RS** (Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training",
  ICLR 2020, https://arxiv.org/abs/2001.03994): δ₀ ~ U(−ε, ε), one step of α = 1.25·ε, projected
  back onto the ε-ball and [0, 1].
- **N-FGSM** (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial
  Training", NeurIPS 2022, https://arxiv.org/abs/2202.01181): δ₀ ~ U(−kε, kε) with k = 2, one
  step of α = ε and **no** projection onto the ε-ball (only onto [0, 1]), so ‖δ‖∞ ≤ (k+1)·ε.
  The larger noise, not the projection, is what keeps it from catastrophic overfitting.

Catastrophic overfitting (held-out PGD accuracy collapsing within an epoch, Wong et al. §5) is
watched by the training loop's held-out evaluation: ``best.pt`` keeps the last good model and a
collapse is logged as a warning (``robustkit.training.callbacks``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.distributed import unwrap
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import accuracy, attack_metrics, check_hparam
from robustkit.utils import eval_mode

__all__ = ["FastAT"]

Method = Literal["fgsm_rs", "n_fgsm"]
# The papers' defaults per method: (alpha / eps, noise k, project onto the eps-ball).
_DEFAULTS: dict[str, tuple[float, float, bool]] = {
    "fgsm_rs": (1.25, 1.0, True),  # Wong et al. 2020: alpha = 1.25 eps, delta_0 ~ U(-eps, eps)
    "n_fgsm": (1.0, 2.0, False),  # de Jorge et al. 2022: alpha = eps, k = 2, no clipping
}


class FastAT(Objective):
    """Single-step adversarial training: ``CE(f(x + δ), y)`` with δ from one noisy FGSM step.

    ``δ₀ ~ U(−kε, kε)`` (clipped so that ``x + δ₀ ∈ [0, 1]``), then
    ``δ = δ₀ + α·sign(∇_δ CE(f(x + δ₀), y))``, projected onto ``[−ε, ε]`` when ``project``, and
    always clipped so that ``x + δ ∈ [0, 1]``. The gradient is taken with
    ``torch.autograd.grad`` on the bare model in eval mode (as every robustkit attack; the
    papers' code keeps train mode, which only matters with BatchNorm), and the training pass on
    ``x + δ`` runs in train mode.

    Args:
        model: the trained module (may be a DDP wrapper).
        attack: must be ``None``: the single step is the objective's own.
        eps: L∞ budget in [0, 1] pixel units (default 8/255).
        method: ``"fgsm_rs"`` (Wong et al. 2020) or ``"n_fgsm"`` (de Jorge et al. 2022); sets
            the defaults of the next three arguments.
        alpha: step size; default ``1.25·eps`` (fgsm_rs) or ``eps`` (n_fgsm).
        noise: k of the uniform start ``U(−k·eps, k·eps)``; default 1 (fgsm_rs) or 2 (n_fgsm);
            0 starts at x (plain FGSM training).
        project: clip δ to ``[−eps, eps]`` after the step; default True (fgsm_rs), False (n_fgsm).
        generator: ``torch.Generator`` for the noise (default: the global RNG).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the adversarial logits ``(N, K)``.

    Example:
        >>> objective = FastAT(model, eps=0.3, method="n_fgsm")
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        eps: float = 8 / 255,
        method: Method = "fgsm_rs",
        alpha: float | None = None,
        noise: float | None = None,
        project: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if attack is not None:
            raise ValueError("attack must be None for 'fast_at' (its single step is its own)")
        if method not in _DEFAULTS:
            raise ValueError(f"method must be one of {sorted(_DEFAULTS)}, got {method!r}")
        ratio, k, proj = _DEFAULTS[method]
        self.method = method
        self.eps = check_hparam("eps", eps, 0.0, 1.0)
        self.alpha = check_hparam("alpha", ratio * self.eps if alpha is None else alpha, 0.0)
        self.noise = check_hparam("noise", k if noise is None else noise, 0.0)
        self.project = proj if project is None else bool(project)
        self.generator = generator
        super().__init__(model, None)

    def perturb(self, x: Tensor, y: Tensor, ctx: TrainContext) -> AttackResult:
        bare = unwrap(self.model)
        g = self.generator
        u = torch.rand(x.shape, generator=g, dtype=x.dtype,
                       device=x.device if g is None else g.device).to(x.device)
        # U(-k eps, k eps), then clipped so that x + delta stays an image (both papers' code)
        delta = ((2 * u - 1) * (self.noise * self.eps)).clamp(-x, 1 - x)
        with eval_mode(bare), torch.enable_grad():
            xd = (x + delta).detach().requires_grad_(True)
            loss = F.cross_entropy(bare(xd), y)
            (grad,) = torch.autograd.grad(loss, xd)  # the input only: no parameter's .grad
        delta = delta + self.alpha * grad.sign()
        if self.project:
            delta = delta.clamp(-self.eps, self.eps)
        x_adv = (x + delta).clamp(0.0, 1.0).detach()
        n = x.shape[0]
        info = {"eps": torch.full((n,), self.eps, device=x.device),
                "steps_used": torch.ones(n, dtype=torch.long, device=x.device)}
        return AttackResult(x_adv, info)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("FastAT.loss needs the AttackResult of perturb()")
        logits_adv = self.model(adv.x_adv)
        loss = F.cross_entropy(logits_adv, y)
        delta = (adv.x_adv - x).flatten(1).abs().amax(1)
        metrics = {"loss/ce_adv": loss, "acc_adv": accuracy(logits_adv, y),
                   "delta_linf_mean": delta.mean(), **attack_metrics(adv.info)}
        return ObjectiveOutput(loss, logits_adv, detach_metrics(metrics))

    def __repr__(self) -> str:
        return (f"FastAT(method={self.method!r}, eps={self.eps:.6g}, alpha={self.alpha:.6g}, "
                f"noise={self.noise:g}, project={self.project})")

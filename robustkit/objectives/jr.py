"""Jacobian regularisation (methods.md §5.2): ``CE + λ/2·‖J‖²_F`` with ``J = ∂z/∂x``.

Hoffman, Roberts & Yaida, "Robust Learning with Jacobian Regularization", 2019
(https://arxiv.org/abs/1908.02729); reference code ``facebookresearch/jacobian_regularizer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import check_hparam

__all__ = ["JR", "jacobian_norm_sq"]


def _check_n_proj(n_proj: int) -> int:
    if isinstance(n_proj, bool) or not isinstance(n_proj, int) or not (n_proj == -1 or n_proj > 0):
        raise ValueError(f"n_proj must be -1 (exact) or a positive int, got {n_proj!r}")
    return n_proj


def jacobian_norm_sq(
    model: nn.Module, x: Tensor, *, n_proj: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample estimate of ``‖J(x_i)‖²_F``, ``J = ∂z/∂x`` (logits), differentiable in the
    parameters (every vector–Jacobian product keeps its graph).

    ``n_proj ≥ 1``: per sample and projection draw ``v`` uniform on the unit sphere ``S^{K-1}``
    (a normalised Gaussian); ``‖J‖²_F ≈ K/n_proj · Σ_j ‖v_jᵀ J‖²``, unbiased because
    ``E[v vᵀ] = I/K``. ``n_proj = -1``: the exact value over the K one-hot vectors (K products).
    This is the full estimate; ``JacobianReg`` in the reference code returns half of it.
    Per sample exactly in eval mode (BatchNorm in train mode couples the batch, as there).

    Args:
        model: maps ``(N, ...)`` to logits ``(N, K)``; used in its current mode.
        x: inputs (pixel units); ``x`` itself is never marked as requiring grad.
        n_proj: random projections per sample (default 1), or -1 for the exact value.
        generator: ``torch.Generator`` for the projections (default: the global RNG).

    Shape: returns ``(estimate (N,), logits (N, K))``.
    """
    n_proj = _check_n_proj(n_proj)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        n, k = z.shape
        exact = n_proj == -1
        est = z.new_zeros(n)
        for j in range(k if exact else n_proj):
            if exact:
                v = F.one_hot(torch.full((n,), j, device=z.device), k).to(z.dtype)
            else:
                dev = z.device if generator is None else generator.device
                v = torch.randn((n, k), generator=generator, dtype=z.dtype, device=dev)
                v = (v / v.norm(dim=1, keepdim=True)).to(z.device)
            (vj,) = torch.autograd.grad(z, x, grad_outputs=v, create_graph=True)
            est = est + vj.flatten(1).pow(2).sum(1)
        if not exact:
            est = est * (k / n_proj)
    return est, z


class JR(Objective):
    """Jacobian regularisation: ``mean_i CE_i + (λ/2)·(1/B)·Σ_i ‖J(x_i)‖²_F`` (no perturbation).

    ``J = ∂z/∂x`` is the Jacobian of the logits with respect to the [0, 1] pixels, estimated with
    ``n_proj`` random projections per sample (``jacobian_norm_sq``). The ½ is applied once, here:
    the regulariser is the full estimate, so this loss equals the reference's
    ``CE + lambda_JR · JacobianReg(n)(x, z)`` (whose ``JacobianReg`` returns half the estimate),
    with ``lam = lambda_JR``. The reference examples normalise MNIST inside the data pipeline, so
    their ``J`` is ``std`` times ours (λ_pixels = λ_normalised·std²).

    Metrics: ``loss/ce`` and ``loss/jr`` (the full ``‖J‖²_F`` estimate, mean over the batch,
    before ½λ: twice the reference's "Jacobian loss").

    Args:
        model: the trained module (may be a DDP wrapper).
        attack: must be ``None`` (JR trains on clean inputs).
        lam: λ_JR (default 0.01, the reference README's example).
        n_proj: random projections per sample (default 1, as the reference); -1 is exact
            (K vector–Jacobian products).
        generator: ``torch.Generator`` for the projections (default: the global RNG).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the clean logits ``(N, K)``.

    Example:
        >>> objective = JR(model, lam=0.01, n_proj=1)
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        lam: float = 0.01,
        n_proj: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if attack is not None:
            raise ValueError("attack must be None for 'jr' (it trains on clean inputs only)")
        self.lam = check_hparam("lam", lam, 0.0)
        self.n_proj = _check_n_proj(n_proj)
        self.generator = generator
        super().__init__(model, None)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        est, logits = jacobian_norm_sq(self.model, x, n_proj=self.n_proj,
                                       generator=self.generator)
        ce, reg = F.cross_entropy(logits, y), est.mean()  # batch sum / B
        loss = ce + 0.5 * self.lam * reg
        return ObjectiveOutput(loss, logits, detach_metrics({"loss/ce": ce, "loss/jr": reg}))

    def __repr__(self) -> str:
        return f"JR(lam={self.lam:g}, n_proj={self.n_proj})"

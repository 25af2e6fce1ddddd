"""AWP: adversarial weight perturbation around any objective (methods.md §2.4)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.distributed import unwrap
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext
from robustkit.objectives.functional import check_hparam
from robustkit.objectives.schedules import warmup_done

__all__ = ["AWP"]

logger = logging.getLogger(__name__)

# Guards the division by a layer's gradient norm (the reference's EPS in utils_awp.py).
_NORM_EPS = 1e-20


class AWP(Objective):
    """Adversarial weight perturbation: the inner objective's loss, taken at weights ``w + v``.

    Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020
    (https://arxiv.org/abs/2004.05884). After the inner objective's perturbation x' (found at
    ``w``), one ascent step on the inner loss gives, per layer ``l`` (weights with ≥ 2 dims),
    ``v_l = γ·‖w_l‖·g_l/‖g_l‖`` with ``g_l = ∂L_inner/∂w_l``, so ``‖v_l‖ = γ‖w_l‖``. ``v`` is
    added before the loss whose gradient the trainer takes and removed in ``after_step()``: the
    optimizer uses gradients at ``w + v`` but updates ``w``. When the trainer abandons the step
    (non-finite loss or gradients), ``abort_step()`` copies the saved ``w`` back, bitwise. The
    ascent gradient comes from one ``torch.autograd.grad`` on the bare module (no ``.grad`` or
    optimizer touched) and leaves BatchNorm running statistics as they were (the reference runs
    it on a proxy copy).

    Args:
        model: the trained module (may be a DDP wrapper).
        attack: handed to the inner objective (``None``: the inner objective's default).
        inner: registry name of the wrapped objective (default ``"pgd_at"``) or an ``Objective``
            instance built on the same model (then no attack or inner hyper-parameters).
        gamma: relative size γ of the weight perturbation per layer (default 5e-3; the official
            code uses 1e-2 for AT-AWP on ResNet-18 and 5e-3 for TRADES-AWP).
        warmup: fraction of T before AWP starts (default 0: from the first epoch).
        **inner_hparams: hyper-parameters of the inner objective (e.g. ``beta=6.0``).

    Shape: as the inner objective.

    Example:
        >>> objective = AWP(model, inner="trades", gamma=5e-3, beta=6.0)
        >>> out = objective(x, y); out.loss.backward(); opt.step(); objective.after_step()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        inner: str | Objective = "pgd_at",
        gamma: float = 5e-3,
        warmup: float = 0.0,
        **inner_hparams,
    ) -> None:
        self.gamma = check_hparam("gamma", gamma, 0.0)
        self.warmup = check_hparam("warmup", warmup, 0.0, 1.0)
        if isinstance(inner, Objective):
            if attack is not None or inner_hparams:
                raise ValueError("inner: pass either an Objective instance or a name with "
                                 "attack/hyper-parameters, not both")
            self.inner = inner
        elif inner == "awp":
            raise ValueError("inner must not be 'awp' (AWP wraps another objective)")
        else:
            from robustkit.objectives import create_objective  # the registry imports this file

            self.inner = create_objective(inner, model, attack, **inner_hparams)
        super().__init__(model, self.inner.attack)
        # (param, w, w + v) of the perturbation currently applied, until after_step()
        self._applied: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def perturb(self, x: Tensor, y: Tensor, ctx: TrainContext) -> AttackResult | None:
        return self.inner.perturb(x, y, ctx)  # x' is found at the unperturbed weights w

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if self._applied:  # after_step() was skipped: never stack two perturbations
            logger.warning("AWP.loss called again before after_step(); restoring the weights")
            self._restore()
        active = self.gamma > 0 and warmup_done(ctx.epoch, ctx.epochs, self.warmup)
        if active:
            self._perturb_weights(x, y, adv, ctx)
        try:
            out = self.inner.loss(x, y, adv, ctx)
        except BaseException:
            self._put_back()  # nobody will call after_step(): never leave the weights at w + v
            raise
        out.metrics["awp_active"] = torch.tensor(float(active), device=out.loss.device)
        return out

    def after_step(self) -> None:
        """Remove ``v`` (the optimizer's update is kept), then the inner objective's hook."""
        self._restore()
        self.inner.after_step()

    def abort_step(self) -> None:
        """No update happened: put back ``w`` exactly, then the inner objective's hook."""
        self._put_back()
        self.inner.abort_step()

    def _layers(self, bare: nn.Module) -> list[nn.Parameter]:
        # conv/linear weights only: biases and BatchNorm affine parameters (≤ 1 dim) are left
        # alone, as in the reference's diff_in_weights
        return [p for name, p in bare.named_parameters()
                if p.requires_grad and p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight"]

    def _perturb_weights(self, x: Tensor, y: Tensor, adv: AttackResult | None,
                         ctx: TrainContext) -> None:
        bare = unwrap(self.model)
        params = self._layers(bare)
        if not params:
            return
        buffers = [b.detach().clone() for b in bare.buffers()]
        wrapped, self.inner.model = self.inner.model, bare  # ascent pass: no DDP hooks
        try:
            with torch.enable_grad():
                ascent = self.inner.loss(x, y, adv, ctx).loss
            grads = torch.autograd.grad(ascent, params, allow_unused=True)
        finally:
            self.inner.model = wrapped
            with torch.no_grad():  # the ascent pass is not a training forward: undo BN updates
                for b, saved in zip(bare.buffers(), buffers, strict=True):
                    b.copy_(saved)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                w = p.detach().clone()
                p.add_(self.gamma * w.norm() * g / (g.norm() + _NORM_EPS))
                self._applied.append((p, w, p.detach().clone()))

    def _restore(self) -> None:
        # p - (w + v) + w rather than p - v: exact when no optimizer step happened in between
        with torch.no_grad():
            for p, w, wv in self._applied:
                p.sub_(wv).add_(w)
        self._applied = []

    def _put_back(self) -> None:
        # a copy, not p - (w + v) + w: w + v may be NaN (a non-finite ascent gradient), and
        # NaN - NaN + w is NaN; the saved w is the only exact way back
        with torch.no_grad():
            for p, w, _ in self._applied:
                p.copy_(w)
        self._applied = []

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"AWP(inner={self.inner!r}, gamma={self.gamma})"

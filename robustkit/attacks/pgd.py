"""Projected gradient descent, L∞ and L2 (methods.md §1.1-1.4, FAT early stopping §2.4)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult, Norm
from robustkit.attacks.losses import LOSSES, TARGETED_LOSSES, LossFn

__all__ = ["PGD"]

logger = logging.getLogger(__name__)

RandomStart = bool | Literal["uniform", "normal"]
# TRADES/MART start: x + 0.001·N(0, I) (yaodongyu/TRADES:trades.py).
_NORMAL_START_STD = 1e-3
# Added to gradient norms before dividing (torchattacks' PGDL2 uses the same constant).
_NORM_EPS = 1e-10


@dataclass
class _Active:
    """The samples still being attacked in one restart, compacted to the front (row i of every
    tensor is the same sample); ``ids`` maps rows back to the full batch (``None``: identity)."""

    ids: Tensor | None
    x0: Tensor
    y: Tensor
    target: Tensor | None
    lo: Tensor | None  # L∞ feasible box: [max(x - eps, 0), min(x + eps, 1)]
    hi: Tensor | None
    eps: Tensor | float  # (n, 1, .., 1) view or a float shared by the batch
    alpha: Tensor | float
    clean: Tensor | None  # clean logits (loss "kl")
    counter: Tensor | None  # FAT: remaining extra steps
    xa: Tensor  # current iterate
    kappa: Tensor
    bx: Tensor | None = None  # best iterate so far (select="best")
    bobj: Tensor | None = None
    bsucc: Tensor | None = None

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in ``rows`` (the batch the model sees really shrinks)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() > 0:
                setattr(self, f.name, v.index_select(0, rows))
        if self.ids is None:
            self.ids = rows


class PGD(Attack):
    """Projected gradient descent (Madry et al., https://arxiv.org/abs/1706.06083).

    L∞: ``x <- clip_[0,1](clip_ball(x + alpha·sign(g)))``; L2: ``x <- x + alpha·g/(‖g‖ + 1e-10)``,
    then ``delta·min(1, eps/‖delta‖)`` and a clip to [0, 1]. The gradient is taken of the *sum* of
    per-sample losses with ``torch.autograd.grad`` on the input only, so a sample's path does not
    depend on the rest of the batch and no parameter's ``.grad`` is touched.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``.
        eps: budget in pixel units (default 8/255).
        alpha: step size in pixel units (default 2/255; for L2 the length of each step).
        steps: number of gradient steps, >= 1 (default 10).
        random_start: ``True``/``"uniform"`` (L∞: U[-eps, eps]; L2: Gaussian direction times a
            U(0, 1) radius times eps, torchattacks' convention), ``"normal"`` (TRADES:
            x + 0.001·N(0, I)) or ``False`` (start at x). Every start is projected onto the
            feasible set.
        norm: ``"Linf"`` or ``"L2"``.
        loss: ``"ce"``, ``"cw"``, ``"kl"`` (KL(p(x) ‖ p(x')), p(x) fixed), ``"dlr"``, or a callable
            ``fn(logits, y, clean_logits) -> (N,)`` to maximise (see ``losses.py``).
        restarts: random restarts; later ones skip samples already broken (needs select="best").
        targeted: minimise the targeted loss towards ``perturb(..., target=t)`` (random classes
            != y from ``generator`` when no target is given); success means argmax == target.
        stop_on_success: stop attacking a sample once it is misclassified (at the clean point or
            any iterate); the batch given to the model shrinks. For evaluation.
        select: ``"best"`` (per sample a successful iterate if any, else the highest-loss one,
            the final iterate included; worst case over restarts) or ``"last"`` (training).
        generator: ``torch.Generator`` for random starts, targets and step noise (default:
            global RNG).
        step_noise: std ω of Gaussian noise added to every step before its projection (FAT's
            ``x + α·sign(g) + ω·N(0, I)``, Zhang et al. 2020, ω = 0.001; default 0: none).

    Shape:
        x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)``; x_adv: like x.

    Example:
        >>> attack = PGD(model, eps=8/255, alpha=2/255, steps=10)
        >>> x_adv = attack(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: RandomStart = True,
        norm: Norm = "Linf",
        loss: Literal["ce", "cw", "kl", "dlr"] | LossFn = "ce",
        restarts: int = 1,
        targeted: bool = False,
        stop_on_success: bool = False,
        select: Literal["best", "last"] = "best",
        generator: torch.Generator | None = None,
        step_noise: float = 0.0,
    ) -> None:
        super().__init__(model, eps, norm)
        self.alpha = float(alpha)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            # steps=0 returned the (random) start unattacked: an "adversarial" accuracy that is
            # clean accuracy. Natural training builds no attack at all.
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if random_start not in (True, False, "uniform", "normal"):
            raise ValueError(f"random_start must be True, False, 'uniform' or 'normal', "
                             f"got {random_start!r}")
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
        if targeted and not callable(loss) and loss not in TARGETED_LOSSES:
            raise ValueError(f"loss {loss!r} has no targeted form; use one of "
                             f"{sorted(TARGETED_LOSSES)}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
        if select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', got {select!r}")
        if restarts > 1 and select != "best":
            raise ValueError("restarts > 1 needs select='best' (the worst case over restarts)")
        self.step_noise = float(step_noise)
        if not (self.step_noise >= 0 and math.isfinite(self.step_noise)):
            raise ValueError(f"step_noise must be finite and >= 0, got {step_noise!r}")
        self.steps = steps
        if 0 < steps * self.alpha < self.eps * (1 - 1e-6):
            # The iterates cannot reach the boundary of the ball: a natural model then looks
            # robust (a held-out PGD-5 with alpha 0.01 at eps 0.3 reported 80 % for one).
            logger.warning("PGD: steps x alpha = %d x %.4g = %.4g cannot reach eps = %.4g; "
                           "the attack is weaker than its budget says (use alpha >= eps/steps, "
                           "e.g. eps/4 with >= 4 steps)", steps, self.alpha,
                           steps * self.alpha, self.eps)
        self.random_start: RandomStart = random_start
        self.loss = loss
        self.restarts = restarts
        self.targeted = bool(targeted)
        self.stop_on_success = bool(stop_on_success)
        self.select = select
        self.generator = generator
        if callable(loss):
            self._loss_fn: LossFn = loss
        else:
            self._loss_fn = (TARGETED_LOSSES if targeted else LOSSES)[loss]

    def perturb(self, x: Tensor, y: Tensor, *, eps: float | Tensor | None = None,
                alpha: float | Tensor | None = None, tau: int | None = None,
                target: Tensor | None = None, clean_logits: Tensor | None = None) -> AttackResult:
        """Attack ``(x, y)``.

        Args:
            eps, alpha: override the budget / step size: a float or ``(N,)`` per-sample values.
                Samples with ``eps_i == 0`` are returned unchanged and never reach the model.
            tau: FAT early stopping: before each step a misclassified sample spends one unit of a
                counter starting at ``tau``; once it is exhausted the sample is frozen at its
                current iterate (``None``: no early stopping; ``tau >= steps``: plain PGD).
            target: ``(N,)`` target classes (``targeted=True`` only).
            clean_logits: ``(N, K)`` clean logits for ``loss="kl"`` (saves one forward).

        Returns:
            ``AttackResult(x_adv, info)`` with ``(N,)`` tensors ``eps``, ``steps_used`` (gradient
            evaluations), ``stopped``, ``kappa`` (iterates x_0..x_{K-1} classified correctly) and,
            with ``select="best"``, ``success``; ``target`` when targeted.
        """
        return super().perturb(x, y, eps=eps, alpha=alpha, tau=tau, target=target,
                               clean_logits=clean_logits)

    # ---------------------------------------------------------------- internals
    def _budget(self, value: float | Tensor | None, default: float, x: Tensor, name: str) -> Tensor:
        v = torch.as_tensor(default if value is None else value, dtype=x.dtype, device=x.device)
        if v.dim() == 0:
            v = v.expand(x.shape[0])
        if v.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a float or a ({x.shape[0]},) tensor, "
                             f"got shape {tuple(v.shape)}")
        if not bool(((v >= 0) & torch.isfinite(v)).all()):
            raise ValueError(f"{name} must be finite and >= 0")
        return v.detach()

    def _rand(self, shape: tuple[int, ...], like: Tensor, normal: bool = False) -> Tensor:
        g = self.generator
        dev = like.device if g is None else g.device
        draw = torch.randn if normal else torch.rand
        return draw(shape, generator=g, device=dev, dtype=like.dtype).to(like.device)

    def _objective(self, logits: Tensor, s: _Active) -> Tensor:
        """The per-sample quantity PGD maximises."""
        if self.targeted:
            if callable(self.loss):
                return -self._loss_fn(logits, s.target, s.clean)
            # The true label too: APGD-T's targeted DLR compares z_y with z_t (methods.md §1.5).
            return -self._loss_fn(logits, s.target, s.clean, y=s.y)
        return self._loss_fn(logits, s.y, s.clean)

    def _success(self, logits: Tensor, s: _Active) -> tuple[Tensor, Tensor]:
        pred = logits.argmax(dim=1)
        correct = pred == s.y
        return correct, (pred == s.target) if self.targeted else ~correct

    def _view(self, v: Tensor, x: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * (x.dim() - 1)))

    def _project(self, xa: Tensor, s: _Active) -> Tensor:
        if self.norm == "Linf":  # two box clips in a row = exact projection (methods.md §1.1)
            return torch.clamp(xa, s.lo, s.hi)
        delta = xa - s.x0
        factor = (s.eps / self._view(delta.flatten(1).norm(dim=1), xa)).clamp(max=1.0)
        return (s.x0 + delta * factor).clamp_(0.0, 1.0)

    def _start(self, s: _Active) -> Tensor:
        x0, mode = s.x0, self.random_start
        if mode is False:
            return x0.clone()
        if mode == "normal":
            return self._project(x0 + _NORMAL_START_STD * self._rand(x0.shape, x0, True), s)
        if self.norm == "Linf":
            return self._project(x0 + (2 * self._rand(x0.shape, x0) - 1) * s.eps, s)
        n = self._rand(x0.shape, x0, normal=True)
        radius = self._view(self._rand((x0.shape[0],), x0), x0) * s.eps
        n = n * (radius / self._view(n.flatten(1).norm(dim=1) + _NORM_EPS, x0))
        return self._project(x0 + n, s)

    def _step(self, xa: Tensor, g: Tensor, s: _Active) -> Tensor:
        if self.norm == "Linf":
            g = g.sign_()
            xa = xa.add(g, alpha=s.alpha) if isinstance(s.alpha, float) else xa.addcmul(g, s.alpha)
            return self._noise(xa).clamp_(s.lo, s.hi)
        scale = s.alpha / self._view(g.flatten(1).norm(dim=1) + _NORM_EPS, xa)
        return self._project(self._noise(xa.addcmul(g, scale)), s)

    def _noise(self, xa: Tensor) -> Tensor:
        """Add ``step_noise·N(0, I)`` in place (``xa`` is a fresh tensor), before the projection."""
        if self.step_noise > 0:
            xa.add_(self._rand(xa.shape, xa, normal=True), alpha=self.step_noise)
        return xa

    def _perturb(self, x: Tensor, y: Tensor, eps=None, alpha=None, tau=None, target=None,
                 clean_logits=None) -> AttackResult:
        n = x.shape[0]
        if tau is not None and (isinstance(tau, bool) or int(tau) != tau or tau < 0):
            raise ValueError(f"tau must be None or an int >= 0, got {tau!r}")
        if target is not None and not self.targeted:
            raise ValueError("target given but the attack was built with targeted=False")
        if clean_logits is not None and clean_logits.shape[0] != n:
            raise ValueError(f"clean_logits must have {n} rows, got {tuple(clean_logits.shape)}")
        eps_v = self._budget(eps, self.eps, x, "eps")
        per_sample = isinstance(eps, Tensor) or isinstance(alpha, Tensor)
        alpha_v = self._budget(alpha, self.alpha, x, "alpha") if per_sample else None
        # A float override replaces the constructor's value for this call (as a tensor does).
        alpha_f = _scalar(alpha, self.alpha, "alpha")
        if not isinstance(eps, Tensor):
            _scalar(eps, self.eps, "eps")
        if self.targeted:
            target = self._targets(x, y, target, clean_logits)

        info = {"eps": eps_v, "steps_used": torch.zeros(n, dtype=torch.long, device=x.device),
                "stopped": torch.zeros(n, dtype=torch.bool, device=x.device),
                "kappa": torch.zeros(n, dtype=torch.long, device=x.device)}
        out = {"x": x.clone(), "obj": torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device),
               "success": torch.zeros(n, dtype=torch.bool, device=x.device)}
        # Samples with eps_i == 0 never enter the computed batch (one sync, only for tensors).
        attacked = eps_v > 0
        ids: Tensor | None = None
        if isinstance(eps, Tensor):
            if not bool(attacked.all()):
                ids = attacked.nonzero().squeeze(1)
        elif float(self.eps if eps is None else eps) == 0:
            ids = torch.zeros(0, dtype=torch.long, device=x.device)
        for r in range(self.restarts):
            if r > 0:  # later restarts only attack the samples no restart has broken yet
                ids = (attacked & ~out["success"]).nonzero().squeeze(1)
            if ids is not None and ids.numel() == 0:
                break
            s = self._gather(x, y, target, eps_v, alpha_v, eps, alpha_f, clean_logits, ids, tau)
            self._restart(s, tau, first=r == 0, out=out, info=info)
        if self.select == "best":
            info["success"] = out["success"]
        if self.targeted:
            info["target"] = target
        return AttackResult(out["x"], info)

    def _targets(self, x, y, target, clean_logits) -> Tensor:
        if target is not None:
            if target.shape != y.shape:
                raise ValueError(f"target must have shape {tuple(y.shape)}")
            return target.to(y.device)
        if clean_logits is not None:
            k = clean_logits.shape[1]
        else:
            with torch.no_grad():  # one sample is enough to learn the number of classes
                k = self.model(x[:1]).shape[1]
        shift = torch.randint(1, k, y.shape, generator=self.generator,
                              device=y.device if self.generator is None else self.generator.device)
        return (y + shift.to(y.device)) % k  # uniform over the classes != y

    def _gather(self, x, y, target, eps_v, alpha_v, eps, alpha_f, clean_logits, ids,
                tau) -> _Active:
        def sel(t: Tensor | None) -> Tensor | None:
            return t if t is None or ids is None else t.index_select(0, ids)

        x0 = sel(x)
        if isinstance(eps, Tensor) or alpha_v is not None:
            e: Tensor | float = self._view(sel(eps_v), x0)
        else:
            e = float(self.eps if eps is None else eps)
        a = self._view(sel(alpha_v), x0) if alpha_v is not None else alpha_f
        lo = hi = None
        if self.norm == "Linf":
            lo, hi = (x0 - e).clamp_(min=0.0), (x0 + e).clamp_(max=1.0)
        clean = sel(clean_logits)
        if clean is None and not callable(self.loss) and self.loss == "kl":
            with torch.no_grad():  # the fixed clean prediction p(x) of the KL loss
                clean = self.model(x0)
        counter = None
        if tau is not None:
            counter = torch.full((x0.shape[0],), int(tau), dtype=torch.long, device=x.device)
        kappa = torch.zeros(x0.shape[0], dtype=torch.long, device=x.device)
        return _Active(ids, x0, sel(y), sel(target), lo, hi, e, a, clean, counter, x0, kappa)

    def _commit(self, s: _Active, rows: Tensor | None, grads: int, stopped: bool, out, info):
        """Write the rows' results into the full-batch outputs (worst case over restarts)."""
        def sel(t: Tensor) -> Tensor:
            return t if rows is None else t.index_select(0, rows)

        ids = s.ids if rows is None else (rows if s.ids is None else s.ids.index_select(0, rows))
        if ids is None:  # the whole batch, in order: plain assignments, no scatter
            ids = slice(None)
        info["steps_used"][ids] += grads
        info["kappa"][ids] += sel(s.kappa)
        info["stopped"][ids] = stopped
        if self.select == "last":
            if isinstance(ids, slice):
                out["x"] = s.xa  # every sample finished together: no copy needed
            else:
                out["x"][ids] = sel(s.xa)
            return
        bx, bobj, bsucc = sel(s.bx), sel(s.bobj), sel(s.bsucc)
        better = bsucc | (bobj > out["obj"][ids])  # earlier restarts' samples here never succeeded
        out["x"][ids] = torch.where(self._view(better, bx), bx, out["x"][ids])
        out["obj"][ids] = torch.where(better, bobj, out["obj"][ids])
        out["success"][ids] |= bsucc

    def _track(self, s: _Active, xa: Tensor, obj: Tensor, succ: Tensor) -> None:
        if s.bx is None:
            s.bx, s.bobj, s.bsucc = xa, obj, succ.clone()
            return
        better = ~s.bsucc & (succ | (obj > s.bobj))  # keep the first success, else the max loss
        s.bx = torch.where(self._view(better, xa), xa, s.bx)
        s.bobj = torch.where(better, obj, s.bobj)
        s.bsucc |= succ

    def _leave(self, s: _Active, leave: Tensor, grads: int, out, info) -> Tensor | None:
        """Commit and drop the rows in ``leave``; returns the rows kept (``None``: no change)."""
        if not bool(leave.any()):  # the one sync per step that shrinking costs
            return None
        self._commit(s, leave.nonzero().squeeze(1), grads, True, out, info)
        rows = (~leave).nonzero().squeeze(1)
        s.keep(rows)
        return rows

    def _restart(self, s: _Active, tau: int | None, first: bool, out, info) -> None:
        best = self.select == "best"
        start = self._start(s)
        if self.stop_on_success and first and self.random_start is not False:
            # x_0 is random, so the clean point is checked first: a sample it already fools is
            # returned as is and never attacked. The clean point stays a candidate for "best".
            with torch.no_grad():
                clean = s.clean if s.clean is not None else self.model(s.x0)
                _, succ = self._success(clean, s)
                s.xa = s.x0
                if best:
                    self._track(s, s.x0, self._objective(clean, s), succ)
                rows = self._leave(s, succ, 0, out, info)
            if rows is not None:
                if rows.numel() == 0:
                    return
                start = start.index_select(0, rows)
        s.xa = start
        shrink = self.stop_on_success or tau is not None
        for t in range(self.steps):
            xa = s.xa.requires_grad_(True)
            logits = self.model(xa)
            obj = self._objective(logits, s)
            (g,) = torch.autograd.grad(obj.sum(), xa)
            xa = xa.detach()
            with torch.no_grad():
                correct, succ = self._success(logits.detach(), s)
                s.kappa += correct
                if best:
                    self._track(s, xa, obj.detach(), succ)
                if shrink:
                    leave = succ if self.stop_on_success else torch.zeros_like(succ)
                    if tau is not None:  # FAT: a misclassified sample spends a unit, or freezes
                        frozen = succ & (s.counter == 0)
                        s.counter -= (succ & ~frozen).long()
                        leave = leave | frozen
                    s.xa = xa  # a frozen sample keeps its current iterate
                    rows = self._leave(s, leave, t + 1, out, info)
                    if rows is not None:
                        if rows.numel() == 0:
                            return
                        xa, g = s.xa, g.index_select(0, rows)
                s.xa = self._step(xa, g, s)
        if best:
            with torch.no_grad():  # the final iterate is a candidate too
                logits = self.model(s.xa)
                self._track(s, s.xa, self._objective(logits, s), self._success(logits, s)[1])
        self._commit(s, None, self.steps, False, out, info)


def _scalar(value: float | Tensor | None, default: float, name: str) -> float:
    """A per-call float override (or the constructor's value), checked finite and >= 0."""
    if isinstance(value, Tensor):
        return default  # per-sample tensors are handled by PGD._budget
    v = float(default if value is None else value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v

"""Any torchattacks attack behind the ``Attack`` seam (an optional extra)."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import logging

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.utils import frozen_parameters

__all__ = ["TorchAttack"]

logger = logging.getLogger(__name__)


def _torchattacks():
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError("torchattacks is not installed: pip install robustkit[torchattacks]"
                          ) from err
    return torchattacks


@contextlib.contextmanager
def _quiet():
    """torchattacks prints (mode changes, device notices): route its stdout to the log."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        logger.debug("torchattacks: %s", buf.getvalue().strip())


class TorchAttack(Attack):
    """Wraps ``torchattacks.<name>(model, **kwargs)`` (https://github.com/Harry24k/adversarial-attacks-pytorch).

    torchattacks takes [0, 1] inputs, so its ``eps`` is in our pixel units; the attack's own
    defaults apply to everything not given. Parameters are frozen during the call so that
    attacks which call ``backward()`` (CW, FAB, DeepFool, ...) leave every ``.grad`` untouched.
    ``torchattacks.AutoAttack`` runs 10-iteration APGD: never report it as AutoAttack
    (use ``robustkit.attacks.AutoAttack``).

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits.
        name: class name in ``torchattacks`` (``"PGD"``, ``"CW"``, ``"Square"``, ...).
        **kwargs: passed to the class (unknown names raise ``ValueError`` listing the accepted).

    Shape:
        x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)``; x_adv: like x.

    Example:
        >>> attack = TorchAttack(model, "PGD", eps=8/255, alpha=2/255, steps=10)
        >>> x_adv = attack(x, y)
    """

    def __init__(self, model: nn.Module, name: str, **kwargs) -> None:
        ta = _torchattacks()
        base = ta.attack.Attack
        known = [n for n in getattr(ta, "__all__", dir(ta))
                 if isinstance(getattr(ta, n, None), type) and issubclass(getattr(ta, n), base)]
        if name not in known:
            lower = {n.lower(): n for n in known}
            close = [lower[c] for c in difflib.get_close_matches(name.lower(), lower, n=5,
                                                                 cutoff=0.4)]
            raise ValueError(f"unknown torchattacks attack {name!r}; close: {close or known[:8]}")
        cls = getattr(ta, name)
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p not in ("self", "model")]
        bad = [k for k in kwargs if k not in accepted]
        if bad and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"torchattacks.{name} does not accept {bad}; accepted: {accepted}")

        def default(key: str, fallback):
            p = params.get(key)
            return kwargs.get(key, fallback if p is None or p.default is p.empty else p.default)

        norm = default("norm", "L2" if name.endswith("L2") else "Linf")
        # Unbounded attacks (CW, DeepFool, ...) have no eps: their budget is infinite.
        super().__init__(model, default("eps", float("inf")), norm if norm == "L2" else "Linf")
        self.name = name
        self.kwargs = dict(kwargs)
        with _quiet():
            self.attack = cls(model, **kwargs)

    def perturb(self, x: Tensor, y: Tensor, *, target: Tensor | None = None) -> AttackResult:
        """Run the attack (targeted by label when ``target`` is given); ``info["success"]``."""
        return super().perturb(x, y, target=target)

    def _perturb(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> AttackResult:
        # some torchattacks call backward(): frozen parameters keep every .grad untouched
        with frozen_parameters(self.model):
            with _quiet():
                if target is None:
                    x_adv = self.attack(x, y)
                else:
                    self.attack.set_mode_targeted_by_label(quiet=True)
                    try:
                        x_adv = self.attack(x, target)
                    finally:
                        self.attack.set_mode_default()
        x_adv = x_adv.detach().to(x.device, x.dtype)
        with torch.no_grad():  # one forward, so evaluators get the flags like from PGD
            pred = self.model(x_adv).argmax(dim=1)
        success = pred == target if target is not None else pred != y
        return AttackResult(x_adv, {"success": success})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"TorchAttack({self.name!r}{', ' if args else ''}{args})"

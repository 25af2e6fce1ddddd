"""Sanity checks before and after an evaluation (methods.md §1.5; AutoAttack's ``checks.py``).

Before attacking (``pre_checks``): eval mode, logits rather than probabilities, a deterministic
forward pass, no gradient computation inside the forward pass (a "dynamic" defence), non-zero
input gradients, and enough classes for the targeted attacks. After (``post_checks``): finite
logits on every evaluated point (``finite_logits``), every ``x_adv`` inside the threat ball, and
the gradient-masking signs of ``robustkit.evaluation.masking``
(Square breaking what the gradient attacks missed, a gradient attack far weaker than another).

Each check has a severity: ``"ok"``; ``"warning"`` (read the numbers with this in mind);
``"fail"`` (the numbers are not trustworthy as they stand: they go into the RobustBench footnote).
Checks never raise: the caller logs and stores them (``results.json["checks"]``).

Example:
    >>> checks = pre_checks(model, x[:256], y[:256], num_targets=9)
    >>> [c.message for c in checks if c.severity != "ok"]
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.utils import eval_mode

__all__ = ["Check", "Severity", "SEVERITIES", "pre_checks", "log_checks", "finite_logits",
           "BLACK_BOX", "ZERO_GRADIENT_FAIL"]

logger = logging.getLogger(__name__)

Severity = Literal["ok", "warning", "fail"]
SEVERITIES = ("ok", "warning", "fail")

# Score-based black-box attacks: when one beats every gradient attack, gradients are unreliable.
BLACK_BOX = ("square", "torchattacks:Square", "torchattacks:OnePixel", "torchattacks:Pixle")

# Zero input gradients on >= 2 % of the checked points (and more than one) make gradient attacks
# unreliable there; one or two saturated points in a batch happen in sound ReLU networks.
ZERO_GRADIENT_FAIL = 0.02


@dataclass
class Check:
    """One sanity check.

    Attributes:
        name: e.g. ``"logits"``, ``"black_box:autoattack/square"``.
        severity: ``"ok"``, ``"warning"`` or ``"fail"``.
        message: one line for people.
        details: the numbers behind the message (plain data).
    """

    name: str
    severity: Severity
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def passed(self) -> bool:
        """False only for ``"fail"``; a warning passes."""
        return self.severity != "fail"

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``passed``, ``severity``, ``message``, ``details`` (for results.json)."""
        d = asdict(self)
        return {"name": d["name"], "passed": self.passed, "severity": d["severity"],
                "message": d["message"], "details": d["details"]}


def pre_checks(model: nn.Module, x: Tensor, y: Tensor, *, num_targets: int = 0,
               repeats: int = 3, tol: float = 1e-5) -> list[Check]:
    """Checks to run before attacking, on one batch (the model's mode is left as it was).

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to ``(N, K)`` outputs.
        x: ``(N, C, H, W) in [0, 1]`` (a few hundred images suffice).
        y: ``(N,)`` labels.
        num_targets: target classes the configured targeted attacks need (AutoAttack standard: 9
            for APGD-T and FAB-T); 0 skips the class-count check.
        repeats: forward passes compared by the determinism check (default 3).
        tol: tolerance of the probability and determinism checks (AutoAttack uses 1e-5 / 1e-4).

    Returns:
        Checks in a fixed order: eval_mode, logits, deterministic, dynamic, gradients, n_classes.
    """
    out = [_check_eval_mode(model)]
    # the remaining checks look at the model as it is attacked (methods.md §1.1)
    with eval_mode(model):
        with torch.no_grad():
            outs = [model(x) for _ in range(repeats)]
        out.append(_check_logits(outs[0], tol))
        out.append(_check_deterministic(outs, tol))
        out.append(_check_dynamic(model, x))
        out.append(_check_gradients(model, x, y))
        if num_targets:
            out.append(_check_n_classes(outs[0].shape[1], num_targets))
    log_checks(out)
    return out


def finite_logits(result) -> Check:
    """``"fail"`` when the model's logits were NaN or inf on any point (``EvalResult.nonfinite``).

    Such points already count as incorrect (clean and under every attack); the check says how
    many there were per pass, since a model that overflows makes every accuracy suspect.
    """
    counts = {k: int(v.sum()) for k, v in getattr(result, "nonfinite", {}).items()
              if v is not None}
    bad = {k: c for k, c in counts.items() if c}
    points = set()
    for k in bad:
        points.update(result.nonfinite[k].nonzero().flatten().tolist())
    if not bad:
        return Check("finite_logits", "ok", "logits are finite on every evaluated point",
                     {"nonfinite_points": 0, "per_pass": counts})
    where = ", ".join(f"{c} under {k}" for k, c in bad.items())
    return Check("finite_logits", "fail",
                 f"the model's logits are NaN or inf on {len(points)} of {result.n} points "
                 f"({where}); they are counted as incorrect", {
                     "nonfinite_points": len(points), "per_pass": counts,
                     "first_points": sorted(points)[:20]})


def log_checks(checks: list[Check]) -> None:
    """Log each check: ``ok`` at INFO, ``warning`` and ``fail`` at WARNING."""
    for c in checks:
        (logger.info if c.severity == "ok" else logger.warning)("check %s [%s]: %s", c.name,
                                                                c.severity, c.message)


def _check_eval_mode(model: nn.Module) -> Check:
    training = [n for n, m in model.named_modules() if m.training]
    # a warning: robustkit evaluates in eval mode anyway (RobustBench warns too)
    return Check("eval_mode", "warning" if training else "ok", "model is in eval mode"
                 if not training else "model is in train mode; it is evaluated in eval mode",
                 {"training_modules": training[:10]})


def _check_logits(out: Tensor, tol: float) -> Check:
    probs = bool(out.max() < 1 + tol and out.min() > -tol
                 and ((out.sum(-1) - 1).abs() < tol).all())
    # fail: cross-entropy on probabilities saturates, so the attacks' losses are flat
    return Check("logits", "fail" if probs else "ok", "outputs look like probabilities (rows "
                 "sum to 1); attacks need logits" if probs else "outputs are logits")


def _check_deterministic(outs: list[Tensor], tol: float) -> Check:
    diff = max(((o - outs[0]).abs().max().item() for o in outs[1:]), default=0.0)
    scale = outs[0].abs().max().item() + 1e-12
    ok = diff <= tol * max(scale, 1.0)
    # fail: attacks without EOT overestimate the robustness of a randomised model
    return Check("deterministic", "ok" if ok else "fail", "forward pass is deterministic" if ok
                 else f"forward pass is randomised (outputs differ by {diff:.3g}); use EOT "
                 "attacks (AutoAttack version='rand')", {"max_diff": diff})


def _check_dynamic(model: nn.Module, x: Tensor) -> Check:
    """Counts autograd calls inside one forward pass, as AutoAttack's ``check_dynamic`` does."""
    names, calls = {"grad", "backward", "_make_grads"}, []

    def trace(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names:
            calls.append(frame.f_code.co_name)
        return None

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        with torch.no_grad():
            model(x[:2])
    finally:
        sys.settrace(old)
    # a warning, as in AutoAttack: the trace matches any function named "grad", not only autograd
    return Check("dynamic", "warning" if calls else "ok", "forward pass takes no gradients"
                 if not calls else "forward pass computes gradients (a dynamic defence); "
                 "AutoAttack may be insufficient", {"calls": len(calls)})


def _check_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Check:
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # input gradient only: torch.autograd.grad leaves .grad untouched
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    fail = zero > 1 and zero >= ZERO_GRADIENT_FAIL * len(x)
    return Check("gradients", "fail" if fail else "warning" if zero else "ok",
                 "input gradients are non-zero" if not zero else
                 f"{zero} of {len(x)} points have a zero input gradient; gradient-based attacks "
                 "are unreliable there", {"zero_gradient_points": zero})


def _check_n_classes(num_classes: int, num_targets: int) -> Check:
    ok = num_classes >= num_targets + 1
    # fail: the targeted attacks cannot run as configured
    return Check("n_classes", "ok" if ok else "fail",
                 f"{num_classes} classes for {num_targets} target classes"
                 + ("" if ok else ": too few classes for the targeted attacks"),
                 {"num_classes": num_classes, "num_targets": num_targets})

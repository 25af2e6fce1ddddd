"""Sanity checks before and after an evaluation (methods.md §1.5; AutoAttack's ``checks.py``).

Before attacking: eval mode, logits rather than probabilities, a deterministic forward pass, no
gradient computation inside the forward pass (a "dynamic" defence), non-zero input gradients, and
enough classes for the targeted attacks. After: a black-box attack beating the white-box ones, or a
stronger PGD giving *higher* accuracy than a weaker one, both signs of gradient masking; and every
``x_adv`` inside the threat ball. Checks never raise: each returns a ``Check`` that the caller logs
and stores (``results.json["checks"]``).

Example:
    >>> checks = pre_checks(model, x[:256], y[:256], num_targets=9)
    >>> [c.message for c in checks if not c.passed]
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.utils import eval_mode

__all__ = ["Check", "pre_checks", "post_checks", "BLACK_BOX"]

logger = logging.getLogger(__name__)

# Score-based black-box attacks: when one beats every white-box attack, gradients are unreliable.
BLACK_BOX = ("square", "torchattacks:Square", "torchattacks:OnePixel", "torchattacks:Pixle")


@dataclass
class Check:
    """One sanity check: ``passed`` False means a warning the evaluation should be read with."""

    name: str
    passed: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    for c in out:
        (logger.info if c.passed else logger.warning)("check %s: %s", c.name, c.message)
    return out


def post_checks(result, *, eps: float, strength: Mapping[str, tuple[str, int]] | None = None,
                black_box: tuple[str, ...] = BLACK_BOX, min_samples: int = 1,
                rel_tol: float = 0.002) -> list[Check]:
    """Checks on an ``EvalResult``: gradient masking signs and perturbation sizes.

    Args:
        result: ``robustkit.evaluation.EvalResult``.
        eps: the budget every ``x_adv`` must respect (same norm as the attacks).
        strength: attack name -> ``(family, effort)`` for attacks comparable by strength, e.g.
            ``{"pgd20": ("pgd-ce", 20), "pgd100x5": ("pgd-ce", 500)}``; within a family a larger
            effort must not give a higher accuracy.
        black_box: names treated as black-box attacks.
        min_samples: an accuracy gap is flagged only when larger than this many samples
            (default 1) and than ``rel_tol`` (default 0.2 %, AutoAttack's Square threshold).
    """
    acc, n = result.accuracy(), max(result.n, 1)
    tol = max(min_samples / n, rel_tol)
    checks = []
    for name, pert in result.max_perturbation.items():
        ok = pert <= eps * (1 + 1e-4) + 1e-6  # float32 rounding of the projection
        rel = "<=" if ok else "EXCEEDS"
        checks.append(Check(f"perturbation:{name}", ok,
                            f"max perturbation {pert:.6g} {rel} eps {eps:.6g}",
                            {"max_perturbation": pert, "eps": eps}))
    bb = [k for k in result.correct if k in black_box]
    wb = [k for k in result.correct if k not in black_box]
    for k in bb:
        if not wb:
            break
        white = torch.stack([result.correct[w] for w in wb]).all(0)
        only_bb = int((white & ~result.correct[k]).sum())
        gap = min(acc[w] for w in wb) - acc[k]
        ok = gap <= tol
        checks.append(Check(
            f"black_box:{k}", ok,
            f"{k} accuracy {acc[k]:.2%} vs best white-box {min(acc[w] for w in wb):.2%}; "
            f"{only_bb} points broken only by {k}"
            + ("" if ok else ": possible gradient masking, try adaptive attacks"),
            {"gap": gap, "only_black_box": only_bb}))
    groups: dict[str, list[tuple[int, str]]] = {}
    for k, (family, effort) in (strength or {}).items():
        if k in result.correct:
            groups.setdefault(family, []).append((effort, k))
    for family, members in groups.items():
        members.sort()
        for (e_weak, weak), (e_strong, strong) in zip(members, members[1:], strict=False):
            if e_strong <= e_weak:
                continue
            gap = acc[strong] - acc[weak]
            reversed_ = int((result.correct[strong] & ~result.correct[weak]).sum())
            ok = gap <= tol
            checks.append(Check(
                f"monotone:{weak}<{strong}", ok,
                f"{strong} accuracy {acc[strong]:.2%} vs {weak} {acc[weak]:.2%}"
                + ("" if ok else ": more iterations gave higher accuracy (gradient masking?)"),
                {"gap": gap, "robust_to_strong_only": reversed_, "family": family}))
    for c in checks:
        (logger.info if c.passed else logger.warning)("check %s: %s", c.name, c.message)
    return checks


def _check_eval_mode(model: nn.Module) -> Check:
    training = [n for n, m in model.named_modules() if m.training]
    ok = not training
    return Check("eval_mode", ok, "model is in eval mode" if ok else
                 "model is in train mode; it is evaluated in eval mode (RobustBench warns too)",
                 {"training_modules": training[:10]})


def _check_logits(out: Tensor, tol: float) -> Check:
    probs = bool(out.max() < 1 + tol and out.min() > -tol
                 and ((out.sum(-1) - 1).abs() < tol).all())
    return Check("logits", not probs, "outputs look like probabilities (rows sum to 1); attacks "
                 "need logits" if probs else "outputs are logits (rows do not sum to 1)")


def _check_deterministic(outs: list[Tensor], tol: float) -> Check:
    diff = max(((o - outs[0]).abs().max().item() for o in outs[1:]), default=0.0)
    scale = outs[0].abs().max().item() + 1e-12
    ok = diff <= tol * max(scale, 1.0)
    return Check("deterministic", ok, "forward pass is deterministic" if ok else
                 f"forward pass is randomised (outputs differ by {diff:.3g}); use EOT attacks "
                 "(AutoAttack version='rand')", {"max_diff": diff})


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
    ok = not calls
    return Check("dynamic", ok, "forward pass takes no gradients" if ok else
                 "forward pass computes gradients (a dynamic defence); AutoAttack may be "
                 "insufficient", {"calls": len(calls)})


def _check_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Check:
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():  # input gradient only: torch.autograd.grad leaves .grad untouched
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    ok = zero == 0
    return Check("gradients", ok, "input gradients are non-zero" if ok else
                 f"{zero} of {len(x)} points have a zero input gradient; gradient-based attacks "
                 "are unreliable", {"zero_gradient_points": zero})


def _check_n_classes(num_classes: int, num_targets: int) -> Check:
    ok = num_classes >= num_targets + 1
    return Check("n_classes", ok, f"{num_classes} classes for {num_targets} target classes"
                 + ("" if ok else ": too few classes for the targeted attacks"),
                 {"num_classes": num_classes, "num_targets": num_targets})

"""Per-sample attack losses (methods.md §1.1, losses table).

Every function maps logits ``(N, K)`` to a per-sample loss ``(N,)``, so an attack can sum them for
its gradient (a sample's step then does not depend on the rest of the batch) and compare them per
sample to keep the best iterate. Untargeted losses are *maximised* by an attack. Targeted losses
take the target class in place of ``y`` and are *minimised* (PGD negates them).

All functions share the signature ``fn(logits, y, clean_logits=None) -> (N,)``; ``kl`` ignores
``y`` and needs ``clean_logits``. Targeted losses take the target in place of ``y`` and the true
label as the keyword ``y=`` (targeted DLR needs it).

Example:
    >>> from robustkit.attacks.losses import LOSSES
    >>> per_sample = LOSSES["cw"](model(x), y)
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ce", "cw", "kl", "dlr", "ce_targeted", "cw_targeted", "dlr_targeted", "LOSSES",
           "TARGETED_LOSSES", "LossFn"]

LossFn = Callable[..., Tensor]

# DLR's denominators get this constant so a sample with tied top logits gives a finite loss
# (the value used by fra31/auto-attack's dlr_loss).
_DLR_EPS = 1e-12


def ce(logits: Tensor, y: Tensor, clean_logits: Tensor | None = None) -> Tensor:
    """Cross-entropy ``-log p_y(x')`` per sample (maximised by untargeted attacks)."""
    return F.cross_entropy(logits, y, reduction="none")


def _other_max(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{k != y} z_k``: the true class is masked with -inf before the max."""
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1)


def cw(logits: Tensor, y: Tensor, clean_logits: Tensor | None = None,
       kappa: float | None = None) -> Tensor:
    """Carlini-Wagner margin ``max_{k != y} z_k - z_y`` (https://arxiv.org/abs/1608.04644).

    Args:
        kappa: optional clip at ``+kappa`` (GAIRAT's CW evaluation uses 50); ``None`` = no clip.
    """
    margin = _other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)
    return margin if kappa is None else margin.clamp(max=kappa)


def kl(logits: Tensor, y: Tensor | None = None, clean_logits: Tensor | None = None) -> Tensor:
    """``KL(p(x) || p(x'))`` summed over classes, ``p(x)`` fixed (the TRADES inner loss).

    ``clean_logits`` are detached here: the clean prediction is a constant target of the attack
    (https://arxiv.org/abs/1901.08573).
    """
    if clean_logits is None:
        raise ValueError("loss 'kl' needs clean_logits (the logits of the clean input)")
    log_p_clean = F.log_softmax(clean_logits.detach(), dim=1)
    return (log_p_clean.exp() * (log_p_clean - F.log_softmax(logits, dim=1))).sum(dim=1)


def _check_classes(logits: Tensor, k: int, name: str) -> None:
    if logits.shape[1] < k:
        raise ValueError(f"loss {name!r} needs at least {k} classes, got {logits.shape[1]}")


def dlr(logits: Tensor, y: Tensor, clean_logits: Tensor | None = None) -> Tensor:
    """Difference of logits ratio (Croce & Hein, https://arxiv.org/abs/2003.01690).

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, pi sorting the logits in decreasing
    order; scale-invariant in the logits. Needs K >= 3 (``ValueError`` otherwise).
    """
    _check_classes(logits, 3, "dlr")
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def ce_targeted(logits: Tensor, target: Tensor, clean_logits: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
    """``CE(f(x'), t)``, minimised by a targeted attack (methods.md §1.3)."""
    return F.cross_entropy(logits, target, reduction="none")


def cw_targeted(logits: Tensor, target: Tensor, clean_logits: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
    """``max_{k != t} z_k - z_t``, minimised: negative once the target class wins."""
    return cw(logits, target)


def dlr_targeted(logits: Tensor, target: Tensor, clean_logits: Tensor | None = None,
                 y: Tensor | None = None) -> Tensor:
    """Targeted DLR, minimised: the negation of APGD-T's maximised loss (needs K >= 4).

    ``(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``y`` the true label
    (fra31/auto-attack ``dlr_loss_targeted``); it needs ``y``: without it the loss is undefined.
    """
    _check_classes(logits, 4, "dlr_targeted")
    if y is None:
        raise ValueError("dlr_targeted needs y, the true labels (APGD-T compares z_y with z_t)")
    top = logits.topk(4, dim=1).values
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return (z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)


LOSSES: dict[str, LossFn] = {"ce": ce, "cw": cw, "kl": kl, "dlr": dlr}
TARGETED_LOSSES: dict[str, LossFn] = {"ce": ce_targeted, "cw": cw_targeted, "dlr": dlr_targeted}


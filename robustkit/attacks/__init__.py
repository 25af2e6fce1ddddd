"""Attacks: PGD (L∞/L2, per-sample ε, early stopping, restarts, targeted), FGSM, AutoAttack
through the official ``pyautoattack``, and any torchattacks attack.

Example:
    >>> from robustkit.attacks import create_attack
    >>> x_adv = create_attack("pgd", model, eps=8/255, steps=20)(x, y)
"""

from __future__ import annotations

import inspect

from torch import nn

from robustkit.attacks.autoattack import AutoAttack
from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.external import TorchAttack
from robustkit.attacks.fgsm import FGSM
from robustkit.attacks.losses import LOSSES
from robustkit.attacks.pgd import PGD

__all__ = ["Attack", "AttackResult", "PGD", "FGSM", "AutoAttack", "TorchAttack", "ATTACKS",
           "LOSSES", "create_attack"]

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "fgsm": FGSM, "autoattack": AutoAttack}

_TORCHATTACKS_PREFIX = "torchattacks:"


def create_attack(name: str, model: nn.Module, **kwargs) -> Attack:
    """Build an attack by name: a key of ``ATTACKS`` or ``"torchattacks:<Class>"``.

    Raises:
        ValueError: for an unknown name (listing the known ones) or an unknown keyword argument
            (listing the accepted ones).

    Example:
        >>> attack = create_attack("torchattacks:PGD", model, eps=8/255)
    """
    if name.startswith(_TORCHATTACKS_PREFIX):
        return TorchAttack(model, name[len(_TORCHATTACKS_PREFIX):], **kwargs)
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)} or "
                         f"'torchattacks:<Class>'")
    cls = ATTACKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ValueError(f"attack {name!r} does not accept {bad}; accepted: {accepted}")
    return cls(model, **kwargs)

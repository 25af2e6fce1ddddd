"""Training objectives: ``objective(x, y, ctx) -> ObjectiveOutput(loss, logits, metrics)``.

Example:
    >>> objective = create_objective("srd_dat", model, eps_hi=8/255, beta=6.0)
    >>> out = objective(x, y, TrainContext(epoch=0, epochs=100, idx=idx))
"""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from robustkit.attacks.base import Attack
from robustkit.objectives.awp import AWP
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext
from robustkit.objectives.fast_at import FastAT
from robustkit.objectives.fat import FAT
from robustkit.objectives.gairat import GAIRAT
from robustkit.objectives.igr import IGR
from robustkit.objectives.jr import JR
from robustkit.objectives.mart import MART
from robustkit.objectives.memory import SampleMemory
from robustkit.objectives.pgd_objective import PGDObjective
from robustkit.objectives.sagr import SAGR
from robustkit.objectives.sns import SNS
from robustkit.objectives.srd_dat import SRDDAT
from robustkit.objectives.standard import PGDAT, Natural
from robustkit.objectives.trades import TRADES

__all__ = ["OBJECTIVES", "create_objective", "accepted_hparams", "Objective", "ObjectiveOutput",
           "PGDObjective", "TrainContext", "SampleMemory", "Natural", "PGDAT", "TRADES", "MART",
           "FAT", "GAIRAT", "AWP", "SRDDAT", "FastAT",
           "IGR", "JR", "SAGR", "SNS"]

OBJECTIVES: dict[str, type[Objective]] = {
    "natural": Natural,
    "pgd_at": PGDAT,
    "trades": TRADES,
    "mart": MART,
    "fat": FAT,
    "gairat": GAIRAT,
    "awp": AWP,
    "srd_dat": SRDDAT,
    "fast_at": FastAT,
    "igr": IGR,
    "jr": JR,
    "sagr": SAGR,
    "sns": SNS,
}


def accepted_hparams(name: str) -> list[str]:
    """The keyword hyper-parameters of objective ``name`` (besides ``model`` and ``attack``)."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params
            if p.name not in ("self", "model", "attack")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def create_objective(
    name: str, model: nn.Module, attack: Attack | None = None, **hparams
) -> Objective:
    """Build objective ``name`` (a key of ``OBJECTIVES``) with keyword hyper-parameters.

    Numbers must already be floats (the CLI parses ``"8/255"``). ``awp`` forwards the
    hyper-parameters it does not know to its inner objective, which checks them.

    Raises:
        ValueError: unknown name (listing the known ones) or unknown hyper-parameter (naming
            it, the closest valid name and the accepted list).
    """
    cls = _lookup(name)
    accepted = accepted_hparams(name)
    takes_rest = any(p.kind is p.VAR_KEYWORD
                     for p in inspect.signature(cls.__init__).parameters.values())
    if not takes_rest:
        for key in hparams:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown hyper-parameter {key!r} for objective {name!r}{hint}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
    return cls(model, attack, **hparams)


def _lookup(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]

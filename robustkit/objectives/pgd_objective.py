"""``PGDObjective``: the shared base of objectives whose inner maximisation is one PGD."""

from __future__ import annotations

from torch import nn

from robustkit.attacks.base import Attack
from robustkit.objectives.base import Objective
from robustkit.objectives.functional import build_pgd, check_hparam

__all__ = ["PGDObjective"]


class PGDObjective(Objective):
    """An objective whose inner maximisation is one PGD at ``(eps, alpha, steps)``.

    Validates and stores the three budget hyper-parameters and, when ``attack`` is ``None``,
    builds the paper-default PGD on the bare module with the subclass's ``inner_loss`` and
    ``random_start`` (class attributes), keeping the last iterate (methods.md §1.1).
    """

    inner_loss: str = "ce"
    random_start: bool | str = True

    def __init__(self, model: nn.Module, attack: Attack | None = None, *, eps: float,
                 alpha: float, steps: int) -> None:
        self.eps = check_hparam("eps", eps, 0.0, 1.0)
        self.alpha = check_hparam("alpha", alpha, 0.0, low_open=True)
        self.steps = int(check_hparam("steps", steps, 1))
        if attack is None:
            attack = build_pgd(model, eps=self.eps, alpha=self.alpha, steps=self.steps,
                               loss=self.inner_loss, random_start=self.random_start)
        super().__init__(model, attack)

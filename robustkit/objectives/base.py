"""The ``Objective`` seam: ``objective(x, y, ctx) -> ObjectiveOutput(loss, logits, metrics)``.

An objective may call its attack and the model as often as it needs (and take input gradients
with ``create_graph=True``) but never calls ``backward``, touches the optimizer, the scheduler or
clipping, or knows about ranks, files and loggers (architecture.md §3). Two hooks let the trainer
tell it how a step ended: ``after_step()`` after ``optimizer.step()``, ``abort_step()`` when the
step was abandoned (non-finite loss or gradients) and no update happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult

__all__ = ["Objective", "ObjectiveOutput", "TrainContext", "detach_metrics"]


@dataclass
class TrainContext:
    """Where training stands when a batch is processed.

    Attributes:
        epoch: current epoch, counted from 0.
        epochs: total number of epochs T (schedules are pure functions of (epoch, epochs)).
        step: global optimisation step, counted from 0.
        idx: ``(N,)`` dataset indices of the batch (per-sample memory), or ``None``.
    """

    epoch: int = 0
    epochs: int = 1
    step: int = 0
    idx: Tensor | None = None


@dataclass
class ObjectiveOutput:
    """What an objective returns for one batch.

    Attributes:
        loss: scalar tensor with a graph; the trainer calls ``backward`` on it.
        logits: ``(N, K)`` logits the trainer uses for ``train/acc`` (clean logits, or adversarial
            ones for objectives that only see x').
        metrics: detached tensors: 0-dim ones are logged as scalars ``train/<key>``, ``(N,)`` ones
            as histograms ``hist/<key>`` (methods.md §7.3 names).
    """

    loss: Tensor
    logits: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class: ``__call__ = loss(x, y, perturb(x, y, ctx), ctx)``.

    Args:
        model: the module trained (it may be a DDP wrapper; attacks get the bare module).
        attack: the perturbation generator, or ``None`` (the null generator).
    """

    def __init__(self, model: nn.Module, attack: Attack | None = None) -> None:
        self.model = model
        self.attack = attack

    def __call__(self, x: Tensor, y: Tensor, ctx: TrainContext | None = None) -> ObjectiveOutput:
        ctx = ctx if ctx is not None else TrainContext()
        return self.loss(x, y, self.perturb(x, y, ctx), ctx)

    def perturb(self, x: Tensor, y: Tensor, ctx: TrainContext) -> AttackResult | None:
        """Generate the training perturbation: the attack's result, or ``None`` without one."""
        return None if self.attack is None else self.attack.perturb(x, y)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by the trainer after ``optimizer.step()`` (AWP removes its weight perturbation
        here, keeping the optimizer's update)."""

    def abort_step(self) -> None:
        """Called by the trainer instead of ``after_step()`` when a step is abandoned.

        The trainer abandons a step, without calling the optimizer, when the loss or the gradient
        norm is non-finite; it then raises ``NonFiniteLossError``. An objective whose ``loss()``
        changed the model (AWP's ``w + v``) puts every parameter back to its value before
        ``loss()``, bitwise, so the error's promise that the weights are intact holds.
        The default does nothing: most objectives leave the parameters alone.
        """

    def state_dict(self) -> dict[str, Tensor]:
        """Per-sample memory and other state that must survive a resume (tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attack={self.attack!r})"


def detach_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach every metric tensor (helper for subclasses)."""
    return {k: v.detach() if torch.is_tensor(v) else torch.tensor(v) for k, v in metrics.items()}

"""The one training loop shared by every objective (methods.md §7.1, architecture.md §3).

The trainer owns train mode, ``sampler.set_epoch``, device moves, autocast, ``zero_grad``,
backward, clipping, the optimizer and scheduler steps, ``objective.after_step()`` and the meters
(reduced across ranks). A NaN or infinite loss or gradient norm stops training with
``NonFiniteLossError`` before the optimizer step, after ``objective.abort_step()`` has put back
whatever the objective changed, so the weights are those from before the step. What a batch's
loss *is* belongs to the objective; evaluation, checkpoints and logging are callbacks, called in
the order given with events ``on_fit_start``, ``on_batch_end(trainer, out, batch)``,
``on_epoch_end``, ``on_fit_end`` and ``on_exception``.

Example:
    >>> trainer = Trainer(model, objective, optimizer, scheduler, epochs=100, callbacks=[...])
    >>> state = trainer.fit(loaders.train)
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from robustkit import distributed as dist
from robustkit.errors import UserError
from robustkit.heartbeat import Heartbeat
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext
from robustkit.training.meters import Meters
from robustkit.utils import seed_everything

__all__ = ["Trainer", "TrainerState", "NonFiniteLossError"]

log = logging.getLogger(__name__)

# fp16: below this loss scale a non-finite gradient is no longer GradScaler's overflow (the
# scaled gradients are not larger than the true ones), so the trainer stops (starts at 2**16).
_FP16_MIN_SCALE = 1.0


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; raised before the optimizer step.

    A diverged run is the user's to fix (a lower ``optim.lr``, ``trainer.grad_clip``, a smaller
    budget), so it is a ``UserError``: the CLI prints one line and exits 2.

    The trainer calls ``objective.abort_step()`` first (AWP puts back the weights it perturbed),
    so the parameters keep their values from before the step, bitwise; their ``.grad`` are
    cleared. BatchNorm statistics of the failing forward are not rolled back; the last checkpoint
    on disk is untouched.
    """


@dataclass
class TrainerState:
    """Shared by the trainer and its callbacks.

    Attributes:
        epoch: epochs completed (``fit`` resumes from here).
        step: optimizer steps completed.
        metrics: this epoch's reduced means (``train/<name>``, ``train/throughput`` in images/s,
            ``lr``: the learning rate of the epoch's last optimizer step, as ``lr`` below), plus
            what callbacks add (``eval/clean``, ``eval/pgd20``).
        history: one ``metrics`` dict per completed epoch.
        best: best value of the checkpoint monitor so far.
        best_epoch: the epoch (1-based, as ``epoch``) that reached ``best``; its weights are in
            ``best.pt`` (``CheckpointCallback`` keeps the two in step).
        stop: set by a callback to end training after the current batch.
        batch: the last batch's 0-dim values (``loss``, ``acc``, objective metrics), detached and
            on the device, this rank only: read them with ``float()`` when needed.
        histograms: this epoch's ``(N,)`` objective metrics gathered over ranks (CPU).
        lr: the learning rate (param group 0) the last optimizer step used: read before the
            scheduler steps, so a logged ``lr`` is the one that produced the step's update,
            not the next step's.
    """

    epoch: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    stop: bool = False
    batch: dict[str, Tensor] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    lr: float | None = None


class Trainer:
    """Train ``model`` on ``objective`` with ``optimizer`` (and ``scheduler``) for ``epochs``.

    Args:
        model: the module trained (bare or DDP-wrapped); the objective holds the same one.
        objective: maps ``(x, y, ctx)`` to ``ObjectiveOutput(loss, logits, metrics)``.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        scheduler: an LR scheduler or ``None``.
        epochs: total number of epochs (``ctx.epochs``).
        amp: ``"off"``, ``"bf16"`` (autocast; prefer it with double backprop) or ``"fp16"``
            (autocast + GradScaler); CUDA only, ignored with a warning on the CPU.
        grad_clip: max global L2 norm of the gradients, or ``None``.
        scheduler_interval: ``"step"`` (``scheduler.step()`` after every optimizer step) or
            ``"epoch"``.
        callbacks: objects with some of the event methods, called in this order.
        device: where batches go; ``None`` takes the model's device.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        epochs: int,
        amp: Literal["off", "bf16", "fp16"] = "off",
        grad_clip: float | None = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        callbacks: Sequence[Any] = (),
        device: str | torch.device | None = None,
    ) -> None:
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self.model, self.objective = model, objective
        self.optimizer, self.scheduler = optimizer, scheduler
        self.epochs, self.grad_clip, self.scheduler_interval = epochs, grad_clip, scheduler_interval
        self.callbacks = list(callbacks)
        self.device = torch.device(device) if device is not None else _model_device(model)
        model.to(self.device)
        cuda = self.device.type == "cuda"
        if amp != "off" and not cuda:
            log.warning("amp=%r ignored on %s: training stays float32", amp, self.device)
        self.amp = amp if cuda else "off"
        # channels_last speeds up cuDNN convolutions (tensor cores); only worth it for 4-D convs.
        self.channels_last = cuda and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.state = TrainerState()
        self.loader: Iterable | None = None

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, train_loader: Iterable) -> TrainerState:
        """Train from ``state.epoch`` (epochs already completed) to ``epochs``; return the state."""
        self.loader, self.state.stop = train_loader, False
        try:
            self._emit("on_fit_start")
            for epoch in range(self.state.epoch, self.epochs):
                self._train_epoch(train_loader, epoch)
                self._emit("on_epoch_end")
                if self.state.stop:
                    break
            self._emit("on_fit_end")
        except BaseException as err:
            self._emit("on_exception", err)
            raise
        return self.state

    def _train_epoch(self, loader: Iterable, epoch: int) -> None:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)  # DistributedSampler: a new, reproducible order per epoch
                break
        self.model.train()
        self.state.lr = self._lr()  # an epoch without batches reports the lr it would use
        meters, start = Meters(), time.perf_counter()
        with self._heartbeat(loader, epoch) as beat:
            for batch in loader:
                out, y = self._train_step(batch, epoch)
                meters.add(self.state.batch, out.metrics, y.shape[0])
                self._emit("on_batch_end", out, batch)
                beat.update(1)
                if self.state.stop:
                    break
        means, n_images, self.state.histograms = meters.reduce(self.device)
        self.state.metrics = {f"train/{k}": v for k, v in means.items()}
        self.state.metrics["train/throughput"] = n_images / max(time.perf_counter() - start, 1e-9)
        # The lr this epoch used, read before the epoch-interval scheduler steps (and, per step,
        # before the step-interval one did): after it, param_groups hold the next epoch's.
        self.state.metrics["lr"] = self.state.lr
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        self.state.epoch = epoch + 1
        self.state.history.append(self.state.metrics)  # same dict: eval callbacks add to it

    def _heartbeat(self, loader: Iterable, epoch: int) -> Any:
        """A heartbeat line every ~30 s of the epoch (batches left, ETA) on rank 0, unless a
        callback shows a progress bar (``shows_bar``, e.g. the CLI's on a terminal)."""
        if not dist.is_main() or any(getattr(cb, "shows_bar", False) for cb in self.callbacks):
            return contextlib.nullcontext(_NoBeat())
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: batches done, no ETA
            total = None
        return Heartbeat(f"epoch {epoch + 1}/{self.epochs}", total, unit="batches")

    def _train_step(self, batch: Any, epoch: int) -> tuple[ObjectiveOutput, Tensor]:
        x, y, idx = self._move(batch)
        ctx = TrainContext(epoch=epoch, epochs=self.epochs, step=self.state.step, idx=idx)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.lr = self._lr()  # what this step's optimizer.step() uses
        with self._autocast():
            out = self.objective(x, y, ctx)
        loss = out.loss
        scalars = {k: v.detach().float() for k, v in out.metrics.items() if v.dim() == 0}
        try:
            stepped = self._backward_and_check(loss, scalars, epoch)
        except BaseException:
            # no update will happen: the objective undoes what its loss() did to the weights
            # (AWP's w + v), so the parameters are those from before the step
            self.objective.abort_step()
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.scaler.step(self.optimizer)  # fp16: skipped by the scaler when stepped is False
        self.scaler.update()
        if stepped:
            self.objective.after_step()
        else:
            self.objective.abort_step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        self.state.step += 1
        acc = (out.logits.detach().argmax(1) == y).float().mean()
        self.state.batch = {**scalars, "loss": loss.detach().float(), "acc": acc}  # ours win
        return out, y

    def _backward_and_check(self, loss: Tensor, scalars: dict[str, Tensor], epoch: int) -> bool:
        """Backward, the finiteness checks and clipping; ``False`` for an fp16 overflow step.

        Raises:
            NonFiniteLossError: the loss or the gradient norm is NaN or infinite (the caller
                calls ``objective.abort_step()`` on the way out).
        """
        # Backward comes before the loss check: under DDP a NaN loss on one rank reaches every
        # rank through the gradient all-reduce, so all ranks raise together instead of the
        # others waiting in the all-reduce for a rank that has left.
        self.scaler.scale(loss).backward()
        if self.amp == "fp16":
            self.scaler.unscale_(self.optimizer)  # check and clip the true gradients
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, self.grad_clip)  # the norm before clipping
        else:
            grad_norm = _grad_norm(params)
        # one host sync for both checks
        loss_ok, grads_ok = torch.isfinite(
            torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)])
        ).tolist()
        if loss_ok and grads_ok:
            return True
        if loss_ok and self.amp == "fp16" and self.scaler.get_scale() > _FP16_MIN_SCALE:
            # An fp16 overflow of the *scaled* gradients is GradScaler's own calibration: its
            # step() skips the update and update() halves the scale. Only once the scale is down
            # to 1 are the gradients no larger than the true ones, and then they are the model's.
            return False
        values = {k: round(float(v), 6) for k, v in scalars.items()}
        what = (f"non-finite loss {loss.item():.4g}" if not loss_ok else
                f"non-finite gradient norm {float(grad_norm):.4g} (loss {loss.item():.4g})")
        raise NonFiniteLossError(
            f"{what} at epoch {epoch} step {self.state.step} (metrics {values}); stopped before "
            "the optimizer step: weights and the last checkpoint are intact; lower optim.lr, "
            "set trainer.grad_clip, or resume from last.pt"
        )

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _move(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        x, y, idx = (*batch, None) if len(batch) == 2 else batch
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.preserve_format
        x = x.to(self.device, memory_format=fmt, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        idx = idx.to(self.device, non_blocking=True) if idx is not None else None
        return x, y, idx

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method(self, *args)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as plain data (``weights_only``-loadable).

        Under DDP this is a collective (every rank's RNG states are gathered): call it on all ranks.
        """
        return {
            "model": dist.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "best": self.state.best,
            "best_epoch": self.state.best_epoch,
            "history": [dict(h) for h in self.state.history],
            "rng": dist.all_gather_object(_rng_state(self.device)),  # one entry per rank
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``: weights, optimizer, scheduler, scaler, objective, RNGs."""
        dist.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("scheduler: the checkpoint and this trainer disagree on having one")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.state.epoch, self.state.step = int(state["epoch"]), int(state["step"])
        self.state.best = state["best"]
        # absent from checkpoints written before best_epoch existed: CheckpointCallback derives
        # it from the history when it needs it
        best_epoch = state.get("best_epoch")
        self.state.best_epoch = int(best_epoch) if best_epoch is not None else None
        self.state.history = [dict(h) for h in state["history"]]
        self.state.metrics = dict(self.state.history[-1]) if self.state.history else {}
        self._load_rng(state["rng"])

    def _load_rng(self, rngs: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Each rank takes back its own Python, NumPy, torch (and CUDA) random streams.

        ``state_dict`` gathers one state per rank (rank order), so an exact resume on the same
        number of processes continues every rank's streams where they stopped. A single state
        (a dict: one process) counts as one rank. With more ranks than states, rank ``r`` starts
        from state ``r % n`` and then reseeds from it with its rank added, so no two ranks
        replay the same stream (their random starts and noise would coincide); such a resume is
        not bit-exact and says so.
        """
        if isinstance(rngs, dict):
            rngs = [rngs]
        world, rank = dist.world_size(), dist.rank()
        if len(rngs) != world:
            log.warning("checkpoint has RNG states of %d ranks, now %d: random streams are not "
                        "those of an uninterrupted run", len(rngs), world)
        _set_rng_state(rngs[rank % len(rngs)], self.device)
        if rank >= len(rngs):
            seed_everything(int(torch.randint(0, 2**31 - 1, ()).item()) + rank)


class _NoBeat:
    def update(self, k: int = 1) -> None:
        pass


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The global L2 norm of the gradients (what ``clip_grad_norm_`` would clip), no sync."""
    if not params:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and lists (no pickled objects)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

"""Held-out evaluation during training: ``eval/clean`` and ``eval/<attack name>``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from robustkit import distributed as dist
from robustkit.evaluation.protocol import evaluate_attacks
from robustkit.training.callbacks.base import Callback

__all__ = ["EvalCallback"]

log = logging.getLogger(__name__)


class EvalCallback(Callback):
    """Clean and robust accuracy on a held-out split: ``eval/clean`` and ``eval/<attack name>``.

    Runs ``robustkit.evaluation.evaluate_attacks`` (standalone protocol, eval mode, every
    submodule's mode restored) with ``shard=True``: each rank attacks a contiguous run of whole
    batches, every batch is seeded by its global index, and the flags are all-gathered, so the
    numbers equal a single-process run's. Only clean-correct points are attacked. The training
    package imports no attack: the caller builds them (architecture.md §2).

    Args:
        loader: ``DataLoader`` of ``(x, y[, idx])`` over the held-out set; its ``dataset`` and
            ``batch_size`` are used (its sampler, workers and collate_fn are not).
        attacks: name -> attack, or a function ``attacks(bare_model) -> {name: attack}`` called
            at each evaluation (for attacks built on the model the trainer holds). The attacks
            carry their own ε, norm, steps and step size.
        every: evaluate every ``every`` epochs and after the final one (default 1): the last
            of ``trainer.epochs``, or the one a callback stopped training at
            (``trainer.state.stop``), so the weights ``last.pt`` ends with are always scored.
        max_batches: use only the first ``max_batches * batch_size`` points (None: all).
        n: use exactly the first ``n`` points (None: all); the last batch is cut short, so
            ``n=200`` with batch size 128 scores 128 + 72 images, not 256. With ``max_batches``
            too, the smaller of the two counts.
        seed: base of the per-batch seeds (fixed: the same random starts every epoch).

    Example:
        >>> cb = EvalCallback(loaders.holdout, lambda m: {"pgd20": PGD(m, eps=8/255, steps=20)})
        >>> cb.evaluate(model)  # {"eval/clean": 0.81, "eval/pgd20": 0.49}
    """

    def __init__(
        self,
        loader: DataLoader,
        attacks: Mapping[str, Any] | Callable[[nn.Module], Mapping[str, Any]],
        every: int = 1,
        max_batches: int | None = None,
        seed: int = 0,
        n: int | None = None,
    ) -> None:
        if getattr(loader, "dataset", None) is None or getattr(loader, "batch_size", None) is None:
            raise ValueError("loader must be a DataLoader with a dataset and a batch_size")
        if not (isinstance(attacks, Mapping) or callable(attacks)):
            raise ValueError("attacks must be a mapping name -> attack or a function of the "
                             f"model returning one, got {type(attacks).__name__}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
            raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
        if n is not None and (isinstance(n, bool) or not (isinstance(n, int) and n >= 1)):
            raise ValueError(f"n must be an int >= 1 or None, got {n!r}")
        self.loader, self.attacks = loader, attacks
        self.every, self.max_batches, self.seed, self.n = every, max_batches, seed, n

    def on_epoch_end(self, trainer) -> None:
        done = trainer.state.epoch
        if done % self.every == 0 or done >= trainer.epochs or trainer.state.stop:
            trainer.state.metrics.update(self.evaluate(trainer.model, trainer.device))

    def evaluate(self, model: nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """``{"eval/clean": acc, "eval/<name>": acc, ...}`` (fractions in [0, 1]) on every rank."""
        model = dist.unwrap(model)  # attacks hold the bare module, never the DDP wrapper
        attacks = self.attacks if isinstance(self.attacks, Mapping) else self.attacks(model)
        bs, dataset = self.loader.batch_size, self.loader.dataset
        n = len(dataset)
        if self.max_batches is not None:
            n = min(n, self.max_batches * bs)
        if self.n is not None:
            n = min(n, self.n)
        if n == 0:
            raise ValueError("EvalCallback: the held-out loader is empty")
        data = dataset if n == len(dataset) else Subset(dataset, range(n))
        kind = torch.device(device).type if device is not None else next(
            iter(list(model.parameters()) + list(model.buffers())), torch.empty(0)).device.type
        # float32: an enclosing autocast (if any) must not reach the attacks' gradients
        with torch.autocast(kind, enabled=False):
            res = evaluate_attacks(model, data, attacks, batch_size=bs, seed=self.seed,
                                   device=device, shard=True)
        acc = res.accuracy()
        if dist.is_main():
            counts = {"clean": res.clean, **res.correct}
            log.info("held-out evaluation on n=%d images: %s", res.n, ", ".join(
                f"{k} {int(v.sum())}/{res.n}" for k, v in counts.items()))
        return {"eval/clean": acc["clean"], **{f"eval/{k}": acc[k] for k in attacks}}

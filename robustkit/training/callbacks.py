"""Trainer callbacks: held-out evaluation, checkpoints, ``metrics.jsonl`` and TensorBoard.

A callback is any object with some of the methods of :class:`Callback` (minGPT style); the
trainer calls them in the order given, so put ``EvalCallback`` before the callbacks that read
its ``eval/*`` metrics, and ``CheckpointCallback`` last: an epoch's log lines are then on disk
before its checkpoint, so a run killed in between has logs *ahead* of ``last.pt`` (trimmed on
resume), never behind it (a line lost for good). Every callback runs on every rank; those that
write files or logs act on rank 0 only (``distributed.is_main()``), while evaluation and
``trainer.state_dict()`` are collectives under DDP and run everywhere.

Example:
    >>> cbs = [EvalCallback(loaders.holdout, {"pgd20": pgd20}), JSONLCallback("runs/x/m.jsonl"),
    ...        CheckpointCallback("runs/x")]
    >>> Trainer(model, objective, optimizer, epochs=10, callbacks=cbs).fit(loaders.train)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from robustkit import __version__
from robustkit import distributed as dist
from robustkit.evaluation.protocol import evaluate_attacks
from robustkit.training.checkpoint import check_plain, load_checkpoint, save_checkpoint
from robustkit.training.loggers import NullLogger, TensorBoardLogger
from robustkit.utils import output_errors

__all__ = [
    "Callback",
    "EvalCallback",
    "CheckpointCallback",
    "JSONLCallback",
    "MetricsLogger",
    "TensorBoardCallback",
]

log = logging.getLogger(__name__)


class Callback:
    """The trainer's events; subclassing is optional (any object with some of them works)."""

    def on_fit_start(self, trainer) -> None: ...

    def on_batch_end(self, trainer, out, batch) -> None: ...

    def on_epoch_end(self, trainer) -> None: ...

    def on_fit_end(self, trainer) -> None: ...

    def on_exception(self, trainer, error: BaseException) -> None: ...


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
        every: evaluate every ``every`` epochs and after the last one (default 1).
        max_batches: use only the first ``max_batches * batch_size`` points (None: all).
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
        self.loader, self.attacks = loader, attacks
        self.every, self.max_batches, self.seed = every, max_batches, seed

    def on_epoch_end(self, trainer) -> None:
        done = trainer.state.epoch
        if done % self.every == 0 or done == trainer.epochs:
            trainer.state.metrics.update(self.evaluate(trainer.model, trainer.device))

    def evaluate(self, model: nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """``{"eval/clean": acc, "eval/<name>": acc, ...}`` (fractions in [0, 1]) on every rank."""
        model = dist.unwrap(model)  # attacks hold the bare module, never the DDP wrapper
        attacks = self.attacks if isinstance(self.attacks, Mapping) else self.attacks(model)
        bs, dataset = self.loader.batch_size, self.loader.dataset
        n = len(dataset) if self.max_batches is None else min(len(dataset), self.max_batches * bs)
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
        return {"eval/clean": acc["clean"], **{f"eval/{k}": acc[k] for k in attacks}}


# Catastrophic overfitting watch (CheckpointCallback): the monitored accuracy fell below this
# fraction of its best and by at least this much (fractions in [0, 1]).
COLLAPSE_FRACTION = 0.5
COLLAPSE_MIN_DROP = 0.10


class CheckpointCallback(Callback):
    """``last.pt`` every ``every`` epochs and after the last; ``best.pt`` when ``monitor`` improves.

    Rank 0 writes, atomically (temporary file + ``os.replace``); each file holds
    ``trainer.state_dict()`` plus ``config``, ``versions`` and the epoch's ``metrics``, loadable
    with ``load_checkpoint`` (``weights_only=True``). ``best.pt`` selects against robust
    overfitting (Rice et al., 2020, https://arxiv.org/abs/2002.11569).

    ``best.pt`` is written *before* ``last.pt``, and the state records ``best_epoch``: a run
    killed between the two writes leaves ``best.pt`` one epoch ahead of ``last.pt``, never
    behind it, so the weights of the epoch ``last.pt`` calls best are always on disk. On a
    resumed run (``trainer.state.epoch > 0`` at ``on_fit_start``) ``best.pt`` is checked against
    the state and reconciled, so that ``best.pt`` holds epoch ``state.best_epoch``: a newer
    ``best.pt`` (the interrupted epoch's) is adopted, a stale one is rewritten from the resumed
    state when that state is the best epoch. Put this callback last: the logs of an epoch are
    then written before its checkpoint, and a resumed run trims what ran ahead of it.

    A monitored accuracy that collapses (below half its best and by >= 10 points: catastrophic
    overfitting of single-step training, Wong et al. 2020) is logged as a warning; ``best.pt``
    keeps the last good epoch, so a collapsed run never ships as "best".

    Args:
        out_dir: the run folder (created).
        config: the resolved config as plain data (dicts, lists, numbers, strings), or None.
        monitor: metric deciding ``best.pt`` (default ``"eval/pgd20"``, from ``EvalCallback``).
        every: write ``last.pt`` every ``every`` epochs.
        mode: ``"max"`` (accuracies) or ``"min"`` (losses).

    Raises:
        OutputError: (from ``on_epoch_end``) a checkpoint could not be written (full disk,
            quota, read-only folder), naming the file; the previous file is intact.

    Example:
        >>> cb = CheckpointCallback("runs/cifar10_pgd_at", config=to_container(cfg))
        >>> trainer.load_state_dict(load_checkpoint("runs/cifar10_pgd_at/last.pt"))  # resume
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        monitor: str = "eval/pgd20",
        every: int = 1,
        mode: Literal["max", "min"] = "max",
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        check_plain(config or {}, "config")  # fail now, not after the first epoch
        self.out_dir, self.config = Path(out_dir), dict(config or {})
        self.monitor, self.every, self.mode = monitor, every, mode
        self._seen_monitor = False

    def _collapsed(self, value: float, best: float | None) -> bool:
        """The monitored robust accuracy fell below half its best and by >= 10 points.

        Single-step training (fast_at) can lose all robustness within an epoch while its clean
        accuracy rises (catastrophic overfitting); such a drop is far larger than the epoch-to-
        epoch noise of a 1,000-image held-out PGD (a few points).
        """
        if self.mode != "max" or best is None or not math.isfinite(value):
            return False
        return value < COLLAPSE_FRACTION * best and best - value >= COLLAPSE_MIN_DROP

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.mode == "max" else value < than)

    def on_fit_start(self, trainer) -> None:
        if trainer.state.epoch > 0:  # resumed: best.pt must hold the epoch the state calls best
            self._reconcile_best(trainer)

    def on_epoch_end(self, trainer) -> None:
        s = trainer.state
        value = s.metrics.get(self.monitor)
        self._seen_monitor |= value is not None
        improved = value is not None and math.isfinite(value) and self._better(value, s.best)
        if improved:
            s.best, s.best_epoch = float(value), s.epoch
        elif value is not None and self._collapsed(value, s.best):
            log.warning("%s fell from %.4f (epoch %s) to %.4f at epoch %d: catastrophic "
                        "overfitting? (Wong et al. 2020, https://arxiv.org/abs/2001.03994) "
                        "best.pt keeps epoch %s", self.monitor, s.best, s.best_epoch, value,
                        s.epoch, s.best_epoch)
        write_last = s.epoch % self.every == 0 or s.epoch == trainer.epochs
        if not (write_last or improved):
            return
        state = trainer.state_dict()  # a collective under DDP: every rank calls it
        if not dist.is_main():
            return
        # best.pt first (see the class docstring): killed between the writes, best.pt is ahead
        # of last.pt and adopted on resume; the other order would lose the best epoch.
        if improved:
            self._save("best.pt", state, s)
            log.info("best.pt: %s = %.4f at epoch %d", self.monitor, value, s.epoch)
        if write_last:
            self._save("last.pt", state, s)

    def _save(self, name: str, state: dict[str, Any], s) -> None:
        state.update(config=self.config, versions=_versions(), metrics=dict(s.metrics))
        with output_errors(self.out_dir / name, f"; the previous {name} is intact"):
            save_checkpoint(self.out_dir / name, state)

    # -- resume: best.pt against the resumed state ---------------------------------------------
    def _reconcile_best(self, trainer) -> None:
        s = trainer.state
        if s.best is not None and s.best_epoch is None:  # a checkpoint older than best_epoch
            s.best_epoch = next((i + 1 for i, h in enumerate(s.history)
                                 if h.get(self.monitor) == s.best), None)
        # rank 0 reads best.pt and decides for every rank (other nodes may not see the folder)
        action = self._best_action(s) if dist.is_main() else None
        kind, *args = dist.all_gather_object(action)[0] or ("ok",)
        if kind == "adopt":
            s.best, s.best_epoch = args
        elif kind == "reset":
            s.best, s.best_epoch = None, None
        elif kind == "rewrite":
            state = trainer.state_dict()  # a collective under DDP
            if dist.is_main():
                self._save("best.pt", state, s)

    def _best_action(self, s) -> tuple | None:
        """What to do so that best.pt holds epoch ``s.best_epoch`` (rank 0; logs why)."""
        path = self.out_dir / "best.pt"
        held_epoch = held = None
        if path.is_file():
            try:
                b = load_checkpoint(path)
                held_epoch, held = int(b["epoch"]), b.get("best")
                held = float(held) if held is not None and math.isfinite(held) else None
            except (ValueError, KeyError, TypeError) as err:  # CheckpointError is a ValueError
                log.warning("%s is unreadable (%s)", path, " ".join(str(err).split())[:200])
                held_epoch = held = None
        if held is not None and held_epoch > s.epoch and self._better(held, s.best):
            log.warning("%s holds epoch %d (%s = %.4f), written by the interrupted run after "
                        "the resumed checkpoint (epoch %d): adopted as the best so far", path,
                        held_epoch, self.monitor, held, s.epoch)
            return ("adopt", held, held_epoch)
        if s.best is None:
            return None  # nothing is called best yet; the first evaluated epoch writes best.pt
        if held is not None and held_epoch == s.best_epoch:
            return None
        if held is not None and s.best_epoch is None and held == s.best:
            return ("adopt", held, held_epoch)  # an old checkpoint whose history lacks the epoch
        if s.best_epoch == s.epoch:  # the resumed state itself is the best epoch
            if held_epoch is None:  # e.g. resumed from another folder's last.pt
                log.info("%s written from the resumed checkpoint, the best epoch so far (%d, "
                         "%s = %.4f)", path, s.epoch, self.monitor, s.best)
            else:
                log.warning("%s holds epoch %d, not epoch %d which the resumed checkpoint calls "
                            "best (%s = %.4f): rewritten from it", path, held_epoch, s.epoch,
                            self.monitor, s.best)
            return ("rewrite",)
        if held is not None:
            log.warning("%s holds epoch %d (%s = %.4f), not epoch %s which the resumed "
                        "checkpoint calls best (%.4f): those weights are lost; best.pt is "
                        "kept as the best so far", path, held_epoch, self.monitor, held,
                        s.best_epoch, s.best)
            return ("adopt", held, held_epoch)
        log.warning("%s is missing or unreadable: the best so far (%s = %.4f at epoch %s) "
                    "is forgotten and the next evaluated epoch writes a new best.pt", path,
                    self.monitor, s.best, s.best_epoch)
        return ("reset",)

    def on_fit_end(self, trainer) -> None:
        if not self._seen_monitor and dist.is_main():
            log.warning("monitor %r was never reported: best.pt not written", self.monitor)


class JSONLCallback(Callback):
    """Append one JSON line per epoch (and every ``log_every`` steps) to ``path`` (rank 0).

    Epoch lines: ``{"type": "epoch", "epoch", "step", "time", <metrics>}``; step lines:
    ``{"type": "step", "epoch", "step", "train/<name>", "lr"}``. Non-finite values are written
    as ``null``. A resumed run appends to the same file (the CLI first trims it to the resumed
    checkpoint: ``RunDirectory.trim_jsonl``). A failed append (full disk) is cut back, so no torn
    line is left, and raises ``OutputError`` naming the file.

    Args:
        path: the ``metrics.jsonl`` file (parent folders created).
        log_every: also write a line every ``log_every`` optimizer steps (None: epochs only).

    Example:
        >>> cb = JSONLCallback("runs/x/metrics.jsonl")
        >>> [json.loads(line) for line in open("runs/x/metrics.jsonl")]
    """

    def __init__(self, path: str | os.PathLike, log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be >= 1 or None, got {log_every!r}")
        self.path, self.log_every = Path(path), log_every

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                 for k, v in record.items()}
        data = (json.dumps(clean) + "\n").encode()
        with output_errors(self.path, "; its earlier lines are intact"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _append(self.path, data)

    def on_batch_end(self, trainer, out, batch) -> None:
        s = trainer.state
        if self.log_every and s.step % self.log_every == 0 and dist.is_main():
            values = {f"train/{k}": float(v) for k, v in s.batch.items()}
            lr = float(trainer.optimizer.param_groups[0]["lr"])
            self._write({"type": "step", "epoch": s.epoch, "step": s.step, **values, "lr": lr})

    def on_epoch_end(self, trainer) -> None:
        s = trainer.state
        if dist.is_main():
            self._write({"type": "epoch", "epoch": s.epoch, "step": s.step, "time": time.time(),
                         **s.metrics})


MetricsLogger = JSONLCallback


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` whole or not at all (a failed write is truncated back, best effort)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # os.write may write part of the data before the disk fills
                view = view[os.write(fd, view):]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


class TensorBoardCallback(Callback):
    """TensorBoard logging with methods.md §7.3's tags (rank 0; other ranks use a NullLogger).

    Every ``log_every`` steps: ``train/<name>`` for the loss, the accuracy and every 0-dim
    objective metric (this rank's batch), ``lr`` and ``train/throughput`` (images/s over all ranks
    since the last log). Every epoch: ``eval/*`` and the epoch means as ``epoch/<name>``,
    ``hist/<name>`` for every ``(N,)`` metric, and the images of ``image_fn`` (the hook for
    saliency panels). At the start the config as text; at the end ``add_hparams`` with the final
    metrics as ``hparam/<name>``. The x axis is the optimizer step. A resumed run (``state.step
    > 0`` at ``on_fit_start``) opens its writer with ``purge_step = state.step + 1``: what the
    interrupted run logged after its checkpoint is hidden, what it logged up to it (including
    the checkpointed epoch's own ``eval/*`` at ``state.step``) is kept, so curves neither overlap
    nor lose a point.

    Args:
        log_dir: event-file folder, e.g. ``runs/<name>/tb``.
        config_text: the resolved YAML, shown in the Text tab.
        log_every: steps between scalar logs (default 50).
        hparams: hyper-parameters for the HParams tab (nested dicts are flattened with ``.``).
        image_fn: ``image_fn(bare_model) -> {tag: (C, H, W) in [0, 1]}``, logged every
            ``image_every`` epochs and after the last.
        image_every: epochs between image logs.

    Example:
        >>> cb = TensorBoardCallback("runs/x/tb", config_text=yaml_text, log_every=50)
        >>> # then: tensorboard --logdir runs/
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        config_text: str | None = None,
        log_every: int = 50,
        hparams: dict[str, Any] | None = None,
        image_fn: Callable[[nn.Module], dict[str, Tensor]] | None = None,
        image_every: int = 1,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every!r}")
        if image_every < 1:
            raise ValueError(f"image_every must be >= 1, got {image_every!r}")
        self.log_dir, self.config_text, self.log_every = log_dir, config_text, log_every
        self.hparams, self.image_fn, self.image_every = hparams, image_fn, image_every
        self.logger: NullLogger = NullLogger()

    def on_fit_start(self, trainer) -> None:
        step = trainer.state.step
        # step + 1, not step: events at the checkpoint's own step came before the checkpoint
        purge = step + 1 if step > 0 else None
        self.logger = (TensorBoardLogger(self.log_dir, purge_step=purge) if dist.is_main()
                       else NullLogger())
        if self.config_text:
            # Indented four spaces: TensorBoard renders text as Markdown, this keeps it verbatim.
            text = "\n".join("    " + line for line in self.config_text.splitlines())
            self.logger.add_text("config", text, trainer.state.step)
        self._t0, self._images = time.perf_counter(), 0

    def on_batch_end(self, trainer, out, batch) -> None:
        s = trainer.state
        self._images += out.logits.shape[0] * dist.world_size()
        if (s.step - 1) % self.log_every or not dist.is_main():
            return  # steps 1, 1 + log_every, ...: the first step shows up at once
        for k, v in s.batch.items():
            self.logger.add_scalar(f"train/{k}", float(v), s.step)  # float(): syncs the device
        now = time.perf_counter()
        self.logger.add_scalar("train/throughput", self._images / max(now - self._t0, 1e-9), s.step)
        self.logger.add_scalar("lr", trainer.optimizer.param_groups[0]["lr"], s.step)
        self._t0, self._images = now, 0

    def on_epoch_end(self, trainer) -> None:
        s = trainer.state
        if not dist.is_main():
            return
        for k, v in s.metrics.items():
            if k.startswith("train/"):
                self.logger.add_scalar("epoch/" + k[len("train/") :], v, s.step)
            elif k != "lr":  # lr is already a per-step curve
                self.logger.add_scalar(k, v, s.step)
        for k, v in s.histograms.items():
            self.logger.add_histogram(f"hist/{k}", v, s.step)
        due = s.epoch % self.image_every == 0 or s.epoch == trainer.epochs
        if self.image_fn is not None and due:
            for tag, image in self.image_fn(dist.unwrap(trainer.model)).items():
                self.logger.add_image(tag, image, s.step)
        self.logger.flush()

    def on_fit_end(self, trainer) -> None:
        final = {f"hparam/{k}": v for k, v in trainer.state.metrics.items()}
        self.logger.add_hparams(self.hparams or {}, final)
        self.logger.close()

    def on_exception(self, trainer, error: BaseException) -> None:
        self.logger.close()  # keep what was logged up to the failure


def _versions() -> dict[str, str]:
    python = platform.python_version()
    return {"robustkit": __version__, "torch": str(torch.__version__), "python": python}

"""Trainer callbacks: held-out evaluation, checkpoints, ``metrics.jsonl`` and TensorBoard.

A callback is any object with some of the methods of :class:`Callback` (minGPT style); the
trainer calls them in the order given, so put ``EvalCallback`` before the callbacks that read
its ``eval/*`` metrics. Every callback runs on every rank; those that write files or logs act on
rank 0 only (``distributed.is_main()``), while evaluation and ``trainer.state_dict()`` are
collectives under DDP and run everywhere.

Example:
    >>> cbs = [EvalCallback(loaders.holdout, eps=8/255), CheckpointCallback("runs/x", config=cfg)]
    >>> Trainer(model, objective, optimizer, epochs=10, callbacks=cbs).fit(loaders.train)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from robustkit import __version__
from robustkit import distributed as dist
from robustkit.training.checkpoint import check_plain, save_checkpoint
from robustkit.training.loggers import NullLogger, TensorBoardLogger

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
    """Clean and PGD-k accuracy on a held-out split, stored as ``eval/clean`` and ``eval/pgd<k>``.

    The held-out points are split into contiguous runs of whole batches, one per rank, and the
    counts are summed over ranks; each batch's random start is seeded by ``(seed, batch index)``,
    so the numbers equal a single-process run's. The robust count needs clean *and* attacked
    correctness; only clean-correct points are attacked. Evaluation uses the bare module in eval
    mode (float32, no autocast) and restores the previous mode.

    Args:
        loader: ``DataLoader`` of ``(x, y[, idx])`` over the held-out set (its ``dataset`` and
            ``batch_size`` are used; its sampler is ignored).
        eps: budget in [0, 1] pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        steps: PGD iterations (default 20: ``eval/pgd20``).
        alpha: step size, default ``eps / 4``.
        every: evaluate every ``every`` epochs and after the last one.
        max_batches: use only the first ``max_batches * batch_size`` points (None: all).
        seed: seed of the random starts (fixed: the same starts every epoch).

    Example:
        >>> cb = EvalCallback(loaders.holdout, eps=8/255, steps=20)
        >>> cb.evaluate(model)  # {"eval/clean": 0.81, "eval/pgd20": 0.49}
    """

    def __init__(
        self,
        loader: DataLoader,
        eps: float,
        norm: Literal["Linf", "L2"] = "Linf",
        steps: int = 20,
        alpha: float | None = None,
        every: int = 1,
        max_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if getattr(loader, "dataset", None) is None or getattr(loader, "batch_size", None) is None:
            raise ValueError("loader must be a DataLoader with a dataset and a batch_size")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r}")
        self.loader, self.eps, self.norm, self.steps = loader, float(eps), norm, steps
        self.alpha = float(alpha) if alpha is not None else self.eps / 4
        self.every, self.max_batches, self.seed = every, max_batches, seed
        self.key = f"eval/pgd{steps}"

    def on_epoch_end(self, trainer) -> None:
        done = trainer.state.epoch
        if done % self.every == 0 or done == trainer.epochs:
            trainer.state.metrics.update(self.evaluate(trainer.model, trainer.device))

    def evaluate(self, model: nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """Return ``{"eval/clean": acc, "eval/pgd<k>": acc}`` (fractions in [0, 1])."""
        from robustkit.attacks.pgd import PGD  # here: the trainer does not depend on attacks

        model = dist.unwrap(model)
        device = device or next(model.parameters()).device
        bs, dataset = self.loader.batch_size, self.loader.dataset
        n = len(dataset) if self.max_batches is None else min(len(dataset), self.max_batches * bs)
        mine = dist.shard_indices(math.ceil(n / bs))  # whole batches: same batches as 1 process
        shard = Subset(dataset, range(mine.start * bs, min(mine.stop * bs, n)))
        loader = DataLoader(
            shard, batch_size=bs, shuffle=False, num_workers=self.loader.num_workers,
            collate_fn=self.loader.collate_fn, pin_memory=self.loader.pin_memory,
        )
        gen = torch.Generator()
        attack = PGD(model, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                     random_start=True, loss="ce", select="best", generator=gen)
        counts = torch.zeros(3, dtype=torch.float64, device=device)  # clean, robust, total
        was_training = model.training
        model.eval()  # BN running statistics, no dropout
        try:
            for j, batch in enumerate(loader):
                x, y = batch[0].to(device), batch[1].to(device)
                with torch.no_grad():
                    clean = model(x).argmax(1) == y
                robust = clean.clone()
                if clean.any() and self.steps > 0 and self.eps > 0:
                    gen.manual_seed(self.seed + mine.start + j)  # global batch index
                    x_adv = attack(x[clean], y[clean])
                    with torch.no_grad():
                        robust[clean] = model(x_adv).argmax(1) == y[clean]
                counts += torch.stack([clean.sum(), robust.sum(), torch.tensor(len(y))]).to(counts)
        finally:
            model.train(was_training)
        clean_n, robust_n, total = dist.all_reduce_sum(counts).tolist()
        if total == 0:
            raise ValueError("EvalCallback: the held-out loader is empty")
        return {"eval/clean": clean_n / total, self.key: robust_n / total}


class CheckpointCallback(Callback):
    """``last.pt`` every ``every`` epochs and after the last; ``best.pt`` when ``monitor`` improves.

    Rank 0 writes, atomically (temporary file + ``os.replace``); each file holds
    ``trainer.state_dict()`` plus ``config``, ``versions`` and the epoch's ``metrics``, loadable
    with ``load_checkpoint`` (``weights_only=True``). ``best.pt`` selects against robust
    overfitting (Rice et al., 2020, https://arxiv.org/abs/2002.11569).

    Args:
        out_dir: the run folder (created).
        config: the resolved config as plain data (dicts, lists, numbers, strings), or None.
        monitor: metric deciding ``best.pt`` (default ``"eval/pgd20"``, from ``EvalCallback``).
        every: write ``last.pt`` every ``every`` epochs.
        mode: ``"max"`` (accuracies) or ``"min"`` (losses).

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

    def on_epoch_end(self, trainer) -> None:
        s = trainer.state
        value = s.metrics.get(self.monitor)
        self._seen_monitor |= value is not None
        improved = value is not None and math.isfinite(value) and (
            s.best is None or (value > s.best if self.mode == "max" else value < s.best)
        )
        if improved:
            s.best = float(value)
        write_last = s.epoch % self.every == 0 or s.epoch == trainer.epochs
        if not (write_last or improved):
            return
        state = trainer.state_dict()  # a collective under DDP: every rank calls it
        if not dist.is_main():
            return
        state.update(config=self.config, versions=_versions(), metrics=dict(s.metrics))
        if write_last:
            save_checkpoint(self.out_dir / "last.pt", state)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", state)
            log.info("best.pt: %s = %.4f at epoch %d", self.monitor, value, s.epoch)

    def on_fit_end(self, trainer) -> None:
        if not self._seen_monitor and dist.is_main():
            log.warning("monitor %r was never reported: best.pt not written", self.monitor)


class JSONLCallback(Callback):
    """Append one JSON line per epoch (and every ``log_every`` steps) to ``path`` (rank 0).

    Epoch lines: ``{"type": "epoch", "epoch", "step", "time", <metrics>}``; step lines:
    ``{"type": "step", "epoch", "step", "train/<name>", "lr"}``. Non-finite values are written
    as ``null``. A resumed run appends to the same file.

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                 for k, v in record.items()}
        with open(self.path, "a") as f:  # one short append per line: a crash loses no earlier line
            f.write(json.dumps(clean) + "\n")

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


class TensorBoardCallback(Callback):
    """TensorBoard logging with methods.md §7.3's tags (rank 0; other ranks use a NullLogger).

    Every ``log_every`` steps: ``train/<name>`` for the loss, the accuracy and every 0-dim
    objective metric (this rank's batch), ``lr`` and ``train/throughput`` (images/s over all ranks
    since the last log). Every epoch: ``eval/*`` and the epoch means as ``epoch/<name>``,
    ``hist/<name>`` for every ``(N,)`` metric, and the images of ``image_fn`` (the hook for
    saliency panels). At the start the config as text; at the end ``add_hparams`` with the final
    metrics as ``hparam/<name>``. The x axis is the optimizer step.

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
        self.logger = TensorBoardLogger(self.log_dir) if dist.is_main() else NullLogger()
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

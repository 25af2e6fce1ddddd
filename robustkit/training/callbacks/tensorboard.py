"""TensorBoard logging during training (methods.md §7.3's tags)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from robustkit import distributed as dist
from robustkit.training.callbacks.base import Callback
from robustkit.training.loggers import NullLogger, TensorBoardLogger

__all__ = ["TensorBoardCallback"]


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
        self.logger.add_scalar("lr", s.lr, s.step)  # the lr this step used
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

"""``ProgressCallback``: one tqdm bar per training epoch with live loss and accuracy (CLI only).

tqdm lives under ``robustkit/cli/`` only: the library stays quiet (architecture.md §1, rule 10).

Example:
    >>> trainer = Trainer(model, objective, optimizer, epochs=10, callbacks=[ProgressCallback()])
    >>> trainer.fit(loaders.train)  # epoch 1/10: 100%|████| 390/390 [loss=1.83, acc=0.32]
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from robustkit import distributed as dist

__all__ = ["ProgressCallback"]


class ProgressCallback:
    """A tqdm bar per epoch on rank 0, with the batch loss and accuracy; a summary line per epoch.

    Args:
        refresh_every: batches between postfix updates (each reads device values, a sync).
        file: stream of the bars (default ``sys.stderr``).
    """

    def __init__(self, refresh_every: int = 10, file=None) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.refresh_every, self.file = refresh_every, file
        self.bar = None

    def _open(self, trainer) -> None:
        try:
            total = len(trainer.loader)
        except TypeError:  # an iterable without a length: the bar counts without a total
            total = None
        self.bar = tqdm(
            total=total,
            desc=f"epoch {trainer.state.epoch + 1}/{trainer.epochs}",
            unit="batch",
            dynamic_ncols=True,
            leave=False,
            file=self.file or sys.stderr,
        )

    def on_batch_end(self, trainer, out, batch) -> None:
        if not dist.is_main():
            return
        if self.bar is None:
            self._open(trainer)
        self.bar.update(1)
        if self.bar.n % self.refresh_every == 1 or self.refresh_every == 1:
            b = trainer.state.batch
            self.bar.set_postfix(loss=f"{float(b['loss']):.4f}", acc=f"{float(b['acc']):.3f}")

    def on_epoch_end(self, trainer) -> None:
        if not dist.is_main():
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        s = trainer.state
        shown = ", ".join(f"{k}={v:.4g}" for k, v in s.metrics.items())
        tqdm.write(f"epoch {s.epoch}/{trainer.epochs}: {shown}", file=self.file or sys.stderr)

    def on_exception(self, trainer, error: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

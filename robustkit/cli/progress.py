"""tqdm progress bars, all in one place: the CLI's only home of tqdm (architecture.md §1, rule 10).

``tqdm_factory`` makes the per-attack bars of ``robustkit evaluate`` (the library only takes a
``progress(name, total)`` factory); ``ProgressCallback`` is the trainer's per-epoch bar. Where no
bar is shown (stderr is not a terminal: ``make demo > log``), the library's heartbeat lines
(``robustkit.heartbeat``: what runs, what is left, elapsed, ETA, every ~30 s) take its place.

Example:
    >>> Trainer(model, objective, optimizer, epochs=10, callbacks=[ProgressCallback()])
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

from robustkit import distributed as dist
from robustkit.heartbeat import Heartbeat

__all__ = ["tqdm_factory", "ProgressCallback"]


def tqdm_factory(enabled: bool | None = None) -> Callable[[str, int], tqdm]:
    """A ``progress(name, total)`` factory of per-attack bars counted in images.

    Args:
        enabled: ``True`` always shows bars, ``False`` never (nor heartbeats), ``None``
            (default) bars on a terminal (tqdm's ``disable=None``), else heartbeat log lines.
    """
    disable = None if enabled is None else not enabled

    def factory(name: str, total: int) -> tqdm | Heartbeat:
        bar = tqdm(total=total, desc=f"{name:>12}", unit="img", leave=False, disable=disable,
                   dynamic_ncols=True)
        if bar.disable and enabled is None:  # not a terminal: heartbeat lines instead
            bar.close()
            return Heartbeat(name, total, unit="")  # totals count images, steps, maps
        return bar

    return factory


class ProgressCallback:
    """A tqdm bar per epoch on rank 0, with the batch loss and accuracy; a summary line per epoch.

    Args:
        refresh_every: batches between postfix updates (each reads device values, a sync).
        file: stream of the bars (default ``sys.stderr``, and then bars only on a terminal:
            elsewhere the trainer's heartbeat lines and this callback's epoch lines remain).
    """

    def __init__(self, refresh_every: int = 10, file=None) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.refresh_every, self.file = refresh_every, file
        self.bar = None

    @property
    def shows_bar(self) -> bool:
        """Bars are drawn (the trainer then logs no heartbeat): with a ``file``, or on a tty."""
        return self.file is not None or bool(getattr(sys.stderr, "isatty", bool)())

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
            disable=not self.shows_bar,
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

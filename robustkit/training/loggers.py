"""``TensorBoardLogger`` over ``torch.utils.tensorboard.SummaryWriter``, and a ``NullLogger``.

Both have the same methods, so callbacks log unconditionally and ranks other than 0 (or runs
without TensorBoard) use the ``NullLogger`` (Lightning's idea). Tag names follow methods.md §7.3.

Example:
    >>> logger = TensorBoardLogger("runs/x/tb")
    >>> logger.add_scalar("train/loss", 0.7, step=100); logger.close()
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch import Tensor

__all__ = ["TensorBoardLogger", "NullLogger"]


class NullLogger:
    """A logger that does nothing (same methods as ``TensorBoardLogger``)."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def add_histogram(self, tag: str, values: Tensor, step: int) -> None: ...

    def add_text(self, tag: str, text: str, step: int = 0) -> None: ...

    def add_image(self, tag: str, image: Tensor, step: int) -> None: ...

    def add_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger(NullLogger):
    """Write TensorBoard event files into ``log_dir`` (view with ``tensorboard --logdir runs/``).

    The writer is opened on first use, so building a logger costs nothing.

    Args:
        log_dir: folder of the event files (created).
        flush_secs: how often pending events are written to disk (seconds, default 30).
        purge_step: a resumed run's step: events at or after it, written by the interrupted run
            after its last checkpoint, are hidden, so curves do not overlap (default None).
    """

    def __init__(self, log_dir: str | os.PathLike, flush_secs: int = 30,
                 purge_step: int | None = None) -> None:
        self.log_dir = os.fspath(log_dir)
        self.flush_secs = flush_secs
        self.purge_step = purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            # Imported here: tensorboard is only needed when something is actually logged.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, flush_secs=self.flush_secs,
                                         purge_step=self.purge_step)
        return self._writer

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), global_step=step)

    def add_histogram(self, tag: str, values: Tensor, step: int) -> None:
        values = values.detach().float().flatten().cpu()
        values = values[values.isfinite()]  # TensorBoard's histogram rejects NaN/inf
        if values.numel():
            self.writer.add_histogram(tag, values, global_step=step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        """``image``: ``(C, H, W)`` in [0, 1]."""
        self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), global_step=step)

    def add_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's hyper-parameters (flattened with ``.``) and final ``metrics``.

        Written into this run's own event file (``SummaryWriter.add_hparams`` would start a
        sibling run), so TensorBoard's HParams tab links them to the run's curves.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        flat = {k: _hparam_value(v) for k, v in _flatten(hparams).items()}
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        exp, ssi, sei = hparams_summary(flat, finite)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for k, v in finite.items():
            self.writer.add_scalar(k, v)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _hparam_value(v: Any) -> bool | int | float | str:
    # TensorBoard's hparams accept only these types; lists and None become their text.
    return v if isinstance(v, bool | int | float | str) else str(v)

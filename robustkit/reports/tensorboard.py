"""A report's TensorBoard folder: written afresh on each run of a command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fresh_tensorboard"]


@contextmanager
def fresh_tensorboard(folder: Path) -> Iterator:
    """A ``TensorBoardLogger`` on ``folder`` after removing the event files of an earlier run.

    A failed write inside the block is an ``OutputError`` naming the folder; the logger is
    closed on exit.
    """
    from robustkit.training.loggers import TensorBoardLogger
    from robustkit.utils import output_errors

    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        tb = TensorBoardLogger(folder)
        try:
            yield tb
        finally:
            tb.close()

"""``metrics.jsonl``: one JSON line per epoch (and every ``log_every`` steps)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from robustkit import distributed as dist
from robustkit.training.callbacks.base import Callback
from robustkit.utils import output_errors

__all__ = ["JSONLCallback", "MetricsLogger"]


class JSONLCallback(Callback):
    """Append one JSON line per epoch (and every ``log_every`` steps) to ``path`` (rank 0).

    Epoch lines: ``{"type": "epoch", "epoch", "step", "time", <metrics>}``; step lines:
    ``{"type": "step", "epoch", "step", "train/<name>", "lr"}``. ``lr`` is the learning rate the
    step (or the epoch's last step) used, not the scheduler's next value. Non-finite values are
    written as ``null``. A resumed run appends to the same file (the CLI first trims it to the
    resumed checkpoint: ``RunDirectory.trim_jsonl``). A failed append (full disk) is cut back, so
    no torn line is left, and raises ``OutputError`` naming the file.

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
            lr = s.lr  # the step's own lr (param_groups already hold the next step's)
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

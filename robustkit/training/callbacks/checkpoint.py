"""``last.pt`` and ``best.pt`` during training, with the catastrophic-overfitting watch."""

from __future__ import annotations

import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Literal

import torch

from robustkit import __version__
from robustkit import distributed as dist
from robustkit.training.callbacks.base import Callback
from robustkit.training.checkpoint import check_plain, load_checkpoint, save_checkpoint
from robustkit.utils import output_errors

__all__ = ["CheckpointCallback"]

log = logging.getLogger(__name__)


# Catastrophic overfitting watch (CheckpointCallback): the monitored accuracy fell below this
# fraction of its best and by at least this much (fractions in [0, 1]).
COLLAPSE_FRACTION = 0.5
COLLAPSE_MIN_DROP = 0.10


class CheckpointCallback(Callback):
    """``last.pt`` every ``every`` epochs and after the last; ``best.pt`` when ``monitor`` improves.

    The final epoch is always written to ``last.pt`` (whatever ``every``): the last of
    ``trainer.epochs``, or the one a callback ended by setting ``trainer.state.stop`` (in
    ``on_batch_end``, or in an ``on_epoch_end`` that runs before this callback). ``best.pt``
    follows every epoch that reports ``monitor``, the final one included.

    Ties keep the earlier epoch: ``best.pt`` moves only when ``monitor`` is strictly better
    (``>`` for ``"max"``, ``<`` for ``"min"``), so on a plateau it holds the first epoch that
    reached the value (the one with less training, hence less robust overfitting).

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
        # strictly: a tie keeps the earlier epoch (class docstring)
        return than is None or (value > than if self.mode == "max" else value < than)

    def on_fit_start(self, trainer) -> None:
        # resumed: the epochs before it count (a resume with no epoch left reported it too)
        self._seen_monitor = any(self.monitor in h for h in trainer.state.history)
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
        write_last = s.epoch % self.every == 0 or s.epoch >= trainer.epochs or s.stop
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


def _versions() -> dict[str, str]:
    python = platform.python_version()
    return {"robustkit": __version__, "torch": str(torch.__version__), "python": python}

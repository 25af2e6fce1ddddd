"""Heartbeats: one log line every ~30 s while a long step runs, for runs without a progress bar.

A ``Heartbeat`` counts what a step has finished (``update(k)``) and, at most once per
``interval`` seconds, logs at INFO on the ``robustkit.heartbeat`` logger what runs, how much is
left, the time elapsed and a rough ETA (from the rate so far, or from ``expected_s`` before
anything finished)::

    INFO robustkit.heartbeat: pgd40: 120 of 200 points left, 1 min 05 s elapsed, ETA 1 min 38 s

A background thread keeps it beating while one long call gives no update (an AutoAttack
sub-attack, one PGD batch on a loaded machine), so ``make demo > log`` never goes quiet for
more than ``interval`` seconds; while a heartbeat opened inside it runs (the sub-attack's inside
the pass's), only the inner one's thread beats. Nothing is logged for a step shorter than
``interval``.
A ``Heartbeat`` has the progress-bar interface (``update``, ``close``, a context manager), so
``heartbeat_factory()`` is a ``progress(name, total)`` factory for every library call that takes
one; the CLI shows tqdm bars on a terminal and these heartbeats otherwise
(``robustkit.cli.progress``). ``$ROBUSTKIT_HEARTBEAT_S`` sets the interval (0 turns them off).

Example:
    >>> with Heartbeat("pgd20", total=1000, unit="points") as hb:
    ...     for xb in batches:
    ...         run(xb); hb.update(len(xb))
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

__all__ = ["Heartbeat", "heartbeat_factory", "format_duration", "default_interval",
           "INTERVAL_S", "LOGGER"]

#: Seconds between two heartbeats of one step, unless ``$ROBUSTKIT_HEARTBEAT_S`` says otherwise.
INTERVAL_S = 30.0
#: The logger every heartbeat goes to (silence it alone with ``setLevel(logging.WARNING)``).
LOGGER = "robustkit.heartbeat"
_ENV = "ROBUSTKIT_HEARTBEAT_S"
# Open heartbeats, outermost first: a thread beats only for the innermost one, so a pass whose
# single batch is an AutoAttack run leaves the talking to the sub-attack's heartbeat.
_OPEN: list[Heartbeat] = []
_OPEN_LOCK = threading.Lock()


def default_interval() -> float:
    """``$ROBUSTKIT_HEARTBEAT_S`` when it is a number >= 0, else ``INTERVAL_S`` (30 s)."""
    text = os.environ.get(_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if math.isfinite(value) and value >= 0:
            return value
        logging.getLogger(LOGGER).warning("%s=%r is not a number of seconds >= 0; using %g s",
                                          _ENV, text, INTERVAL_S)
    return INTERVAL_S


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"2 h 04 min"``: short, rounded to the second.

    Example:
        >>> format_duration(185.4)
        '3 min 05 s'
    """
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Heartbeat:
    """Logs ``"<what>: <left> of <total> <unit> left, <elapsed> elapsed, ETA <eta>"`` at most
    once per ``interval`` seconds while a step runs.

    Args:
        what: the step, e.g. ``"pgd40"`` or ``"AutoAttack apgd-t (sub-attack 2 of 2)"``.
        total: how many ``unit`` the step has to do (``None``: unknown, no ETA).
        unit: what ``total`` counts (``"points"``, ``"batches"``; ``""``: not named).
        interval: seconds between two lines; default ``default_interval()``; 0 logs nothing.
        expected_s: a rough estimate of the step's whole duration, for the ETA while nothing
            has finished yet (``None``: "ETA unknown" until the first ``update``).
        ticker: beat from a background thread too, so a long call without updates still logs.
        clock: the time source (tests pass a fake one); default ``time.monotonic``.
        logger: default the ``robustkit.heartbeat`` logger.

    Example:
        >>> hb = Heartbeat("pgd40", total=200, interval=30)
        >>> hb.update(64)  # logs only when 30 s have passed since the start or the last line
        >>> hb.close()
    """

    def __init__(self, what: str, total: int | None = None, *, unit: str = "points",
                 interval: float | None = None, expected_s: float | None = None,
                 ticker: bool = True, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.interval = default_interval() if interval is None else float(interval)
        if not self.interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.expected_s = expected_s
        self.clock = clock
        self.logger = logger or logging.getLogger(LOGGER)
        self.done = 0
        self.start = self.last = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        with _OPEN_LOCK:
            _OPEN.append(self)
        if ticker and self.interval > 0:
            self._thread = threading.Thread(target=self._tick, name=f"heartbeat {what}",
                                            daemon=True)
            self._thread.start()

    # the progress-bar interface -----------------------------------------------------------
    def update(self, k: int = 1) -> None:
        """``k`` more ``unit`` finished; logs a line when one is due."""
        self.done += int(k)
        self.beat()

    def close(self) -> None:
        """Stop beating (idempotent)."""
        self._stop.set()
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    def beat(self, force: bool = False) -> str | None:
        """Log the line when ``interval`` seconds passed since the start or the last line (or
        ``force``); returns the line logged, else ``None``."""
        if self.interval <= 0 and not force:
            return None
        with self._lock:
            now = self.clock()
            if not force and now - self.last < self.interval:
                return None
            self.last = now
            line = self.message(now)
        self.logger.info("%s", line)
        return line

    def message(self, now: float | None = None) -> str:
        """The line a beat logs at time ``now`` (default: the clock's)."""
        elapsed = (self.clock() if now is None else now) - self.start
        took = f"{format_duration(elapsed)} elapsed"
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{self.what}: {self.done}{unit} done, {took}"
        left = max(self.total - self.done, 0)
        if self.done > 0:
            eta = format_duration(elapsed / self.done * left)
        elif self.expected_s is not None:
            eta = f"~{format_duration(max(self.expected_s - elapsed, 0.0))} (estimate)"
        else:
            eta = "unknown until the first finish"
        return f"{self.what}: {left} of {self.total}{unit} left, {took}, ETA {eta}"

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with _OPEN_LOCK:
                innermost = bool(_OPEN) and _OPEN[-1] is self
            if innermost:  # an inner step's heartbeat says more; updates still beat here
                self.beat()


def heartbeat_factory(interval: float | None = None, unit: str = ""
                      ) -> Callable[[str, int], Heartbeat]:
    """A ``progress(name, total)`` factory of heartbeats, for the library calls that take one
    (``unit``: what ``total`` counts; default none named, as the callers' totals differ).

    Example:
        >>> robustkit.sensitivity.compare(models, x, y, attack="pgd20", eps=0.3,
        ...                               progress=heartbeat_factory())
    """

    def factory(name: str, total: int) -> Heartbeat:
        return Heartbeat(name, total, unit=unit, interval=interval)

    return factory

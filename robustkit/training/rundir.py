"""Run directories that keep what they hold: a lock, a writability check, stale temporary files
removed, and logs trimmed to the checkpoint a run resumes from.

``robustkit train`` once overwrote ``last.pt`` of an interrupted run without a word, let two live
runs write into one folder, appended a fresh run to an old ``metrics.jsonl`` and left the
temporary files of interrupted atomic writes behind. ``RunDirectory`` is what the CLI uses so
that none of that happens (the trainer and its callbacks stay unaware of folders they do not
write).

Example:
    >>> run = RunDirectory("runs/mnist_pgd_at")
    >>> run.check_writable(); run.acquire(); run.clean_tmp()
    >>> run.trim_jsonl("metrics.jsonl", step=1200, epoch=3)   # a resumed run
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from robustkit.errors import OutputError
from robustkit.utils import atomic_write, check_writable, clean_tmp

__all__ = ["RunDirectory"]

logger = logging.getLogger(__name__)

class RunDirectory:
    """A run's folder, held by one live process at a time.

    Args:
        path: the folder (created).

    Example:
        >>> with RunDirectory("runs/x") as run:
        ...     run.clean_tmp()
    """

    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def check_writable(self) -> None:
        check_writable(self.path, "run directory")

    def acquire(self) -> None:
        """Take an exclusive ``flock`` on ``<path>/.lock`` (released when the process dies).

        Raises:
            OutputError: another live process holds it.
        """
        import fcntl  # POSIX only; imported here so the module imports everywhere

        self.check_writable()
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"run directory {self.path} is in use by another live run "
                                  f"(pid {holder}); wait for it or choose another "
                                  "trainer.out_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunDirectory:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def clean_tmp(self) -> list[Path]:
        return clean_tmp(self.path)

    def trim_jsonl(self, name: str, *, step: int, epoch: int) -> int:
        """Drop the lines of ``<path>/<name>`` an interrupted run wrote after its checkpoint.

        Keeps step lines with ``step <= step`` and epoch lines with ``epoch <= epoch``, so a
        resumed run neither duplicates nor drops a line. Returns the number of lines removed.
        """
        path = self.path / name
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                dropped += 1
                continue
            late = (rec.get("epoch", 0) > epoch) if rec.get("type") == "epoch" else (
                rec.get("step", 0) > step)
            if late:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write(path, ("\n".join(kept) + "\n" if kept else "").encode())
            logger.info("%s: dropped %d line(s) written after the checkpoint", path, dropped)
        return dropped

    def start_fresh(self, names: tuple[str, ...] = ("metrics.jsonl",)) -> list[Path]:
        """A fresh run in a folder without ``last.pt``: earlier logs would mix with the new ones;
        they are renamed ``<name>.old`` (kept, not deleted; ``<name>.old.1``, ... when that
        exists). ``names`` may name files or folders (``tb``). Returns the new paths."""
        moved = []
        for name in names:
            path = self.path / name
            if not (path.is_file() or path.is_dir()):
                continue
            old, n = path.with_name(path.name + ".old"), 0
            while old.exists():
                n += 1
                old = path.with_name(f"{path.name}.old.{n}")
            os.replace(path, old)
            moved.append(old)
            logger.warning("%s held a previous run's %s; moved to %s", path,
                           "logs" if old.is_dir() else "file", old)
        return moved

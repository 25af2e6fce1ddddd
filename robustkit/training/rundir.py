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

import contextlib
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

    The lock is ``<path>/.lock``, ``flock``-ed; ``release`` removes it (and the folder when
    ``acquire`` created it and it is still empty), so no exit path leaves it behind.

    Args:
        path: the folder (created by ``acquire``).

    Example:
        >>> with RunDirectory("runs/x") as run:
        ...     run.clean_tmp()
    """

    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._created = False

    def check_writable(self) -> None:
        check_writable(self.path, "run directory")

    def acquire(self) -> None:
        """Take an exclusive ``flock`` on ``<path>/.lock`` (released when the process dies).

        Creates the folder when needed (remembered: ``release`` removes it again if the run
        left it empty).

        Raises:
            OutputError: another live process holds it, or the folder is not writable.
        """
        import fcntl  # POSIX only; imported here so the module imports everywhere

        created = not self.path.exists()
        self.check_writable()
        lock = self.path / self.LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a run that just released removed its empty folder
                self.check_writable()
                continue
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
            # The holder releases by unlinking .lock before closing it: if that happened
            # between our open and our flock, we locked a file no later run can see, and a
            # third run would take the new one. Only a lock on the file at the path counts.
            if _same_file(fd, lock):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd, self._created = fd, created

    def release(self) -> None:
        """Drop the lock and remove ``.lock`` (and the folder, if ``acquire`` created it and
        nothing else was written there), so a finished, failed or interrupted run leaves no
        trace of it. Never raises (it runs in ``finally`` blocks); a no-op unless held."""
        if self._fd is None:
            return
        try:
            # unlinked while still locked: a run that opened it meanwhile sees the change
            with contextlib.suppress(OSError):
                os.unlink(self.path / self.LOCK)
            if self._created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something
                    self.path.rmdir()
        finally:
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


def _same_file(fd: int, path: Path) -> bool:
    """``fd`` is open on the file now at ``path`` (not on one unlinked since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)

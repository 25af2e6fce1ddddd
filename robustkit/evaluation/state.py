"""The resumable state of an evaluation: per-attack JSON files of finished batches.

``state_dir/fingerprint.json`` holds every setting that changes a flag or a recorded number (the
attacks' ``settings()``, number of points, batch size, protocol, seed, the norm of
``max_perturbation``, world size, robustkit's and torch's versions, the sha256 of the model's
parameters and buffers and of the evaluated images and labels, and what the caller adds: model
spec and code, checkpoint hash, dataset, data root, threat model, ε, the attacks' backends). A
folder written with other settings is refused with a ``StateMismatchError`` naming each
differing setting, or emptied with ``overwrite=True``.
``state_dir/flags_<attack>.json`` holds one record per finished batch (written atomically after
each batch), so an interrupted run resumes at the first unfinished batch.

Nothing here can wedge a run: an unreadable (torn, empty, hand-edited) file or a malformed
record only costs the work it held. A bad record is recomputed, a bad ``flags_<attack>.json``
recomputes that attack, a bad ``fingerprint.json`` the whole folder, each with a logged warning;
recomputing gives the same flags (per-batch seeds). Every write is atomic, and a write that fails
(full disk, quota, read-only or unwritable folder) raises an ``OutputError`` naming the file,
with the files already written left intact for the rerun. Temporary files of interrupted writes
are removed when the folder is opened.

Example:
    >>> store = _Store("runs/x/state", {"seed": 0, "attacks": {...}}, overwrite=False)
    >>> store.save("pgd20", {"0": {"idx": [...], "correct": [...]}})
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from robustkit.errors import StateMismatchError
from robustkit.utils import TMP_GLOB, atomic_write_json, clean_tmp, output_errors, safe_name

__all__ = ["STATE_VERSION", "write_json", "read_json", "discard_state", "rank_dir"]

logger = logging.getLogger(__name__)

#: Bumped when the files' meaning changes, so a folder written by older code is refused, not
#: misread (2: settings() fingerprints and per-sub-attack ``broken_by`` records; 3: model, data
#: and world-size fingerprints, per-rank folders, ``nonfinite`` records; 4: the norm and the
#: robustkit/torch versions in the fingerprint, collision-free ``flags_<attack>`` file names).
STATE_VERSION = 4

# The files a state folder holds (discarded together); atomic_write's temporary files are
# ".<name>.<random>.tmp" beside their target.
_STATE_GLOBS = ("flags_*.json", "aastate_*.json")
_RANK_DIR = re.compile(r"rank\d+-of\d+")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write_json`` that turns a failed write into an ``OutputError`` naming the file.

    The write is atomic, so the previous content of ``path`` (if any) is intact after a failure.

    Raises:
        OutputError: the disk is full, the quota exceeded, the folder read-only or unwritable
            (or any other ``OSError`` while writing).
    """
    with output_errors(path, "; the files already written are intact: free space or fix the "
                       "permissions and rerun the same command to resume"):
        atomic_write_json(path, obj)


def read_json(path: str | os.PathLike) -> tuple[Any, str | None]:
    """``(content, None)``, or ``(None, why)`` when ``path`` cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        return None, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def rank_dir(state_dir: str | os.PathLike, rank: int, world: int) -> Path:
    """The folder of rank ``rank`` of ``world`` processes in a sharded evaluation's state."""
    return Path(state_dir) / f"rank{rank}-of{world}"


def discard_state(state_dir: str | os.PathLike, keep_world: int | None = None) -> int:
    """Delete every evaluation state in ``state_dir`` (its fingerprint, flags, AutoAttack chunk
    files and the per-rank folders of sharded runs); other files stay. Returns how many files and
    folders were removed.

    Args:
        keep_world: leave the folders ``rank<r>-of<keep_world>`` alone (under torchrun each rank
            empties its own, so no two processes remove the same files).
    """
    folder = Path(state_dir)
    if not folder.is_dir():
        return 0
    removed = 0
    for pattern in (*_STATE_GLOBS, "fingerprint.json", TMP_GLOB):
        for f in folder.glob(pattern):
            f.unlink()
            removed += 1
    for sub in folder.iterdir():
        if (sub.is_dir() and _RANK_DIR.fullmatch(sub.name)
                and not sub.name.endswith(f"-of{keep_world}")):
            shutil.rmtree(sub)
            removed += 1
    return removed


class _Store:
    """Per-attack JSON of finished batches, guarded by a fingerprint of the settings.

    Args:
        state_dir: the folder (created); ``None`` keeps nothing (every method is a no-op).
        fingerprint: plain data; compared as canonical JSON.
        overwrite: discard a mismatching state instead of raising.

    Raises:
        StateMismatchError: ``state_dir`` holds a run made with other settings.
        OutputError: ``state_dir`` cannot be written.
    """

    def __init__(self, state_dir: str | Path | None, fingerprint: dict[str, Any],
                 overwrite: bool) -> None:
        self.dir = None if state_dir is None else Path(state_dir)
        if self.dir is None:
            return
        clean_tmp(self.dir)
        fingerprint = json.loads(json.dumps({"state_version": STATE_VERSION, **fingerprint},
                                            default=str))  # canonical JSON types
        path = self.dir / "fingerprint.json"
        if path.exists():
            old, why = read_json(path)
            if why is not None or not isinstance(old, dict):
                # Without its fingerprint nothing in the folder can be trusted: recompute.
                logger.warning("%s is unreadable (%s); discarding the state it guards and "
                               "recomputing", path, why or "not a JSON object")
                self._discard()
            elif old != fingerprint:
                if not overwrite:
                    raise StateMismatchError(
                        f"{self.dir} holds an evaluation with other settings (differs in: "
                        f"{'; '.join(_differences(old, fingerprint))}); use another output "
                        "folder or overwrite (--overwrite)")
                logger.info("discarding the previous state in %s (overwrite)", self.dir)
                self._discard()
            elif any(self.dir.glob("flags_*.json")):
                logger.info("resuming the evaluation stored in %s", self.dir)
        write_json(path, fingerprint)

    def _discard(self) -> None:
        for pattern in _STATE_GLOBS:
            for f in self.dir.glob(pattern):
                f.unlink()

    def load(self, name: str, components: list[str] | None = None) -> dict[str, Any]:
        """``{str(batch index): record}`` of ``name``'s finished batches (empty: none).

        An unreadable file gives no records and a malformed record is dropped, each with a
        warning: the runner recomputes what is missing (``components``: the sub-attack names
        every record must index).
        """
        if self.dir is None:
            return {}
        path = self.dir / f"flags_{_safe(name)}.json"
        if not path.exists():
            return {}
        d, why = read_json(path)
        batches = d.get("batches") if isinstance(d, dict) else None
        if why is None and not isinstance(batches, dict):
            why = "no 'batches' object"
        if why is None and d.get("components") != components:
            why = f"sub-attacks {d.get('components')} instead of {components}"
        if why is not None:
            logger.warning("%s is unreadable (%s); recomputing every batch of %r", path, why,
                           name)
            return {}
        good = {}
        for key, rec in batches.items():
            bad = _bad_record(key, rec, components)
            if bad:
                logger.warning("%s: batch %s is malformed (%s); recomputing it", path, key, bad)
            else:
                good[key] = rec
        return good

    def save(self, name: str, batches: dict[str, Any], **extra: Any) -> None:
        """Atomically replace ``name``'s file (``extra``: e.g. the sub-attack names).

        Raises:
            OutputError: the file cannot be written (the previous version stays).
        """
        if self.dir is not None:
            write_json(self.dir / f"flags_{_safe(name)}.json",
                       {"attack": name, **extra, "batches": batches})

    def aa_state(self, name: str, batch: int) -> Path | None:
        """The file a resumable attack (``Attack.resumable``) keeps for the batch in progress."""
        return None if self.dir is None else self.dir / f"aastate_{_safe(name)}_{batch:05d}.json"


def _bad_record(key: str, rec: Any, components: list[str] | None) -> str | None:
    """Why a saved batch record cannot be used (None: it can)."""
    if not key.isdigit():
        return f"batch key {key!r}"
    if not isinstance(rec, dict):
        return "not an object"
    idx, correct = rec.get("idx"), rec.get("correct")
    if not (isinstance(idx, list) and all(type(i) is int and i >= 0 for i in idx)):
        return "'idx' is not a list of point indices"
    if not (isinstance(correct, list) and len(correct) == len(idx)
            and all(isinstance(c, bool) for c in correct)):
        return "'correct' is not one flag per point"
    for k in ("time_s", "max_perturbation"):
        if isinstance(rec.get(k), bool) or not isinstance(rec.get(k), int | float):
            return f"{k!r} is not a number"
    nonfinite = rec.get("nonfinite", [])
    if not (isinstance(nonfinite, list) and all(i in idx for i in nonfinite)):
        return "'nonfinite' names points outside the batch"
    if components is not None:
        by = rec.get("broken_by")
        if not (isinstance(by, list) and len(by) == len(idx) and all(
                type(b) is int and -2 <= b < len(components) for b in by)):
            return "'broken_by' is not one sub-attack index per point"
    return None


def _safe(name: str) -> str:
    """A file-name-safe form of an attack name (``torchattacks:FAB(k=1)`` ->
    ``torchattacks_FAB_k_1_-<hash>``): one component, and two attack names never share a file
    (``utils.safe_name``; the old ``a/b`` and ``a:b`` both gave ``a_b``)."""
    return safe_name(name, "attack name")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of what differs, with both values (``attacks.pgd.steps: 1 -> 40``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{where}: added")
            elif k not in new:
                out.append(f"{where}: removed")
            else:
                out += _differences(old[k], new[k], where)
        return out
    if old == new:
        return []
    return [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The resumable state of an evaluation: per-attack JSON files of finished batches.

``state_dir/fingerprint.json`` holds every setting that changes a flag (the attacks'
``settings()``, batch size, protocol, seed, labels, and what the caller adds: model, checkpoint
hash, ε). A folder written with other settings is refused with a ``StateMismatchError`` naming
each differing setting, or emptied with ``overwrite=True``. ``state_dir/flags_<attack>.json``
holds one record per finished batch (written atomically after each batch), so an interrupted
run resumes at the first unfinished batch.

Example:
    >>> store = _Store("runs/x/state", {"seed": 0, "attacks": {...}}, overwrite=False)
    >>> store.save("pgd20", {"0": {"idx": [...], "correct": [...]}})
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from robustkit.errors import StateMismatchError
from robustkit.utils import atomic_write_json

__all__ = ["STATE_VERSION"]

logger = logging.getLogger(__name__)

#: Bumped when the files' meaning changes, so a folder written by older code is refused, not
#: misread (2: settings() fingerprints and per-sub-attack ``broken_by`` records).
STATE_VERSION = 2


class _Store:
    """Per-attack JSON of finished batches, guarded by a fingerprint of the settings.

    Args:
        state_dir: the folder (created); ``None`` keeps nothing (every method is a no-op).
        fingerprint: plain data; compared as canonical JSON.
        overwrite: discard a mismatching state instead of raising.

    Raises:
        StateMismatchError: ``state_dir`` holds a run made with other settings.
    """

    def __init__(self, state_dir: str | Path | None, fingerprint: dict[str, Any],
                 overwrite: bool) -> None:
        self.dir = None if state_dir is None else Path(state_dir)
        if self.dir is None:
            return
        fingerprint = json.loads(json.dumps({"state_version": STATE_VERSION, **fingerprint},
                                            default=str))  # canonical JSON types
        path = self.dir / "fingerprint.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != fingerprint:
                if not overwrite:
                    raise StateMismatchError(
                        f"{self.dir} holds an evaluation with other settings (differs in: "
                        f"{'; '.join(_differences(old, fingerprint))}); use another output "
                        "folder or overwrite (--overwrite)")
                logger.info("discarding the previous state in %s (overwrite)", self.dir)
                for f in [*self.dir.glob("flags_*.json"), *self.dir.glob("aastate_*.json")]:
                    f.unlink()
            elif any(self.dir.glob("flags_*.json")):
                logger.info("resuming the evaluation stored in %s", self.dir)
        atomic_write_json(path, fingerprint)

    def load(self, name: str) -> dict[str, Any]:
        """``{str(batch index): record}`` of ``name``'s finished batches (empty: none)."""
        if self.dir is None:
            return {}
        path = self.dir / f"flags_{_safe(name)}.json"
        return json.loads(path.read_text())["batches"] if path.exists() else {}

    def save(self, name: str, batches: dict[str, Any], **extra: Any) -> None:
        """Atomically replace ``name``'s file (``extra``: e.g. the sub-attack names)."""
        if self.dir is not None:
            atomic_write_json(self.dir / f"flags_{_safe(name)}.json",
                              {"attack": name, **extra, "batches": batches})

    def aa_state(self, name: str, batch: int) -> Path | None:
        """The file a resumable attack (``Attack.resumable``) keeps for the batch in progress."""
        return None if self.dir is None else self.dir / f"aastate_{_safe(name)}_{batch:05d}.json"


def _safe(name: str) -> str:
    """A file-name-safe form of an attack name (``torchattacks:FAB(k=1)`` -> ``...FAB_k_1_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


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

"""Atomic checkpoint writes and ``weights_only`` reads of the full resume state.

A checkpoint holds only tensors, numbers, strings, ``None``, lists, tuples and dicts, so it loads
with ``torch.load(weights_only=True)``: a checkpoint is untrusted input and unpickling it must
never run code (architecture.md §3). ``save_checkpoint`` refuses anything else *before* writing,
and writes through a temporary file and ``os.replace``, so a run killed mid-write leaves the
previous checkpoint intact.

Example:
    >>> save_checkpoint("runs/x/last.pt", trainer.state_dict())
    >>> trainer.load_state_dict(load_checkpoint("runs/x/last.pt"))
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from robustkit.errors import CheckpointError
from robustkit.utils import atomic_write, torch_load_plain

__all__ = ["save_checkpoint", "load_checkpoint", "check_plain", "CheckpointError"]

# Exact types torch's weights_only unpickler accepts besides containers. Subclasses are refused:
# numpy.float64 is a float, but not on torch's allowlist.
_PLAIN = (bool, int, float, str, bytes, type(None), torch.Size)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``CheckpointError`` naming the first entry of ``obj`` that is not plain data."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor | torch.dtype):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}: {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    else:
        raise CheckpointError(
            f"{where} is a {type(obj).__name__}: checkpoints hold only tensors, numbers, strings, "
            "lists and dicts (they are loaded with weights_only=True)"
        )


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, ``os.replace``).

    Args:
        path: destination file; parent folders are created.
        state: nested dicts/lists of tensors, numbers, strings and ``None``.

    Raises:
        CheckpointError: naming the first entry of another type (nothing is written).
    """
    check_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, corrupt (empty, truncated, not a torch file at
            all: "corrupt"), pickles anything but plain data ("refused": it is never run), or
            is not a dict.
    """
    try:
        state = torch_load_plain(path)  # tells "corrupt" (e.g. config.yaml) from "refused"
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"checkpoint {err}") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror or err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict")
    return state

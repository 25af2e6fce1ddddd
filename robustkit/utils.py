"""Small shared helpers: seeding, devices, atomic writes, ``"8/255"`` parsing, and the two
context managers every part uses on a model: ``eval_mode()`` and ``frozen_parameters()``."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustkit.errors import OutputError, UserError

__all__ = ["seed_everything", "resolve_device", "atomic_write", "atomic_write_json", "parse_number",
           "eval_mode", "frozen_parameters", "torch_load_plain", "torch_load_plain_bytes",
           "output_errors", "check_writable", "clean_tmp", "TMP_GLOB", "safe_name"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


# atomic_write's temporary files: ".<name>.<random>.tmp" beside the target (clean_tmp's prey).
TMP_GLOB = ".*.tmp"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; results and checkpoints get the usual 0666 & ~umask instead
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as indented JSON."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_writable(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (a folder) if needed and prove it writable; ``OutputError`` otherwise.

    Called before any model or data is loaded, so a typo in ``--out`` costs nothing.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is an existing file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{what} {path} is not writable ({err.strerror or err}); "
                          "choose another folder or fix its permissions") from None
    return path


def clean_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files interrupted atomic writes left in ``folder`` (not recursive).

    Only call it while holding the folder's lock: a live writer's temporary file looks the same.
    """
    removed = []
    for f in Path(folder).glob(TMP_GLOB):
        if f.is_file():
            try:
                f.unlink()
                removed.append(f)
            except OSError as err:  # pragma: no cover - racing cleanup; nothing is lost
                logger.debug("could not remove %s: %s", f, err)
    if removed:
        logger.info("removed %d temporary file(s) of interrupted writes in %s", len(removed),
                    folder)
    return removed


# safe_name: what a file-name component may hold (ASCII, no separator), and its longest form.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]+")
SAFE_NAME_MAX = 100


def safe_name(name: str, what: str = "name") -> str:
    """``name`` (a user's model label, entry name, attack name) as ONE file-name component.

    A name already made of ASCII letters, digits and ``_ . @ + -``, not starting with a dot and
    at most ``SAFE_NAME_MAX`` characters, is returned unchanged. Otherwise every other run of
    characters (``/``, ``\\``, spaces, ``:``, NUL ...) becomes ``_``, leading dots go (no ``..``,
    no hidden file), the rest is cut to ``SAFE_NAME_MAX`` characters and ``-<8 hex digits of
    sha256(name)>`` is appended, so two different names never share a file. The result never
    leaves the folder it is joined to.

    Raises:
        ValueError: naming ``what``, when ``name`` is not a non-empty string.

    Example:
        >>> safe_name("resnet18"), safe_name("../../x")
        ('resnet18', '_.._x-9cdf6a50')
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    safe = _UNSAFE.sub("_", name).lstrip(".")[:SAFE_NAME_MAX] or "_"
    if safe == name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe}-{digest}"


def check_plain_name(name: str, what: str = "name") -> str:
    """``name`` when it is a name, not a path; ``ValueError`` naming ``what`` otherwise.

    A run, entry or model name becomes part of file and folder names (always through
    :func:`safe_name` or under the output folder); a separator, ``.``/``..``, an empty string or
    a control character says the user meant a path, so it is refused rather than renamed.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} {name!r}: must be a non-empty name")
    if "/" in name or "\\" in name or name.strip() in (".", "..") or any(
            ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"{what} {name!r}: a name, not a path (no '/', '\\', '.', '..' or "
                         "control characters)")
    return name


def parse_number(value: str | float | int) -> float:
    """Parse ``0.3``, ``"0.5"`` or a fraction such as ``"8/255"`` into a float.

    Raises:
        ValueError: naming the value when it is neither a number nor a fraction.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a fraction such as 8/255, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction such as 8/255, got {value!r}") from None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, then every submodule's own mode back.

    Restoring each submodule (not ``model.train(was_training)``) matters: a model may keep some
    layers in eval while it trains (a frozen BatchNorm), and a root-level ``train(True)`` would
    silently switch them back on.

    Example:
        >>> with eval_mode(model):
        ...     logits = model(x)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad=False`` on every parameter for the block, then the previous flags back.

    For third-party attacks that call ``backward()`` (FAB, torchattacks' CW, ...): with frozen
    parameters they leave every parameter's ``.grad`` untouched, and skip the weight gradients.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def torch_load_plain(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors a user can act on.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``"corrupt"`` (empty, truncated or not a torch file) or ``"refused"`` (it
            pickles objects other than tensors and containers; they are never run). The two
            are told apart: a half-written file is not a security problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is corrupt: the file is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    return _load_plain(path, head, str(path))


def torch_load_plain_bytes(data: bytes, name: str) -> Any:
    """``torch_load_plain`` of a file's bytes already in memory (e.g. checksum-verified package
    data); ``name`` stands for the file in the messages."""
    if not data:
        raise ValueError(f"{name} is corrupt: the file is empty")
    return _load_plain(io.BytesIO(data), data[:4], name)


def _load_plain(source: Any, head: bytes, name: str) -> Any:
    import pickle

    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        # neither torch's zip format nor a (legacy) pickle: e.g. a YAML file given by mistake
        raise ValueError(f"{name} is corrupt: not a torch checkpoint (it starts with {head!r})")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # A global outside torch's allowlist ("Unsupported global: GLOBAL builtins.exec"), one
        # from a blocked module ("unsupported GLOBAL posix.system whose module posix is
        # blocked": os.system, subprocess), an object the weights-only unpickler will not build,
        # or a plain pickle it cannot read, is refused (unpickling it could run code). Inside
        # torch's zip format any other unpickling failure is corruption.
        lines = [ln.strip() for ln in str(err).splitlines() if _REFUSAL.search(ln)]
        if lines or head.startswith(b"\x80"):
            why = lines[0].rstrip(".") if lines else "a plain pickle, not a weights-only torch file"
            raise _Refused(f"{name} was refused: {why}; robustkit loads checkpoints with "
                           "weights_only=True and never runs pickled code") from None
        raise ValueError(f"{name} is corrupt ({_first(err)})") from None
    except (EOFError, RuntimeError, KeyError, OSError, IndexError) as err:
        # EOFError: cut before the first record; RuntimeError: a zip archive without its
        # central directory (cut mid-write); KeyError: not a torch file at all.
        raise ValueError(f"{name} is corrupt or truncated ({_first(err)}); it is not a complete "
                         "torch checkpoint") from None


# The weights-only unpickler's messages for content it will not load (torch 2.x
# _weights_only_unpickler.py), as opposed to bytes it cannot parse ("Unsupported operand").
_REFUSAL = re.compile(r"\bGLOBAL\b|Unsupported global|Can only (build|create new object)")


class _Refused(ValueError):
    """``torch_load_plain``: the file pickles code (a security refusal, not corruption)."""


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def output_errors(path: str | os.PathLike, intact: str = "") -> Iterator[None]:
    """Turn an ``OSError`` of the write of ``path`` into ``OutputError`` naming the file.

    A full disk (``ENOSPC``), an exhausted quota (``EDQUOT``), a read-only or re-mounted file
    system (``EROFS``) or permissions changed under a run are the user's to fix, not bugs: the
    CLI prints them as one line (exit 2). A ``UserError`` passes through unchanged.

    Args:
        path: the file being written, named in the message.
        intact: appended to the message, e.g. ``"; the previous last.pt is intact"``.

    Example:
        >>> with output_errors(out / "last.pt", "; the previous last.pt is intact"):
        ...     save_checkpoint(out / "last.pt", state)
    """
    try:
        yield
    except UserError:
        raise
    except OSError as err:
        code = errno.errorcode.get(err.errno or -1)
        reason = (err.strerror or str(err) or type(err).__name__) + (f" ({code})" if code else "")
        raise OutputError(f"cannot write {path}: {reason}{intact}") from err

"""User errors: what a user can fix, as opposed to a bug.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; any other exception is a
bug and keeps its traceback (exit code 1). The kinds also subclass ``ValueError``, so library
callers that catch ``ValueError`` keep working.

Example:
    >>> raise ConfigError("config key 'optim.lr' must be > 0, got 0")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["UserError", "ConfigError", "ModelError", "DataError", "StateMismatchError",
           "CheckpointError", "OutputError", "user_input"]


class UserError(Exception):
    """Base of every error a user causes and can fix (bad flag, file, config or state)."""


class ConfigError(UserError, ValueError):
    """An invalid configuration: unknown key, wrong type or value (names the key)."""


class ModelError(UserError, ValueError):
    """A model cannot be built or loaded: unknown name, bad file, mismatching checkpoint or
    wrong class count. The message says what to change."""


class DataError(UserError, ValueError):
    """A dataset root is missing or malformed (names the expected layout and ``--download``)."""


class StateMismatchError(UserError, ValueError):
    """A resumable state folder holds a run made with other settings."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be written safely or read as plain data."""


class OutputError(UserError, OSError):
    """An output folder or file that cannot be written: read-only, a file where a folder is
    expected, a full disk, locked by another live run, or holding a run that would be lost."""


@contextmanager
def user_input(
    kind: type[UserError], where: str, catch: tuple[type[Exception], ...] = (ValueError,)
) -> Iterator[None]:
    """Re-raise the library's ``ValueError`` from user-given values as the user error ``kind``.

    Wrap only the call that receives the user's values (a constructor, a factory, a loader):
    the same exception from anywhere else is a bug and must keep its traceback. A
    ``UserError`` passes through unchanged. Used by ``robustkit.cli`` and by the library calls
    behind it (``robustkit.config.build``, ``robustkit.evaluate``).

    Args:
        kind: e.g. ``ConfigError`` or ``DataError``.
        where: what the user wrote, prefixed to the message (``"objective.params"``).
        catch: exception types to convert (default ``ValueError``).

    Example:
        >>> with user_input(ConfigError, "objective.params"):
        ...     objective = create_objective(name, model, **params)
    """
    try:
        yield
    except UserError:
        raise
    except catch as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise kind(f"{where}: {message}") from err

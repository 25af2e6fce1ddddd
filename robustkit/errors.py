"""User errors: what a user can fix, as opposed to a bug.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; any other exception is a
bug and keeps its traceback (exit code 1). The kinds also subclass ``ValueError``, so library
callers that catch ``ValueError`` keep working.

Example:
    >>> raise ConfigError("config key 'optim.lr' must be > 0, got 0")
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "ModelError", "DataError", "StateMismatchError",
           "CheckpointError", "OutputError"]


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

"""Loaders: ``robustkit train``'s :class:`TrainConfig` and ``robustkit evaluate``'s
:class:`EvalConfig` from YAML, overrides and flags; saving a resolved config.
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustkit.config._merge import _config_key, _merge, _parse_overrides, _read_mapping
from robustkit.config.schema import EvalConfig, TrainConfig
from robustkit.config.validate import _validate, _validate_eval
from robustkit.errors import ConfigError
from robustkit.utils import atomic_write, check_plain_name

__all__ = ["load_config", "build_config", "load_eval_config", "save_config", "to_container"]

logger = logging.getLogger(__name__)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML file, apply dotted ``key=value`` overrides, validate.

    Args:
        path: YAML file; its stem is the default ``name`` (hence ``runs/<name>/``).
        overrides: e.g. ``["trainer.epochs=1", "objective.params.eps=8/255"]``.

    Returns:
        A typed, read-only ``DictConfig`` of :class:`TrainConfig`.

    Raises:
        ConfigError: missing file, malformed YAML, unknown key (with the nearest valid one),
            wrong type or value.
    """
    return build_config(_read_mapping(path), overrides, name=Path(path).stem)


def build_config(
    raw: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    name: str | None = None,
) -> DictConfig:
    """Merge a plain dict and dotted overrides onto the schema (what ``load_config`` does).

    Args:
        raw: nested dict as read from YAML (``None``: all defaults).
        overrides: dotted ``key=value`` strings, applied after ``raw``.
        name: default experiment name when ``raw`` sets none.
    """
    merged = OmegaConf.structured(TrainConfig)
    for layer in (raw or {}, _parse_overrides(overrides)):
        merged = _merge(merged, layer, TrainConfig, _config_key)
    if merged.name is None:
        merged.name = name or "run"
    try:  # the name becomes runs/<name>: a path there would leave runs/ (name=.., name=/abs)
        check_plain_name(merged.name, "name")
    except ValueError as err:
        raise ConfigError(f"{err}; set trainer.out_dir to choose the run folder") from None
    if merged.trainer.out_dir is None:
        merged.trainer.out_dir = str(Path("runs") / merged.name)
    _validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def load_eval_config(
    path: str | os.PathLike | None = None, flags: Mapping[str, Any] | None = None
) -> DictConfig:
    """``robustkit evaluate``'s settings: the ``-c`` file, then the flags, on :class:`EvalConfig`.

    Both layers pass the same checks; an error names the flag (``--eps``) or the file's key.

    Args:
        path: optional YAML mapping of :class:`EvalConfig` keys.
        flags: key -> value given on the command line; ``None`` means not given. Strings read
            as in the file: ``"16"``, ``"8/255"``, ``"clean,pgd20"``.

    Returns:
        A typed, read-only ``DictConfig`` of :class:`EvalConfig`.

    Raises:
        ConfigError: missing file, malformed YAML, unknown key (with the nearest valid one),
            wrong type, bad value (unknown dataset or attack, eps outside (0, 1], ...), or a
            missing ``model`` / ``dataset``.

    Example:
        >>> cfg = load_eval_config("configs/evaluate/mnist_Linf.yaml", {"model": "small_cnn"})
    """
    file = _read_mapping(path) if path is not None else {}
    given = {k: v for k, v in (flags or {}).items() if v is not None}

    def label(key: str) -> str:
        # A key set only in the file is named there; any other (a flag, or a missing value
        # the user will most likely add as a flag) by its flag.
        top = key.split(".")[0]
        if top in file and top not in given:
            return f"{_config_key(key)} in {path}"
        return f"--{key.replace('_', '-')}"

    merged = OmegaConf.structured(EvalConfig)
    merged = _merge(merged, file, EvalConfig, label)
    merged = _merge(merged, given, EvalConfig, label)
    _validate_eval(merged, label)
    OmegaConf.set_readonly(merged, True)
    return merged


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), e.g. ``<out_dir>/config.yaml``."""
    atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True).encode())


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain nested dict (str, numbers, lists, dicts): safe for ``weights_only`` checkpoints."""
    return typing.cast(dict, OmegaConf.to_container(cfg, resolve=True))

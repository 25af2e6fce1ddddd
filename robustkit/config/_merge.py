"""Generic machinery for any schema dataclass: read a YAML mapping, parse dotted overrides,
check keys (with the nearest valid one), coerce ``"8/255"`` and comma lists, merge by OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustkit.errors import ConfigError
from robustkit.utils import parse_number

# A whole string that is a fraction such as "8/255" or "-1.5 / 2" (decimals allowed).
_FRACTION = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")

Label = Callable[[str], str]  # dotted key -> how messages name it


def _config_key(key: str) -> str:
    return f"config key {key!r}"


def _read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # OmegaConf's YAML loader (not yaml.safe_load): it reads 5e-4 as a float, not a string.
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:  # Latin-1, UTF-16, a binary file given by mistake
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start}); save the config as UTF-8") from None
    except OSError as err:  # permission denied, a folder that vanished, an I/O error
        raise ConfigError(f"config file {path} cannot be read "
                          f"({err.strerror or type(err).__name__})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys, got a list")
    return typing.cast(dict, OmegaConf.to_container(loaded))


def _merge(merged: DictConfig, layer: dict[str, Any], schema: type, label: Label) -> DictConfig:
    """Check one layer's keys, coerce its fractions and lists, merge it (types checked there)."""
    _check_keys(layer, schema, "", schema, label)
    coerced = _coerce(layer, schema, "", label)
    try:
        return typing.cast(DictConfig, OmegaConf.merge(merged, OmegaConf.create(coerced)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{label(key)}: {_first_line(err)}") from None


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. seed=1)")
    try:
        return typing.cast(dict, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # YAML: e.g. a control character
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {_first_line(err)}") from None


def _fields(schema: type) -> dict[str, Any]:
    """Field name → type hint of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for key, hint in _fields(schema).items():
        full = f"{prefix}{key}"
        keys.append(full)
        if dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, f"{full}."))
    return keys


def _check_keys(raw: Any, schema: type, prefix: str, root: type, label: Label) -> None:
    """Unknown keys raise with the nearest valid key (difflib over the dotted names)."""
    if not isinstance(raw, dict):
        return
    known = _fields(schema)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            valid = _all_keys(root)
            if "params" in known and not isinstance(value, dict):
                # A method hyper-parameter written beside params: instead of under it.
                valid = [f"{prefix}params.{key}", *valid]
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown {label(full)}; {hint}")
        if dataclasses.is_dataclass(known[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{label(full)} is a section; expected a mapping")
            _check_keys(value, known[key], f"{full}.", root, label)


def _is_str(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) is not None and str in typing.get_args(hint))


def _is_float(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) is not None and float in typing.get_args(hint))


def _list_of(hint: Any) -> Any:
    """The item type of ``list[T]`` or ``list[T] | None``, else None."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is list:
            return typing.get_args(h)[0]
    return None


def _coerce(raw: Any, schema: type, prefix: str, label: Label) -> Any:
    """Fractions to floats where the schema expects a float (and anywhere under params); a
    comma-separated string to a list where it expects a list of strings."""
    out = {}
    for key, value in raw.items():
        hint = _fields(schema)[key]
        full = f"{prefix}{key}"
        item = _list_of(hint)
        if dataclasses.is_dataclass(hint):
            value = _coerce(value, hint, f"{full}.", label)
        elif key == "params":
            value = _fractions(value, full, label)
        elif item is str and isinstance(value, str):
            from robustkit.attacks.specs import split_list  # commas inside (...) stay

            value = split_list(value)
        elif item is float and isinstance(value, list):
            value = [_number(v, full, label) if isinstance(v, str) else v for v in value]
        elif _is_str(hint) and isinstance(value, bool):
            # YAML 1.1 reads an unquoted off/on as a boolean: trainer.amp=off means "off".
            value = "on" if value else "off"
        elif _is_float(hint) and isinstance(value, str):
            value = _number(value, full, label)
        out[key] = value
    return out


def _number(value: str, key: str, label: Label) -> float:
    try:
        return parse_number(value)
    except ValueError:
        if value.strip().lstrip("+-").lower() in ("nan", "inf", "infinity"):
            raise ConfigError(f"{label(key)} must be a finite number, got {value!r}") from None
        raise ConfigError(f"{label(key)}: expected a number or a fraction such as 8/255, "
                          f"got {value!r}") from None


def _fractions(value: Any, key: str, label: Label) -> Any:
    """Recursively replace fraction strings inside free-form ``params``."""
    if isinstance(value, dict):
        return {k: _fractions(v, f"{key}.{k}", label) for k, v in value.items()}
    if isinstance(value, list):
        return [_fractions(v, key, label) for v in value]
    if isinstance(value, str) and _FRACTION.match(value):
        return _number(value, key, label)
    return value


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

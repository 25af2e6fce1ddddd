"""Typed training configuration: dataclass schemas, YAML + dotted overrides, ``"8/255"``, save.

One dataclass per section (``data``, ``model``, ``attack``, ``objective``, ``optim``,
``trainer``, ``log``) merged by OmegaConf onto :class:`TrainConfig`. Only the CLI turns a config
into objects (architecture.md §1, rule 4); library classes take keyword arguments.

Example:
    >>> cfg = load_config("configs/train/cifar10_trades.yaml", ["objective.params.beta=3"])
    >>> save_config(cfg, "runs/cifar10_trades/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustkit.errors import ConfigError
from robustkit.utils import atomic_write, parse_number

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "AttackConfig", "ObjectiveConfig",
           "OptimConfig", "TrainerConfig", "LogConfig", "TrainConfig", "load_config",
           "build_config", "save_config", "to_container"]

logger = logging.getLogger(__name__)

# A whole string that is a fraction such as "8/255" or "-1.5 / 2" (decimals allowed).
_FRACTION = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")
_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("sgd", "adam"),
    "optim.schedule": ("multistep", "cosine", "onecycle", "constant"),
    "trainer.amp": ("off", "bf16", "fp16"),
    "trainer.eval_norm": ("Linf", "L2"),
}


@dataclass
class DataConfig:
    """Dataset and loaders (``robustkit.data.build_loaders``)."""

    name: str = "cifar10"  # mnist cifar10 cifar100 tinyimagenet sample-mnist sample-cifar10
    root: str | None = None  # None: $ROBUSTKIT_DATA, else ./data
    batch_size: int = 128  # global: each of W ranks gets batch_size // W
    eval_batch_size: int | None = None  # holdout/test loaders; None: batch_size
    holdout: int = 1000  # training images held out for best-checkpoint selection (Rice et al.)
    num_workers: int = 0
    download: bool = False
    augment: bool = True  # crop + flip on CIFAR / Tiny-ImageNet (methods.md §2)
    limit: int | None = None  # train on the first N training images only (smoke runs)


@dataclass
class ModelConfig:
    """Architecture (``robustkit.models.create_model``); mean/std/shape come from the dataset."""

    name: str = "preact_resnet18"
    params: dict[str, Any] = field(default_factory=dict)  # extra create_model keyword arguments


@dataclass
class AttackConfig:
    """Optional training attack; ``name: null`` lets the objective build its own default one."""

    name: str | None = None  # e.g. pgd; built on the bare model and passed as attack=
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """Training objective (``robustkit.objectives.create_objective``)."""

    name: str = "natural"  # natural pgd_at trades mart fat gairat awp srd_dat
    params: dict[str, Any] = field(default_factory=dict)  # checked against the constructor


@dataclass
class OptimConfig:
    """Optimizer and per-iteration learning-rate schedule."""

    name: str = "sgd"  # sgd | adam
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum; Adam beta1
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | onecycle | constant
    milestones: list[float] = field(default_factory=lambda: [100.0, 105.0])  # <1: fractions
    gamma: float = 0.1  # multistep factor at each milestone
    warmup_epochs: float = 0.0  # linear warm-up from 0; onecycle: the peak (0: 2/5 of training)


@dataclass
class TrainerConfig:
    """Training loop, evaluation during training and the run directory."""

    epochs: int = 1
    out_dir: str | None = None  # run directory; None: runs/<config name>
    resume: str | None = None  # a last.pt to continue from exactly
    amp: str = "off"  # off | bf16 | fp16
    grad_clip: float | None = None  # max global gradient norm
    device: str | None = None  # None/"auto": CUDA when available; torchrun: the local rank's GPU
    eval_every: int = 1  # epochs between held-out evaluations (0: never)
    eval_steps: int = 20  # PGD-k on the holdout split
    eval_eps: float | None = None  # None: the dataset's default eps for eval_norm
    eval_alpha: float | None = None  # None: the EvalCallback's default (eps / 4)
    eval_norm: str = "Linf"
    eval_n: int = 1000  # holdout images evaluated (rounded up to whole batches)
    checkpoint_every: int = 1  # epochs between last.pt writes
    log_every: int = 50  # steps between scalar logs


@dataclass
class LogConfig:
    """Writers of the run directory."""

    tensorboard: bool = True  # out_dir/tb
    jsonl: bool = True  # out_dir/metrics.jsonl
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class TrainConfig:
    """The whole ``robustkit train`` configuration."""

    name: str | None = None  # experiment name; None: the config file's stem
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> DictConfig:
    """Load a YAML file, apply dotted ``key=value`` overrides, validate.

    Args:
        path: YAML file; its stem is the default ``name`` (hence ``runs/<name>/``).
        overrides: e.g. ``["trainer.epochs=1", "objective.params.eps=8/255"]``.

    Returns:
        A typed, read-only ``DictConfig`` of :class:`TrainConfig`.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: malformed YAML, unknown key (with the nearest valid one), wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        # OmegaConf's YAML loader (not yaml.safe_load): it reads 5e-4 as a float, not a string.
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections, got a list")
    raw = typing.cast(dict, OmegaConf.to_container(loaded))
    return build_config(raw, overrides, name=path.stem)


def build_config(
    raw: dict[str, Any] | None = None,
    overrides: typing.Sequence[str] = (),
    name: str | None = None,
) -> DictConfig:
    """Merge a plain dict and dotted overrides onto the schema (what ``load_config`` does).

    Args:
        raw: nested dict as read from YAML (``None``: all defaults).
        overrides: dotted ``key=value`` strings, applied after ``raw``.
        name: default experiment name when ``raw`` sets none.
    """
    merged = OmegaConf.structured(TrainConfig)
    layers = [raw or {}, _parse_overrides(overrides)]
    for layer in layers:
        _check_keys(layer, TrainConfig, "")
        coerced = _coerce(layer, TrainConfig, "")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(coerced))
        except OmegaConfBaseException as err:
            raise _config_error(err) from None
    if merged.name is None:
        merged.name = name or "run"
    if merged.trainer.out_dir is None:
        merged.trainer.out_dir = str(Path("runs") / merged.name)
    _validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), e.g. ``<out_dir>/config.yaml``."""
    atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True).encode())


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain nested dict (str, numbers, lists, dicts): safe for ``weights_only`` checkpoints."""
    return typing.cast(dict, OmegaConf.to_container(cfg, resolve=True))


# --------------------------------------------------------------------------- internals


def _parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. seed=1)")
    try:
        return typing.cast(dict, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as err:
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


def _check_keys(raw: Any, schema: type, prefix: str) -> None:
    """Unknown keys raise with the nearest valid key (difflib over the dotted names)."""
    if not isinstance(raw, dict):
        return
    known = _fields(schema)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            valid = _all_keys(TrainConfig)
            if "params" in known and not isinstance(value, dict):
                # A method hyper-parameter written beside params: instead of under it.
                valid = [f"{prefix}params.{key}", *valid]
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {full!r}; {hint}")
        if dataclasses.is_dataclass(known[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section; expected a mapping")
            _check_keys(value, known[key], f"{full}.")


def _is_str(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) is not None and str in typing.get_args(hint))


def _is_float(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) is not None and float in typing.get_args(hint))


def _coerce(raw: Any, schema: type, prefix: str) -> Any:
    """Turn ``"8/255"`` into floats where the schema expects a float and anywhere under params."""
    out = {}
    for key, value in raw.items():
        hint = _fields(schema)[key]
        full = f"{prefix}{key}"
        if dataclasses.is_dataclass(hint):
            value = _coerce(value, hint, f"{full}.")
        elif key == "params":
            value = _fractions(value, full)
        elif _is_str(hint) and isinstance(value, bool):
            # YAML 1.1 reads an unquoted off/on as a boolean: trainer.amp=off means "off".
            value = "on" if value else "off"
        elif _is_float(hint) and isinstance(value, str):
            value = _number(value, full)
        elif typing.get_origin(hint) is list and isinstance(value, list):
            value = [_number(v, full) if isinstance(v, str) else v for v in value]
        out[key] = value
    return out


def _number(value: str, key: str) -> float:
    try:
        return parse_number(value)
    except ValueError:
        raise ConfigError(f"config key {key!r}: expected a number or a fraction such as 8/255, "
                          f"got {value!r}") from None


def _fractions(value: Any, key: str) -> Any:
    """Recursively replace fraction strings inside free-form ``params``."""
    if isinstance(value, dict):
        return {k: _fractions(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_fractions(v, key) for v in value]
    if isinstance(value, str) and _FRACTION.match(value):
        return _number(value, key)
    return value


def _validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}{hint}")
    positive = {"trainer.epochs": 1, "data.batch_size": 1, "trainer.eval_steps": 1,
                "trainer.log_every": 1, "trainer.checkpoint_every": 1, "trainer.eval_n": 1}
    non_negative = ("data.holdout", "data.num_workers", "trainer.eval_every",
                    "optim.weight_decay", "optim.warmup_epochs", "optim.momentum")
    for key, low in [*positive.items(), *((k, 0) for k in non_negative)]:
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"config key 'data.limit' must be >= 1 or null, got {cfg.data.limit}")
    if any(m <= 0 for m in cfg.optim.milestones):
        raise ConfigError(f"config key 'optim.milestones' must be > 0 (epochs, or fractions < 1), "
                          f"got {list(cfg.optim.milestones)}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _config_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    return ConfigError(f"config key {key!r}: {_first_line(err)}")

"""Typed configurations: dataclass schemas, YAML + overrides, ``"8/255"``, save.

``robustkit train``: one dataclass per section (``data``, ``model``, ``attack``, ``objective``,
``optim``, ``trainer``, ``log``) merged by OmegaConf onto :class:`TrainConfig`, then dotted
``key=value`` overrides. ``robustkit evaluate``: the flat :class:`EvalConfig`, a ``-c`` YAML
file with the flags on top, so a value gets the same checks wherever it comes from. Only the CLI
turns a config into objects (architecture.md §1, rule 4); library classes take keyword
arguments. Every error is a :class:`~robustkit.errors.ConfigError` naming the key.

Example:
    >>> cfg = load_config("configs/train/cifar10_trades.yaml", ["objective.params.beta=3"])
    >>> save_config(cfg, "runs/cifar10_trades/config.yaml")
    >>> ev = load_eval_config("configs/evaluate/cifar10_Linf.yaml", {"model": "resnet18"})
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustkit.errors import ConfigError
from robustkit.utils import atomic_write, parse_number

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "AttackConfig", "ObjectiveConfig",
           "OptimConfig", "TrainerConfig", "LogConfig", "TrainConfig", "EvalConfig",
           "load_config", "build_config", "load_eval_config", "save_config", "to_container"]

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
    eval_steps: int = 20  # PGD-k on the holdout split; eval_steps * eval_alpha must reach eps
    eval_eps: float | None = None  # None: the dataset's default eps for eval_norm
    eval_alpha: float | None = None  # None: eps / 4, as robustkit evaluate's pgdK
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


@dataclass
class EvalConfig:
    """The whole ``robustkit evaluate`` configuration: its flags, with underscores."""

    model: str | None = None  # NAME | FILE.py:FN | robustbench:NAME (required)
    checkpoint: str | None = None  # weights file, loaded weights-only and strictly
    dataset: str | None = None  # a key of robustkit.data.DATASETS (required)
    data_root: str | None = None  # None: $ROBUSTKIT_DATA, else ./data
    threat_model: str = "Linf"  # Linf | L2
    eps: float | None = None  # [0, 1] pixel units ("8/255" accepted); None: the dataset's
    n_examples: int | None = None  # the first N test images; None: all (RobustBench: 10,000)
    batch_size: int = 256  # images per attack call
    # RobustBench's number (AutoAttack standard) plus PGD-20 as a quick cross-check; a
    # comma-separated string is accepted too ("clean,pgd20").
    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20", "autoattack"])
    aa_version: str = "standard"  # standard | plus | custom
    aa_attacks: list[str] | None = None  # with aa_version custom, e.g. [apgd-ce, apgd-t]
    protocol: str = "standalone"  # standalone | cascade
    out: str | None = None  # None: runs/evaluate/<name>-<dataset>-<threat_model>
    name: str | None = None  # entry name in the RobustBench JSON; None: from model
    seed: int = 0  # seed of the attacks' randomness
    device: str | None = None  # None: CUDA when available


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


# --------------------------------------------------------------------------- internals

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


def _one_of(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}{hint}")


def _validate(cfg: DictConfig) -> None:
    from robustkit.data import DATASETS

    for key, choices in {**_CHOICES, "data.name": tuple(DATASETS)}.items():
        _one_of(OmegaConf.select(cfg, key), choices, _config_key(key))
    positive = {"trainer.epochs": 1, "data.batch_size": 1, "trainer.eval_steps": 1,
                "trainer.log_every": 1, "trainer.checkpoint_every": 1, "trainer.eval_n": 1}
    non_negative = ("data.holdout", "data.num_workers", "trainer.eval_every",
                    "optim.weight_decay", "optim.warmup_epochs", "optim.momentum")
    for key, low in [*positive.items(), *((k, 0) for k in non_negative)]:
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    for key in ("optim.lr", "trainer.eval_eps", "trainer.eval_alpha"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"config key 'data.limit' must be >= 1 or null, got {cfg.data.limit}")
    if any(m <= 0 for m in cfg.optim.milestones):
        raise ConfigError(f"config key 'optim.milestones' must be > 0 (epochs, or fractions < 1), "
                          f"got {list(cfg.optim.milestones)}")
    if cfg.trainer.eval_every > 0:
        _check_eval_reach(cfg.trainer, DATASETS[cfg.data.name].eps[cfg.trainer.eval_norm])


def _check_eval_reach(t: DictConfig, default_eps: float) -> None:
    """Reject a held-out PGD whose ``eval_steps × eval_alpha`` cannot reach ε.

    Such an attack stays inside a smaller ball, so a natural model looks robust (issue #9
    measured 80 % "robust" accuracy with 5 steps of 0.01 at ε = 0.3) and ``best.pt``, which
    follows that number, is chosen on a meaningless value. An error, not a warning: the run is
    long and the number silently wrong.
    """
    eps = t.eval_eps if t.eval_eps is not None else default_eps
    alpha = t.eval_alpha if t.eval_alpha is not None else eps / 4
    # Relative slack: 3 steps of 0.1 must reach 0.3 despite float rounding.
    if t.eval_steps * alpha < eps * (1 - 1e-6):
        written = "eps/4" if t.eval_alpha is None else f"{alpha:g}"
        raise ConfigError(
            f"config keys 'trainer.eval_steps' x 'trainer.eval_alpha' = {t.eval_steps} x "
            f"{written} = {t.eval_steps * alpha:.4g} < eval eps {eps:.4g}: the held-out PGD "
            f"cannot reach the eps-ball's surface and would overstate robustness; raise "
            f"trainer.eval_steps or trainer.eval_alpha (null: eps/4, which needs >= 4 steps)")


def _validate_eval(cfg: DictConfig, label: Label) -> None:
    from robustkit.attacks.specs import check_aa_attacks, parse_attacks
    from robustkit.data import DATASETS

    if not cfg.model:
        raise ConfigError(f"{label('model')} is required (NAME, FILE.py:FN or robustbench:NAME)")
    _one_of(cfg.dataset, tuple(DATASETS), label("dataset"))
    _one_of(cfg.threat_model, ("Linf", "L2"), label("threat_model"))
    _one_of(cfg.aa_version, ("standard", "plus", "custom"), label("aa_version"))
    _one_of(cfg.protocol, ("standalone", "cascade"), label("protocol"))
    if cfg.eps is not None and not (cfg.eps > 0 and (cfg.threat_model != "Linf" or cfg.eps <= 1)):
        raise ConfigError(f"{label('eps')} must be > 0 (and <= 1 for Linf) in [0, 1] pixel "
                          f"units, got {cfg.eps}")
    for key, low in (("batch_size", 1), ("n_examples", 1), ("seed", 0)):
        value = cfg[key]
        if value is not None and value < low:
            raise ConfigError(f"{label(key)} must be an integer >= {low}, got {value}")
    try:
        parse_attacks(list(cfg.attacks))
    except ValueError as err:
        raise ConfigError(f"{label('attacks')}: {err}") from None
    aa = list(cfg.aa_attacks) if cfg.aa_attacks is not None else None
    try:
        check_aa_attacks(cfg.aa_version, aa)
    except ValueError as err:
        raise ConfigError(f"{label('aa_attacks')} / {label('aa_version')}: {err}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

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

from robustkit.config.loading import (
    build_config,
    load_config,
    load_eval_config,
    save_config,
    to_container,
)
from robustkit.config.schema import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
)
from robustkit.errors import ConfigError

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "AttackConfig", "ObjectiveConfig",
           "OptimConfig", "TrainerConfig", "LogConfig", "TrainConfig", "EvalConfig",
           "load_config", "build_config", "load_eval_config", "save_config", "to_container"]

"""Typed configurations: dataclass schemas, YAML + overrides, ``"8/255"``, save.

``robustkit train``: one dataclass per section (``data``, ``model``, ``attack``, ``objective``,
``optim``, ``trainer``, ``log``) merged by OmegaConf onto :class:`TrainConfig`, then dotted
``key=value`` overrides. ``robustkit evaluate``: the flat :class:`EvalConfig`, a ``-c`` YAML
file with the flags on top, so a value gets the same checks wherever it comes from. Only this
package turns a config into objects (architecture.md §1, rule 4): :func:`build` wires a training
config into a :class:`Run` (what ``robustkit train`` trains), for the CLI and notebooks alike;
library classes take keyword arguments. Every error is a
:class:`~robustkit.errors.ConfigError` naming the key.

Example:
    >>> run = build("configs/smoke.yaml", ["trainer.out_dir=/tmp/smoke", "trainer.device=cpu"])
    >>> state = run.fit()
"""

from robustkit.config.build import Run, build
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

__all__ = ["build", "Run", "ConfigError", "DataConfig", "ModelConfig", "AttackConfig",
           "ObjectiveConfig", "OptimConfig", "TrainerConfig", "LogConfig", "TrainConfig",
           "EvalConfig", "load_config", "build_config", "load_eval_config", "save_config",
           "to_container"]

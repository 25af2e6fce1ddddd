"""Training: the one loop (``Trainer``), its callbacks, checkpoints, loggers and meters.

The training package imports no attack: the CLI builds the held-out evaluation's attacks and
hands them to ``EvalCallback`` (architecture.md §2).

Example:
    >>> from robustkit.training import Trainer, CheckpointCallback
    >>> Trainer(model, objective, optimizer, epochs=10, callbacks=[...]).fit(loaders.train)
"""

from robustkit.training.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    JSONLCallback,
    SaliencyCallback,
    SensitivityCallback,
    TensorBoardCallback,
)
from robustkit.training.checkpoint import check_plain, load_checkpoint, save_checkpoint
from robustkit.training.loggers import NullLogger, TensorBoardLogger
from robustkit.training.trainer import NonFiniteLossError, Trainer, TrainerState

__all__ = ["Trainer", "TrainerState", "NonFiniteLossError", "Callback", "EvalCallback",
           "CheckpointCallback", "JSONLCallback", "SaliencyCallback",
           "SensitivityCallback", "TensorBoardCallback",
           "save_checkpoint",
           "load_checkpoint", "check_plain", "NullLogger", "TensorBoardLogger"]

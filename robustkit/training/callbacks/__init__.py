"""Trainer callbacks: held-out evaluation, neuron sensitivity, saliency panels, checkpoints,
``metrics.jsonl`` and TensorBoard.

A callback is any object with some of the methods of :class:`Callback` (minGPT style); the
trainer calls them in the order given, so put ``EvalCallback`` before the callbacks that read
its ``eval/*`` metrics, and ``CheckpointCallback`` last: an epoch's log lines are then on disk
before its checkpoint, so a run killed in between has logs *ahead* of ``last.pt`` (trimmed on
resume), never behind it (a line lost for good). Every callback runs on every rank; those that
write files or logs act on rank 0 only (``distributed.is_main()``), while evaluation and
``trainer.state_dict()`` are collectives under DDP and run everywhere.

Example:
    >>> cbs = [EvalCallback(loaders.holdout, {"pgd20": pgd20}), JSONLCallback("runs/x/m.jsonl"),
    ...        CheckpointCallback("runs/x")]
    >>> Trainer(model, objective, optimizer, epochs=10, callbacks=cbs).fit(loaders.train)
"""

from robustkit.training.callbacks.base import Callback
from robustkit.training.callbacks.checkpoint import CheckpointCallback
from robustkit.training.callbacks.evaluation import EvalCallback
from robustkit.training.callbacks.jsonl import JSONLCallback, MetricsLogger
from robustkit.training.callbacks.saliency import SaliencyCallback
from robustkit.training.callbacks.sensitivity import SensitivityCallback
from robustkit.training.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "Callback",
    "EvalCallback",
    "CheckpointCallback",
    "JSONLCallback",
    "MetricsLogger",
    "SaliencyCallback",
    "SensitivityCallback",
    "TensorBoardCallback",
]

"""The trainer's events, as the methods of :class:`Callback`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["Callback", "check_probe_args", "first_items", "probe_due", "probe_mode",
           "cuda_indices"]


class Callback:
    """The trainer's events; subclassing is optional (any object with some of them works)."""

    def on_fit_start(self, trainer) -> None: ...

    def on_batch_end(self, trainer, out, batch) -> None: ...

    def on_epoch_end(self, trainer) -> None: ...

    def on_fit_end(self, trainer) -> None: ...

    def on_exception(self, trainer, error: BaseException) -> None: ...


def first_items(dataset, n: int):
    """The first ``n`` items of ``dataset`` stacked: images ``(n, C, H, W)`` and labels ``(n,)``
    (a callback's fixed probe set, the same in every run)."""
    import torch

    items = [dataset[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(item[0]) for item in items])
    y = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
    return x, y


def check_probe_args(data, perturb, **counts):
    """A probe callback's common arguments: ``data`` a non-empty Dataset (or a DataLoader over
    one, returned unwrapped), ``perturb`` callable, every ``counts`` value an int >= 1; raises
    ``ValueError`` naming the first bad one. Returns the dataset."""
    from torch.utils.data import DataLoader

    dataset = data.dataset if isinstance(data, DataLoader) else data
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError("data must be a non-empty Dataset or a DataLoader over one")
    if not callable(perturb):
        raise ValueError(f"perturb must be a function (model, x, y, generator) -> x_adv, "
                         f"got {type(perturb).__name__}")
    for name, value in counts.items():
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return dataset


def probe_due(trainer, every: int) -> bool:
    """Whether a probe callback measures at this ``on_epoch_end``: on rank 0, every ``every``
    epochs (``trainer.state.epoch`` counts the finished ones) and after the last."""
    from robustkit import distributed as dist

    done = trainer.state.epoch
    return (done % every == 0 or done == trainer.epochs) and dist.is_main()


def cuda_indices(device) -> list[int]:
    """The CUDA device whose RNG a fork must save for ``device``: ``[its index]`` (the current
    CUDA device when it has none) on CUDA, ``[]`` elsewhere (then only the CPU's is forked)."""
    import torch

    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def probe_mode(model, device=None) -> Iterator[tuple[Any, Any]]:
    """A probe callback's measurement surroundings; yields ``(bare, device)``.

    ``bare`` is the bare module (``distributed.unwrap``: DDP and compile wrappers removed);
    ``device`` the one given, else where the model's first parameter or buffer lives, else the
    CPU. Inside: the global RNG streams forked (the CPU's and, on CUDA, that device's), so
    whatever an attack or an explainer draws, training's streams continue as before; the model
    in eval mode (every submodule's mode restored after); autocast off.
    """
    import torch

    from robustkit import distributed as dist
    from robustkit.sensitivity.pairs import model_device
    from robustkit.utils import eval_mode

    bare = dist.unwrap(model)
    device = model_device(bare) if device is None else torch.device(device)
    with torch.random.fork_rng(devices=cuda_indices(device)), eval_mode(bare), \
            torch.autocast(device.type, enabled=False):
        yield bare, device

"""The trainer's events, as the methods of :class:`Callback`."""

from __future__ import annotations

__all__ = ["Callback", "check_probe_args", "first_items"]


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

"""The trainer's events, as the methods of :class:`Callback`."""

from __future__ import annotations

__all__ = ["Callback", "first_items"]


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

"""The trainer's events, as the methods of :class:`Callback`."""

from __future__ import annotations

__all__ = ["Callback"]


class Callback:
    """The trainer's events; subclassing is optional (any object with some of them works)."""

    def on_fit_start(self, trainer) -> None: ...

    def on_batch_end(self, trainer, out, batch) -> None: ...

    def on_epoch_end(self, trainer) -> None: ...

    def on_fit_end(self, trainer) -> None: ...

    def on_exception(self, trainer, error: BaseException) -> None: ...

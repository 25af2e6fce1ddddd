"""tqdm progress bars for the CLI (the library only takes a ``progress`` factory)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["tqdm_factory"]


def tqdm_factory(enabled: bool | None = None) -> Callable[[str, int], tqdm]:
    """A ``progress(name, total)`` factory of per-attack bars counted in images.

    Args:
        enabled: ``True`` always shows bars, ``False`` never, ``None`` (default) only on a
            terminal (tqdm's ``disable=None``).

    Example:
        >>> evaluate_attacks(model, data, attacks, progress=tqdm_factory())
    """
    disable = None if enabled is None else not enabled

    def factory(name: str, total: int) -> tqdm:
        return tqdm(total=total, desc=f"{name:>12}", unit="img", leave=False, disable=disable,
                    dynamic_ncols=True)

    return factory

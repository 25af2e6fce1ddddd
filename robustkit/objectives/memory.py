"""``SampleMemory``: per-sample tensors indexed by dataset index (methods.md §7.1).

Holds what an objective remembers about each training sample across epochs (SRD-DAT's score EMA,
IAAT/CAT budgets). Slots never written read as NaN. With ``torch.distributed`` initialised,
``update`` all-gathers every rank's ``(idx, values)`` first, so all ranks hold the same memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SampleMemory"]


class SampleMemory:
    """Named 1-D float tensors indexed by dataset index, grown on demand.

    Args:
        size: number of dataset samples, when known (the store grows past it if needed).

    Example:
        >>> mem = SampleMemory(); mem.update("score", idx, r)
        >>> prev = mem.get("score", idx)   # NaN where a sample was never seen
    """

    def __init__(self, size: int = 0) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)
        self._store: dict[str, Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def names(self) -> list[str]:
        return sorted(self._store)

    def get(self, name: str, idx: Tensor) -> Tensor:
        """Values of ``name`` at dataset indices ``idx`` (NaN where never written).

        Shape: ``idx (N,) -> (N,)`` float32 on ``idx``'s device.
        """
        idx = _check_idx(idx)
        table = self._store.get(name)
        out = torch.full(idx.shape, float("nan"), device=idx.device)
        if table is None:
            return out
        inside = idx < table.numel()
        out[inside] = table[idx[inside].to(table.device)].to(out.device, out.dtype)
        return out

    def update(self, name: str, idx: Tensor, values: Tensor) -> None:
        """Write ``values`` at ``idx`` (gathered from all ranks when distributed)."""
        idx = _check_idx(idx)
        values = values.detach().float().reshape(-1)
        if values.numel() != idx.numel():
            raise ValueError(f"values has {values.numel()} entries for {idx.numel()} indices")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            idx, values = _all_gather_cat(idx), _all_gather_cat(values)
        table = self._grow(name, int(idx.max()) + 1 if idx.numel() else 0, values.device)
        table[idx.to(table.device)] = values.to(table.device)

    def _grow(self, name: str, needed: int, device: torch.device) -> Tensor:
        table = self._store.get(name)
        n = max(needed, self.size, 0 if table is None else table.numel())
        if table is None or table.numel() < n:
            new = torch.full((n,), float("nan"), device=device)
            if table is not None:
                new[: table.numel()] = table.to(device)
            self._store[name] = table = new
        return table

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: (size,) tensor}`` copies (NaN = never written)."""
        return {name: t.detach().clone() for name, t in self._store.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, t in state.items():
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise ValueError(f"memory entry {name!r} must be a 1-D tensor")
        self._store = {name: t.detach().clone().float() for name, t in state.items()}

    def __repr__(self) -> str:
        sizes = {n: t.numel() for n, t in self._store.items()}
        return f"SampleMemory({sizes})"


def _check_idx(idx: Tensor) -> Tensor:
    if not isinstance(idx, Tensor) or idx.dim() != 1:
        raise ValueError("idx must be a (N,) tensor of dataset indices")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integers, got {idx.dtype}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("idx must be >= 0")
    return idx.long()


def _all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` (1-D, possibly of different lengths per rank) from every rank."""
    world = dist.get_world_size()
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])

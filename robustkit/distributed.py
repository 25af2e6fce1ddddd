"""torchrun environment → process group; rank queries, DDP wrap/unwrap, sharding and gathering.

Every function also works without a process group (a plain single-process run), where it is the
identity or a no-op, so library code calls them unconditionally.

Example:
    >>> info = init_from_env()                   # under `torchrun --nproc_per_node=4 ...`
    >>> model = wrap_ddp(model.to(info.device), info.device)
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustkit.utils import resolve_device

__all__ = [
    "DistInfo",
    "init_from_env",
    "is_main",
    "rank",
    "world_size",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_cat",
    "all_gather_object",
    "wrap_ddp",
    "unwrap",
    "shard_indices",
    "cleanup",
    "raise_first_failure",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_from_env(device: str | torch.device | None = None, timeout_s: float = 1800) -> DistInfo:
    """Start the process group from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Without ``WORLD_SIZE`` no process group is created: rank 0 of 1 on ``resolve_device(device)``.
    Under torchrun each rank takes ``cuda:<LOCAL_RANK>`` with NCCL when CUDA is available (and
    ``device`` does not ask for the CPU), else the CPU with Gloo.

    Args:
        device: ``None``/``"auto"``, ``"cpu"`` or ``"cuda"``; a device index is ignored under
            torchrun (the local rank decides).
        timeout_s: collective timeout in seconds (default 30 min: an AutoAttack evaluation on rank 0
            may keep the other ranks waiting at a barrier for a long time).
    """
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 0, 1, resolve_device(device))
    world = int(os.environ["WORLD_SIZE"])
    global_rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = resolve_device(device)
    if want.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)  # NCCL and all_gather_object use the current device
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=global_rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        log.info("process group %s: rank %d/%d on %s", backend, global_rank, world, dev)
    return DistInfo(global_rank, local, world, dev)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0: the only rank that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left unchanged)."""
    out = tensor.detach().clone()
    if _active() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks (a new floating tensor)."""
    return all_reduce_sum(tensor if tensor.is_floating_point() else tensor.float()) / world_size()


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order; sizes may differ by rank.

    Shape:
        ``(n_r, ...)`` on rank r → ``(sum_r n_r, ...)`` on every rank.
    """
    if not (_active() and world_size() > 1):
        return tensor.detach().clone()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_int = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad every rank to the largest size, trim after.
    pad = torch.zeros((max(sizes_int), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    pad[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(pad) for _ in sizes_int]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_int, strict=True)])


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` in a single process)."""
    if not (_active() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` when more than one process runs, else ``model`` itself.

    The model must already be on ``device``; on CUDA the wrapper is bound to that device.
    """
    if not (_active() and world_size() > 1):
        return model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type != "cuda":  # CPU (gloo): DDP takes no device ids
        return nn.parallel.DistributedDataParallel(model)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return nn.parallel.DistributedDataParallel(model, device_ids=[index])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers: attacks, taps and checkpoints always hold the bare module."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous slice of ``range(n)``; the first ``n % world`` ranks get one more.

    Concatenating the shards in rank order gives ``range(n)`` back, so gathered per-sample results
    are in index order (architecture.md §3, scale-out).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def raise_first_failure(failures: list[tuple[str, str] | None]) -> None:
    """Raise the first rank's failure among gathered ``(exception type name, message)`` summaries.

    For a rank that did not fail but must stop because another did (after a collective such as
    ``all_gather_object`` that carried the summaries), so no rank waits forever for a dead one.
    A ``robustkit.errors.UserError`` kind or a built-in exception is raised as the same type
    with the message prefixed by the rank (the CLI still prints one line and exits 2 for a user
    error); anything else becomes a ``RuntimeError`` naming the rank and the type (the traceback
    is on that rank). No-op when none failed.
    """
    import builtins

    from robustkit import errors

    for r, failure in enumerate(failures):
        if failure is None:
            continue
        kind, message = failure
        cls = getattr(errors, kind, None) or getattr(builtins, kind, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ in (
                "builtins", errors.__name__):
            try:
                exc = cls(f"rank {r}: {message}")
            except TypeError:  # a constructor with other arguments (UnicodeDecodeError)
                exc = None
            if exc is not None:
                raise exc
        raise RuntimeError(f"rank {r} failed with {kind}: {message}")


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if _active():
        dist.destroy_process_group()

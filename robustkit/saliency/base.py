"""The ``Explainer`` seam (architecture.md §3): ``attribute(x, target)`` -> a map shaped like x.

Subclasses implement ``_attribute(x, target)`` on a detached ``x`` and a resolved ``(N,)`` int64
target. The base class validates the inputs, resolves the default target (the predicted class),
runs the model in eval mode and restores every submodule's mode, enables autograd itself (so it
works under ``torch.no_grad()``) and prepares the random generators of the noise explainers for
the call. Gradients come from ``torch.autograd.grad`` on a fresh leaf: ``x.grad``, parameter
``.grad`` and hooks are never touched.

Wrappers (``GradientXInput``, ``SmoothGrad``, ``AdaptGrad``, ``IntegratedGradients``) hold an inner
explainer and call its ``_attribute`` with the target already resolved on the clean input, so a
noisy or interpolated point is always explained for the class of ``x`` (methods.md §6.2).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.utils import eval_mode

__all__ = ["Explainer", "Target"]

logger = logging.getLogger(__name__)

#: ``None`` (the predicted class), one class for every sample, or one class per sample.
Target = int | Sequence[int] | Tensor | None

# Rows per forward pass when internal_batch_size is None (at least the images of the call).
DEFAULT_ROWS = 256


class Explainer:
    """Base class of all explainers: ``attribute(x, target=None)`` returns a map shaped like x.

    The score explained is the **logit** of the target class (methods.md §6.2), never a softmax.
    Attribution runs in **eval mode** (BatchNorm on running statistics, dropout off, as the
    attacks do; captum instead leaves the mode alone): a map then depends neither on the batch it
    is computed in nor on dropout draws, and BatchNorm's running statistics are not updated. Every
    submodule's mode is restored afterwards.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``.
        internal_batch_size: most rows sent through the model at once (default ``None``:
            ``max(N, DEFAULT_ROWS)``, N the images of the call, so a few images' noise or path
            samples still fill a batch: ``benchmarks/bench_saliency.py`` measured N rows per
            forward at 1.2x the ideal chunking on ResNet-18 with 4 images). Bounds memory; results
            do not depend on it.

    Shape:
        x: ``(N, C, H, W)`` in [0, 1] (any ``(N, ...)`` the model takes); target: int or
        ``(N,)``; returned map: like x, detached.

    Example:
        >>> maps = Gradient(model).attribute(x)            # predicted class
        >>> maps = Gradient(model).attribute(x, target=y)  # one class per sample
    """

    def __init__(self, model: nn.Module, internal_batch_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.internal_batch_size = _check_batch_size(internal_batch_size)

    #: The explainer draws random numbers. ``IntegratedGradients`` then hands it one path point
    #: (all N images) per call, so the noise it draws does not depend on IG's batching.
    stochastic: bool = False

    def attribute(self, x: Tensor, target: Target = None) -> Tensor:
        """Explain ``target``'s logit at ``x``; ``target=None`` means the predicted class.

        Raises:
            ValueError: ``x`` is not a finite floating tensor with a batch dimension, or
                ``target`` is not one int or ``N`` ints in ``[0, K)``.
        """
        _check_input(x)
        if x.shape[0] == 0:  # nothing to explain: an empty map, without touching the model
            return torch.zeros_like(x.detach())
        # eval_mode restores each submodule's own mode; enable_grad: works under no_grad()
        with eval_mode(self.model), torch.enable_grad(), self._random_scope(x.device):
            x = x.detach()  # the caller's tensor never enters a graph: x.grad stays as it was
            resolved = self._resolve_target(x, target)
            out = self._attribute(x, resolved)
        return out.detach()

    def _attribute(self, x: Tensor, target: Tensor) -> Tensor:
        """The map for a detached ``x`` and an ``(N,)`` int64 target on x's device."""
        raise NotImplementedError

    @contextmanager
    def _random_scope(self, device: torch.device) -> Iterator[None]:
        """Set up this explainer's (and its inners') random generators for one call."""
        yield

    def settings(self) -> dict[str, Any]:
        """Every constructor argument that changes the result, nested for wrappers."""
        return {"name": type(self).__name__,
                "internal_batch_size": self.internal_batch_size, **self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items()
                         if k not in ("name", "inner"))
        if isinstance(getattr(self, "inner", None), Explainer):
            args = f"{self.inner!r}, {args}"
        return f"{type(self).__name__}({args})"

    def _rows(self, n: int) -> int:
        return self.internal_batch_size or max(n, DEFAULT_ROWS)

    def _resolve_target(self, x: Tensor, target: Target) -> Tensor:
        n = x.shape[0]
        if target is None:
            # the predicted class of the clean input, in eval mode, without a graph
            with torch.no_grad():
                rows = self._rows(n)
                logits = torch.cat([_check_logits(self.model(x[i:i + rows]), x[i:i + rows])
                                    for i in range(0, n, rows)])
            return logits.argmax(dim=1)
        t = torch.as_tensor(target, device=x.device)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"target must be an int or have shape ({n},), got {tuple(t.shape)}")
        if n and int(t.min()) < 0:
            raise ValueError(f"target must be >= 0, got {int(t.min())}")
        return t.long()


def _accumulate(inner: Explainer, target: Tensor, blocks: Iterable[tuple[Tensor, float]],
                rows: int, drop_nan: bool) -> tuple[Tensor, Tensor]:
    """``Σ_j w_j · inner(x_j)`` per image over blocks ``(x_j (N, ...), w_j)``, in block order.

    Rows are sent to ``inner`` ``rows`` at a time, a call spanning consecutive blocks, and the
    sums are taken block by block for every image whatever the chunking, so a result does not
    depend on ``rows`` (beyond the model's own batch-size rounding). Blocks are consumed lazily:
    at most ``rows + N`` rows of input are alive at once.

    With ``drop_nan`` a row whose map has a NaN anywhere is left out (methods.md §6.2: "any sample
    whose gradient contains a NaN is dropped") and ``count`` says how many weights were kept per
    image; otherwise NaNs propagate and ``count`` is the plain sum of weights.

    Returns:
        ``(total, count)``: total like one block, count ``(N,)``.
    """
    total: Tensor | None = None
    count: Tensor | None = None
    queue: deque[list] = deque()  # [block, weight, first row not yet sent]
    queued = 0

    def run(take: int) -> None:
        nonlocal total, count
        parts, segments = [], []
        while take:
            block, weight, start = queue[0]
            stop = min(start + take, block.shape[0])
            parts.append(block[start:stop])
            segments.append((weight, start, stop))
            take -= stop - start
            if stop == block.shape[0]:
                queue.popleft()
            else:
                queue[0][2] = stop
        maps = inner._attribute(torch.cat(parts), torch.cat([target[a:b] for _, a, b in segments]))
        offset = 0
        for weight, a, b in segments:
            m = maps[offset:offset + b - a]
            offset += b - a
            if total is None:
                total = torch.zeros((target.shape[0], *m.shape[1:]), dtype=m.dtype,
                                    device=m.device)
                count = torch.zeros(target.shape[0], dtype=m.dtype, device=m.device)
            if drop_nan:
                keep = ~torch.isnan(m.flatten(1)).any(dim=1)
                shape = (-1,) + (1,) * (m.dim() - 1)
                total[a:b] += torch.where(keep.view(shape), weight * m, torch.zeros_like(m))
                count[a:b] += keep.to(m.dtype) * weight
            else:
                total[a:b] += weight * m
                count[a:b] += weight

    for block, weight in blocks:
        queue.append([block, weight, 0])
        queued += block.shape[0]
        while queued >= rows:
            run(rows)
            queued -= rows
    if queued:
        run(queued)
    if total is None:
        raise ValueError("nothing to accumulate: no blocks")  # pragma: no cover - callers guard
    return total, count


def _check_batch_size(internal_batch_size: int | None) -> int | None:
    if internal_batch_size is None:
        return None
    if isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) \
            or internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be a positive int or None, got "
                         f"{internal_batch_size!r}")
    return internal_batch_size


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension (N, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf values")


def _check_logits(logits: Tensor, x: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape ({x.shape[0]}, K), got {shape}")
    return logits

"""``Normalize``: the one place in robustkit where a per-channel mean and std are applied."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize"]


def _as_vector(value: float | Sequence[float] | Tensor, name: str) -> Tensor:
    vec = torch.as_tensor(value, dtype=torch.float32).flatten().clone()
    if vec.numel() == 0:
        raise ValueError(f"{name} must hold at least one value, got {value!r}")
    if not torch.isfinite(vec).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return vec


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, the first layer of every robustkit model.

    Attacks, objectives and explainers work on [0, 1] pixels and never see a mean or std
    (methods.md §0, as in RobustBench's "Model definition"). ``mean`` and ``std`` are
    persistent buffers, as in RobustBench's models: they follow ``.to()``/``.double()`` and
    are saved in ``state_dict()`` (keys ``mean`` and ``std``), so a checkpoint records the
    normalisation its weights were trained with and restores it on load.

    Args:
        mean: per-channel mean in [0, 1] pixel units; a float or one value per channel.
        std: per-channel standard deviation, > 0; a float or one value per channel. A single
            value broadcasts over the channels of ``mean`` and vice versa.

    Shape:
        Input ``(N, C, H, W) in [0, 1]`` (or ``(N, C)``); output the same shape.

    Example:
        >>> norm = Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
        >>> z = norm(torch.rand(2, 3, 32, 32))
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: float | Sequence[float] | Tensor, std: float | Sequence[float] | Tensor
    ) -> None:
        super().__init__()
        mean_v, std_v = _as_vector(mean, "mean"), _as_vector(std, "std")
        if mean_v.numel() != std_v.numel():
            if mean_v.numel() == 1:
                mean_v = mean_v.expand_as(std_v).clone()
            elif std_v.numel() == 1:
                std_v = std_v.expand_as(mean_v).clone()
            else:
                raise ValueError(
                    f"mean and std must have the same number of channels, got "
                    f"{mean_v.numel()} and {std_v.numel()}"
                )
        if (std_v <= 0).any():
            raise ValueError(f"std must be > 0, got {std!r}")
        self.register_buffer("mean", mean_v)
        self.register_buffer("std", std_v)

    def forward(self, x: Tensor) -> Tensor:
        c = self.mean.numel()
        if c > 1 and (x.dim() < 2 or x.shape[1] != c):
            # broadcasting would silently turn a 1-channel x into C channels
            have = x.shape[1] if x.dim() > 1 else 0
            raise ValueError(f"x has {have} channel{'s' * (have != 1)}, the model expects {c} "
                             f"(its Normalize has {c}); x has shape {tuple(x.shape)}")
        # (C,) buffers viewed as (1, C, 1, ...) so they broadcast over batch and space.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"

"""The architecture registry: ``MODELS`` and ``create_model`` (Normalize + architecture)."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from robustkit.errors import ModelError
from robustkit.models.cifar_cnn import CifarCNN
from robustkit.models.normalize import Normalize
from robustkit.models.preact_resnet import PreActResNet
from robustkit.models.resnet import ResNet
from robustkit.models.small_cnn import SmallCNN
from robustkit.models.wide_resnet import WideResNet

__all__ = ["MODELS", "create_model"]

# name -> constructor taking num_classes, in_channels (and input_size when the flatten size
# depends on it) plus the architecture's own keyword arguments.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,  # TRADES MNIST CNN; any square input >= 12 px
    "cifar_cnn": CifarCNN,  # fast 4-conv BN network for 32x32
    "preact_resnet18": partial(PreActResNet, num_blocks=(2, 2, 2, 2)),
    "resnet18": partial(ResNet, num_blocks=(2, 2, 2, 2)),  # CIFAR stem; 32x32 and 64x64
    "wrn_28_10": partial(WideResNet, depth=28, widen_factor=10),
    "wrn_34_10": partial(WideResNet, depth=34, widen_factor=10),
}

# Filled in by create_model from the dataset, never by the caller's **kwargs.
_DATASET_ARGS = ("num_classes", "in_channels", "input_size")


def _channel_vector(value: float | Sequence[float], name: str, in_channels: int) -> torch.Tensor:
    vec = torch.as_tensor(value, dtype=torch.float32).flatten()
    if vec.numel() == 1:
        return vec.expand(in_channels).clone()
    if vec.numel() != in_channels:
        raise ValueError(f"{name} has {vec.numel()} values but in_channels is {in_channels}")
    return vec


def create_model(
    name: str,
    num_classes: int,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    in_channels: int = 3,
    input_size: int = 32,
    **kwargs: object,
) -> nn.Sequential:
    """Build a registered architecture behind its ``Normalize`` layer (random weights, train mode).

    Args:
        name: a key of ``MODELS``: small_cnn, cifar_cnn, preact_resnet18, resnet18,
            wrn_28_10, wrn_34_10.
        num_classes: number of logits K.
        mean: per-channel mean in [0, 1] units (one value or ``in_channels`` values); None
            with ``std=None`` means no normalisation. Default None.
        std: per-channel std, > 0. Default None.
        in_channels: input channels (1 for MNIST). Default 3.
        input_size: input height = width in pixels (28 MNIST, 32 CIFAR, 64 Tiny-ImageNet);
            used by the architectures whose flatten size depends on it. Default 32.
        **kwargs: the architecture's own arguments (e.g. ``drop`` for small_cnn).

    Returns:
        ``nn.Sequential(normalize=Normalize, model=architecture)``.

    Raises:
        ModelError: unknown ``name`` (known names listed) or unknown ``kwargs`` (accepted
            ones listed).
        ValueError: naming a bad ``num_classes``, ``mean``, ``std`` or shape argument.

    Example:
        >>> model = create_model("resnet18", num_classes=10, mean=(0.49, 0.48, 0.45),
        ...                      std=(0.25, 0.24, 0.26))
    """
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(MODELS)} "
            f"(load_model/--model also take path/to/file.py:function and robustbench:NAME)"
        )
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if (mean is None) != (std is None):
        missing = "std" if std is None else "mean"
        raise ValueError(f"{missing} is missing: give both mean and std, or neither")
    constructor = MODELS[name]
    params = inspect.signature(constructor).parameters
    accepted = [p for p in params if p not in _DATASET_ARGS]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(
            f"model {name!r} does not accept {', '.join(unknown)}; accepted keyword arguments: "
            f"{', '.join(accepted) or 'none'}"
        )
    dataset_args: dict[str, int] = {"num_classes": num_classes, "in_channels": in_channels}
    if "input_size" in params:
        dataset_args["input_size"] = input_size
    architecture = constructor(**dataset_args, **kwargs)
    normalize = Normalize(
        _channel_vector(0.0 if mean is None else mean, "mean", in_channels),
        _channel_vector(1.0 if std is None else std, "std", in_channels),
    )
    return nn.Sequential(OrderedDict([("normalize", normalize), ("model", architecture)]))

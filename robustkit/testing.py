"""Tiny and analytic models shared by the tests and benchmarks (captum.testing's idea).

Everything here takes [0, 1] inputs and returns logits, like every robustkit model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyCNN", "LinearModel", "IdentityFeatures", "ConstantModel", "random_batch",
           "separable_toy_data", "pyautoattack_resnet18"]


class TinyCNN(nn.Module):
    """conv(8) → BN → ReLU → pool → linear; BatchNorm makes train/eval mode observable."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(8 * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class LinearModel(nn.Module):
    """``logits = W · flatten(x) + b``: input gradients are rows of W, so FGSM is analytic."""

    def __init__(self, in_shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


class IdentityFeatures(nn.Module):
    """``net.feat`` is the input itself (``nn.Identity``), then flatten and a linear layer:
    a feature hook on ``net.feat`` sees F(x) = x exactly, so neuron-level terms (σ, top-k, SNS
    distances) can be written out by hand from x and x'. Seeded: the same weights every time."""

    def __init__(self, shape: tuple[int, ...] = (10, 2, 2), num_classes: int = 10,
                 seed: int = 0) -> None:
        from collections import OrderedDict

        super().__init__()
        fc = nn.Linear(int(torch.tensor(shape).prod()), num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = fc.in_features ** -0.5
            fc.weight.copy_(torch.rand(fc.weight.shape, generator=g) * 2 * bound - bound)
            fc.bias.copy_(torch.rand(fc.bias.shape, generator=g) * 2 * bound - bound)
        self.net = nn.Sequential(OrderedDict(feat=nn.Identity(), flat=nn.Flatten(), fc=fc))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConstantModel(nn.Module):
    """Predicts ``label`` for every input; its logits still depend (weakly) on x so gradients exist.

    With ``sensitivity=0`` the logits are exactly constant (zero input gradient).
    """

    def __init__(self, num_classes: int = 10, label: int = 0, sensitivity: float = 1e-3) -> None:
        super().__init__()
        logits = torch.zeros(num_classes)
        logits[label] = 10.0
        self.register_buffer("logits", logits)
        self.sensitivity = sensitivity

    def forward(self, x: Tensor) -> Tensor:
        wiggle = self.sensitivity * x.flatten(1).mean(1, keepdim=True)
        return self.logits.expand(x.shape[0], -1) + wiggle


class HalfMaskedLinear(nn.Module):
    """A ``LinearModel((3, 8, 8), 10)`` whose right image half is quantised to quarters, minus a
    tiny decoy linear term whose gradient points the wrong way: each sub-attack of AutoAttack
    standard breaks some points at eps 0.05 (APGD-CE, APGD-T, FAB-T and Square: 7, 4, 1, 3 of 24
    ``random_batch(24, (3, 8, 8), seed=1)`` points) and some stay robust."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = LinearModel((3, 8, 8), 10)

    def forward(self, x: Tensor) -> Tensor:
        q = torch.cat([x[..., :4], torch.round(x[..., 4:] * 4) / 4], dim=-1)
        return self.net(q) - 1e-3 * self.net.fc(x.flatten(1))


def shrink_autoattack(aa):
    """Fewer iterations (5), target classes (2) and Square queries (30) on a built
    ``pyautoattack.AutoAttack``, in place, for fast tests; the protocol is unchanged. Returns it.

    Example:
        >>> monkeypatch.setattr(AutoAttack, "build", lambda s, d: shrink_autoattack(build(s, d)))
    """
    for a in (aa.apgd, aa.apgd_targeted, aa.fab):
        a.n_iter = 5
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 2
    aa.square.n_queries = 30
    return aa


def random_batch(
    n: int = 8, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A reproducible batch ``x`` uniform in [0, 1] and labels ``y``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def separable_toy_data(
    n: int = 256, shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images whose class is the brightness level: learnable in a few steps by any model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    level = (y.float() + 0.5) / num_classes
    noise = 0.05 * torch.randn((n, *shape), generator=g)
    x = (level.view(-1, *([1] * len(shape))) + noise).clamp(0, 1)
    return x, y


def pyautoattack_resnet18() -> nn.Module:
    """The real standard CIFAR-10 ResNet-18 that ships with ``pyautoattack``, in eval mode.

    ``examples/resnet.py`` (kuangliu's ResNet-18) with ``examples/model_test.pt`` loaded weights-
    only and strictly. Its ``examples/eval.py`` feeds ``ToTensor()`` images, so the network takes
    [0, 1] pixels without normalisation, like every robustkit model. Needs ``pyautoattack``.
    """
    from pathlib import Path

    import pyautoattack
    from pyautoattack.examples.resnet import ResNet18

    from robustkit.models import load_state_dict_file

    model = ResNet18()
    weights = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    return model.eval()

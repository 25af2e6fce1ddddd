"""``PreActResNet``: pre-activation ResNet-18, the robust-overfitting reference network."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PreActResNet"]


class _PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the projection shortcut (if any) reads the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet (PreActResNet-18 by default) with a final BN-ReLU before pooling.

    He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016,
    https://arxiv.org/abs/1603.05027; the variant of Rice et al., "Overfitting in adversarially
    robust deep learning", ICML 2020, https://arxiv.org/abs/2002.11569, whose state-dict keys
    (``conv1 layer1..4 bn linear``) it keeps. About 11.17M parameters for K = 10. Pooling is
    adaptive, so 64×64 inputs work.

    Args:
        num_classes: number of logits K. Default 10.
        in_channels: input channels. Default 3.
        num_blocks: pre-activation blocks per stage. Default (2, 2, 2, 2) (PreActResNet-18).

    Shape:
        Input ``(N, in_channels, H, W) in [0, 1]`` with H, W ≥ 8; output ``(N, K)`` logits.

    Example:
        >>> model = PreActResNet(num_classes=10)
        >>> logits = model(torch.rand(2, 3, 32, 32))
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, num_blocks: Sequence[int] = (2, 2, 2, 2)
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must be 4 positive integers, got {num_blocks!r}")
        self._in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_PreActBlock(self._in_planes, planes, s))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        # Pre-activation blocks end without a ReLU: the last BN-ReLU closes the network.
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

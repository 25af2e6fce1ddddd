"""``ResNet``: ResNet-18/34 with the CIFAR stem (3×3 conv, stride 1, no max-pool)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNet"]


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut (1×1 conv-BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # An empty Sequential is the identity; keeps the reference's state-dict keys.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks and the CIFAR stem, as used across adversarial training.

    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
    https://arxiv.org/abs/1512.03385. Layout and state-dict keys (``conv1 bn1 layer1..4
    linear``) follow the widely used kuangliu/pytorch-cifar code, which is also AutoAttack's
    example model, so those checkpoints load unchanged. Global average pooling is adaptive,
    so 64×64 Tiny-ImageNet inputs work (8×8 final maps instead of 4×4).

    Args:
        num_classes: number of logits K. Default 10.
        in_channels: input channels. Default 3.
        num_blocks: basic blocks per stage; (2, 2, 2, 2) is ResNet-18 (about 11.17M parameters
            for K = 10), (3, 4, 6, 3) ResNet-34. Default ResNet-18.

    Shape:
        Input ``(N, in_channels, H, W) in [0, 1]`` with H, W ≥ 8 (32 or 64); output ``(N, K)``.

    Example:
        >>> model = ResNet(num_classes=200)
        >>> logits = model(torch.rand(2, 3, 64, 64))
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, num_blocks: Sequence[int] = (2, 2, 2, 2)
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must be 4 positive integers, got {num_blocks!r}")
        self._in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_BasicBlock(self._in_planes, planes, s))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Adaptive pooling equals the reference's avg_pool2d(4) on 32×32 inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

"""``WideResNet``: WRN-depth-k as in TRADES and RobustBench (WRN-28-10, WRN-34-10)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WideResNet"]


class _WideBlock(nn.Module):
    """Pre-activation basic block; attribute names match TRADES (``equalInOut``,
    ``convShortcut``) so their checkpoints load key for key."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop = drop
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        # As in the reference: when the width changes, the shortcut reads the activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop > 0:
            out = F.dropout(out, p=self.drop, training=self.training)
        return shortcut + self.conv2(out)


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                           drop)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide residual network WRN-``depth``-``widen_factor`` with the TRADES/RobustBench layout.

    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
    https://arxiv.org/abs/1605.07146; code and keys from TRADES (Zhang et al. 2019,
    https://arxiv.org/abs/1901.08573) as kept by RobustBench. Parameters for K = 10:
    WRN-28-10 about 36.48M, WRN-34-10 about 46.16M. Pooling is adaptive (the reference's
    ``avg_pool2d(8)`` on 32×32 inputs), so 64×64 inputs work too.

    Args:
        num_classes: number of logits K. Default 10.
        in_channels: input channels. Default 3.
        depth: total depth; (depth - 4) must be divisible by 6. Default 34.
        widen_factor: width multiplier k. Default 10.
        drop: dropout probability inside blocks. Default 0.0.
        sub_block1: also build TRADES' unused ``sub_block1`` (it never runs) so that the
            official TRADES checkpoints load strictly. Default False (RobustBench).

    Shape:
        Input ``(N, in_channels, H, W) in [0, 1]`` with H, W ≥ 4; output ``(N, K)`` logits.

    Example:
        >>> model = WideResNet(num_classes=10, depth=28, widen_factor=10)
        >>> logits = model(torch.rand(2, 3, 32, 32))
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 34,
        widen_factor: int = 10,
        drop: float = 0.0,
        sub_block1: bool = False,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, channels[0], channels[1], 1, drop)
        if sub_block1:
            self.sub_block1 = _NetworkBlock(n, channels[0], channels[1], 1, drop)
        self.block2 = _NetworkBlock(n, channels[1], channels[2], 2, drop)
        self.block3 = _NetworkBlock(n, channels[2], channels[3], 2, drop)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He initialisation on fan-out, exactly as the reference code.
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

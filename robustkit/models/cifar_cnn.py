"""``CifarCNN``: a small, fast four-conv BatchNorm network for 32×32 colour images."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["CifarCNN"]


def _conv_bn(in_channels: int, out_channels: int) -> list[tuple[str, nn.Module]]:
    # bias=False: the BatchNorm right after the conv has its own shift.
    return [
        ("conv", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)),
        ("bn", nn.BatchNorm2d(out_channels)),
        ("relu", nn.ReLU()),
    ]


class CifarCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU layers (32, 64 | 128, 128 channels, max-pool after each pair)
    and a two-layer classifier; about 2.3M parameters and 0.08 G multiply-adds per 32×32 image.

    Not from a paper: a quick model for demos, smoke tests and short GPU runs, where a
    ResNet is too slow. The flatten size follows ``input_size`` (two 2×2 pools: side / 4).

    Args:
        num_classes: number of logits K. Default 10.
        in_channels: input channels. Default 3.
        input_size: input height = width in pixels, at least 4. Default 32.
        width: channels of the first conv; the others are 2×, 4×, 4× it. Default 32.
        hidden: units of the hidden fully connected layer. Default 256.

    Shape:
        Input ``(N, in_channels, input_size, input_size) in [0, 1]``; output ``(N, K)`` logits.

    Example:
        >>> model = CifarCNN(num_classes=10)
        >>> logits = model(torch.rand(8, 3, 32, 32))
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width: int = 32,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if input_size < 4:
            raise ValueError(f"input_size must be at least 4 for CifarCNN, got {input_size}")
        if width < 1 or hidden < 1:
            raise ValueError(f"width and hidden must be positive, got {width} and {hidden}")
        widths = (width, 2 * width, 4 * width, 4 * width)
        self.block1 = nn.Sequential(OrderedDict(_conv_bn(in_channels, widths[0])))
        self.block2 = nn.Sequential(
            OrderedDict(_conv_bn(widths[0], widths[1]) + [("pool", nn.MaxPool2d(2))])
        )
        self.block3 = nn.Sequential(OrderedDict(_conv_bn(widths[1], widths[2])))
        self.block4 = nn.Sequential(
            OrderedDict(_conv_bn(widths[2], widths[3]) + [("pool", nn.MaxPool2d(2))])
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(widths[3] * side * side, hidden)),
                    ("relu", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, num_classes)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block4(self.block3(self.block2(self.block1(x))))
        return self.classifier(out.flatten(1))

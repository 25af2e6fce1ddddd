"""``SmallCNN``: the TRADES MNIST network (4 conv, 2 max-pool, 3 fully connected layers)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _flat_side(input_size: int) -> int:
    # Two unpadded 3x3 convs (-4) then a 2x2 max-pool, twice: 28 -> 4, 32 -> 5.
    side = input_size
    for _ in range(2):
        side = (side - 4) // 2
    return side


class SmallCNN(nn.Module):
    """The TRADES ``SmallCNN``: conv 32, 32 → pool → conv 64, 64 → pool → fc 200, 200 → K.

    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019, https://arxiv.org/abs/1901.08573 (``models/small_cnn.py`` of their code).
    Layer names, initialisation (Kaiming convs, zero last layer) and dropout match the
    reference, so its MNIST checkpoints load; the flatten size is computed from
    ``input_size`` instead of the hard-coded ``64 * 4 * 4``. ReLUs are separate, non-inplace
    modules (the reference shares one inplace ReLU) so forward hooks see each activation.

    Args:
        num_classes: number of logits K. Default 10.
        in_channels: input channels (1 for MNIST, 3 for CIFAR). Default 1.
        input_size: input height = width in pixels, at least 12. Default 28.
        drop: dropout probability after ``fc1``. Default 0.5 (TRADES).

    Shape:
        Input ``(N, in_channels, input_size, input_size) in [0, 1]``; output ``(N, K)`` logits.

    Example:
        >>> model = SmallCNN(num_classes=10, in_channels=1, input_size=28)
        >>> logits = model(torch.rand(8, 1, 28, 28))
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, drop: float = 0.5
    ) -> None:
        super().__init__()
        side = _flat_side(input_size)
        if side < 1:
            raise ValueError(f"input_size must be at least 12 for SmallCNN, got {input_size}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {drop}")
        self.flat_features = 64 * side * side
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 32, 3)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(32, 32, 3)),
                    ("relu2", nn.ReLU()),
                    ("maxpool1", nn.MaxPool2d(2, 2)),
                    ("conv3", nn.Conv2d(32, 64, 3)),
                    ("relu3", nn.ReLU()),
                    ("conv4", nn.Conv2d(64, 64, 3)),
                    ("relu4", nn.ReLU()),
                    ("maxpool2", nn.MaxPool2d(2, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(self.flat_features, 200)),
                    ("relu1", nn.ReLU()),
                    ("drop", nn.Dropout(drop)),
                    ("fc2", nn.Linear(200, 200)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(200, num_classes)),
                ]
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        # TRADES starts from all-zero logits (uniform prediction): the last layer is zeroed.
        nn.init.zeros_(self.classifier.fc3.weight)
        nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feature_extractor(x).flatten(1))

"""Training augmentations on float ``(C, H, W)`` tensors in [0, 1].

The standard adversarial-training recipe (Madry et al., 2018, https://arxiv.org/abs/1706.06083;
Rice et al., 2020, https://arxiv.org/abs/2002.11569): random crop after zero padding plus a
horizontal flip for CIFAR and Tiny-ImageNet, nothing for MNIST (flipping digits changes them).
Randomness comes from the global torch RNG (torchvision draws with ``torch.randint`` and
``torch.rand``), so the RNG state saved in a checkpoint makes a resumed run draw the same
crops; DataLoader workers are seeded from that RNG too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["train_transform", "CROP_PADDING"]

# Zero padding before the random crop, in pixels. 4 px on 32 x 32 is the CIFAR standard.
# For 64 x 64 Tiny-ImageNet we also use 4 px, as the public Tiny-ImageNet AT code does
# (RandomCrop(64, padding=4)), rather than scaling it to 8 px.
CROP_PADDING = {"mnist": 0, "cifar10": 4, "cifar100": 4, "tinyimagenet": 4}


def train_transform(name: str) -> Callable[[Tensor], Tensor] | None:
    """The training augmentation of dataset ``name``, or ``None`` when it has none (MNIST).

    Args:
        name: a ``DATASETS`` key; ``sample-<name>`` uses ``<name>``'s augmentation.

    Shape:
        ``(C, H, W)`` in [0, 1] -> same shape, still in [0, 1] (padding is 0, a valid pixel).

    Example:
        >>> aug = train_transform("cifar10")
        >>> x_aug = aug(torch.rand(3, 32, 32))
    """
    base = name.removeprefix("sample-")
    if base not in CROP_PADDING:
        raise ValueError(f"name must be one of {sorted(CROP_PADDING)}, got {name!r}")
    padding = CROP_PADDING[base]
    if padding == 0:
        return None
    from torchvision import transforms  # imported here: `import robustkit.data` stays light

    size = 64 if base == "tinyimagenet" else 32
    return transforms.Compose(
        [transforms.RandomCrop(size, padding=padding), transforms.RandomHorizontalFlip()]
    )

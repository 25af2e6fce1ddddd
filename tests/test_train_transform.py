"""``train_transform`` does what ``CROP_PADDING`` says (issue 18 §5; robustkit.data.transforms):
CIFAR-10/100 and Tiny-ImageNet get a random crop of their own size after 4 px of zero padding
(every offset 0..8 reachable, none beyond) and a horizontal flip half the time; MNIST nothing;
pixel values are moved, never changed; ``build_loaders(augment=False)`` trains on the images as
stored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustkit.data import DATASETS, build_loaders, load_dataset, train_transform
from robustkit.data.transforms import CROP_PADDING

DRAWS = 200


def _unique_image(c: int, size: int) -> torch.Tensor:
    """Pixel values all distinct and > 0, so a crop offset and a flip are identifiable and a
    padded (zero) pixel is never confused with an image pixel."""
    return (torch.randperm(c * size * size).float() + 1).div(c * size * size + 1).view(
        c, size, size)


def _candidates(x: torch.Tensor, pad: int) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Every padded crop of ``x``'s size, unflipped and horizontally flipped."""
    size = x.shape[-1]
    padded = F.pad(x, (pad, pad, pad, pad))
    outs, keys = [], []
    for flip in (False, True):
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                crop = padded[:, i:i + size, j:j + size]
                outs.append(crop.flip(-1) if flip else crop)
                keys.append((i, j, flip))
    return torch.stack(outs), keys


def _draws(name: str, size: int, c: int = 3):
    aug = train_transform(name)
    x = _unique_image(c, size)
    cands, keys = _candidates(x, 4)
    seen = []
    torch.manual_seed(0)
    for _ in range(DRAWS):
        out = aug(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        hit = (cands == out).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(hit) == 1, "not a 4-px padded crop of the same size, or a vertical flip"
        seen.append(keys[hit[0]])
    return x, seen


@pytest.mark.parametrize("name, size", [("cifar10", 32), ("cifar100", 32),
                                        ("sample-cifar10", 32), ("tinyimagenet", 64)])
def test_crop_and_flip(name, size):
    assert DATASETS[name].input_shape == (3, size, size)
    assert CROP_PADDING[name.removeprefix("sample-")] == 4
    _, seen = _draws(name, size)
    rows = {i for i, _, _ in seen}
    cols = {j for _, j, _ in seen}
    assert rows == cols == set(range(9))  # every offset of 4 px padding, no more (no 9)
    flips = sum(f for _, _, f in seen) / DRAWS
    assert 0.4 < flips < 0.6  # p = 0.5, horizontal (vertical flips match no candidate)
    centred = sum(i == 4 and j == 4 and not f for i, j, f in seen)
    assert centred < DRAWS / 20  # 1 in 162 expected: the identity is not the usual draw


def test_pixel_values_are_moved_not_changed():
    x, _ = _draws("cifar10", 32)
    aug = train_transform("cifar10")
    values = set(x.flatten().tolist())
    for _ in range(20):
        out = aug(x)
        assert set(out.flatten().tolist()) <= values | {0.0}  # padding is 0, a valid pixel
        assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("name", ["mnist", "sample-mnist"])
def test_mnist_has_no_augmentation(name):
    assert CROP_PADDING["mnist"] == 0 and train_transform(name) is None


def test_unknown_names_are_refused():
    for bad in ("svhn", "CIFAR10", "sample-svhn", ""):
        with pytest.raises(ValueError, match="name must be one of"):
            train_transform(bad)


def _train_batch(augment: bool):
    loaders = build_loaders("sample-cifar10", batch_size=16, holdout=100, augment=augment)
    x, _, idx = next(iter(loaders.train))
    raw = load_dataset("sample-cifar10", "train").x[idx].float() / 255
    return x, raw


def test_augment_false_is_the_identity():
    x, raw = _train_batch(augment=False)
    assert torch.equal(x, raw)


def test_augment_true_crops_and_flips_each_training_image():
    x, raw = _train_batch(augment=True)
    moved = 0
    for out, img in zip(x, raw, strict=True):
        cands, _ = _candidates(img, 4)
        assert (cands == out).flatten(1).all(1).any()
        moved += not torch.equal(out, img)
    assert moved > 0

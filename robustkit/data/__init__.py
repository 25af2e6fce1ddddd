"""Datasets as ``(x in [0, 1], y, index)``: the ``DATASETS`` table, loaders and splits.

Readers take the official local layouts (``../shared/data/README.md``); nothing is downloaded
unless ``download=True`` (``--download``). ``root=None`` means ``$ROBUSTKIT_DATA``, else ``./data``;
a root pointing at ``shared/data`` itself also works for every dataset. ``sample-*`` datasets are
the real-data samples shipped in ``robustkit/assets`` and ignore the root.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Subset

from robustkit.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, load_cifar
from robustkit.data.dataset import (
    DataError,
    DatasetInfo,
    ImageDataset,
    check_num_classes,
    first_n,
    resolve_root,
)
from robustkit.data.mnist import load_mnist
from robustkit.data.samples import SAMPLES, load_sample
from robustkit.data.tiny_imagenet import load_tiny_imagenet
from robustkit.data.transforms import train_transform

__all__ = [
    "DATASETS", "DatasetInfo", "ImageDataset", "DataError", "Loaders", "load", "load_dataset",
    "build_loaders", "first_n", "train_transform", "check_num_classes", "resolve_root",
    "load_mnist", "load_cifar", "load_tiny_imagenet", "load_sample",
]  # fmt: skip

logger = logging.getLogger(__name__)

_MNIST = DatasetInfo(
    "mnist", 10, (1, 28, 28),
    mean=(0.1307,), std=(0.3081,),  # the training-set pixel statistics
    eps={"Linf": 0.3, "L2": 2.0},  # Madry et al. (2018) Linf; the usual MNIST L2 budget
    class_names=tuple(str(k) for k in range(10)),
)  # fmt: skip
_CIFAR10 = DatasetInfo(
    "cifar10", 10, (3, 32, 32),
    # Pixel statistics of the 50,000 training images (true per-pixel std, not the often copied
    # 0.2023/0.1994/0.2010, which is a per-image average).
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    eps={"Linf": 8 / 255, "L2": 0.5},  # the RobustBench threat models
    class_names=CIFAR10_CLASSES,
)  # fmt: skip

# Registry of every dataset name the CLI accepts (`--dataset`).
DATASETS: dict[str, DatasetInfo] = {
    "mnist": _MNIST,
    "cifar10": _CIFAR10,
    "cifar100": DatasetInfo(
        "cifar100", 100, (3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        eps={"Linf": 8 / 255, "L2": 0.5},  # RobustBench's CIFAR-100 Linf; L2 as CIFAR-10
        class_names=CIFAR100_CLASSES,
    ),  # fmt: skip
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", 200, (3, 64, 64),
        mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
        # Linf 8/255: the budget of the Tiny-ImageNet adversarial-training papers (and of the
        # SRD-DAT paper's tables), not RobustBench's 4/255 for 224 x 224 ImageNet. L2 0.5 keeps
        # CIFAR's per-image budget; there is no Tiny-ImageNet L2 convention, and per pixel it is
        # half as large as on CIFAR (the image has 4x the pixels). Override with --eps.
        eps={"Linf": 8 / 255, "L2": 0.5},
        class_names=None,  # 200 names from words.txt, known once loaded
    ),  # fmt: skip
    "sample-mnist": replace(_MNIST, name="sample-mnist"),
    "sample-cifar10": replace(_CIFAR10, name="sample-cifar10"),
}


def load_dataset(
    name: str,
    split: Literal["train", "test"] = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageDataset:
    """One split of a ``DATASETS`` entry, unaugmented, in file order.

    Args:
        name: a ``DATASETS`` key.
        split: ``"train"`` or ``"test"`` (Tiny-ImageNet: the labelled ``val/`` set).
        root: data root; ``None`` means ``$ROBUSTKIT_DATA``, else ``./data``; ignored by
            ``sample-*``.
        download: let torchvision fetch MNIST/CIFAR into ``root``; default ``False``.

    Raises:
        ValueError: unknown ``name`` or ``split``. DataError (a ValueError): missing or
            malformed root, naming the expected layout.

    Example:
        >>> test = load_dataset("cifar10", "test", root="../shared/data")
        >>> x, y, idx = test[0]
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in SAMPLES:
        return load_sample(name, split)  # type: ignore[arg-type]
    if name == "mnist":
        return load_mnist(root, split, download)
    if name == "tinyimagenet":
        return load_tiny_imagenet(root, split, download)
    return load_cifar(name, root, split, download)  # type: ignore[arg-type]


def load(
    name: str,
    split: Literal["train", "test"] = "test",
    n: int | None = None,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of a split as tensors, ready for a model or ``robustkit.evaluate``.

    The same images, in the same order and with the same values, as ``robustkit evaluate
    --dataset name --n-examples n`` evaluates (RobustBench's "first n test images"): file
    order, unaugmented, ``uint8 / 255`` in float32. For batches of ``(x, y, index)`` use
    ``build_loaders`` (training) or ``torch.utils.data.DataLoader(first_n(load_dataset(...), n))``.

    Args:
        name: a ``DATASETS`` key; ``"sample-mnist"`` and ``"sample-cifar10"`` ship with
            robustkit and work offline.
        split: ``"test"`` (default; Tiny-ImageNet: the labelled ``val/`` set) or ``"train"``.
        n: the first ``n`` images; ``None`` (default): all of the split.
        root: data root; ``None`` means ``$ROBUSTKIT_DATA``, else ``./data``; ignored by
            ``sample-*``.
        download: let torchvision fetch MNIST/CIFAR into ``root``; default ``False``.

    Returns:
        ``(x, y)``: ``x`` float32 ``(n, C, H, W)`` in [0, 1], ``y`` int64 ``(n,)``.

    Raises:
        ValueError: unknown ``name`` or ``split``, ``n`` below 1 or beyond the split (both
            numbers named). DataError (a ValueError): missing or malformed root, naming the
            expected layout.

    Example:
        >>> x, y = load("sample-mnist", n=100)
        >>> x.shape, y[:5]
    """
    data = first_n(load_dataset(name, split, root, download), n)
    # uint8 / 255 in float32, as ImageDataset.__getitem__ converts one image: bit for bit the
    # values the CLI's evaluation sees.
    return data.x.to(torch.float32).div_(255.0), data.y.clone()


@dataclass
class Loaders:
    """The three loaders of a training run and the dataset's facts.

    ``train`` yields augmented ``(x, y, idx)`` through a ``DistributedSampler``; ``holdout``
    (``None`` when ``holdout=0``) and ``test`` are unaugmented, in file order, unsharded.
    """

    train: DataLoader
    holdout: DataLoader | None
    test: DataLoader
    info: DatasetInfo


def build_loaders(
    name: str,
    root: str | os.PathLike | None = None,
    batch_size: int = 128,
    holdout: int = 1000,
    download: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    augment: bool = True,
    eval_batch_size: int | None = None,
    distributed: bool | None = None,
    limit: int | None = None,
) -> Loaders:
    """Train, held-out and test loaders of ``(x, y, idx)`` for dataset ``name``.

    The held-out split is the LAST ``holdout`` training images in file order, so the training
    indices stay ``0 .. N - holdout - 1`` (per-sample memories are sized by ``len(train)``) and
    the split never depends on a seed. The training order comes from a ``DistributedSampler``
    (``shuffle=True, seed=seed``) even on one process: call ``loaders.train.sampler.set_epoch
    (epoch)`` each epoch and the order is a pure function of ``(seed, epoch)``, which makes
    kill-and-resume exact and DDP a matter of ``num_replicas``. ``batch_size`` is GLOBAL: each of
    the ``world_size`` ranks gets ``batch_size // world_size``. The last, smaller batch is kept.

    Args:
        name: a ``DATASETS`` key.
        root: data root; default ``$ROBUSTKIT_DATA``, else ``./data``.
        batch_size: global training batch size; default 128.
        holdout: held-out training images for model selection; default 1,000; 0 for none.
        download: let torchvision fetch MNIST/CIFAR; default ``False``.
        num_workers: DataLoader workers (seeded from the global torch RNG); default 0.
        seed: seed of the training order; default 0.
        augment: apply ``train_transform(name)`` to the training split; default ``True``.
        eval_batch_size: batch size of ``holdout`` and ``test``; default ``batch_size``.
        distributed: ``None`` uses the torch.distributed process group when one is initialised;
            ``False`` forces one process; ``True`` requires a process group.
        limit: train on the first ``limit`` training images only (smoke runs); the held-out
            split stays the last ``holdout`` images of the full split. ``None``: all.

    Raises:
        ValueError: bad sizes (naming the argument), or ``distributed=True`` without a group.

    Example:
        >>> loaders = build_loaders("sample-mnist", batch_size=64, holdout=500)
        >>> x, y, idx = next(iter(loaders.train))
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    world, rank = _world(distributed)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (global) is not divisible by {world} ranks")
    full = load_dataset(name, "train", root, download)
    test = load_dataset(name, "test", root, download)
    n = len(full)
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in [0, {n - 1}] ({n} training images), got {holdout}")
    available = n - holdout
    used = available if limit is None else min(limit, available)
    train_ds = full.view(0, used, train_transform(name) if augment else None)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    common = dict(num_workers=num_workers, persistent_workers=num_workers > 0)
    train = DataLoader(train_ds, batch_size=batch_size // world, sampler=sampler, **common)
    eval_bs = eval_batch_size or batch_size
    held = None
    if holdout:
        # A Subset of the unaugmented full split keeps the held-out images' file-order indices.
        held = DataLoader(Subset(full, range(n - holdout, n)), batch_size=eval_bs, **common)
    of = f" (the first of {available}: limit {limit})" if used < available else ""
    logger.info(
        "%s: %d training%s, %d held-out, %d test images; %d rank(s), %d per rank per batch",
        name, len(train_ds), of, holdout, len(test), world, batch_size // world,
    )  # fmt: skip
    return Loaders(train, held, DataLoader(test, batch_size=eval_bs, **common), DATASETS[name])


def _world(distributed: bool | None) -> tuple[int, int]:
    if distributed is False:
        return 1, 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    if distributed:
        raise ValueError("distributed=True but no torch.distributed process group is initialised")
    return 1, 0

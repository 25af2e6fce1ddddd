"""``ImageDataset``: uint8 images in memory, served as ``(x in [0, 1], y, index)``.

Also holds the small value types of ``robustkit.data``: ``DataError``, ``DatasetInfo`` and the
helpers ``first_n`` and ``check_num_classes``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from robustkit.errors import DataError

__all__ = ["ImageDataset", "DataError", "DatasetInfo", "first_n", "check_num_classes"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model and an attack need to know.

    Args:
        name: registry name (``"cifar10"``).
        num_classes: number of labels K.
        input_shape: ``(C, H, W)`` of one image.
        mean: per-channel mean in [0, 1] units, used only by ``models.Normalize``.
        std: per-channel standard deviation, likewise.
        eps: default budget per threat model in [0, 1] pixel units, ``{"Linf": .., "L2": ..}``.
        class_names: label names in label order, or ``None`` when known only after loading
            (Tiny-ImageNet: from ``words.txt``).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: dict[str, float] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None


class ImageDataset(Dataset):
    """Images kept as uint8 ``(N, C, H, W)``, returned as float32 in [0, 1] with their index.

    The index lets per-sample memories (FAT, SRD-DAT, GAIRAT) follow a sample through shuffled
    batches; it is the position in this dataset, which for every loader here is the position in
    the file order of the split.

    Args:
        x: uint8 images ``(N, C, H, W)``.
        y: int64 labels ``(N,)``.
        transform: optional callable on one float ``(C, H, W)`` image in [0, 1]
            (``train_transform``); default ``None``.
        boxes: optional ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels (Tiny-ImageNet).
        class_names: optional label names in label order.

    Shape:
        ``__getitem__(i)`` -> ``(x (C, H, W) float32 in [0, 1], y int64 0-dim, i int64 0-dim)``.

    Example:
        >>> ds = ImageDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
        >>> x, y, i = ds[2]
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
        boxes: Tensor | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be a uint8 tensor (N, C, H, W), got {_describe(x)}")
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a 1-D tensor of {x.shape[0]} labels, got {_describe(y)}")
        if boxes is not None and (boxes.dim() != 2 or tuple(boxes.shape) != (x.shape[0], 4)):
            raise ValueError(f"boxes must be ({x.shape[0]}, 4), got {tuple(boxes.shape)}")
        self.x = x
        self.y = y.to(torch.int64)
        self.transform = transform
        self.boxes = boxes
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        index = int(index)
        # Conversion per item keeps the whole split at 1 byte per pixel in memory.
        img = self.x[index].to(torch.float32).div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.y[index], torch.tensor(index, dtype=torch.int64)

    def view(
        self, start: int = 0, stop: int | None = None, transform: Callable | None = None
    ) -> ImageDataset:
        """Rows ``start:stop`` as a new dataset sharing storage, with ``transform``.

        Indices restart at 0, so only prefixes (``start=0``) keep the file-order index.
        """
        boxes = self.boxes[start:stop] if self.boxes is not None else None
        return ImageDataset(
            self.x[start:stop], self.y[start:stop], transform, boxes, self.class_names
        )

    def __repr__(self) -> str:
        c, h, w = self.x.shape[1:]
        extra = ", boxes" if self.boxes is not None else ""
        return f"ImageDataset(n={len(self)}, shape=({c}, {h}, {w}){extra})"


def first_n(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` points in file order (RobustBench's ``n_examples`` semantics).

    Args:
        dataset: an ``ImageDataset`` (sliced without copying, keeping ``.x``/``.y``/``.boxes``
            and indices ``0..n-1``) or any sized dataset (wrapped in ``torch.utils.data.Subset``).
        n: number of points; ``None`` means all of them.

    Raises:
        ValueError: ``n`` is below 1 or larger than the dataset (both numbers are named).

    Example:
        >>> test = load_dataset("sample-cifar10", "test")
        >>> subset = first_n(test, 100)
    """
    size = len(dataset)  # type: ignore[arg-type]
    if n is None:
        n = size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if n > size:
        raise ValueError(f"n={n} test points requested but the dataset holds only {size}")
    if isinstance(dataset, ImageDataset):
        return dataset.view(0, n, dataset.transform)
    return Subset(dataset, range(n))


def check_num_classes(num_classes_model: int, info: DatasetInfo) -> None:
    """Raise when a model's output size differs from the dataset's label count.

    Raises:
        ValueError: naming both numbers and the dataset.
    """
    if int(num_classes_model) != info.num_classes:
        raise ValueError(
            f"the model has {num_classes_model} outputs but dataset {info.name!r} has "
            f"{info.num_classes} classes"
        )


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


# ---- helpers shared by the readers (mnist.py, cifar.py, tiny_imagenet.py) -----------------------


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$ROBUSTKIT_DATA``, else ``./data`` (never created here)."""
    if root is None or str(root) == "":
        root = os.environ.get("ROBUSTKIT_DATA") or "data"
    return Path(root).expanduser()


def data_error(
    title: str, problem: str, looked_at: Sequence[Path], layout: str, download: str | None
) -> DataError:
    """One ``DataError`` naming the dataset, the paths looked at (one per line), the layout and
    the fixes: ``--data-root``, ``--download`` where torchvision has a downloader, or a shipped
    ``sample-*`` dataset (offline). The CLI prints it line by line (exit code 2)."""
    paths = "\n".join(f"  {p}" for p in looked_at)
    fix = "give --data-root DIR (or set $ROBUSTKIT_DATA) pointing at a folder with this layout"
    if download:
        fix += f",\n  or add --download to fetch it ({download})"
    else:
        fix += "\n  (no --download: torchvision has no downloader for it)"
    return DataError(
        f"{title}: {problem}\nLooked at:\n{paths}\n"
        f"Expected layout (<root> = --data-root, default $ROBUSTKIT_DATA, else ./data):\n"
        f"{layout.rstrip()}\nFix: {fix},\n"
        f"  or try a shipped sample, offline: --dataset {' or '.join(_SAMPLE_HINT)}"
        " (robustkit train: data.name=)."
    )


# The shipped samples (robustkit.data.samples), suggested when a dataset's files are missing.
_SAMPLE_HINT = ("sample-mnist", "sample-cifar10")


def find_dir(root: Path, subdirs: Sequence[str], marker: Callable[[Path], bool]) -> tuple[
    Path | None, list[Path]
]:
    """The first ``root / s`` (for ``s`` in ``subdirs``) that is a folder passing ``marker``.

    Returns the folder (or ``None``) and the candidates looked at, for the error message.
    """
    looked = [root / s if s else root for s in subdirs]
    for cand in looked:
        if cand.is_dir() and marker(cand):
            return cand, looked
    return None, looked

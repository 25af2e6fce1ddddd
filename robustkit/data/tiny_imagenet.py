"""Tiny-ImageNet-200 (Stanford CS231n) from the layout of ``tiny-imagenet-200.zip``.

Labels follow the sorted wnids, the order ``torchvision.datasets.ImageFolder`` gives the class
folders of ``train/`` (``wnids.txt`` itself is not sorted). Train images are read class by class,
file names sorted as strings within a class (ImageFolder's order again: ``_0, _1, _10, ...``);
validation images follow ``val/val_annotations.txt`` (``val_0 ... val_9999``), whose boxes are
kept as ``dataset.boxes``. JPEGs are decoded with PIL on every load: 10,000 images take about 2 s,
so no cache is kept. Tiny-ImageNet has no torchvision downloader.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from robustkit.data.dataset import ImageDataset, data_error, find_dir, resolve_root

__all__ = ["load_tiny_imagenet", "TINY_IMAGENET_LAYOUT"]

logger = logging.getLogger(__name__)

_SUBDIRS = ("tiny-imagenet-200", "", "tinyimagenet/tiny-imagenet-200")
_SIZE = 64  # every Tiny-ImageNet image is 64 x 64
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_TITLE = "Tiny-ImageNet-200 (tinyimagenet)"
TINY_IMAGENET_LAYOUT = """\
  <root>/tiny-imagenet-200/        (the unpacked tiny-imagenet-200.zip; <root>/ itself works too)
    wnids.txt                      200 WordNet ids (labels = their sorted order)
    words.txt                      optional: wnid<TAB>names, for class names
    train/<wnid>/images/*.JPEG     training images (any subset per class is accepted)
    train/<wnid>/<wnid>_boxes.txt  optional: file<TAB>x0<TAB>y0<TAB>x1<TAB>y1
    val/val_annotations.txt        file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1
    val/images/val_*.JPEG          10,000 validation images (the "test" split here)
  Download tiny-imagenet-200.zip from http://cs231n.stanford.edu/ and unzip it into <root>."""


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        # About 2 % of the images are grayscale; convert so every item is (3, 64, 64).
        arr = np.asarray(im.convert("RGB"))
    if arr.shape != (_SIZE, _SIZE, 3):
        raise ValueError(f"{path} is {arr.shape[1]} x {arr.shape[0]}, expected 64 x 64")
    return arr


def _read_table(path: Path, columns: int) -> list[list[str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    for k, row in enumerate(rows):
        if len(row) != columns:
            raise ValueError(f"{path} line {k + 1} has {len(row)} fields, expected {columns}")
    return rows


def _class_names(folder: Path, wnids: list[str]) -> list[str]:
    """First name of each wnid in ``words.txt`` (``"goldfish"``), else the wnid itself."""
    words = folder / "words.txt"
    if not words.is_file():
        return list(wnids)
    table = {}
    for line in words.read_text().splitlines():
        wnid, _, names = line.partition("\t")
        table[wnid] = names.split(",")[0].strip()
    return [table.get(w, w) for w in wnids]


def load_tiny_imagenet(
    root: str | os.PathLike | None = None,
    split: Literal["train", "test"] = "train",
    download: bool = False,
    limit: int | None = None,
) -> ImageDataset:
    """Tiny-ImageNet-200 as an ``ImageDataset``; ``split="test"`` is the labelled val set.

    Args:
        root: data root (see ``TINY_IMAGENET_LAYOUT``); ``None`` means ``$ROBUSTKIT_DATA``, else
            ``./data``.
        split: ``"train"`` or ``"test"`` (``val/``, 10,000 images with boxes).
        download: must stay ``False``: there is no torchvision downloader for Tiny-ImageNet.
        limit: read only the first ``limit`` images in file order (quick checks); default all.

    Shape:
        ``x``: ``(N, 3, 64, 64)`` uint8; ``boxes``: ``(N, 4)`` int64 ``x0, y0, x1, y1`` (inclusive
        pixel coordinates) for val, and for train when every ``*_boxes.txt`` is present.

    Raises:
        DataError: missing or malformed folder, or ``download=True``.

    Example:
        >>> val = load_tiny_imagenet("../shared/data", "test")
        >>> val.boxes[0]  # tensor([ 0, 32, 44, 62])
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    base = resolve_root(root)
    folder, looked = find_dir(base, _SUBDIRS, lambda p: (p / "wnids.txt").is_file())
    if folder is None:
        problem = f"no wnids.txt found under {base}"
        if download:
            problem += " (download=True: torchvision has no Tiny-ImageNet downloader)"
        raise data_error(_TITLE, problem, looked, TINY_IMAGENET_LAYOUT, None)
    try:
        wnids = sorted(w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip())
        if len(set(wnids)) != len(wnids) or not wnids:
            raise ValueError(f"{folder / 'wnids.txt'} is empty or repeats a wnid")
        label_of = {w: k for k, w in enumerate(wnids)}
        if split == "train":
            paths, labels, boxes = _train_files(folder, wnids)
        else:
            paths, labels, boxes = _val_files(folder, label_of)
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
            boxes = boxes[:limit] if boxes is not None else None
        images = np.stack([_decode(p) for p in paths])
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise data_error(
            _TITLE, f"malformed folder: {err}", [folder], TINY_IMAGENET_LAYOUT, None
        ) from None
    logger.debug("Tiny-ImageNet %s: %d images from %s", split, len(paths), folder)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(
        x,
        torch.tensor(labels, dtype=torch.int64),
        boxes=torch.tensor(boxes, dtype=torch.int64) if boxes is not None else None,
        class_names=_class_names(folder, wnids),
    )


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int], list | None]:
    paths: list[Path] = []
    labels: list[int] = []
    boxes: list[list[int]] | None = []
    for label, wnid in enumerate(wnids):
        img_dir = folder / "train" / wnid / "images"
        if not img_dir.is_dir():
            raise ValueError(f"{img_dir} is missing (one folder per wnid in wnids.txt)")
        names = sorted(p.name for p in img_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        box_file = folder / "train" / wnid / f"{wnid}_boxes.txt"
        table = {}
        if boxes is not None and box_file.is_file():
            table = {r[0]: [int(v) for v in r[1:]] for r in _read_table(box_file, 5)}
        if boxes is not None and not all(n in table for n in names):
            boxes = None  # boxes only when every training image has one
        for name in names:
            paths.append(img_dir / name)
            labels.append(label)
            if boxes is not None:
                boxes.append(table[name])
    if not paths:
        raise ValueError(f"no images under {folder / 'train'}")
    return paths, labels, boxes


def _val_files(folder: Path, label_of: dict[str, int]) -> tuple[list[Path], list[int], list]:
    rows = _read_table(folder / "val" / "val_annotations.txt", 6)
    paths, labels, boxes = [], [], []
    for name, wnid, *box in rows:
        if wnid not in label_of:
            raise ValueError(f"val_annotations.txt names {wnid}, which is not in wnids.txt")
        paths.append(folder / "val" / "images" / name)
        labels.append(label_of[wnid])
        boxes.append([int(v) for v in box])
    if not paths:
        raise ValueError(f"{folder / 'val' / 'val_annotations.txt'} is empty")
    return paths, labels, boxes

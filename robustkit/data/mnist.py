"""MNIST from the official big-endian IDX files (LeCun et al., 1998), plain or ``.gz``."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from robustkit.data.dataset import DataError, ImageDataset, data_error, find_dir, resolve_root

__all__ = ["load_mnist", "MNIST_LAYOUT"]

logger = logging.getLogger(__name__)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Candidate folders under the root, in order: torchvision's layout, the files directly in the
# root, and ../shared/data's layout (so --data-root can point at shared/data for every dataset).
_SUBDIRS = ("MNIST/raw", "", "mnist/MNIST/raw", "mnist")
_IDX_UINT8 = 0x08  # IDX type code of unsigned bytes, the only one MNIST uses

MNIST_LAYOUT = """\
  <root>/MNIST/raw/                (torchvision's layout; <root>/ itself and
                                    <root>/mnist/MNIST/raw/ are accepted too)
    train-images-idx3-ubyte        60,000 x 28 x 28 (each file may also be .gz)
    train-labels-idx1-ubyte
    t10k-images-idx3-ubyte         10,000 x 28 x 28
    t10k-labels-idx1-ubyte"""
_TITLE = "MNIST (mnist)"
_DOWNLOAD = "torchvision.datasets.MNIST into <root>/MNIST/raw, about 12 MB"


def _error(problem: str, looked: list[Path]) -> DataError:
    return data_error(_TITLE, problem, looked, MNIST_LAYOUT, _DOWNLOAD)


def _file(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _has_any(folder: Path) -> bool:
    return any(_file(folder, n) for pair in _FILES.values() for n in pair)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file: magic ``0x0000 08 ndim``, ``ndim`` big-endian uint32 sizes, bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:  # a truncated or corrupt .gz (BadGzipFile)
        raise ValueError(f"{path} cannot be read ({err}); it is truncated or corrupt, "
                         "replace it (or delete it and use --download)") from None
    if len(data) < 4 + 4 * ndim or data[:2] != b"\x00\x00" or data[2] != _IDX_UINT8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    if data[3] != ndim:
        raise ValueError(f"{path} has {data[3]} dimensions, expected {ndim}")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {body.size} bytes, its header {dims} says {np.prod(dims)}")
    return body.reshape(dims)


def load_mnist(
    root: str | os.PathLike | None = None,
    split: Literal["train", "test"] = "train",
    download: bool = False,
) -> ImageDataset:
    """MNIST as an ``ImageDataset`` in file order (train 60,000, test 10,000).

    Args:
        root: data root (see ``MNIST_LAYOUT``); ``None`` means ``$ROBUSTKIT_DATA``, else ``./data``.
        split: ``"train"`` or ``"test"``.
        download: fetch the files with torchvision into ``<root>/MNIST/raw`` when absent;
            default ``False`` (nothing is downloaded unless asked).

    Shape:
        ``x``: ``(N, 1, 28, 28)`` uint8; items ``(1, 28, 28)`` in [0, 1].

    Raises:
        DataError: the files are missing or malformed (the message shows the expected layout).

    Example:
        >>> test = load_mnist("../shared/data", "test")
        >>> x, y, i = test[0]
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = resolve_root(root)
    folder, looked = find_dir(base, _SUBDIRS, _has_any)
    if folder is None and download:
        from torchvision.datasets import MNIST  # optional path: only when asked to download

        logger.info("downloading MNIST into %s", base / "MNIST" / "raw")
        MNIST(str(base), train=split == "train", download=True)
        folder, looked = find_dir(base, _SUBDIRS, _has_any)
    if folder is None:
        raise _error(f"no IDX files found under {base}", looked)
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = _file(folder, img_name), _file(folder, lbl_name)
    if img_path is None or lbl_path is None:
        missing = img_name if img_path is None else lbl_name
        raise _error(f"{folder} lacks {missing} (or {missing}.gz)", [folder])
    try:
        images = _read_idx(img_path, 3)
        labels = _read_idx(lbl_path, 1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{img_path} holds {images.shape[1:]} images, expected 28 x 28")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lbl_path} holds label {labels.max()}, expected 0..9")
    except ValueError as err:
        raise _error(f"malformed file: {err}", [folder]) from None
    logger.debug("MNIST %s: %d images from %s", split, images.shape[0], folder)
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: frombuffer memory is read-only
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, class_names=[str(k) for k in range(10)])

"""The real-data samples shipped in ``robustkit/assets/`` (``sample-mnist``, ``sample-cifar10``).

Each sample is one ``.npz`` written by ``train/prepare_samples.py`` from ``../shared/data``: the
first images of the official files, in file order. Its sha256 is recorded in
``assets/checksums.json`` and checked on every load (a few milliseconds), so a sample that is not
byte-for-byte the one whose provenance the tests prove is refused.

Per split the archive holds ``y_<split>`` (int64) and either ``x_<split>`` (uint8
``(N, C, H, W)``, deflated) or ``x_<split>_png`` (the bytes of one lossless PNG with the images
stacked vertically, ``(N * H, W[, C])``; about 25 % smaller than deflate on CIFAR photographs),
plus ``class_names``.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from importlib import resources
from typing import Literal

import numpy as np
import torch
from PIL import Image

from robustkit.data.dataset import DataError, ImageDataset

__all__ = ["load_sample", "SAMPLES", "encode_sample", "decode_sample", "asset_bytes"]

# Registry name -> file in robustkit/assets/.
SAMPLES = {"sample-mnist": "mnist_sample.npz", "sample-cifar10": "cifar10_sample.npz"}
CHECKSUMS = "checksums.json"
# A fixed timestamp (the zip epoch) makes the archive a pure function of its arrays.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def asset_bytes(filename: str) -> bytes:
    """The bytes of ``robustkit/assets/<filename>`` (works from a wheel or a checkout)."""
    return resources.files("robustkit.assets").joinpath(filename).read_bytes()


def encode_sample(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str], png: bool
) -> bytes:
    """Deterministic ``.npz`` bytes for ``{split: (x uint8 (N, C, H, W), y (N,))}``.

    ``np.savez_compressed`` stamps members with the current time, so the archive is written
    here with a fixed timestamp instead; ``np.load`` reads it like any ``.npz``.
    """
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    for split, (x, y) in splits.items():
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"x of split {split!r} must be uint8 (N, C, H, W), got {x.dtype}")
        arrays[f"y_{split}"] = y.astype(np.int64)
        if png:
            n, c, h, w = x.shape
            tall = x.transpose(0, 2, 3, 1).reshape(n * h, w, c)
            buf = io.BytesIO()
            Image.fromarray(tall[..., 0] if c == 1 else tall).save(buf, "PNG", optimize=True)
            arrays[f"x_{split}_png"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
            arrays[f"x_{split}_shape"] = np.array(x.shape, dtype=np.int64)
        else:
            arrays[f"x_{split}"] = x
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, arrays[key], allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return out.getvalue()


def decode_sample(data: bytes, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(x uint8 (N, C, H, W), y int64 (N,), class_names)`` of ``split`` from ``.npz`` bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if f"y_{split}" not in npz:
            splits = sorted(k[2:] for k in npz.files if k.startswith("y_"))
            raise ValueError(f"split must be one of {splits}, got {split!r}")
        y = npz[f"y_{split}"]
        names = [str(n) for n in npz["class_names"]]
        if f"x_{split}" in npz:
            return npz[f"x_{split}"], y, names
        n, c, h, w = (int(v) for v in npz[f"x_{split}_shape"])
        with Image.open(io.BytesIO(npz[f"x_{split}_png"].tobytes())) as im:
            tall = np.asarray(im)
    x = tall.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), y, names


def load_sample(
    name: Literal["sample-mnist", "sample-cifar10"], split: Literal["train", "test"] = "test"
) -> ImageDataset:
    """A shipped sample as an ``ImageDataset``, after checking its sha256.

    ``sample-mnist``: the first 6,000 MNIST training and first 1,000 test images;
    ``sample-cifar10``: the first 1,000 CIFAR-10 training and first 1,000 test images.

    Args:
        name: ``"sample-mnist"`` or ``"sample-cifar10"``.
        split: ``"train"`` or ``"test"``; default ``"test"``.

    Raises:
        DataError: the asset is missing, altered (checksum mismatch) or unreadable.

    Example:
        >>> test = load_sample("sample-cifar10", "test")
        >>> x, y, i = test[0]
    """
    if name not in SAMPLES:
        raise ValueError(f"name must be one of {sorted(SAMPLES)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    filename = SAMPLES[name]
    where = f"robustkit/assets/{filename}"
    try:
        data = asset_bytes(filename)
        expected = json.loads(asset_bytes(CHECKSUMS))["files"][filename]["sha256"]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(
            f"{name}: cannot read the shipped sample {where}: {err}; reinstall robustkit or "
            "rebuild it with `python train/prepare_samples.py`"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(
            f"{name}: checksum mismatch for {where}: sha256 {actual}, expected {expected} "
            f"(assets/{CHECKSUMS}); the file was altered: reinstall robustkit or rebuild it "
            "with `python train/prepare_samples.py`"
        )
    try:
        x, y, names = decode_sample(data, split)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{name}: malformed sample {where}: {err}") from None
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), class_names=names)

"""CIFAR-10 and CIFAR-100 from the official python pickles (Krizhevsky, 2009).

Partial folders are accepted (``../shared/data`` holds a 4,000-image ``data_batch_1`` and a
1,000-image ``test_batch``): whatever batches exist are read in file order and a warning states
how many images were found. Pickles are read with an unpickler that only builds numpy arrays, so a
crafted file cannot run code.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from robustkit.data.dataset import DataError, ImageDataset, data_error, find_dir, resolve_root

__all__ = ["load_cifar", "CIFAR10_CLASSES", "CIFAR100_CLASSES", "CIFAR10_LAYOUT", "CIFAR100_LAYOUT"]

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# The fine label names in label order (alphabetical), as in cifar-100-python/meta.
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)

CIFAR10_LAYOUT = """\
  <root>/cifar-10-batches-py/      (torchvision's layout; <root>/ itself and
                                    <root>/cifar10/cifar-10-batches-py/ are accepted too)
    batches.meta                   class names
    data_batch_1 ... data_batch_5  python pickles, 10,000 images each (a subset is accepted)
    test_batch                     10,000 images (a shorter one is accepted)"""
CIFAR100_LAYOUT = """\
  <root>/cifar-100-python/         (torchvision's layout; <root>/ itself and
                                    <root>/cifar100/cifar-100-python/ are accepted too)
    meta                           class names (fine_label_names)
    train                          python pickle, 50,000 images
    test                           python pickle, 10,000 images"""

# name -> (title, sub-folders looked at, train files, test file, label key, full sizes, ...)
_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        title="CIFAR-10 (cifar10)",
        subdirs=("cifar-10-batches-py", "", "cifar10/cifar-10-batches-py"),
        train=tuple(f"data_batch_{k}" for k in range(1, 6)),
        test=("test_batch",),
        meta=("batches.meta", "label_names"),
        label_key="labels",
        full={"train": 50_000, "test": 10_000},
        classes=CIFAR10_CLASSES,
        layout=CIFAR10_LAYOUT,
        download="torchvision.datasets.CIFAR10 into <root>/cifar-10-batches-py, about 170 MB",
    ),
    "cifar100": dict(
        title="CIFAR-100 (cifar100)",
        subdirs=("cifar-100-python", "", "cifar100/cifar-100-python"),
        train=("train",),
        test=("test",),
        meta=("meta", "fine_label_names"),
        label_key="fine_labels",
        full={"train": 50_000, "test": 10_000},
        classes=CIFAR100_CLASSES,
        layout=CIFAR100_LAYOUT,
        download="torchvision.datasets.CIFAR100 into <root>/cifar-100-python, about 170 MB",
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR pickle needs (numpy arrays); any other global is refused."""

    # Taken from numpy's own reducers, since their module paths differ between numpy 1.x and 2.x.
    _NUMPY = {
        "_reconstruct": np.empty(0).__reduce__()[0],  # protocols 0-4
        "_frombuffer": np.empty(0).__reduce_ex__(5)[0],  # protocol 5
        "scalar": np.int64(0).__reduce__()[0],  # numpy scalars, e.g. in a list of labels
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            return self._NUMPY[name]
        if (module, name) == ("_codecs", "encode"):  # bytes in a Python 3 protocol-2 pickle
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict[str, Any]:
    # latin1 reads the original Python 2 pickles; keys are normalised to str either way.
    obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path} lacks the keys 'data' and {label_key!r} (has {sorted(d)})")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
    # Rows are channel-major: 1,024 red, then green, then blue values.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(
    name: Literal["cifar10", "cifar100"],
    root: str | os.PathLike | None = None,
    split: Literal["train", "test"] = "train",
    download: bool = False,
) -> ImageDataset:
    """CIFAR-10/100 as an ``ImageDataset`` in file order (batches 1..5, then within a batch).

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        root: data root (see ``CIFAR10_LAYOUT``); ``None`` means ``$ROBUSTKIT_DATA``, else
            ``./data``.
        split: ``"train"`` or ``"test"``.
        download: fetch with torchvision when no folder is found; default ``False``.

    Shape:
        ``x``: ``(N, 3, 32, 32)`` uint8; items ``(3, 32, 32)`` in [0, 1].

    Raises:
        DataError: no folder, no batch of the split, or a malformed pickle.

    Example:
        >>> test = load_cifar("cifar10", "../shared/data", "test")
        >>> len(test)  # 1,000 there (a partial test_batch), with a warning
    """
    if name not in _SPECS:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = _SPECS[name]
    files: tuple[str, ...] = spec[split]
    meta_file = spec["meta"][0]

    def marker(folder: Path) -> bool:
        return any((folder / f).is_file() for f in (*spec["train"], *spec["test"], meta_file))

    base = resolve_root(root)
    folder, looked = find_dir(base, spec["subdirs"], marker)
    if folder is None and download:
        from torchvision import datasets  # optional path: only when asked to download

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        logger.info("downloading %s into %s", name, base)
        cls(str(base), train=split == "train", download=True)
        folder, looked = find_dir(base, spec["subdirs"], marker)

    def error(problem: str, paths: list[Path]) -> DataError:
        return data_error(spec["title"], problem, paths, spec["layout"], spec["download"])

    if folder is None:
        raise error(f"no CIFAR pickles found under {base}", looked)
    present = [f for f in files if (folder / f).is_file()]
    if not present:
        raise error(f"{folder} has no {split} pickle (expected {', '.join(files)})", [folder])
    num_classes = len(spec["classes"])
    xs, ys, counts = [], [], []
    try:
        for f in present:
            x, y = _read_batch(folder / f, spec["label_key"], num_classes)
            xs.append(x)
            ys.append(y)
            counts.append(f"{f}: {len(y):,}")
        class_names = _class_names(folder, spec)
    except (ValueError, pickle.UnpicklingError, EOFError) as err:
        raise error(f"malformed file: {err}", [folder]) from None
    x, y = np.concatenate(xs), np.concatenate(ys)
    full = spec["full"][split]
    if len(y) < full:
        missing = [f for f in files if f not in present]
        logger.warning(
            "%s %s: found %s of %s images (%s)%s in %s; this is a PARTIAL split in file order",
            spec["title"], split, f"{len(y):,}", f"{full:,}", ", ".join(counts),
            f"; missing {', '.join(missing)}" if missing else "", folder,
        )  # fmt: skip
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), class_names=class_names)


def _class_names(folder: Path, spec: dict[str, Any]) -> list[str]:
    """Names from the meta pickle when present, else the standard list."""
    meta_file, key = spec["meta"]
    if not (folder / meta_file).is_file():
        logger.debug("%s has no %s; using the standard class names", folder, meta_file)
        return list(spec["classes"])
    names = _unpickle(folder / meta_file).get(key)
    if not isinstance(names, list) or len(names) != len(spec["classes"]):
        raise ValueError(f"{folder / meta_file}: {key!r} is not a list of {len(spec['classes'])}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

"""Rebuild ``robustkit/assets/`` (the shipped real-data samples) from ``../shared/data``.

    python train/prepare_samples.py [--data-root ../shared/data]

Writes ``mnist_sample.npz`` (the first 6,000 MNIST training and first 1,000 test images, deflated
uint8), ``cifar10_sample.npz`` (the first 1,000 CIFAR-10 training and first 1,000 test images,
lossless PNG, about 25 % smaller than deflate on photographs) and their entries in
``checksums.json`` (sha256, size and provenance of each; the shipped models' entries are kept).
The output is a pure function of the input files: re-running gives the same bytes (fixed zip
timestamps, no dates in the json). Printing is fine here: this is a script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from robustkit.data import load_cifar, load_mnist
from robustkit.data.samples import CHECKSUMS, SAMPLES, encode_sample
from robustkit.utils import atomic_write, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "robustkit" / "assets"
# Counts keep the assets under 8 MB together (about 1.1 MB MNIST + 4.3 MB CIFAR-10) while leaving
# MNIST enough images to train the demo's SmallCNN (5,000 after a 1,000-image held-out split).
COUNTS = {
    "sample-mnist": {"train": 6000, "test": 1000},
    "sample-cifar10": {"train": 1000, "test": 1000},
}
SOURCES = {
    "sample-mnist": {
        "train": "mnist/MNIST/raw/train-images-idx3-ubyte + train-labels-idx1-ubyte",
        "test": "mnist/MNIST/raw/t10k-images-idx3-ubyte + t10k-labels-idx1-ubyte",
    },
    "sample-cifar10": {
        "train": "cifar10/cifar-10-batches-py/data_batch_1",
        "test": "cifar10/cifar-10-batches-py/test_batch",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    root = Path(args.data_root)
    loaders = {
        "sample-mnist": lambda split: load_mnist(root, split),
        "sample-cifar10": lambda split: load_cifar("cifar10", root, split),
    }
    record = {}
    for name, filename in SAMPLES.items():
        splits, provenance = {}, {}
        class_names: list[str] = []
        for split, n in COUNTS[name].items():
            ds = loaders[name](split)
            splits[split] = (ds.x[:n].numpy(), ds.y[:n].numpy())
            class_names = ds.class_names or []
            provenance[split] = {
                "n": n,
                "source": f"{SOURCES[name][split]}, images 0..{n - 1} in file order",
            }
        data = encode_sample(splits, class_names, png=name == "sample-cifar10")
        atomic_write(ASSETS / filename, data)
        os.chmod(ASSETS / filename, 0o644)  # atomic_write's temporary file is 0600
        digest = hashlib.sha256(data).hexdigest()
        record[filename] = {"sha256": digest, "bytes": len(data), "splits": provenance}
        print(f"{digest}  {filename}  ({len(data):,} bytes)")
    # Merge: checksums.json also covers the shipped models' weights and cards
    # (train/ship_model.py); rewriting it with the samples alone would drop their entries and
    # every robustkit:NAME load would then be refused.
    sums_path = ASSETS / CHECKSUMS
    sums = json.loads(sums_path.read_text()) if sums_path.is_file() else {"files": {}}
    sums["files"].update(record)
    atomic_write_json(sums_path, sums)
    os.chmod(ASSETS / CHECKSUMS, 0o644)
    total = sum(r["bytes"] for r in record.values())
    print(f"total {total:,} bytes; checksums in {ASSETS / CHECKSUMS}")


if __name__ == "__main__":
    main()

"""Thin wrapper of ``robustkit train``: ``python train/train.py -c configs/train/X.yaml [k=v ...]``.

Example:
    >>> python train/train.py -c configs/smoke.yaml trainer.out_dir=/tmp/smoke
    >>> torchrun --nproc_per_node=2 train/train.py -c configs/train/cifar10_pgd_at.yaml
"""

from __future__ import annotations

import sys

from robustkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

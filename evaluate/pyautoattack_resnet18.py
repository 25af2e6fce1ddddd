"""``--model evaluate/pyautoattack_resnet18.py:load``: AutoAttack's example CIFAR-10 ResNet-18.

pyautoattack ships ``examples/resnet.py`` (kuangliu's CIFAR ResNet-18) and ``examples/
model_test.pt``, its state dict. Its ``examples/eval.py`` feeds ``ToTensor()`` images, i.e.
[0, 1] pixels without normalisation, so the network is returned as is: it already takes
robustkit's inputs. An example of the ``FILE.py:FN`` form of ``--model``.

The entry in the table and the RobustBench JSON is named after the function in the spec:
``:pyautoattack_resnet18`` (re-exported here from ``robustkit.testing``) gives that name,
``:load`` gives ``load`` unless ``--name`` says otherwise.

Example:
    robustkit evaluate --model evaluate/pyautoattack_resnet18.py:pyautoattack_resnet18 \
        --dataset cifar10
"""

from __future__ import annotations

from torch import nn

from robustkit.testing import pyautoattack_resnet18

__all__ = ["load", "pyautoattack_resnet18"]


def load() -> nn.Module:
    """pyautoattack's example ResNet-18 with ``model_test.pt`` (weights only), eval mode."""
    return pyautoattack_resnet18()

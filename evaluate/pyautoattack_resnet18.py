"""``--model evaluate/pyautoattack_resnet18.py:load``: AutoAttack's example CIFAR-10 ResNet-18.

pyautoattack ships ``examples/resnet.py`` (kuangliu's CIFAR ResNet-18) and ``examples/
model_test.pt``, its state dict. Its ``examples/eval.py`` feeds ``ToTensor()`` images, i.e.
[0, 1] pixels without normalisation, so the network is returned as is: it already takes
robustkit's inputs. An example of the ``FILE.py:FN`` form of ``--model``.

Example:
    robustkit evaluate --model evaluate/pyautoattack_resnet18.py:load --dataset cifar10
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robustkit.models import load_state_dict_file


def load() -> nn.Module:
    """Build pyautoattack's example ResNet-18 and load ``model_test.pt`` (weights only)."""
    import pyautoattack
    from pyautoattack.examples.resnet import ResNet18

    model = ResNet18()
    weights = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model.load_state_dict(load_state_dict_file(weights), strict=True)
    return model.eval()

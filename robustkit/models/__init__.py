"""Models: the architecture registry, ``Normalize``, and loading from names, files and the zoo.

Every robustkit model takes ``(N, C, H, W)`` pixels in [0, 1] and returns logits; the
normalisation is its first layer. ``create_model`` always returns the same two-child layout::

    nn.Sequential(normalize=Normalize(mean, std), model=<architecture>)

so layers are reached as ``"model.layer3"`` (``model.get_submodule``) and state-dict keys read
``normalize.mean``, ``model.conv1.weight``. Without ``mean``/``std`` the ``Normalize`` is the
identity (mean 0, std 1), which keeps names and checkpoints the same whether or not a dataset
normalises. ``robustbench`` is imported only by ``robustkit.models.zoo``, on demand.
"""

from __future__ import annotations

from robustkit.errors import ModelError
from robustkit.models.cifar_cnn import CifarCNN
from robustkit.models.loading import load_model, load_state_dict_file, load_weights
from robustkit.models.normalize import Normalize
from robustkit.models.preact_resnet import PreActResNet
from robustkit.models.pretrained import PRETRAINED, load_pretrained, model_card
from robustkit.models.registry import MODELS, create_model
from robustkit.models.resnet import ResNet
from robustkit.models.small_cnn import SmallCNN
from robustkit.models.wide_resnet import WideResNet

__all__ = [
    "MODELS",
    "create_model",
    "load_model",
    "load_weights",
    "load_pretrained",
    "model_card",
    "PRETRAINED",
    "load_state_dict_file",
    "ModelError",
    "Normalize",
    "SmallCNN",
    "CifarCNN",
    "ResNet",
    "PreActResNet",
    "WideResNet",
]

"""``FeatureTap``: capture the outputs of named modules during forward passes (methods.md §4, §7.1).

A context manager: forward hooks are registered on entry and removed on exit, also when the
block raises, so a model never keeps a hook it was not built with (captum's no-side-effect rule).
Names resolve on the bare module (DDP / ``torch.compile`` wrappers are unwrapped), so
``"model.layer3"`` means the same thing in training, evaluation and analysis; a unique end of a
name (``"layer3"``) is accepted as an alias and stored as the full name (``resolve_layers``).

Example:
    >>> with FeatureTap(model, ["conv1", "fc1"]) as tap:      # the shipped SmallCNN
    ...     logits = model(x)
    ...     feats = tap.take()  # {"model.feature_extractor.conv1": (N, C, H, W),
    ...                         #  "model.classifier.fc1": (N, C)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from robustkit.distributed import unwrap

__all__ = ["FeatureTap", "resolve_layers"]

# "auto": the modules whose output channels are the paper's neurons (methods.md §4.1): every
# convolution (channel m of its feature map) and every linear layer (unit m).
_AUTO_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def resolve_layers(model: nn.Module, layers: Sequence[str] | Literal["auto"]) -> list[str]:
    """The full module names ``layers`` stands for; ``ValueError`` lists the valid ones.

    A layer has one name in every output (result keys, JSON, tables, TensorBoard tags): its full
    module name, e.g. ``"model.feature_extractor.conv2"`` for the shipped SmallCNN. As input a
    short alias is accepted wherever a layer is named (here, so also ``FeatureTap``,
    ``neuron_sensitivity``, ``intervention_test``, ``sensitivity.compare``, ``--layers`` and the
    ``sensitivity.layers`` config key): a trailing part of the dotted name that matches exactly
    one module (``"conv2"`` or ``"feature_extractor.conv2"``). An exact module name always wins;
    an alias that matches several modules is refused, listing them.

    Args:
        model: the (possibly wrapped) model.
        layers: module names or aliases (``"model.layer3"``, ``"layer3"``), or ``"auto"``
            (every conv and linear module, in model order).

    Returns:
        Full module names, in the order given (``"auto"``: model order).

    Raises:
        ValueError: ``layers`` empty, an unknown or ambiguous name (listing the conv/linear
            layers, or the candidates), or one module named twice.

    Example:
        >>> resolve_layers(create_model("small_cnn", 10, in_channels=1, input_size=28), ["conv2"])
        ['model.feature_extractor.conv2']
    """
    bare = unwrap(model)
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
        names = [n for n, m in bare.named_modules() if isinstance(m, _AUTO_TYPES)]
        if not names:
            raise ValueError("layers='auto' found no convolution or linear module")
        return names
    requested = list(layers)
    if not requested:
        raise ValueError("layers must name at least one module")
    known = [n for n, _ in bare.named_modules() if n]  # "" is the model itself, not a layer
    names, bad = [], []
    for name in requested:
        hits = [name] if name in known else [n for n in known if n.endswith(f".{name}")]
        if len(hits) > 1:
            raise ValueError(f"layer {name!r} is ambiguous: it ends {len(hits)} module names "
                             f"({', '.join(hits)}); give more of the name")
        if hits:
            names.append(hits[0])
        else:
            bad.append(name)
    if bad:
        valid = [n for n, m in bare.named_modules() if isinstance(m, _AUTO_TYPES)]
        raise ValueError(f"unknown layer(s) {bad}; conv/linear layers of this model: "
                         f"{', '.join(valid) or 'none'} (any module name, or a unique end of "
                         "one such as 'conv2', works)")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a module twice: {requested} -> {names}")
    return names


class FeatureTap:
    """Capture the outputs of named modules while the context is open.

    Args:
        model: the model whose modules are tapped (wrappers are unwrapped).
        layers: module names, unique aliases (``resolve_layers``) or ``"auto"`` (every conv and
            linear module); ``take()`` keys the outputs by the full names.
        detach: store detached outputs (measurement, default) or keep them in the graph
            (training regularisers such as SNS need gradients through them).

    Each forward pass overwrites the stored outputs; ``take()`` returns them and clears the store.

    Shape: a conv layer gives ``(N, C, H, W)``, a linear layer ``(N, C)``.

    Example:
        >>> with FeatureTap(model, "auto") as tap:
        ...     model(x); clean = tap.take(); model(x_adv); adv = tap.take()
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | Literal["auto"] = "auto",
                 detach: bool = True) -> None:
        self.model = unwrap(model)
        self.layers = resolve_layers(self.model, layers)
        self.detach = bool(detach)
        self._handles: list = []
        self._store: dict[str, Tensor] = {}

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise RuntimeError("FeatureTap is already open")
        try:
            for name in self.layers:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()  # also on an exception inside the block: no hook outlives the context
        self._store = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"FeatureTap: {name} returned a {type(output).__name__}, "
                                "expected a tensor")
            self._store[name] = output.detach() if self.detach else output
        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> dict[str, Tensor]:
        """The outputs of the last forward pass, by layer name (then forgotten)."""
        missing = [n for n in self.layers if n not in self._store]
        if missing:
            raise RuntimeError(f"FeatureTap.take(): no output captured for {missing}; run a "
                               "forward pass inside the context first")
        out, self._store = self._store, {}
        return out

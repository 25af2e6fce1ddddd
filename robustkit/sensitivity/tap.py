"""``FeatureTap``: capture the outputs of named modules during forward passes (methods.md §4, §7.1).

A context manager: forward hooks are registered on entry and removed on exit, also when the
block raises, so a model never keeps a hook it was not built with (captum's no-side-effect rule).
Names resolve with ``get_submodule`` on the bare module (DDP / ``torch.compile`` wrappers are
unwrapped), so ``"model.layer3"`` means the same thing in training, evaluation and analysis.

Example:
    >>> with FeatureTap(model, ["model.conv1", "model.fc1"]) as tap:
    ...     logits = model(x)
    ...     feats = tap.take()     # {"model.conv1": (N, C, H, W), "model.fc1": (N, C)}
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
    """The module names ``layers`` stands for, in model order; ``ValueError`` lists valid ones.

    Args:
        model: the (possibly wrapped) model.
        layers: module names (``"model.layer3"``) or ``"auto"`` (every conv and linear module).
    """
    bare = unwrap(model)
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
        names = [n for n, m in bare.named_modules() if isinstance(m, _AUTO_TYPES)]
        if not names:
            raise ValueError("layers='auto' found no convolution or linear module")
        return names
    names = list(layers)
    if not names:
        raise ValueError("layers must name at least one module")
    known = dict(bare.named_modules())
    bad = [n for n in names if n not in known or n == ""]
    if bad:
        valid = [n for n, m in bare.named_modules() if isinstance(m, _AUTO_TYPES)]
        raise ValueError(f"unknown layer(s) {bad}; conv/linear layers of this model: "
                         f"{', '.join(valid) or 'none'} (any module name works)")
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a module twice: {names}")
    return names


class FeatureTap:
    """Capture the outputs of named modules while the context is open.

    Args:
        model: the model whose modules are tapped (wrappers are unwrapped).
        layers: module names or ``"auto"`` (every conv and linear module).
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

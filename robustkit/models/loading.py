"""Loading models: registry names, ``FILE.py:FN`` factories, the RobustBench zoo, checkpoints.

A checkpoint is untrusted input: every file is read with ``torch.load(weights_only=True)``, so
only tensors and plain containers come back and a pickled object can never run code.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from robustkit.errors import ModelError
from robustkit.models._keys import state_dict_mismatch
from robustkit.models.registry import MODELS, create_model
from robustkit.utils import torch_load_plain

__all__ = ["load_model", "load_state_dict_file", "load_weights"]

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights, tried in this order. robustkit's own
# trainer checkpoints keep the model under "model".
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# The layout of create_model's output: Normalize, then the architecture.
_WRAPPER_CHILDREN = ("normalize", "model")
_WRAPPER_PREFIXES = ("normalize.", "model.")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a checkpoint file, safely (``weights_only=True``).

    Accepts a plain state dict, robustkit's trainer checkpoints (weights under ``"model"``)
    and the common wrappers ``state_dict``, ``model``, ``model_state_dict`` and ``net``
    (nested at most three deep); strips a ``module.`` (DDP) or ``_orig_mod.``
    (``torch.compile``) prefix shared by every key.

    Args:
        path: checkpoint file written by ``torch.save``.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        ModelError: the file is missing, pickles anything but tensors and containers (refused
            unread: its code never runs), or holds no state dict.

    Example:
        >>> sd = load_state_dict_file("runs/cifar10_trades/best.pt")
        >>> model.load_state_dict(sd)
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch_load_plain(path)
    except ValueError as err:
        hint = ("Re-save the weights with torch.save(model.state_dict(), path)."
                if "refused" in str(err) else "Re-download or re-train it.")
        raise ModelError(f"checkpoint {err}. {hint}") from None
    for _ in range(3):
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise ModelError(
                f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict"
            )
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(map(repr, list(obj)[:8]))
            raise ModelError(
                f"checkpoint {str(path)!r} holds no state dict: top-level keys {keys}; expected "
                f"tensors, or one of {', '.join(_WRAPPER_KEYS)} holding them"
            )
        obj = inner
    if not _is_state_dict(obj):
        raise ModelError(f"checkpoint {str(path)!r} holds no state dict")
    state = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_wrapper(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and tuple(model._modules) == _WRAPPER_CHILDREN


def wrapped_state(model: nn.Module, state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``state`` in the key layout of ``model``: bare-architecture keys (none starts with
    ``normalize.`` or ``model.``) loaded into a ``create_model`` wrapper are prefixed with
    ``model.`` and get the wrapper's own mean/std; anything else is returned as it is."""
    if _is_wrapper(model) and not any(k.startswith(_WRAPPER_PREFIXES) for k in state):
        logger.info("%s holds bare-architecture weights; keeping the model's %s", path,
                    model.normalize)
        state = {f"model.{k}": v for k, v in state.items()}
        state.update({f"normalize.{k}": v for k, v in model.normalize.state_dict().items()})
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in a checkpoint file into ``model`` strictly, returning ``model``.

    Into a model from ``create_model`` (``Normalize`` → architecture) both layouts load:
    wrapped keys (``normalize.mean``, ``model.conv1.weight``: the checkpoint's normalisation
    wins) and bare-architecture keys (``conv1.weight``: prefixed with ``model.``, and the
    model keeps the mean/std it was built with). A checkpoint is bare when no key starts
    with ``normalize.`` or ``model.``.

    Raises:
        ModelError: unreadable file, or keys and shapes that do not match (listed).
    """
    state = wrapped_state(model, load_state_dict_file(path), path)
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelError(
            f"checkpoint {str(path)!r} does not match the model ({problem}). Is --model the "
            f"architecture the checkpoint was trained with (and are num_classes/in_channels "
            f"those of the dataset)?"
        )
    model.load_state_dict(state, strict=True)
    return model


def _import_file(path: Path) -> Any:
    """Import a Python file by path, with its folder on ``sys.path`` while it imports."""
    name = f"robustkit_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its sibling modules
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ModelError(f"importing {str(path)!r} failed: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(folder)
    return module


def _from_file(spec: str) -> nn.Module:
    file, _, factory = spec.rpartition(":")
    path = Path(file)
    if not factory.isidentifier():
        raise ModelError(f"--model {spec!r}: expected path/to/file.py:function")
    if not path.is_file():
        raise ModelError(f"--model {spec!r}: file {file!r} not found")
    module = _import_file(path)
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise ModelError(
            f"--model {spec!r}: {file!r} defines no function {factory!r} "
            f"(its functions and classes: {', '.join(names) or 'none'})"
        )
    try:
        model = fn()
    except Exception as err:  # a user file: report which call failed, keep the cause chained
        raise ModelError(
            f"--model {spec!r}: {factory}() raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"--model {spec!r}: {factory}() returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def _check_classes(
    model: nn.Module, spec: str, num_classes: int, shape: tuple[int, int, int], device: Any
) -> None:
    """One forward on a zero image of the dataset's shape; logits must be (1, num_classes)."""
    x = torch.zeros((1, *shape), device=device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        raise ModelError(
            f"model {spec!r} fails on a {tuple(x.shape)} input (the dataset's shape): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, Tensor) or out.dim() != 2:
        what = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
        raise ModelError(f"model {spec!r} must return (N, K) logits, got {what}")
    if out.shape[1] != num_classes:
        raise ModelError(
            f"model {spec!r} outputs {out.shape[1]} classes but the dataset has {num_classes}"
        )


def load_model(
    spec: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    checkpoint: str | Path | None = None,
    dataset: str | None = None,
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf",
    device: str | torch.device = "cpu",
    model_dir: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build or fetch a model from a ``--model`` string, load its weights, return it in eval mode.

    ``spec`` takes three forms:

    * a registry name (``robustkit.models.MODELS``): ``create_model(spec, num_classes, mean,
      std, in_channels, input_size)``, then the optional ``checkpoint``;
    * ``path/to/file.py:function``: the file is imported and ``function()`` is called with no
      arguments; it must return an ``nn.Module`` taking [0, 1] inputs (normalising itself:
      ``mean``/``std`` are not applied); the optional ``checkpoint`` is then loaded into it;
    * ``robustbench:<name>``: RobustBench's zoo (``dataset`` and ``threat_model`` required,
      network access to download weights unless already in ``model_dir``); no checkpoint;
    * ``robustkit:<name>``: a reference model shipped with robustkit
      (``robustkit.models.pretrained``: offline, sha256-checked); no checkpoint.

    Every model is then run once on a zero input of shape ``(1, in_channels, input_size,
    input_size)`` to check that it returns ``(1, num_classes)`` logits.

    Args:
        spec: model name, ``FILE.py:FN``, ``robustbench:NAME`` or ``robustkit:NAME``.
        num_classes: classes of the dataset.
        in_channels: image channels of the dataset. Default 3.
        input_size: image height = width of the dataset in pixels. Default 32.
        mean: per-channel mean for registry models (None: no normalisation).
        std: per-channel std for registry models (None: no normalisation).
        checkpoint: weights file (see ``load_state_dict_file``) for the first two forms.
        dataset: dataset name, needed by ``robustbench:`` (cifar10, cifar100, imagenet).
        threat_model: RobustBench threat model. Default ``"Linf"``.
        device: where the model goes. Default ``"cpu"``.
        model_dir: RobustBench download folder (see ``robustkit.models.zoo``).
        **kwargs: the architecture's own arguments, registry names only (e.g.
            ``sub_block1=True`` to load the official TRADES WRN-34-10 checkpoint).

    Raises:
        ModelError: unknown name, bad file or factory, mismatching checkpoint, offline zoo,
            or a class count different from ``num_classes``.

    Example:
        >>> model = load_model("preact_resnet18", num_classes=10, checkpoint="runs/x/best.pt")
        >>> model = load_model("robustbench:Standard", num_classes=10, dataset="cifar10")
    """
    from robustkit.utils import resolve_device

    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("spec must be a model name, FILE.py:FN, robustbench:NAME or "
                         f"robustkit:NAME, got {spec!r}")
    spec = spec.strip()
    is_zoo = spec.startswith("robustbench:")
    shipped = spec.startswith("robustkit:")
    if kwargs and (is_zoo or ":" in spec or spec.endswith(".py")):
        raise ModelError(f"architecture arguments {', '.join(kwargs)} apply to registry names "
                         f"only, not to {spec!r}")
    if is_zoo:
        from robustkit.models.zoo import load_zoo_model

        if checkpoint is not None:
            raise ModelError("checkpoint cannot be combined with robustbench: models (the zoo "
                             "downloads its own weights)")
        model = load_zoo_model(spec.partition(":")[2], dataset=dataset,
                               threat_model=threat_model, model_dir=model_dir)
    elif shipped:
        from robustkit.models.pretrained import load_pretrained

        if checkpoint is not None:
            raise ModelError("checkpoint cannot be combined with robustkit: models (they ship "
                             "their own weights)")
        model = load_pretrained(spec.partition(":")[2])
    elif ":" in spec or spec.endswith(".py"):
        if spec.rpartition(":")[0][-3:] != ".py":
            raise ModelError(
                f"--model {spec!r}: expected a registry name ({', '.join(MODELS)}), "
                f"path/to/file.py:function, robustbench:NAME or robustkit:NAME"
            )
        model = _from_file(spec)
    else:
        model = create_model(spec, num_classes, mean=mean, std=std, in_channels=in_channels,
                             input_size=input_size, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    _check_classes(model, spec, num_classes, (in_channels, input_size, input_size), dev)
    return model

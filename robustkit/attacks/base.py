"""The ``Attack`` seam: every attack maps ``(x, y)`` in [0, 1] to ``x_adv`` in the ε-ball ∩ [0, 1].

Subclasses implement ``_perturb``. The base class validates the inputs, runs the model in eval
mode (BatchNorm on running statistics, methods.md §1.1) and restores the previous mode, and
enables autograd itself so an attack works under ``torch.no_grad()``. Attacks take gradients with
``torch.autograd.grad`` on the input only and never write a parameter's ``.grad``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robustkit.utils import eval_mode

__all__ = ["Attack", "AttackResult", "Norm"]

Norm = Literal["Linf", "L2"]


@dataclass
class AttackResult:
    """What ``Attack.perturb`` returns.

    Attributes:
        x_adv: ``(N, C, H, W)`` in [0, 1], detached.
        info: per-sample ``(N,)`` tensors keyed as in methods.md §7.1: ``eps`` (budget used),
            ``steps_used`` (gradient evaluations spent on the sample), ``stopped`` (bool, frozen by
            early stopping), ``kappa`` (iterates still classified correctly, GAIRAT's κ).
            Attacks fill what they know; keys they do not compute are absent.
    """

    x_adv: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


class Attack:
    """Base class of all attacks.

    Args:
        model: ``nn.Module`` mapping ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``. Hold the bare
            module, never a DDP wrapper.
        eps: budget in [0, 1] pixel units (float).
        norm: ``"Linf"`` or ``"L2"``.

    Example:
        >>> x_adv = PGD(model, eps=8/255, alpha=2/255, steps=10)(x, y)
    """

    #: ``perturb`` takes ``state_path=`` and resumes an interrupted run from it (AutoAttack).
    resumable: ClassVar[bool] = False

    def __init__(self, model: nn.Module, eps: float, norm: Norm = "Linf") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        eps = float(eps)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model = model
        self.eps = eps
        self.norm: Norm = norm

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return ``x_adv`` (detached, same shape as ``x``)."""
        return self.perturb(x, y).x_adv

    def perturb(self, x: Tensor, y: Tensor, **overrides) -> AttackResult:
        """Run the attack; ``overrides`` are per-call settings the subclass accepts (``eps``).

        Raises:
            ValueError: naming ``x`` or ``y``: non-tensors, NaN/inf or out-of-[0, 1] ``x``, a
                ``y`` of the wrong shape or a non-integer dtype, a dtype or device mismatch;
                and, found on the attack's own first forward, labels outside ``[0, K)`` for
                the model's ``K`` logits or an ``x`` whose channel count the model's first
                layer does not take.
        """
        y = _check_inputs(x, y, self.model)
        # Attack on running BN statistics (methods.md §1.1, step 6); eval_mode restores every
        # submodule's own mode afterwards, not just the root's.
        with eval_mode(self.model), torch.enable_grad(), _FirstForward(self.model, x, y):
            # enable_grad: works under no_grad()
            result = self._perturb(x.detach(), y.detach(), **overrides)
        result.x_adv = result.x_adv.detach()
        return result

    def _perturb(self, x: Tensor, y: Tensor, **overrides) -> AttackResult:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every constructor argument that changes the result, as plain data (``model`` aside).

        Read from the attribute of the same name, so a subclass that stores its arguments under
        their own names needs nothing more. Evaluation fingerprints an attack by this (through
        ``repr``): two attacks with equal settings give equal flags for the same seed.
        """
        out: dict[str, Any] = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name in ("self", "model") or not hasattr(self, name):
                continue
            out[name] = _plain(getattr(self, name))
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def _plain(value: Any) -> Any:
    """A stable, readable stand-in for a setting (callables by name, generators by kind)."""
    if isinstance(value, float):
        return float(f"{value:.10g}")  # 8/255 prints the same on every run
    if isinstance(value, bool | int | str | type(None)):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Generator):
        # A generator's state is reseeded per batch by the evaluation; only its presence counts.
        return f"Generator({value.device})"
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
    return repr(value)


def _check_inputs(x: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """Refuse what would silently give wrong numbers; returns ``y`` as int64.

    NaN passes ``x.min() < 0 or x.max() > 1`` (every comparison with NaN is False) and a NaN
    image argmaxes to class 0, so finiteness is checked explicitly. Integer labels of another
    dtype are cast; float or bool labels are refused (a float label is usually a one-hot or a
    probability by mistake). A dtype or device different from the model's gets a clear message
    instead of torch's matmul error.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"x and y must be tensors, got {type(x).__name__} and "
                         f"{type(y).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be batched (N, ...), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor in [0, 1], got {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {y.dtype}")
    y = y.long()
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise ValueError("x must lie in [0, 1]: normalisation belongs inside the model")
    ref = next(iter(list(model.parameters()) + list(model.buffers())), None)
    if ref is not None:
        if ref.device != x.device:
            raise ValueError(f"x is on {x.device} but the model is on {ref.device}")
        if ref.is_floating_point() and ref.dtype != x.dtype:
            raise ValueError(f"x is {x.dtype} but the model's parameters are {ref.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    return y


# torch's convolution error for an input with the wrong number of channels.
_CONV_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+)")


class _FirstForward:
    """Checks what needs the model, on the attack's own first forward (no extra pass).

    ``y`` must lie in ``[0, K)`` for the ``K`` logits the model returns: an out-of-range label
    otherwise ends in an index error deep inside a loss (or, on CUDA, a device-side assert). An
    ``x`` with the wrong number of channels fails inside the first layer with torch's own
    message; that failure, before the model ever returned, is re-raised as a ``ValueError``
    naming ``x``. One forward hook on the model, removed after its first call; one device sync.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.seen = False
        self.handle: Any = None

    def __enter__(self) -> _FirstForward:
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.seen = True
        self.handle.remove()
        if isinstance(output, Tensor) and output.dim() == 2:
            k = output.shape[1]
            bad = (self.y < 0) | (self.y >= k)
            if bool(bad.any()):
                labels = sorted(set(self.y[bad].tolist()))
                shown = ", ".join(map(str, labels[:5])) + (" ..." if len(labels) > 5 else "")
                raise ValueError(f"y must be in [0, {k}) (the model returns {k} logits), got "
                                 f"label(s) {shown}")

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> None:
        self.handle.remove()
        if self.seen or not isinstance(err, RuntimeError):
            return
        have = self.x.shape[1]
        match = _CONV_CHANNELS.search(str(err))
        expected = int(match[1]) if match else _first_layer_channels(self.model)
        if expected is not None and expected != have:
            raise ValueError(f"x has {have} channel{'s' * (have != 1)}, the model expects "
                             f"{expected} (x has shape {tuple(self.x.shape)})") from err


def _first_layer_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution, if it has one."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None

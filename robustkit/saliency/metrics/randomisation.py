"""Randomisation sanity check (methods.md §8.2 item 8; Quantus' "randomisation" family): a map
that does not change when the model's weights are randomised does not explain the model
(Adebayo et al.'s cascading model-parameter randomisation).

Example:
    >>> from robustkit.saliency.metrics import cascading_randomisation
    >>> rho = cascading_randomisation(model, x, y, lambda m, t, c: Gradient(m).attribute(t, c))
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from robustkit.saliency.metrics._common import _float, _maps, _spearman

__all__ = ["cascading_randomisation"]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU (and of ``device`` when it is a GPU) seeded for the block; the
    caller's RNG states come back afterwards, and other GPUs' generators are not touched."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda \
        else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _default_layers(model: nn.Module) -> list[str]:
    """Every module with parameters of its own, output side first (reverse registration)."""
    names = [name for name, mod in model.named_modules()
             if any(True for _ in mod.parameters(recurse=False))]
    return names[::-1]


def _randomise(module: nn.Module) -> None:
    """Re-initialise every parameter of ``module`` and its submodules: PyTorch's default
    initialisation for leaf modules that have one (``reset_parameters``; BatchNorm goes back to
    weight 1, bias 0 and fresh running statistics), else N(0, 1) (AdaptGrad's
    ``metrics/consistency.py``)."""
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        if hasattr(sub, "reset_parameters") and not any(True for _ in sub.children()):
            sub.reset_parameters()
            continue
        with torch.no_grad():
            for p in own:
                p.normal_()


def cascading_randomisation(model: nn.Module, x: Tensor, target: Tensor | int,
                            explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
                            layers: Sequence[str] | None = None,
                            seed: int = 0) -> dict[str, Tensor]:
    """Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018,
    https://arxiv.org/abs/1810.03292): randomise layers from the output down, cumulatively, and
    score each map against the original map by the Spearman ρ of their magnitudes.

    Works on a deep copy: ``model`` itself (parameters, buffers, modes) is never changed. The
    copy is in eval mode. Every ``explain`` call runs with the global RNG seeded by ``seed`` (and
    the caller's RNG state restored), so a stochastic explainer draws the same noise at every
    step and only the weights change; the re-initialisation of the k-th layer (k = 1, 2, ...) is
    seeded by ``seed + k``.

    Args:
        model: the model to explain.
        x: inputs ``(N, C, H, W)`` in [0, 1].
        target: classes ``(N,)`` or an int.
        explain: ``explain(model, x, target) -> maps`` (``(N, H, W)`` or ``(N, C, H, W)``;
            4-D maps become ``Σ_c |a_c|``, 3-D ones ``|a|``).
        layers: module names, randomised in the given order (give them output side first); a
            block (``"model.layer4"``) is randomised whole. Default: every module with
            parameters of its own, in reverse registration order.
        seed: see above; default 0.

    Returns:
        ``{"original": ρ, layer_1: ρ, ...}`` in randomisation order, each ``(N,)``: "original" is
        a second explanation by the untouched copy (1 for a deterministic explainer), entry k
        the map after randomising layers 1..k.

    Example:
        >>> cascading_randomisation(model, x, y, lambda m, t, c: input_gradient(m, t, c))
        {'original': tensor([1., 1.]), 'model.fc': tensor([0.41, 0.37]), ...}
    """
    x = _float(x, "x")
    work = copy.deepcopy(model).eval()
    target = torch.as_tensor(target, device=x.device).long().expand(x.shape[0])
    names = list(_default_layers(work) if layers is None else layers)
    known = dict(work.named_modules())
    unknown = [name for name in names
               if name not in known or not any(True for _ in known[name].parameters())]
    if unknown:
        raise ValueError(f"layers names modules the model does not have, or that have no "
                         f"parameters: {unknown}; modules with parameters of their own: "
                         f"{_default_layers(work)[::-1]}")

    def flat_map() -> Tensor:
        with _seeded(seed, x.device):
            maps = explain(work, x, target).detach()
        return _maps(maps, "explain(model, x, target)", "magnitude").flatten(1)

    reference = flat_map()
    out = {"original": _spearman(reference, flat_map()).to(reference.dtype)}
    for k, name in enumerate(names):
        module = known[name]
        device = next(iter(module.parameters(recurse=False)), x).device
        with _seeded(seed + 1 + k, device):
            _randomise(module)
        out[name] = _spearman(reference, flat_map()).to(reference.dtype)
    return out

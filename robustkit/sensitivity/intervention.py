"""The intervention test (methods.md §4.2 [R]): do the most sensitive neurons carry the
adversarial prediction?

On x', the activations of chosen neurons of one layer are replaced by their values on x (a
forward hook), and the accuracy on x' is measured again. If the top-k sensitive neurons carry
the attack, restoring them recovers much more accuracy than restoring k random neurons.

Example:
    >>> sigma = neuron_sensitivity(model, x, x_adv, ["conv2"])["model.feature_extractor.conv2"]
    >>> intervention_test(model, x, x_adv, y, "conv2", sigma, ratio=0.1)   # SmallCNN
    {'topk': 0.62, 'random': 0.18, 'k': 7, 'adv': 0.05, 'clean': 0.99}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustkit.distributed import unwrap
from robustkit.sensitivity.measure import _check_pairs, top_k_neurons
from robustkit.sensitivity.tap import FeatureTap, resolve_layers
from robustkit.utils import eval_mode

__all__ = ["patched_logits", "intervention_test"]


@torch.no_grad()
def patched_logits(model: nn.Module, x: Tensor, x_adv: Tensor, layer: str,
                   neurons: Tensor) -> Tensor:
    """Logits on ``x_adv`` with ``layer``'s channels ``neurons`` set to their values on ``x``.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits (run in eval mode, mode restored).
        x, x_adv: benign and adversarial inputs, same shape.
        layer: module name or unique alias (``resolve_layers``); its output is ``(N, C, ...)``.
        neurons: ``(k,)`` channel indices of that output.

    Shape: returns ``(N, K)``.
    """
    bare = unwrap(model)
    (name,) = resolve_layers(bare, [layer])
    with eval_mode(bare):
        with FeatureTap(bare, [name]) as tap:
            bare(x)
            clean = tap.take()[name]
        idx = neurons.to(clean.device).long()

        def patch(module, inputs, output):
            out = output.clone()
            out[:, idx] = clean[:, idx]  # channel dimension: the paper's neurons
            return out

        handle = bare.get_submodule(name).register_forward_hook(patch)
        try:
            return bare(x_adv)
        finally:
            handle.remove()


@torch.no_grad()
def intervention_test(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, layer: str,
                      sigma: Tensor, ratio: float = 0.1, draws: int = 5,
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """Accuracy on x' after restoring the top-k sensitive neurons of ``layer``, and after
    restoring k random ones (mean over ``draws``), with ``k = ceil(ratio · C)``.

    Returns:
        ``{"topk", "random", "k", "adv", "clean"}``: accuracies in [0, 1] (``adv`` without any
        restoring, ``clean`` on x) and k.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    _check_pairs(x, x_adv)
    bare = unwrap(model)
    top = top_k_neurons(sigma, ratio=ratio)
    k, channels = top.numel(), sigma.numel()
    y = y.to(x.device)

    def acc(logits: Tensor) -> float:
        return float((logits.argmax(1) == y).float().mean())

    with eval_mode(bare):
        clean, adv = acc(bare(x)), acc(bare(x_adv))
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rand = [acc(patched_logits(bare, x, x_adv, layer, torch.randperm(channels, generator=g)[:k]))
            for _ in range(draws)]
    return {"topk": acc(patched_logits(bare, x, x_adv, layer, top)),
            "random": math.fsum(rand) / draws, "k": k, "adv": adv, "clean": clean}

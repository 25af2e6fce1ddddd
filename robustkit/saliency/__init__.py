"""Explainers (methods.md §6): Gradient, Gradient × Input, SmoothGrad, AdaptGrad and Integrated
Gradients over any inner explainer, plus the display reductions of ``saliency.display``; the
metrics in ``saliency.metrics``; ``compare`` (-> ``SaliencyReport``) runs what ``robustkit
inspect`` runs: several models explained, scored and compared on the same images.

Every explainer maps ``(N, C, H, W)`` in [0, 1] to a detached map shaped like x, explaining the
logit of ``target`` (default: the predicted class) in eval mode, with no side effect on x, the
parameters' ``.grad``, hooks or the model's mode.

Example:
    >>> from robustkit.saliency import create_explainer
    >>> maps = create_explainer("ig-adaptgrad", model, seed=0).attribute(x, target=y)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustkit.saliency.adaptgrad import AdaptGrad
from robustkit.saliency.base import Explainer, Target
from robustkit.saliency.compare import compare
from robustkit.saliency.display import absolute_map, percentile_scale, repo_scale, signed_map
from robustkit.saliency.gradient import Gradient
from robustkit.saliency.gradient_x_input import GradientXInput
from robustkit.saliency.integrated_gradients import IntegratedGradients, Method
from robustkit.saliency.report import SaliencyReport
from robustkit.saliency.smoothgrad import SmoothGrad

# metrics: robustkit.saliency.metrics

__all__ = ["Explainer", "Target", "Gradient", "GradientXInput", "SmoothGrad", "AdaptGrad",
           "IntegratedGradients", "EXPLAINERS", "create_explainer", "explainer_params",
           "signed_map", "absolute_map", "percentile_scale", "repo_scale", "compare",
           "SaliencyReport"]


def _ig_adaptgrad(model: nn.Module, inner: Explainer | None = None, *, n_steps: int = 50,
                  baseline: float | Tensor = 0.0, method: Method = "gausslegendre",
                  n_samples: int = 50, confidence: float = 0.95,
                  bounds: tuple[float, float] = (0.0, 1.0), include_clean: bool = True,
                  seed: int | None = None, generator: torch.Generator | None = None,
                  internal_batch_size: int | None = None) -> IntegratedGradients:
    """``IntegratedGradients(AdaptGrad(inner or Gradient(model), ...), ...)``, the paper's
    IG-AdaptGrad; ``method="repo"`` reproduces the repository's form."""
    adapt = AdaptGrad(Gradient(model, internal_batch_size) if inner is None else inner,
                      n_samples=n_samples, confidence=confidence, bounds=bounds,
                      include_clean=include_clean, seed=seed, generator=generator,
                      internal_batch_size=internal_batch_size)
    return IntegratedGradients(adapt, baseline=baseline, n_steps=n_steps, method=method,
                               internal_batch_size=internal_batch_size)


EXPLAINERS: dict[str, Callable[..., Explainer]] = {
    "gradient": Gradient,
    "gradient_x_input": GradientXInput,
    "gxi": GradientXInput,
    "smoothgrad": SmoothGrad,
    "adaptgrad": AdaptGrad,
    "ig": IntegratedGradients,
    "integrated_gradients": IntegratedGradients,  # architecture.md §3's config spelling
    "ig-adaptgrad": _ig_adaptgrad,
}


def explainer_params(name: str) -> list[str]:
    """The keyword arguments ``create_explainer(name, model, ...)`` accepts (its factory's
    parameters but ``model`` and ``inner``), e.g. to pass only the settings an explainer
    takes."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; known: {sorted(EXPLAINERS)}")
    params = inspect.signature(EXPLAINERS[name]).parameters  # a class: its __init__'s
    return [p for p in params if p not in ("model", "inner")]


def create_explainer(name: str, model: nn.Module, inner: Explainer | None = None,
                     **kwargs) -> Explainer:
    """Build an explainer by name, a key of ``EXPLAINERS``.

    Wrappers (every name but ``"gradient"``) wrap ``inner``, default ``Gradient(model)``;
    ``"ig-adaptgrad"`` is IG over AdaptGrad over ``inner``, its keyword arguments shared out
    (``n_steps``, ``baseline``, ``method`` to IG; ``n_samples``, ``confidence``, ``bounds``,
    ``include_clean``, ``seed``, ``generator`` to AdaptGrad; ``internal_batch_size`` to all).

    Raises:
        ValueError: an unknown name (listing the known ones), an unknown keyword argument
            (listing the accepted ones), an ``inner`` for ``"gradient"``, or an ``inner`` that
            explains another model.

    Example:
        >>> sg = create_explainer("smoothgrad", model, stdev=0.2, seed=0)
        >>> ig_sg = create_explainer("ig", model, inner=sg, n_steps=20)
    """
    accepted = explainer_params(name)  # raises for an unknown name, listing the known ones
    factory = EXPLAINERS[name]
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ValueError(f"explainer {name!r} does not accept {bad}; accepted: {accepted}")
    if inner is not None:
        if not isinstance(inner, Explainer):
            raise ValueError(f"inner must be an Explainer, got {type(inner).__name__}")
        if inner.model is not model:
            raise ValueError("inner explains a different model than model")
    if factory is Gradient:
        if inner is not None:
            raise ValueError("explainer 'gradient' takes no inner")
        return Gradient(model, **kwargs)
    if factory is _ig_adaptgrad:
        return _ig_adaptgrad(model, inner, **kwargs)
    if inner is None:
        inner = Gradient(model, internal_batch_size=kwargs.get("internal_batch_size"))
    return factory(inner, **kwargs)

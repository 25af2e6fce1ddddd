"""Neuron sensitivity of several models on one image set (methods.md §4): ``compare`` measures
and returns a ``SensitivityReport`` (``sensitivity.report``), which shows and saves the result as
``robustkit sensitivity`` writes it.

Per model and layer: σ per neuron, its mean and median over the layer's neurons with a 95 % BCa
bootstrap CI of the mean over *images* (``reports.stats.bootstrap_ci``), the relative σ, the top-k
most sensitive neurons and the intervention test (accuracy on x' with those k, or k random,
neurons restored to their clean values); per pair (the first model, each other one) the Jaccard
overlap of the top-k sets. Models with different layers are compared on the common ones.

x' comes from the paper's full-strength PGD (``sensitivity.pairs``: L∞, α = ε/4, random start,
no early stop, last iterate), white-box on each model or made once on a ``source`` model so that
every model sees identical pairs; or it is given (``x_adv=``).

Example:
    >>> report = compare({"standard": std, "robust": rob}, x, y, attack="pgd20", eps=0.3)
    >>> report.to_frame(); report.save("runs/sens")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.sensitivity.intervention import intervention_test
from robustkit.sensitivity.measure import (
    Reduction,
    SensitivityMeter,
    jaccard,
    per_sample_sensitivity,
    top_k_neurons,
)
from robustkit.sensitivity.pairs import (
    Progress,
    adversarial_pairs,
    check_images,
    full_strength_pgd,
    model_device,
    null_progress,
    pair_attack_settings,
    parse_pair_attack,
)
from robustkit.sensitivity.report import SensitivityReport
from robustkit.sensitivity.tap import resolve_layers
from robustkit.utils import eval_mode

__all__ = ["compare", "common_layers"]

logger = logging.getLogger(__name__)


def common_layers(models: Mapping[str, nn.Module], layers: Sequence[str] | str = "auto"
                  ) -> tuple[list[str], dict[str, list[str]]]:
    """The layers every model has (the first model's order) and, per model, those left out.

    Raises:
        ValueError: a layer unknown to a model (naming the model), or no common layer.

    Example:
        >>> common, skipped = common_layers({"a": model_a, "b": model_b}, "auto")
        >>> skipped["b"]                       # b's layers that a lacks
    """
    own: dict[str, list[str]] = {}
    for lb, model in models.items():
        try:
            own[lb] = resolve_layers(model, layers)
        except ValueError as err:
            raise ValueError(f"model {lb}: {err}") from None
    labels = list(models)
    common = [ly for ly in own[labels[0]] if all(ly in own[lb] for lb in labels)]
    if not common:
        raise ValueError("the models share no layer to compare: " + "; ".join(
            f"{lb}: {', '.join(own[lb])}" for lb in labels))
    return common, {lb: [ly for ly in own[lb] if ly not in common] for lb in labels}


def _check(models, x, y, attack, eps, x_adv, source, source_model, reduction, ratio, draws,
           batch_size) -> None:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty {label: nn.Module} mapping")
    for lb, m in models.items():
        if not isinstance(lb, str) or not isinstance(m, nn.Module):
            raise ValueError(f"models must map str labels to nn.Module, got {lb!r}: "
                             f"{type(m).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, C, H, W) with N >= 2 (a bootstrap needs two images), "
                         f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    check_images("x", x)
    if not isinstance(y, Tensor) or y.shape != x.shape[:1] or y.is_floating_point():
        raise ValueError(f"y must be ({x.shape[0]},) integer labels of x")
    if bool((y < 0).any()):
        raise ValueError(f"y holds negative labels ({int(y.min())})")
    if (attack is None) == (x_adv is None):
        raise ValueError("give exactly one of attack= (make x') and x_adv= (x' given)")
    if attack is not None and (eps is None or not eps > 0):
        raise ValueError(f"eps must be a positive budget in pixel units with attack=, got {eps!r}")
    if x_adv is not None:
        if source is not None or source_model is not None:
            raise ValueError("source applies to attack=, not to a given x_adv")
        if isinstance(x_adv, Mapping) and set(x_adv) != set(models):
            raise ValueError(f"x_adv must have one entry per model: {sorted(models)}")
        for lb, t in (x_adv.items() if isinstance(x_adv, Mapping) else [(None, x_adv)]):
            check_images("x_adv" if lb is None else f"x_adv[{lb!r}]", t, tuple(x.shape))
    if source_model is not None and source is None:
        raise ValueError("source_model needs source= (its label)")
    if source is not None and source not in models and source_model is None:
        raise ValueError(f"source {source!r} is not one of the models ({', '.join(models)}); "
                         "pass the model as source_model=")
    if source is not None and source in models and source_model is not None:
        raise ValueError(f"source {source!r} is one of the models; source_model applies only "
                         "to another model")
    if reduction not in ("elementwise", "spatial_mean"):
        raise ValueError(f"reduction must be 'elementwise' or 'spatial_mean', got {reduction!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    if draws < 1 or batch_size < 1:
        raise ValueError(f"draws and batch_size must be >= 1, got {draws!r} and {batch_size!r}")


def compare(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, *,
            attack: str | None = None, eps: float | None = None,
            x_adv: Tensor | Mapping[str, Tensor] | None = None,
            source: str | None = None, source_model: nn.Module | None = None,
            layers: Sequence[str] | Literal["auto"] = "auto",
            reduction: Reduction = "elementwise", ratio: float = 0.1, draws: int = 5,
            batch_size: int = 256, seed: int = 0,
            model_info: Mapping[str, Mapping[str, Any]] | None = None,
            about: Mapping[str, Any] | None = None,
            progress: Progress | None = None) -> SensitivityReport:
    """Neuron sensitivity of every model on the same images (methods.md §4.1-4.2).

    Args:
        models: ``{label: model}``, each mapping ``(N, C, H, W)`` in [0, 1] to logits, on the
            device it should run on (batches go there; results come back to the CPU). The first
            is the reference of the top-k overlaps.
        x: ``(N, C, H, W)`` benign images in [0, 1], N >= 2.
        y: ``(N,)`` labels.
        attack: ``"pgdK"`` or ``"cwK"``: x' by the full-strength PGD (``sensitivity.pairs``),
            white-box on each model unless ``source`` is given. Exclusive with ``x_adv``.
        eps: L∞ budget of ``attack`` in [0, 1] pixel units (α = ε/4).
        x_adv: given x': one tensor for every model, or ``{label: tensor}``.
        source: make x' once, on this model (a label of ``models``, or the label of
            ``source_model``), and measure every model on it.
        source_model: the source model when it is not one of ``models``.
        layers: module names, unique aliases (``"conv2"``) or ``"auto"`` (every conv and linear
            module); results use the full module names.
        reduction: ``"elementwise"`` (paper, default) or ``"spatial_mean"`` (MindArmour).
        ratio: top-k ratio: ``k = ceil(ratio * channels)``; default 0.1.
        draws: random k-neuron sets of the intervention test; default 5.
        batch_size: images per forward / attack batch; default 256 (results do not depend
            on it).
        seed: seed of the random starts, the random neurons and the bootstrap; default 0.
        model_info: ``{label: {...}}`` written first into each model's entry (the CLI records
            ``{"model": spec, "checkpoint": path}``); default ``{"model": class name,
            "checkpoint": None}``.
        about: what x is and where it ran (``{"dataset", "split", "device"}``), written into
            the settings.
        progress: ``progress(name, total)`` factory of bars with ``update(k)`` (the CLI's tqdm);
            default none.

    Returns:
        A ``SensitivityReport``.

    Raises:
        ValueError: naming the argument: a bad attack, eps, layer (with the model), shapes,
            ratio, draws, reduction, source, or models sharing no layer.

    Example:
        >>> report = compare({"std": std, "rob": rob}, x, y, attack="pgd20", eps=0.3)
        >>> report.to_frame().pivot(index="layer", columns="model", values="mean")
    """
    from robustkit.reports.stats import CONFIDENCE, N_RESAMPLES

    _check(models, x, y, attack, eps, x_adv, source, source_model, reduction, ratio, draws,
           batch_size)
    spec = parse_pair_attack(attack) if attack is not None else None
    labels = list(models)
    for lb in labels:  # a label outside the classes would only lower the accuracies silently
        with torch.no_grad(), eval_mode(models[lb]):
            classes = models[lb](x[:1].to(model_device(models[lb]))).shape[-1]
        if int(y.max()) >= classes:
            raise ValueError(f"y holds label {int(y.max())}, outside the {classes} classes of "
                             f"model {lb}")
    common, skipped = common_layers(models, layers)
    if any(skipped.values()):
        logger.warning("the models have different layer sets; comparing only the %d common "
                       "layers (%s); skipped: %s", len(common), ", ".join(common), "; ".join(
                           f"{lb}: {', '.join(s)}" for lb, s in skipped.items() if s))
    n = x.shape[0]
    progress = progress or null_progress
    x, y = x.detach().cpu(), y.detach().cpu().long()
    shared = None
    if spec is not None and source is not None:  # one x' set for every model, made once
        src = models[source] if source in models else source_model
        shared = adversarial_pairs(full_strength_pgd(src, attack, eps=eps, seed=seed), x, y,
                                   batch_size=batch_size, progress=progress,
                                   name=f"x' on {source}")
    elif x_adv is not None and not isinstance(x_adv, Mapping):
        shared = x_adv.detach().cpu()
    info = dict(model_info or {})
    out: dict[str, dict[str, Any]] = {}
    sigmas: dict[str, dict[str, Tensor]] = {}
    relative: dict[str, dict[str, Tensor]] = {}
    adv: dict[str, Tensor] = {}
    for i, lb in enumerate(labels):
        model = models[lb]
        where = f"[{i + 1}/{len(labels)}] {lb}"
        if shared is not None:
            adv[lb] = shared
        elif spec is not None:
            adv[lb] = adversarial_pairs(full_strength_pgd(model, attack, eps=eps, seed=seed), x,
                                        y, batch_size=batch_size, progress=progress,
                                        name=f"{where} attack")
        else:
            adv[lb] = x_adv[lb].detach().cpu()
        with progress(f"{where} measure", n * (2 + len(common))) as bar:
            entry, sigmas[lb], relative[lb] = _measure(
                model, x, adv[lb], y, common, reduction, ratio, draws, seed, batch_size, bar)
        layer_stats = entry.pop("layers")
        out[lb] = {**info.get(lb, {"model": type(model).__name__, "checkpoint": None}),
                   "attack": spec.name if spec else None, "eps": eps if spec else None, "n": n,
                   **entry, "reduction": reduction, "source_model": source,
                   "skipped_layers": skipped[lb], "layers": layer_stats}
    settings = {**dict(about or {}), "n": n, "eps": eps if spec else None, "norm": "Linf",
                "reduction": reduction, "ratio": ratio, "draws": draws, "seed": seed,
                "batch_size": batch_size, "layers": layers if isinstance(layers, str)
                else list(layers)}
    settings.update(eps_text=_eps_text(eps) if spec else None,
                    attack=spec.name if spec else None,
                    attack_settings={"name": spec.name, "class": "PGD", "family": spec.kind,
                                     **pair_attack_settings(attack, eps), "generator_seed": seed}
                    if spec else None,
                    source_model=source,
                    ci={"over": "images", "method": "BCa", "confidence_level": CONFIDENCE,
                        "n_resamples": N_RESAMPLES, "seed": seed})
    return SensitivityReport(models=out, common_layers=common,
                             pairs=_pairs(labels, sigmas, common, ratio), settings=settings,
                             sigma=sigmas, relative=relative, x_adv=adv, y=y)


def _eps_text(eps: float) -> str:
    from robustkit.evaluation.results import format_eps

    return format_eps(eps)


def _measure(model, x, x_adv, y, layers: list[str], reduction: Reduction, ratio: float,
             draws: int, seed: int, bs: int, bar):
    """Accuracies, σ, relative σ, per-image means, CI, top-k and intervention of one model."""
    from robustkit.reports.stats import bootstrap_ci

    n, device = x.shape[0], model_device(model)
    meter = SensitivityMeter(model, layers, reduction)
    rows: dict[str, list] = {ly: [] for ly in layers}
    clean_ok = adv_ok = 0
    batches = [(x[i:i + bs].to(device), x_adv[i:i + bs].to(device), y[i:i + bs].to(device))
               for i in range(0, n, bs)]
    for xb, xab, yb in batches:
        meter.update(xb, xab)
        for ly, r in per_sample_sensitivity(model, xb, xab, layers, reduction,
                                            batch_size=xb.shape[0]).items():
            rows[ly].append(r.mean(1))  # (nb,): each image's mean over the layer's neurons
        with torch.no_grad(), eval_mode(model):
            clean_ok += int((model(xb).argmax(1) == yb).sum())
            adv_ok += int((model(xab).argmax(1) == yb).sum())
        bar.update(2 * xb.shape[0])
    sigma, rel = meter.compute(), meter.compute(relative=True)
    out: dict[str, Any] = {"clean_accuracy": clean_ok / n, "adv_accuracy": adv_ok / n,
                           "layers": {}}
    # spatial_mean sums over images (MindArmour), so its layer mean is n x the image mean
    scale = n if reduction == "spatial_mean" else 1
    for ly in layers:
        s = sigma[ly]
        top = top_k_neurons(s, ratio=ratio)
        topk = rand = 0.0
        for xb, xab, yb in batches:
            # The same seed for every batch draws the same k random neurons for all images, so
            # the batched accuracies are those of one pass over all n images.
            r = intervention_test(model, xb, xab, yb, ly, s, ratio=ratio, draws=draws,
                                  generator=torch.Generator().manual_seed(seed))
            topk += round(r["topk"] * xb.shape[0])
            rand += r["random"] * xb.shape[0]
            bar.update(xb.shape[0])
        lo, hi = bootstrap_ci(torch.cat(rows[ly]).numpy(), seed)  # over images
        out["layers"][ly] = {
            "mean": float(s.mean()), "median": float(np.median(s.numpy())),
            "relative_mean": float(rel[ly].mean()), "topk_mean": float(s[top].mean()),
            "ci95": [lo * scale, hi * scale],
            "intervention": {"topk": topk / n, "random": rand / n},
            "channels": s.numel(), "k": top.numel(), "topk_neurons": top.tolist()}
    return out, sigma, rel


def _pairs(labels: list[str], sigmas, common: list[str], ratio: float) -> list[dict[str, Any]]:
    """Jaccard overlap of the top-k sets of the first model and each other one, per layer."""
    pairs = []
    for other in labels[1:]:
        overlap: dict[str, float | None] = {}
        for ly in common:
            a, b = sigmas[labels[0]][ly], sigmas[other][ly]
            if a.numel() != b.numel():  # neuron m of one model is not neuron m of the other
                logger.warning("%s: %s has %d neurons, %s %d; no top-k overlap", ly, labels[0],
                               a.numel(), other, b.numel())
                overlap[ly] = None
                continue
            overlap[ly] = jaccard(top_k_neurons(a, ratio), top_k_neurons(b, ratio))
        pairs.append({"a": labels[0], "b": other, "jaccard": overlap})
    return pairs

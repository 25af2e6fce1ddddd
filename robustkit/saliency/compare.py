"""Saliency of several models side by side (methods.md §8.1): ``compare`` explains, scores and
tests, and returns a ``SaliencyReport`` (``saliency.report``), which shows and saves the result
as ``robustkit inspect`` writes it.

Each model explains the true label's logit on x and on its own x' (the full-strength white-box
PGD of ``sensitivity.pairs``, or given x'), with every explainer; each map is scored by the
metrics of methods.md §8.2 (``saliency.metrics``): of one map (clean, adv), with object boxes,
of the pair (map of x vs map of x'), faithfulness on x, and AdaptGrad's residual. Per
(explainer, metric, input, model): the mean over images with a finite value and its 95 % BCa
bootstrap CI; per pair (the first model a, each other b): the paired differences b − a over the
images finite for both, their CI, effect size d_z and Wilcoxon p (``reports.stats``).

Example:
    >>> report = compare({"standard": std, "robust": rob}, x, y, attack="pgd20", eps=0.3)
    >>> report.to_frame(); report.save("runs/inspect")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.saliency import metrics as M
from robustkit.saliency.report import Row, SaliencyReport
from robustkit.sensitivity.pairs import (
    Progress,
    adversarial_pairs,
    full_strength_pgd,
    model_device,
    null_progress,
    pair_attack_settings,
    parse_pair_attack,
)
from robustkit.utils import eval_mode

__all__ = ["compare", "DEFAULT_EXPLAINERS", "ROBUST_THRESHOLD", "INPUTS", "metric_order"]

logger = logging.getLogger(__name__)

DEFAULT_EXPLAINERS = ("gradient", "smoothgrad", "adaptgrad")
# Maps are scored on x ("clean"), on x' ("adv") and as a pair (map of x vs map of x').
INPUTS = ("clean", "adv", "pair")
# Without a given kind, a model is called robust when it keeps this much accuracy under the
# attack: standard models fall to ~0 under PGD at the usual budgets, adversarially trained ones
# keep 40-95 % (methods.md §7 tables); 0.2 sits well between the two.
ROBUST_THRESHOLD = 0.2


def _explainer_kwargs(name: str, n_samples: int, ig_steps: int, seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if name in ("smoothgrad", "adaptgrad", "ig-adaptgrad"):
        kw.update(n_samples=n_samples, seed=seed)
    if name in ("ig", "ig-adaptgrad", "integrated_gradients"):
        kw["n_steps"] = ig_steps
    return kw


def _check(models, x, y, explainers, attack, eps, x_adv, boxes) -> None:
    from robustkit.saliency import EXPLAINERS

    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty {label: nn.Module} mapping")
    for lb, m in models.items():
        if not isinstance(lb, str) or not isinstance(m, nn.Module):
            raise ValueError(f"models must map str labels to nn.Module, got {lb!r}: "
                             f"{type(m).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, C, H, W) with N >= 2 (a bootstrap needs two images), "
                         f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(y, Tensor) or y.shape != x.shape[:1]:
        raise ValueError(f"y must be ({x.shape[0]},) labels of x")
    if isinstance(explainers, str) or not explainers:
        raise ValueError(f"explainers must be a non-empty list of names, got {explainers!r}")
    unknown = [e for e in explainers if e not in EXPLAINERS]
    if unknown:
        raise ValueError(f"unknown explainer(s) {unknown}; known: {', '.join(EXPLAINERS)}")
    if (attack is None) == (x_adv is None):
        raise ValueError("give exactly one of attack= (make x') and x_adv= (x' given)")
    if attack is not None and (eps is None or not eps > 0):
        raise ValueError(f"eps must be a positive budget in pixel units with attack=, got {eps!r}")
    if x_adv is not None:
        given = x_adv.values() if isinstance(x_adv, Mapping) else [x_adv]
        if isinstance(x_adv, Mapping) and set(x_adv) != set(models):
            raise ValueError(f"x_adv must have one entry per model: {sorted(models)}")
        if any(not isinstance(t, Tensor) or t.shape != x.shape for t in given):
            raise ValueError(f"x_adv must be shaped like x, {tuple(x.shape)}")
    if boxes is not None and tuple(torch.as_tensor(boxes).shape) != (x.shape[0], 4):
        raise ValueError(f"boxes must be ({x.shape[0]}, 4) rows x0, y0, x1, y1")


def compare(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, *,
            explainers: Sequence[str] = DEFAULT_EXPLAINERS,
            attack: str | None = None, eps: float | None = None,
            x_adv: Tensor | Mapping[str, Tensor] | None = None,
            n_samples: int = 16, ig_steps: int = 32, faithfulness_steps: int | None = None,
            boxes: Tensor | None = None, batch_size: int = 64, seed: int = 0,
            grid_rows: int = 16, kinds: Mapping[str, str] | None = None,
            kind_source: str = "given",
            model_info: Mapping[str, Mapping[str, Any]] | None = None,
            about: Mapping[str, Any] | None = None,
            progress: Progress | None = None) -> SaliencyReport:
    """Explain, score and compare the saliency of every model on the same images (§8.1).

    Args:
        models: ``{label: model}`` on the device each should run on; the first is the
            reference ``a`` of the paired differences.
        x: ``(N, C, H, W)`` images in [0, 1], N >= 2.
        y: ``(N,)`` labels: the explained target.
        explainers: names of ``saliency.EXPLAINERS``; default gradient, smoothgrad, adaptgrad.
        attack: ``"pgdK"`` or ``"cwK"``: x' by the full-strength PGD (α = ε/4, random start,
            last iterate), white-box on each model. Exclusive with ``x_adv``.
        eps: L∞ budget of ``attack`` in [0, 1] pixel units.
        x_adv: given x': one tensor for every model, or ``{label: tensor}``.
        n_samples: noise samples of smoothgrad, adaptgrad, ig-adaptgrad; default 16.
        ig_steps: integration steps of ig, ig-adaptgrad; default 32.
        faithfulness_steps: also score the clean maps by deletion and insertion AUC with this
            many steps (black baseline); default ``None`` (off).
        boxes: ``(N, 4)`` object boxes ``x0, y0, x1, y1`` (inclusive): adds mass_in_box and
            pointing_game, and ``box_chance``.
        batch_size: images per attack and explainer batch; default 64.
        seed: seed of the random starts, the explainers' noise and the bootstrap; default 0.
        grid_rows: images shown in each grid (``plot``, ``save``); the metrics cover all N.
        kinds: ``{label: "robust" | "standard"}`` known kinds; the others are robust when
            their adversarial accuracy is at least ``ROBUST_THRESHOLD`` (0.2).
        kind_source: how ``kinds`` were decided (recorded; the CLI: ``"model card"``).
        model_info: ``{label: {...}}`` written first into each model's entry (the CLI records
            ``{"model": spec, "checkpoint": path}``); default the class name and ``None``.
        about: what x is and where it ran (``{"dataset", "split", "device"}``), in the settings.
        progress: ``progress(name, total)`` factory of bars with ``update(k)``; default none.

    Returns:
        A ``SaliencyReport``.

    Raises:
        ValueError: naming the argument: unknown explainers, a bad attack, eps, shapes, boxes.

    Example:
        >>> report = compare({"std": std, "rob": rob}, x, y, explainers=["gradient"],
        ...                  attack="pgd20", eps=0.3)
    """
    from robustkit.reports.stats import CONFIDENCE, N_RESAMPLES

    _check(models, x, y, explainers, attack, eps, x_adv, boxes)
    spec = parse_pair_attack(attack) if attack is not None else None
    explainers = list(dict.fromkeys(explainers))
    labels, n = list(models), x.shape[0]
    x, y = x.detach().cpu(), y.detach().cpu().long()
    progress = progress or null_progress
    settings: dict[str, Any] = {
        **dict(about or {}), "n": n, "eps": eps if spec else None, "norm": "Linf",
        "explainers": explainers, "target": "true label", "n_samples": n_samples,
        "ig_steps": ig_steps, "batch_size": batch_size, "grid_rows": grid_rows, "seed": seed,
        "reference": labels[0], "faithfulness_steps": faithfulness_steps}
    settings.update(eps_text=_eps_text(eps) if spec else None,
                    attack=spec.name if spec else None,
                    attack_settings={"name": spec.name, "class": "PGD", "family": spec.kind,
                                     **pair_attack_settings(attack, eps), "generator_seed": seed}
                    if spec else None,
                    ci={"over": "images", "method": "BCa", "confidence_level": CONFIDENCE,
                        "n_resamples": N_RESAMPLES, "seed": seed},
                    robust_threshold=ROBUST_THRESHOLD)
    box_chance = (float(M.box_area_fraction(boxes, *x.shape[-2:]).mean())
                  if boxes is not None else None)
    info, kinds = dict(model_info or {}), dict(kinds or {})
    rows: list[Row] = []
    out: dict[str, dict[str, Any]] = {}
    adv: dict[str, Tensor] = {}
    attributions: dict[str, dict[str, dict[str, Tensor]]] = {e: {} for e in explainers}
    predicted: dict[str, dict[str, Tensor]] = {}
    confidence: dict[str, dict[str, Tensor]] = {}
    for i, lb in enumerate(labels):
        model = models[lb]
        where = f"[{i + 1}/{len(labels)}] {lb}"
        if spec is not None:
            adv[lb] = adversarial_pairs(full_strength_pgd(model, attack, eps=eps, seed=seed), x,
                                        y, batch_size=batch_size, progress=progress,
                                        name=f"{where} attack")
        else:
            adv[lb] = (x_adv[lb] if isinstance(x_adv, Mapping) else x_adv).detach().cpu()
        inputs = {"clean": x, "adv": adv[lb]}
        predicted[lb], confidence[lb], acc = {}, {}, {}
        for key, xi in inputs.items():
            predicted[lb][key], confidence[lb][key] = _predict(model, xi, batch_size)
            acc[key] = float((predicted[lb][key] == y).float().mean())
        kind, source = ((kinds[lb], kind_source) if lb in kinds else
                        ("robust" if acc["adv"] >= ROBUST_THRESHOLD else "standard",
                         f"adv_accuracy >= {ROBUST_THRESHOLD}"))
        out[lb] = {**info.get(lb, {"model": type(model).__name__, "checkpoint": None}),
                   "clean_accuracy": acc["clean"], "adv_accuracy": acc["adv"], "kind": kind,
                   "kind_source": source}
        with progress(f"{where} explain", 2 * n * len(explainers)) as bar:
            for name in explainers:
                attributions[name][lb] = _explain_and_score(
                    name, model, inputs, y, boxes, lb, rows, bar, n_samples=n_samples,
                    ig_steps=ig_steps, seed=seed, batch_size=batch_size,
                    faithfulness_steps=faithfulness_steps)
        if "gradient" in explainers and "adaptgrad" in explainers:
            for key in ("clean", "adv"):
                _append(rows, lb, "adaptgrad", key, {"adaptgrad_residual": M.adaptgrad_residual(
                    attributions["gradient"][lb][key], attributions["adaptgrad"][lb][key])})
    metrics, pairs = _statistics(rows, labels, settings)
    return SaliencyReport(n=n, models=out, metrics=metrics, pairs=pairs, settings=settings,
                          box_chance=box_chance, rows=rows, x=x, y=y, x_adv=adv,
                          attributions=attributions, predicted=predicted, confidence=confidence)


def _eps_text(eps: float) -> str:
    from robustkit.evaluation.results import format_eps

    return format_eps(eps)


def _predict(model: nn.Module, x: Tensor, bs: int) -> tuple[Tensor, Tensor]:
    """Predicted class and its softmax probability, ``(N,)`` each on the CPU."""
    device = model_device(model)
    preds, confs = [], []
    with torch.no_grad(), eval_mode(model):
        for j in range(0, x.shape[0], bs):
            p = model(x[j:j + bs].to(device)).float().softmax(1).cpu()
            c, k = p.max(1)
            preds.append(k)
            confs.append(c)
    return torch.cat(preds), torch.cat(confs)


def _explain_and_score(name, model, inputs, y, boxes, label, rows, bar, *, n_samples, ig_steps,
                       seed, batch_size, faithfulness_steps) -> dict[str, Tensor]:
    """The raw maps of x and x' by one explainer; appends every metric's rows to ``rows``."""
    from robustkit.saliency import create_explainer

    device = model_device(model)
    explainer = create_explainer(name, model, **_explainer_kwargs(name, n_samples, ig_steps,
                                                                  seed))
    raw: dict[str, Tensor] = {}
    for key, xi in inputs.items():
        parts = []
        for j in range(0, xi.shape[0], batch_size):
            xb = xi[j:j + batch_size].to(device)
            parts.append(explainer.attribute(xb, target=y[j:j + batch_size].to(device)).cpu())
            bar.update(xb.shape[0])
        raw[key] = torch.cat(parts)
        a, xc = raw[key].double(), xi.double()
        values = {"sparseness": M.sparseness(a), "complexity": M.complexity(a),
                  "total_variation": M.total_variation(a), "hfer": M.hfer(a),
                  "alignment_cos": M.alignment_cos(a, xc), "edge_spearman": M.edge_spearman(a, xc)}
        if boxes is not None:
            values.update(mass_in_box=M.mass_in_box(a, boxes),
                          pointing_game=M.pointing_game(a, boxes))
        if key == "clean" and faithfulness_steps:
            values.update(_faithfulness(model, xi, raw[key], y, faithfulness_steps, batch_size))
        _append(rows, label, name, key, values)
    a, b = raw["clean"].double(), raw["adv"].double()
    _append(rows, label, name, "pair", {"stability_spearman": M.stability_spearman(a, b),
                                        "topk_intersection": M.topk_intersection(a, b),
                                        "stability_cos": M.stability_cos(a, b)})
    return raw


def _faithfulness(model, x, a, y, steps: int, bs: int) -> dict[str, Tensor]:
    """Deletion and insertion AUC of the true label, batch by batch on the model's device."""
    device = model_device(model)
    out: dict[str, list] = {"deletion_auc": [], "insertion_auc": []}
    for j in range(0, x.shape[0], bs):
        xb, ab, yb = (t[j:j + bs].to(device) for t in (x, a, y))
        out["deletion_auc"].append(M.deletion_auc(model, xb, ab, yb, steps=steps).cpu())
        out["insertion_auc"].append(M.insertion_auc(model, xb, ab, yb, steps=steps).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _append(rows: list[Row], label: str, explainer: str, key: str,
            values: dict[str, Tensor]) -> None:
    for metric, v in values.items():
        for idx, val in enumerate(v.tolist()):
            rows.append((idx, label, explainer, key, metric, float(val)))


def _statistics(rows: Sequence[Row], labels: list[str], settings: Mapping[str, Any]):
    """Per (explainer, metric, input, model) mean and CI; per pair (reference, other) the mean
    paired difference b − a, its CI, d_z and the Wilcoxon p. NaN values (a constant map's
    Spearman ρ) are left out: of the mean, and of the pair for both models."""
    from robustkit.reports.stats import bootstrap_ci, wilcoxon_p

    seed, n = settings["seed"], settings["n"]
    table: dict[tuple[str, str, str, str], np.ndarray] = {}
    for idx, lb, ex, key, metric, val in rows:
        table.setdefault((ex, metric, key, lb), np.full(n, np.nan))[idx] = val
    metrics, pairs = [], []
    for ex, key, metric in metric_order(rows, settings["explainers"]):
        for lb in labels:
            v = table[(ex, metric, key, lb)]
            v = v[np.isfinite(v)]
            metrics.append({"explainer": ex, "metric": metric, "input": key,
                            "model": lb, "n": int(v.size),
                            "mean": float(v.mean()) if v.size else None,
                            "ci95": list(bootstrap_ci(v, seed)) if v.size > 1 else None})
        a_all = table[(ex, metric, key, labels[0])]
        for other in labels[1:]:
            b_all = table[(ex, metric, key, other)]
            ok = np.isfinite(a_all) & np.isfinite(b_all)  # paired image by image
            a, b = a_all[ok], b_all[ok]
            d = b - a
            sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
            pairs.append({"explainer": ex, "metric": metric, "input": key,
                          "a": labels[0], "b": other, "n": int(d.size),
                          "diff_mean": float(d.mean()) if d.size else None,
                          "ci95": list(bootstrap_ci(d, seed)) if d.size > 1 else None,
                          # paired effect size (Cohen's d_z): comparable across metrics and
                          # explainers, whose scales differ
                          "d_z": float(d.mean()) / sd if sd > 0 else None,
                          "wilcoxon_p": wilcoxon_p(b, a)})
    return metrics, pairs


def metric_order(rows: Sequence[Row], explainers: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ``(explainer, input, metric)`` triples present in ``rows``: explainers as given, then
    clean, adv, pair, then metrics in the order they were computed.

    Example:
        >>> metric_order(report.rows, report.settings["explainers"])[0]
        ('gradient', 'clean', 'sparseness')
    """
    seen = dict.fromkeys((ex, key, metric) for _, _, ex, key, metric, _ in rows)
    return sorted(seen, key=lambda t: (list(explainers).index(t[0]), INPUTS.index(t[1])))

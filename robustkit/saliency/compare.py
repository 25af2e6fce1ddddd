"""Saliency of several models side by side (methods.md §8.1): ``compare`` explains, scores and
tests, and returns a ``SaliencyReport`` (``saliency.report``), which shows and saves the result
as ``robustkit inspect`` writes it.

Each model explains one class per image (``target``: the class it predicts on x, default, or the
true label) on x, on its own x' (the full-strength white-box PGD of ``sensitivity.pairs`` against
the true label, or given x') and on x + δ, one random-sign δ of the same L∞ size shared by every
model (the shared-perturbation control, methods.md §8.2.6), with every explainer; ``subset=
"correct-by-all"`` first keeps only the images every model classifies correctly. Each map is
scored by the metrics of methods.md §8.2 (``saliency.metrics``): of one map (clean, adv), with
object boxes, of a pair (map of x vs map of x': ``pair``; vs map of x + δ: ``noise``),
faithfulness on x, and AdaptGrad's residual. Per (explainer, metric, input, model): the mean over
images with a finite value and its 95 % BCa bootstrap CI; the x-vs-x' stability also split by
whether x' flips the model's prediction; per pair (the first model a, each other b): the paired
differences b − a over the images finite for both, their CI, effect size d_z with its CI and the
Wilcoxon p, adjusted over the family of every test in the report (Holm by default); per two
explainers, the paired bootstrap CI of the difference of their |d_z| (``reports.stats``).

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

from robustkit.errors import ConfigError
from robustkit.saliency import metrics as M
from robustkit.saliency.ranking import Table, _explainer_difference, _table, explainer_difference
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

__all__ = ["compare", "DEFAULT_EXPLAINERS", "ROBUST_THRESHOLD", "INPUTS", "TARGETS", "SUBSETS",
           "DIRECTIONS", "metric_order", "shared_noise", "explainer_difference"]

logger = logging.getLogger(__name__)

DEFAULT_EXPLAINERS = ("gradient", "smoothgrad", "adaptgrad")
# Maps are scored on x ("clean"), on x' ("adv"), as a pair (map of x vs map of x': "pair") and
# against the shared-perturbation control (map of x vs map of x + δ, δ the same for every model:
# "noise").
INPUTS = ("clean", "adv", "pair", "noise")
# The class each map explains: the model's prediction on x (for x, x' and x + δ alike, so the
# pair metrics compare maps of one logit), or the true label.
TARGETS = ("predicted", "true")
# The images compared: all, or those every model classifies correctly on x.
SUBSETS = ("all", "correct-by-all")
PAIR_METRICS = ("stability_spearman", "topk_intersection", "stability_cos")
# Which direction of each metric means a more interpretable map (methods.md §8.2), shown beside
# every effect size: (better, what that direction means).
DIRECTIONS: dict[str, tuple[str, str]] = {
    "sparseness": ("higher", "higher Gini = sparser, more concentrated map"),
    "complexity": ("lower", "lower entropy = more concentrated map"),
    "total_variation": ("lower", "lower total variation = smoother, less visual noise"),
    "hfer": ("lower", "lower high-frequency energy = less visual noise"),
    "alignment_cos": ("higher", "higher = more aligned with the image (perceptual alignment)"),
    "edge_spearman": ("higher", "higher = follows the image's edges more"),
    "stability_spearman": ("higher", "higher = map changes less (more stable)"),
    "topk_intersection": ("higher", "higher = top 5 % pixels kept (more stable)"),
    "stability_cos": ("higher", "higher = map changes less (more stable)"),
    "mass_in_box": ("higher", "higher = more relevance on the object"),
    "pointing_game": ("higher", "higher = arg-max on the object more often"),
    "deletion_auc": ("lower", "lower = more faithful (score falls faster)"),
    "insertion_auc": ("higher", "higher = more faithful (score rises faster)"),
    "adaptgrad_residual": ("lower", "lower = less of the gradient is noise to AdaptGrad"),
}
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


def _check(models, x, y, explainers, attack, eps, x_adv, boxes, target, subset,
           correction) -> None:
    from robustkit.reports.stats import CORRECTIONS
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
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
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
    for name, value, valid in (("target", target, TARGETS), ("subset", subset, SUBSETS),
                               ("correction", correction, CORRECTIONS)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


def shared_noise(x: Tensor, size: float, seed: int) -> Tensor:
    """The shared-perturbation control's input: ``clip(x + size·s, 0, 1)`` with ``s`` uniform
    random signs (a vertex of the L∞ ball of radius ``size``, where PGD's last iterate mostly
    lies, so δ has the attack's L∞ size and about its L2 size), drawn on the CPU from
    ``torch.Generator().manual_seed(seed)`` as ``torch.randint(0, 2, x.shape)``; the same δ for
    every model.

    Example:
        >>> x_noise = shared_noise(x, 0.3, seed=0)
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, tuple(x.shape), generator=g).to(x.dtype) * 2 - 1
    return (x + size * s).clamp(0, 1)


def compare(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, *,
            explainers: Sequence[str] = DEFAULT_EXPLAINERS,
            attack: str | None = None, eps: float | None = None,
            x_adv: Tensor | Mapping[str, Tensor] | None = None,
            target: str = "predicted", subset: str = "all", correction: str = "holm",
            noise_control: bool = True,
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
        y: ``(N,)`` true labels.
        explainers: names of ``saliency.EXPLAINERS``; default gradient, smoothgrad, adaptgrad.
        attack: ``"pgdK"`` or ``"cwK"``: x' by the full-strength PGD (α = ε/4, random start,
            last iterate) against the true label, white-box on each model. Exclusive with
            ``x_adv``.
        eps: L∞ budget of ``attack`` in [0, 1] pixel units.
        x_adv: given x': one tensor for every model, or ``{label: tensor}``.
        target: the class every map explains: ``"predicted"`` (default: the class each model
            predicts on x, for its maps of x, x' and x + δ alike) or ``"true"`` (the label).
            With the true label, a model's maps of the images it misclassifies explain a class
            it does not predict, so a model's accuracy leaks into its saliency metrics.
        subset: ``"all"`` (default) or ``"correct-by-all"``: only the images every model
            classifies correctly on x (then both targets coincide); ``settings["n"]`` is the
            number kept, ``settings["subset_indices"]`` their positions in x.
        correction: multiple-comparison correction of the Wilcoxon p-values over the family
            of every paired test in the report: ``"holm"`` (default), ``"bh"`` or ``"none"``.
        noise_control: also explain x + δ, one random-sign δ of x''s L∞ size shared by every
            model (``shared_noise``), and score the stability of each map against it (input
            ``"noise"``); default on.
        n_samples: noise samples of smoothgrad, adaptgrad, ig-adaptgrad; default 16.
        ig_steps: integration steps of ig, ig-adaptgrad; default 32.
        faithfulness_steps: also score the clean maps by deletion and insertion AUC with this
            many steps (black baseline); default ``None`` (off).
        boxes: ``(N, 4)`` object boxes ``x0, y0, x1, y1`` (inclusive): adds mass_in_box and
            pointing_game, and ``box_chance``.
        batch_size: images per attack and explainer batch; default 64.
        seed: seed of the random starts, the explainers' noise, the shared δ and the bootstrap;
            default 0.
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
        ValueError: naming the argument: unknown explainers, a bad attack, eps, shapes, boxes,
            target, subset or correction.
        ConfigError: (a ``ValueError``) ``subset="correct-by-all"`` keeps fewer than 2 images.

    Example:
        >>> report = compare({"std": std, "rob": rob}, x, y, explainers=["gradient"],
        ...                  attack="pgd20", eps=0.3, subset="correct-by-all")
    """
    from robustkit.reports.stats import CONFIDENCE, N_RESAMPLES

    _check(models, x, y, explainers, attack, eps, x_adv, boxes, target, subset, correction)
    spec = parse_pair_attack(attack) if attack is not None else None
    explainers = list(dict.fromkeys(explainers))
    labels = list(models)
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n_given = x.shape[0]
    progress = progress or null_progress
    clean = {lb: _predict(models[lb], x, batch_size) for lb in labels}
    _check_labels(y, {lb: n_classes for lb, (_, _, n_classes) in clean.items()})
    clean = {lb: (pred, conf) for lb, (pred, conf, _) in clean.items()}
    keep = None
    if subset == "correct-by-all":
        keep = torch.stack([clean[lb][0] == y for lb in labels]).all(0).nonzero().flatten()
        if keep.numel() < 2:  # the user's images and choice: a one-line error in the CLI
            raise ConfigError(f"subset='correct-by-all' keeps {keep.numel()} of the {n_given} "
                             f"images (those every model classifies correctly); a bootstrap "
                             f"needs 2: give more images or subset='all'")
        x, y = x[keep], y[keep]
        clean = {lb: (pred[keep], conf[keep]) for lb, (pred, conf) in clean.items()}
        boxes = None if boxes is None else torch.as_tensor(boxes)[keep]
        if x_adv is not None:
            x_adv = ({lb: t[keep] for lb, t in x_adv.items()} if isinstance(x_adv, Mapping)
                     else x_adv[keep])
    n = x.shape[0]
    targets = {lb: clean[lb][0] if target == "predicted" else y for lb in labels}
    given = (list(x_adv.values()) if isinstance(x_adv, Mapping) else [x_adv]) \
        if x_adv is not None else []
    size = float(eps) if spec else max(float((t.detach().cpu() - x).abs().amax())
                                      for t in given)
    noise = shared_noise(x, size, seed) if noise_control and size > 0 else None
    settings: dict[str, Any] = {
        **dict(about or {}), "n": n, "eps": eps if spec else None, "norm": "Linf",
        "explainers": explainers, "target": target,
        "target_text": _target_text(target), "subset": subset, "n_given": n_given,
        "subset_indices": None if keep is None else keep.tolist(),
        "n_samples": n_samples,
        "ig_steps": ig_steps, "batch_size": batch_size, "grid_rows": grid_rows, "seed": seed,
        "reference": labels[0], "faithfulness_steps": faithfulness_steps}
    settings.update(eps_text=_eps_text(eps) if spec else None,
                    attack=spec.name if spec else None,
                    attack_settings={"name": spec.name, "class": "PGD", "family": spec.kind,
                                     **pair_attack_settings(attack, eps), "generator_seed": seed}
                    if spec else None,
                    ci={"over": "images", "method": "BCa", "confidence_level": CONFIDENCE,
                        "n_resamples": N_RESAMPLES, "seed": seed},
                    noise_control=None if noise is None else {
                        "input": "noise", "perturbation": "random signs x L-inf size, "
                        "clipped to [0, 1]; the same for every model", "linf": size,
                        "mean_l2": float((noise - x).flatten(1).norm(dim=1).mean()),
                        "seed": seed},
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
    flipped: dict[str, Tensor] = {}
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
        if noise is not None:
            inputs["noise"] = noise
        predicted[lb], confidence[lb] = {"clean": clean[lb][0]}, {"clean": clean[lb][1]}
        for key, xi in list(inputs.items())[1:]:
            predicted[lb][key], confidence[lb][key], _ = _predict(model, xi, batch_size)
        acc = {key: float((predicted[lb][key] == y).float().mean()) for key in ("clean", "adv")}
        flipped[lb] = predicted[lb]["adv"] != predicted[lb]["clean"]
        kind, source = ((kinds[lb], kind_source) if lb in kinds else
                        ("robust" if acc["adv"] >= ROBUST_THRESHOLD else "standard",
                         f"adv_accuracy >= {ROBUST_THRESHOLD}"))
        out[lb] = {**info.get(lb, {"model": type(model).__name__, "checkpoint": None}),
                   "clean_accuracy": acc["clean"], "adv_accuracy": acc["adv"], "kind": kind,
                   "kind_source": source, "flipped": int(flipped[lb].sum()),
                   "adv_mean_l2": float((adv[lb] - x).flatten(1).norm(dim=1).mean())}
        with progress(f"{where} explain", len(inputs) * n * len(explainers)) as bar:
            for name in explainers:
                attributions[name][lb] = _explain_and_score(
                    name, model, inputs, targets[lb], boxes, lb, rows, bar,
                    n_samples=n_samples, ig_steps=ig_steps, seed=seed, batch_size=batch_size,
                    faithfulness_steps=faithfulness_steps)
        if "gradient" in explainers and "adaptgrad" in explainers:
            for key in ("clean", "adv"):
                _append(rows, lb, "adaptgrad", key, {"adaptgrad_residual": M.adaptgrad_residual(
                    attributions["gradient"][lb][key], attributions["adaptgrad"][lb][key])})
    metrics, pairs = _statistics(rows, labels, settings, correction)
    settings["correction"] = {
        "method": correction, "m": sum(p["wilcoxon_p"] is not None for p in pairs),
        "family": "every paired Wilcoxon test of this report (each explainer x metric x input "
                  "x compared model, with a defined p)"}
    table = _table(rows, n)
    settings["explainer_ci"] = {
        "statistic": "|d_z(second)| - |d_z(first)| of the same model pair",
        "method": "paired BCa bootstrap over the images finite for both explainers",
        "confidence_level": CONFIDENCE, "n_resamples": N_RESAMPLES, "seed": seed,
        "adjusted": False}
    differences = [_explainer_difference(table, e1, e2, metric, key, labels[0], b, seed)
                   for e1, e2, metric, key, b in _explainer_pairs(rows, labels, explainers)]
    return SaliencyReport(n=n, models=out, metrics=metrics, pairs=pairs, settings=settings,
                          box_chance=box_chance, rows=rows, x=x, y=y, x_adv=adv,
                          attributions=attributions, predicted=predicted, confidence=confidence,
                          stability=_stability_split(table, flipped, labels, explainers, seed),
                          explainer_differences=differences,
                          directions={m: {"better": b, "meaning": t}
                                      for m, (b, t) in DIRECTIONS.items()
                                      if any(r["metric"] == m for r in metrics)})


def _target_text(target: str) -> str:
    return ("the class each model predicts on x" if target == "predicted" else
            "the true label")


def _eps_text(eps: float) -> str:
    from robustkit.evaluation.results import format_eps

    return format_eps(eps)


def _predict(model: nn.Module, x: Tensor, bs: int) -> tuple[Tensor, Tensor, int]:
    """Predicted class and its softmax probability, ``(N,)`` each on the CPU, and the number
    of logits the model returns."""
    device = model_device(model)
    preds, confs, n_classes = [], [], 0
    with torch.no_grad(), eval_mode(model):
        for j in range(0, x.shape[0], bs):
            p = model(x[j:j + bs].to(device)).float().softmax(1).cpu()
            n_classes = p.shape[1]
            c, k = p.max(1)
            preds.append(k)
            confs.append(c)
    return torch.cat(preds), torch.cat(confs), n_classes


def _check_labels(y: Tensor, n_classes: Mapping[str, int]) -> None:
    """Every label in ``[0, K)`` for each model's ``K`` logits (else an explainer's gather
    fails deep inside with an index error, or CUDA asserts)."""
    lo, hi = int(y.min()), int(y.max())
    for lb, k in n_classes.items():
        if lo < 0 or hi >= k:
            raise ValueError(f"y must hold labels in [0, {k}) for model {lb!r} ({k} logits), "
                             f"got labels from {lo} to {hi}")


def _explain_and_score(name, model, inputs, target, boxes, label, rows, bar, *, n_samples,
                       ig_steps, seed, batch_size, faithfulness_steps) -> dict[str, Tensor]:
    """The raw maps of every input (x, x', x + δ) by one explainer, each explaining ``target``;
    appends every metric's rows to ``rows``."""
    from robustkit.saliency import create_explainer

    device = model_device(model)
    explainer = create_explainer(name, model, **_explainer_kwargs(name, n_samples, ig_steps,
                                                                  seed))
    raw: dict[str, Tensor] = {}
    for key, xi in inputs.items():
        parts = []
        for j in range(0, xi.shape[0], batch_size):
            xb = xi[j:j + batch_size].to(device)
            parts.append(explainer.attribute(xb, target=target[j:j + batch_size].to(device))
                         .cpu())
            bar.update(xb.shape[0])
        raw[key] = torch.cat(parts)
        if key == "noise":
            continue
        a, xc = raw[key].double(), xi.double()
        values = {"sparseness": M.sparseness(a), "complexity": M.complexity(a),
                  "total_variation": M.total_variation(a), "hfer": M.hfer(a),
                  "alignment_cos": M.alignment_cos(a, xc), "edge_spearman": M.edge_spearman(a, xc)}
        if boxes is not None:
            values.update(mass_in_box=M.mass_in_box(a, boxes),
                          pointing_game=M.pointing_game(a, boxes))
        if key == "clean" and faithfulness_steps:
            values.update(_faithfulness(model, xi, raw[key], target, faithfulness_steps,
                                        batch_size))
        _append(rows, label, name, key, values)
    for key, other in (("pair", "adv"), ("noise", "noise")):
        if other in raw:
            a, b = raw["clean"].double(), raw[other].double()
            _append(rows, label, name, key, {"stability_spearman": M.stability_spearman(a, b),
                                             "topk_intersection": M.topk_intersection(a, b),
                                             "stability_cos": M.stability_cos(a, b)})
    return raw


def _faithfulness(model, x, a, y, steps: int, bs: int) -> dict[str, Tensor]:
    """Deletion and insertion AUC of class ``y``, batch by batch on the model's device."""
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


def _statistics(rows: Sequence[Row], labels: list[str], settings: Mapping[str, Any],
                correction: str = "holm"):
    """Per (explainer, metric, input, model) mean and CI; per pair (reference, other) the mean
    paired difference b − a, its CI, d_z with its CI, the Wilcoxon p and the p adjusted by
    ``correction`` over every pair's test. NaN values (a constant map's Spearman ρ) are left
    out: of the mean, and of the pair for both models."""
    from robustkit.reports.stats import adjust_p, bootstrap_ci, d_z, dz_ci, wilcoxon_p

    seed = settings["seed"]
    table = _table(rows, settings["n"])
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
            interval = dz_ci(d, seed)
            pairs.append({"explainer": ex, "metric": metric, "input": key,
                          "a": labels[0], "b": other, "n": int(d.size),
                          "diff_mean": float(d.mean()) if d.size else None,
                          "ci95": list(bootstrap_ci(d, seed)) if d.size > 1 else None,
                          # paired effect size (Cohen's d_z): comparable across metrics and
                          # explainers, whose scales differ
                          "d_z": d_z(d), "d_z_ci95": list(interval) if interval else None,
                          "wilcoxon_p": wilcoxon_p(b, a)})
    for p, adjusted in zip(pairs, adjust_p([p["wilcoxon_p"] for p in pairs], correction),
                           strict=True):
        p["p_adjusted"] = adjusted
    return metrics, pairs


def _stability_split(table: Table, flipped: Mapping[str, Tensor], labels: Sequence[str],
                     explainers: Sequence[str], seed: int) -> list[dict[str, Any]]:
    """The x-vs-x' stability metrics of each model, separately over the images whose
    prediction its x' leaves unchanged and those it flips (methods.md §8.2.6): n, mean and the
    BCa CI (``None`` under 2 images)."""
    from robustkit.reports.stats import bootstrap_ci

    out = []
    for ex in explainers:
        for metric in PAIR_METRICS:
            for lb in labels:
                if (ex, metric, "pair", lb) not in table:
                    continue
                values = table[(ex, metric, "pair", lb)]
                for group, mask in (("unchanged", ~flipped[lb]), ("flipped", flipped[lb])):
                    v = values[mask.numpy()]
                    v = v[np.isfinite(v)]
                    out.append({"explainer": ex, "metric": metric, "model": lb,
                                "prediction": group, "n": int(v.size),
                                "mean": float(v.mean()) if v.size else None,
                                "ci95": list(bootstrap_ci(v, seed)) if v.size > 1 else None})
    return out


def _explainer_pairs(rows: Sequence[Row], labels: Sequence[str], explainers: Sequence[str]):
    """``(first, second, metric, input, b)`` for every two explainers (in the given order) that
    both have ``(metric, input)``, and every compared model b."""
    have: dict[tuple[str, str], list[str]] = {}
    for ex, key, metric in metric_order(rows, explainers):
        have.setdefault((metric, key), []).append(ex)
    out = []
    for (metric, key), exs in sorted(have.items(), key=lambda t: INPUTS.index(t[0][1])):
        for i, e1 in enumerate(exs):
            for e2 in exs[i + 1:]:
                out += [(e1, e2, metric, key, b) for b in labels[1:]]
    return out


def metric_order(rows: Sequence[Row], explainers: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ``(explainer, input, metric)`` triples present in ``rows``: explainers as given, then
    clean, adv, pair, then metrics in the order they were computed.

    Example:
        >>> metric_order(report.rows, report.settings["explainers"])[0]
        ('gradient', 'clean', 'sparseness')
    """
    seen = dict.fromkeys((ex, key, metric) for _, _, ex, key, metric, _ in rows)
    return sorted(seen, key=lambda t: (list(explainers).index(t[0]), INPUTS.index(t[1])))

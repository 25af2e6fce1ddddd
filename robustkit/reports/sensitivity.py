"""Figures and TensorBoard logs of a neuron-sensitivity comparison (methods.md §4.2 outputs).

Renders the report ``robustkit sensitivity`` writes as ``sensitivity.json`` (plus the per-neuron σ
it measured); computes nothing beyond what a plot needs (bin edges, axis scales).

Three PNG figures, every one titled with the attack, ε and n:

- ``sigma_mean.png``: each layer's mean σ, models side by side, 95 % bootstrap CI whiskers, a log
  axis when the means span more than ``LOG_RANGE``;
- ``sigma_hist.png``: one panel per layer, the per-neuron σ histogram of each model overlaid;
- ``intervention.png``: one panel per model; per layer the accuracy on x', on x' with k random
  neurons restored, on x' with the top-k neurons restored, and on x.

Example:
    >>> paths = write_figures(report, {"natural": {"model.conv1": sigma}}, "runs/sens")
    >>> write_tensorboard(sigmas, relative, "runs/sens/tb")
"""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["figures", "write_figures", "layer_means_figure", "histograms_figure",
           "intervention_figure", "write_tensorboard", "text_table", "html_tables", "FIGURES",
           "LOG_RANGE"]

# File names of the three figures, in the order write_figures returns them.
FIGURES = ("sigma_mean.png", "sigma_hist.png", "intervention.png")
# Max / min ratio beyond which an axis of positive values is drawn in log scale: one decade and a
# half already squashes the smaller bars into the baseline.
LOG_RANGE = 30.0
_DPI = 100
# Intervention bars, in reading order: from the attacked accuracy up to the clean one.
_INTERVENTION = (("adv_accuracy", "x' (adversarial)", "#d62728"),
                 ("random", "x', k random neurons restored", "#7f7f7f"),
                 ("topk", "x', top-k sensitive neurons restored", "#1f77b4"),
                 ("clean_accuracy", "x (clean)", "#2ca02c"))


def _figure(width: float, height: float):
    """A ``Figure`` on its own Agg canvas: no pyplot, no global figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 40.0), min(height, 60.0)), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _layer_ticks(ax, x, layers: Sequence[str]) -> None:
    """Layer names as x tick labels: the full module names, the one name a layer has in every
    output (the JSON, the tables, TensorBoard); slanted when many or long."""
    slant = len(layers) > 4 or max(len(ly) for ly in layers) > 14
    ax.set_xticks(x, list(layers), rotation=30 if slant else 0, ha="right" if slant else "center",
                  fontsize=8)


def _attack_text(s: Mapping[str, Any]) -> str:
    """``pgd20 (white-box on each model), L∞ ε = 0.3``, or ``given x'``."""
    if not s.get("attack"):
        return "given x'"
    how = (f"transferred from {s['source_model']}" if s.get("source_model")
           else "white-box on each model")
    return f"{s['attack']} ({how}), L∞ ε = {s['eps_text']}"


def _images_text(s: Mapping[str, Any]) -> str:
    """``first 200 sample-mnist test images``, or ``200 images`` without a dataset."""
    if s.get("dataset"):
        return f"first {s['n']} {s['dataset']} {s.get('split', 'test')} images"
    return f"{s['n']} images"


def _subtitle(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    return f"{_attack_text(s)}, n = {s['n']}\n{_images_text(s)}, {s['reduction']} σ"


def _wide(values: np.ndarray) -> bool:
    values = values[np.isfinite(values)]
    return values.size > 0 and bool((values > 0).all()) and values.max() / values.min() > LOG_RANGE


def layer_means_figure(report: Mapping[str, Any]):
    """Grouped bars: mean σ per common layer, one bar per model, 95 % CI whiskers."""
    from matplotlib.ticker import NullFormatter

    layers = list(report["common_layers"])
    models = list(report["models"])
    fig = _figure(max(8.0, 2.5 + 0.3 * len(layers) * (len(models) + 1)), 5.2)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(layers))
    means = np.array([[report["models"][m]["layers"][ly]["mean"] for ly in layers]
                      for m in models], dtype=float)
    for i, m in enumerate(models):
        ci = np.array([report["models"][m]["layers"][ly]["ci95"] for ly in layers], dtype=float)
        err = np.clip(np.stack([means[i] - ci[:, 0], ci[:, 1] - means[i]]), 0, None)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means[i], width, yerr=err, capsize=3,
               label=m, error_kw={"linewidth": 1})
    if _wide(means):
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
    _layer_ticks(ax, x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean neuron sensitivity σ" + (" (log scale)" if _wide(means) else ""))
    ax.set_title(f"Mean neuron sensitivity σ per layer (95 % bootstrap CI over images)\n"
                 f"{_subtitle(report)}", fontsize=10)
    ax.legend(title="model", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def histograms_figure(report: Mapping[str, Any],
                      sigmas: Mapping[str, Mapping[str, Any]]):
    """One panel per common layer: per-neuron σ histograms of every model, overlaid."""
    from matplotlib.ticker import MaxNLocator, NullFormatter

    layers = list(report["common_layers"])
    models = list(report["models"])
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(max(8.0, 4.0 * cols), 3.0 * rows + 1.0)
    for j, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, j + 1)
        values = {m: np.asarray(sigmas[m][layer], dtype=float) for m in models}
        pooled = np.concatenate(list(values.values()))
        pooled = pooled[np.isfinite(pooled)]
        positive = pooled[pooled > 0]
        log = positive.size > 0 and positive.max() / positive.min() > LOG_RANGE
        if log:  # zeros go into the first bin: log axes cannot show them
            edges = np.geomspace(positive.min(), positive.max(), 21)
        else:
            lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, 21)
        for m in models:
            v = values[m][np.isfinite(values[m])]
            ax.hist(np.clip(v, edges[0], edges[-1]), bins=edges, histtype="step",
                    linewidth=1.5, label=m)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on small panels
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("σ per neuron" + (" (log scale)" if log else ""), fontsize=8)
        ax.set_ylabel("neurons", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of neurons
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(title="model", fontsize=7, title_fontsize=7)
    fig.suptitle(f"Distribution of neuron sensitivity σ per layer\n{_subtitle(report)}",
                 fontsize=10)
    return fig


def intervention_figure(report: Mapping[str, Any]):
    """Per model, per layer: accuracy on x', x' with k random / top-k neurons restored, and x."""
    layers = list(report["common_layers"])
    models = list(report["models"])
    ratio = report["settings"]["ratio"]
    fig = _figure(max(8.0, 2.0 + 0.25 * len(layers) * len(_INTERVENTION)),
                  2.6 * len(models) + 1.6)
    axes = fig.subplots(len(models), 1, squeeze=False, sharey=True)[:, 0]
    x = np.arange(len(layers))
    width = 0.8 / len(_INTERVENTION)
    for ax, m in zip(axes, models, strict=True):
        entry = report["models"][m]
        for i, (key, label, color) in enumerate(_INTERVENTION):
            if key in ("adv_accuracy", "clean_accuracy"):
                heights = [entry[key]] * len(layers)  # one value per model, repeated per layer
            else:
                heights = [entry["layers"][ly]["intervention"][key] for ly in layers]
            ax.bar(x + (i - (len(_INTERVENTION) - 1) / 2) * width, heights, width,
                   label=label, color=color)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(m, fontsize=9)
        _layer_ticks(ax, x, layers)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("layer whose neurons are restored")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"Intervention test: accuracy after restoring k = ⌈{ratio:g}·C⌉ neurons of "
                 f"one layer to their clean values\n{_subtitle(report)}", fontsize=10)
    return fig


def _save(fig, path: Path) -> Path:
    from robustkit.utils import atomic_write, output_errors

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    with output_errors(path):
        atomic_write(path, buf.getvalue())
    return path


def figures(report: Mapping[str, Any], sigmas: Mapping[str, Mapping[str, Any]]
            ) -> dict[str, Any]:
    """The three figures: ``{"sigma_mean", "sigma_hist", "intervention"}`` (``FIGURES``' stems).

    Example:
        >>> figs = figures(report.to_dict(), report.sigma)
        >>> figs["sigma_mean"].savefig("sigma_mean.pdf")

    Args:
        report: the ``sensitivity.json`` content (``models``, ``common_layers``, ``settings``).
        sigmas: ``{model label: {layer: (C,) σ per neuron}}`` (tensors or arrays).
    """
    made = (layer_means_figure(report), histograms_figure(report, sigmas),
            intervention_figure(report))
    return {name.removesuffix(".png"): fig for name, fig in zip(FIGURES, made, strict=True)}


def write_figures(report: Mapping[str, Any], sigmas: Mapping[str, Mapping[str, Any]],
                  out_dir: str | os.PathLike) -> list[Path]:
    """Write the three PNG figures (``FIGURES``) into ``out_dir``; returns their paths.

    Args:
        report: the ``sensitivity.json`` content (``models``, ``common_layers``, ``settings``).
        sigmas: ``{model label: {layer: (C,) σ per neuron}}`` (tensors or arrays).
        out_dir: existing folder; each file is written atomically.
    """
    out = Path(out_dir)
    return [_save(fig, out / name)
            for fig, name in zip(figures(report, sigmas).values(), FIGURES, strict=True)]


def _folder(label: str) -> str:
    """One component below ``log_dir`` (``utils.safe_name``): ``..`` or ``.`` would have put a
    model's events into ``log_dir``'s parent or into ``log_dir`` itself."""
    from robustkit.utils import safe_name

    return safe_name(label, "model label")


def write_tensorboard(sigmas: Mapping[str, Mapping[str, Any]],
                      relative: Mapping[str, Mapping[str, Any]],
                      log_dir: str | os.PathLike) -> list[Path]:
    """Histograms ``sigma/<layer>`` and ``relative_sigma/<layer>``, one run folder per model.

    One folder per model (``<log_dir>/<label>``) makes TensorBoard draw the models of one layer
    on one chart. Earlier event files in those folders are removed first: a rerun replaces the
    previous measurement instead of stacking a second histogram on it.

    Returns:
        The run folders, in model order.
    """
    from robustkit.reports.tensorboard import fresh_tensorboard

    folders: list[Path] = []
    for label, layers in sigmas.items():
        name = _folder(label)
        if Path(log_dir) / name in folders:  # "a b" and "a_b" would share a run folder
            name = f"{name}_{len(folders) + 1}"
        folder = Path(log_dir) / name
        with fresh_tensorboard(folder) as tb:
            for layer, sigma in layers.items():
                tb.add_histogram(f"sigma/{layer}", _tensor(sigma), step=0)
                tb.add_histogram(f"relative_sigma/{layer}", _tensor(relative[label][layer]),
                                 step=0)
        folders.append(folder)
    return folders


def _tensor(values: Any):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def text_table(report: Mapping[str, Any]) -> str:
    """The table ``robustkit sensitivity`` prints: accuracies per model, then per layer and
    model mean σ [95 % CI], relative σ, top-k mean σ, the intervention, and the overlaps.

    Example:
        >>> text = text_table(json.loads(Path("runs/sens/sensitivity.json").read_text()))
        >>> print(text)
    """
    s = report["settings"]
    if s.get("attack"):
        how = f"x' from {s['source_model']}" if s.get("source_model") else "white-box"
        attack = f"{s['attack']} ({how}), Linf eps = {s['eps_text']}"
    else:
        attack = "given x'"
    lines = [f"\nneuron sensitivity on the {_images_text(s)}: {attack}, {s['reduction']} "
             f"sigma, top-k ratio {s['ratio']:g}"]
    width = max(len("model"), *(len(lb) for lb in report["models"])) + 2
    lines.append(f"  {'model':<{width}}{'clean':>9}{'adversarial':>13}")
    for lb, m in report["models"].items():
        lines.append(f"  {lb:<{width}}{100 * m['clean_accuracy']:>8.2f}%"
                     f"{100 * m['adv_accuracy']:>12.2f}%")
    lw = max(len("layer"), *(len(ly) for ly in report["common_layers"])) + 2
    lines.append(f"\n  {'layer':<{lw}}{'model':<{width}}{'mean sigma [95% CI]':<36}"
                 f"{'relative':>10}{'top-k':>11}{'restore top-k / random':>26}")
    for ly in report["common_layers"]:
        for lb, m in report["models"].items():
            e = m["layers"][ly]
            ci = f"{e['mean']:.4g} [{e['ci95'][0]:.4g}, {e['ci95'][1]:.4g}]"
            iv = (f"{100 * e['intervention']['topk']:.1f}% / "
                  f"{100 * e['intervention']['random']:.1f}%")
            lines.append(f"  {ly:<{lw}}{lb:<{width}}{ci:<36}{e['relative_mean']:>10.4g}"
                         f"{e['topk_mean']:>11.4g}{iv:>26}")
    for pair in report["pairs"]:
        shown = ", ".join(f"{ly} {j:.2f}" if j is not None else f"{ly} -"
                          for ly, j in pair["jaccard"].items())
        lines.append(f"  top-k overlap (Jaccard) {pair['a']} vs {pair['b']}: {shown}")
    return "\n".join(lines)


def html_tables(report: Mapping[str, Any]) -> str:
    """An HTML fragment for notebooks (``SensitivityReport._repr_html_``): the accuracies and,
    per layer and model, mean σ [95 % CI], relative σ and the intervention.

    Example:
        >>> fragment = html_tables(report.to_dict())
        >>> IPython.display.HTML(fragment)
    """
    from robustkit.reports.html import ci, num, table

    s = report["settings"]
    models = report["models"]
    head = (f"<p><b>Neuron sensitivity</b>: {html.escape(_attack_text(s))}; "
            f"{html.escape(_images_text(s))}; {html.escape(str(s['reduction']))} σ, top-k "
            f"ratio {s['ratio']:g}</p>")
    acc = table(["model", "clean", "adversarial"],
                [[lb, f"{100 * m['clean_accuracy']:.1f}%", f"{100 * m['adv_accuracy']:.1f}%"]
                 for lb, m in models.items()], [False, True, True])
    rows = [[ly, lb, num(e["mean"]), ci(e["ci95"]), num(e["relative_mean"]),
             num(e["topk_mean"]), f"{100 * e['intervention']['topk']:.1f}% / "
             f"{100 * e['intervention']['random']:.1f}%"]
            for ly in report["common_layers"] for lb, m in models.items()
            for e in [m["layers"][ly]]]
    layers = table(["layer", "model", "mean σ", "95% CI", "relative", "top-k mean σ",
                    "restore top-k / random"], rows,
                   [False, False, True, True, True, True, True])
    pairs = [f"<p>top-k overlap (Jaccard) {html.escape(p['a'])} vs {html.escape(p['b'])}: "
             + html.escape(", ".join(f"{ly} {'-' if j is None else f'{j:.2f}'}"
                                     for ly, j in p["jaccard"].items())) + "</p>"
             for p in report["pairs"]]
    return "\n".join([head, *acc, *layers, *pairs])

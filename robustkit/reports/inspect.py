"""Saliency grids, ``index.html`` and TensorBoard images of a robust-vs-standard comparison
(methods.md §8.1; written by ``robustkit inspect``).

Renders what the command computed; computes nothing beyond display: the maps arrive as signed
``(N, H, W)`` maps already scaled to [−1, 1] (``saliency.display.percentile_scale``).

- ``grid_figure``: one PNG per explainer; rows are images, columns the image and, per model, its
  map of x and of x' (diverging colormap, 0 at white), captioned with the prediction and its
  softmax confidence;
- ``write_html``: ``index.html`` showing the settings (target, subset and n, the correction and
  its family), the grids (relative ``src``, so the folder is self-contained), then the wide table
  (``wide_rows``: one row per metric, input and explainer) and the other summaries; the
  long-format tables (every mean, every paired difference) on their own page,
  ``metrics_long.html``, linked from it (in a notebook, ``html_tables``: collapsed in a
  ``<details id="long-format">``); labels are HTML-escaped. An inline script writes the
  number of images that loaded into ``document.title`` (``"loaded K/M"``) and into
  ``<body data-loaded>``, so a headless browser can check the page.

Example:
    >>> fig = grid_figure(x, {"std": {"clean": m, "adv": m_adv}}, captions, "gradient")
    >>> save_png(fig, "runs/inspect/grid_gradient.png")
"""

from __future__ import annotations

import html
import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustkit.reports.html import ci, head, num, table, tail

__all__ = ["grid_figure", "grid_title", "save_png", "write_csv", "write_html", "html_tables",
           "text_table", "write_tensorboard", "grid_filename", "wide_rows", "CMAP",
           "INPUT_NAMES", "LONG_FORMAT_ID", "LONG_FORMAT_PAGE"]

# Diverging: positive evidence red, negative blue, zero white (maps are in [-1, 1]).
CMAP = "RdBu_r"
_DPI = 100
_CELL = 1.55  # inches per grid cell
_INPUTS = (("clean", "x"), ("adv", "x'"))
# How each input of the metrics reads on the page.
INPUT_NAMES = {"clean": "x", "adv": "x'", "pair": "x vs x'", "noise": "x vs x + δ (shared)"}
# The anchor of the collapsed long-format tables (notebook view) and the page that holds them
# next to index.html.
LONG_FORMAT_ID = "long-format"
LONG_FORMAT_PAGE = "metrics_long.html"


def _figure(width: float, height: float):
    """A ``Figure`` on its own Agg canvas: no pyplot, no global figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 40.0), min(height, 60.0)), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def grid_filename(explainer: str) -> str:
    """``grid_<explainer>.png``, the explainer's name made one safe component
    (``utils.safe_name``)."""
    from robustkit.utils import safe_name

    return f"grid_{safe_name(explainer, 'explainer')}.png"


def _attack_text(s: Mapping[str, Any]) -> str:
    """``pgd20 white-box, L∞ ε = 0.3``, or ``given x'``."""
    if not s.get("attack"):
        return "given x'"
    return f"{s['attack']} white-box, L∞ ε = {s['eps_text']}"


def _images_text(s: Mapping[str, Any], shown: int | None = None) -> str:
    """``first 8 sample-mnist test images`` (``first 3 of the 8 ...`` when fewer are shown)."""
    n = s["n"]
    first = f"first {n}" if shown is None or shown == n else f"first {shown} of the {n}"
    if s.get("subset", "all") != "all":
        first += f" ({s['subset']} of {s['n_given']})"
    return f"{first} {s['dataset']} {s.get('split', 'test')} images" if s.get("dataset") \
        else f"{first} images"


def grid_title(explainer: str, settings: Mapping[str, Any], rows: int) -> str:
    """The title of ``explainer``'s grid showing the first ``rows`` images.

    Example:
        >>> grid_title("gradient", summary["settings"], 8)
        "gradient: maps of the true label's logit on x and on x' (pgd20 white-box, ...); ..."
    """
    target = settings.get("target_text", "the true label")
    return (f"{explainer}: maps of {target}'s logit on x and on x' "
            f"({_attack_text(settings)}); {_images_text(settings, rows)}")


def write_csv(rows: Sequence[Sequence[Any]], path: str | os.PathLike) -> Path:
    """``metrics.csv``: ``index,model,explainer,input,metric,value``, one row per image, model,
    explainer, input and metric; values as Python's ``repr`` (round-trips exactly).

    Example:
        >>> write_csv(report.rows, "runs/inspect/metrics.csv")
        PosixPath('runs/inspect/metrics.csv')
    """
    import csv

    from robustkit.utils import atomic_write, output_errors

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "model", "explainer", "input", "metric", "value"])
    w.writerows([idx, lb, ex, key, metric, repr(val)] for idx, lb, ex, key, metric, val in rows)
    path = Path(path)
    with output_errors(path):
        atomic_write(path, buf.getvalue().encode())
    return path


def grid_figure(images, maps: Mapping[str, Mapping[str, Any]],
                captions: Mapping[str, Mapping[str, Sequence[str]]], title: str,
                row_labels: Sequence[str] | None = None):
    """Rows = images; columns = the image, then per model its map of x and of x'.

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (tensor or array).
        maps: ``{model label: {"clean": (N, H, W), "adv": (N, H, W)}}`` in [−1, 1].
        captions: ``{model label: {"clean": [N str], "adv": [N str]}}`` under each map.
        title: the figure's title.
        row_labels: one caption per image row (default ``#i``).
    """
    images = np.asarray(images, dtype=np.float64)
    n, c = images.shape[:2]
    labels = list(maps)
    cols = 1 + 2 * len(labels)
    fig = _figure(_CELL * cols, _CELL * n + 0.8)
    axes = fig.subplots(n, cols, squeeze=False)
    im = None
    for i in range(n):
        ax = axes[i, 0]
        img = images[i].transpose(1, 2, 0)
        ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None,
                  vmin=0, vmax=1)
        ax.set_xlabel(row_labels[i] if row_labels else f"#{i}", fontsize=7)
        if i == 0:
            ax.set_title("image", fontsize=8)
        for j, label in enumerate(labels):
            for k, (key, name) in enumerate(_INPUTS):
                ax = axes[i, 1 + 2 * j + k]
                im = ax.imshow(np.asarray(maps[label][key][i], dtype=np.float64), cmap=CMAP,
                               vmin=-1, vmax=1)
                ax.set_xlabel(captions[label][key][i], fontsize=7)
                if i == 0:
                    ax.set_title(textwrap.fill(label, 24) + f"\nmap of {name}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.3, pad=0.01,
                     label="signed map / 99th percentile of |map|")
    fig.suptitle(textwrap.fill(title, max(40, int(11 * _CELL * cols))), fontsize=10)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG, atomically; returns the path."""
    from robustkit.utils import atomic_write, output_errors

    path = Path(path)
    data = _png(fig)
    with output_errors(path):
        atomic_write(path, data)
    return path


def write_tensorboard(figures: Mapping[str, Any], log_dir: str | os.PathLike) -> Path:
    """Each grid as TensorBoard image ``saliency/<explainer>`` in ``log_dir`` (earlier event
    files there are removed first, so a rerun replaces the images instead of stacking them)."""
    import torch
    from matplotlib.image import imread

    from robustkit.reports.tensorboard import fresh_tensorboard

    folder = Path(log_dir)
    with fresh_tensorboard(folder) as tb:
        for name, fig in figures.items():
            rgba = imread(io.BytesIO(_png(fig)), format="png")  # (H, W, 4) in [0, 1]
            tb.add_image(f"saliency/{name}",
                         torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1),
                         step=0)
    return folder


def _models_table(summary: Mapping[str, Any]) -> list[str]:
    e = html.escape
    parts = ["<table><tr><th>model</th><th>clean accuracy</th>"
             "<th>adversarial accuracy</th><th>predictions x' flips</th><th>kind</th></tr>"]
    for label, m in summary["models"].items():
        parts.append(f"<tr><td>{e(label)}</td><td class=n>{100 * m['clean_accuracy']:.1f}%</td>"
                     f"<td class=n>{100 * m['adv_accuracy']:.1f}%</td>"
                     f"<td class=n>{m.get('flipped', '–')}</td>"
                     f"<td>{e(str(m['kind']))} ({e(str(m.get('kind_source', '')))})</td></tr>")
    parts.append("</table>")
    return parts


def wide_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The wide table: one row per metric, input and explainer (metrics grouped, explainers side
    by side), with each model's mean, then per compared model b the d_z of b − a, its 95 % CI
    and the adjusted p, and which direction of the metric means a more interpretable map.

    Keys: ``metric``, ``input``, ``explainer``, ``mean <model>`` per model, ``d_z <b>``,
    ``d_z ci95 <b>``, ``p_adjusted <b>`` per compared model, ``better``, ``meaning``.

    Example:
        >>> wide_rows(report.to_dict())[0]["better"]
        'higher'
    """
    labels = list(summary["models"])
    means = {(r["explainer"], r["metric"], r["input"], r["model"]): r["mean"]
             for r in summary["metrics"]}
    pairs = {(p["explainer"], p["metric"], p["input"], p["b"]): p for p in summary["pairs"]}
    keys = list(dict.fromkeys((r["metric"], r["input"]) for r in summary["metrics"]))
    explainers = list(dict.fromkeys(r["explainer"] for r in summary["metrics"]))
    directions = summary.get("directions", {})
    out = []
    for metric, key in keys:
        for ex in explainers:
            if (ex, metric, key, labels[0]) not in means:
                continue
            row: dict[str, Any] = {"metric": metric, "input": key, "explainer": ex}
            row.update({f"mean {lb}": means[(ex, metric, key, lb)] for lb in labels})
            for b in labels[1:]:
                p = pairs[(ex, metric, key, b)]
                row.update({f"d_z {b}": p.get("d_z"), f"d_z ci95 {b}": p.get("d_z_ci95"),
                            f"p_adjusted {b}": p.get("p_adjusted", p["wilcoxon_p"])})
            d = directions.get(metric, {})
            row.update(better=d.get("better"), meaning=d.get("meaning"))
            out.append(row)
    return out


def _p(v) -> str:
    return "–" if v is None else f"{v:.2g}"


def _correction_text(summary: Mapping[str, Any]) -> str:
    c = summary.get("settings", {}).get("correction")
    if not c:
        return "p-values not corrected"
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}[c["method"]]
    return f"{name} correction over the family of m = {c['m']} tests: {c['family']}"


def _wide_table(summary: Mapping[str, Any], long_href: str = f"#{LONG_FORMAT_ID}") -> list[str]:
    e = html.escape
    labels = list(summary["models"])
    a = labels[0]
    method = summary.get("settings", {}).get("correction", {}).get("method", "none")
    head_ = ("<table><tr><th>metric</th><th>input</th><th>explainer</th>"
             f"<th>{' → '.join(e(lb) for lb in labels)} (mean)</th>"
             + "".join(f"<th>d_z of {e(b)} − {e(a)} [95% CI]</th><th>p ({e(method)})</th>"
                       for b in labels[1:])
             + "<th>more interpretable</th></tr>")
    parts = ["<h2>Per metric and explainer</h2>",
             f"<p>Mean over the images per model; d_z = mean / sd of the per-image paired "
             f"differences with its 95% BCa bootstrap CI; p = Wilcoxon signed-rank, "
             f"{e(_correction_text(summary))}. Long format (every mean with its CI, every "
             f'paired difference): <a href="{e(long_href)}">{e(long_href.lstrip("#"))}</a>.'
             "</p>", head_]
    for r in wide_rows(summary):
        cells = " → ".join(num(r[f"mean {lb}"]) for lb in labels)
        tests = "".join(f"<td class=n>{num(r[f'd_z {b}'])} {ci(r[f'd_z ci95 {b}'])}</td>"
                        f"<td class=n>{_p(r[f'p_adjusted {b}'])}</td>" for b in labels[1:])
        key = INPUT_NAMES.get(r["input"], r["input"])
        parts.append(f"<tr><td>{e(r['metric'])}</td><td>{e(key)}"
                     f"</td><td>{e(r['explainer'])}</td><td class=n>{cells}</td>{tests}"
                     f"<td>{e(r['meaning'] or '–')}</td></tr>")
    parts.append("</table>")
    return parts


def _stability_table(summary: Mapping[str, Any]) -> list[str]:
    rows = summary.get("stability_by_prediction") or []
    if not rows:
        return []
    return ["<h2>Stability x vs x', by whether x' flips the prediction</h2>",
            *table(["explainer", "metric", "model", "prediction", "n", "mean", "95% CI"],
                   ([r["explainer"], r["metric"], r["model"], r["prediction"], r["n"],
                     num(r["mean"]), ci(r["ci95"])] for r in rows),
                   [False] * 4 + [True] * 3)]


def _explainer_table(summary: Mapping[str, Any]) -> list[str]:
    rows = summary.get("explainer_differences") or []
    if not rows:
        return []
    return ["<h2>Which explainer separates the models more?</h2>",
            "<p>|d_z(second)| − |d_z(first)| over the same images, paired 95% BCa bootstrap "
            "CI (not corrected for multiplicity); a CI covering 0 cannot decide.</p>",
            *table(["metric", "input", "b − a", "first", "second", "n", "d_z first",
                    "d_z second", "|d_z| difference [95% CI]", "verdict"],
                   ([r["metric"], INPUT_NAMES.get(r["input"], r["input"]),
                     f"{r['b']} − {r['a']}", r["first"], r["second"], r["n"],
                     num(r["d_z_first"]), num(r["d_z_second"]),
                     f"{num(r['abs_d_z_difference'])} {ci(r['ci95'])}", r["verdict"]]
                    for r in rows),
                   [False] * 5 + [True] * 4 + [False])]


def _long_rows(summary: Mapping[str, Any]) -> list[str]:
    e = html.escape
    parts = ["<h2>Metrics (mean over images, 95% bootstrap CI)</h2>",
             "<table><tr><th>explainer</th><th>metric</th><th>input</th><th>model</th>"
             "<th>n</th><th>mean</th><th>95% CI</th></tr>"]
    for r in summary["metrics"]:
        parts.append(f"<tr><td>{e(r['explainer'])}</td><td>{e(r['metric'])}</td>"
                     f"<td>{e(r['input'])}</td><td>{e(r['model'])}</td>"
                     f"<td class=n>{r['n']}</td><td class=n>{num(r['mean'])}</td>"
                     f"<td class=n>{ci(r['ci95'])}</td></tr>")
    parts += ["</table>", "<h2>Paired differences (b − a per image; Wilcoxon signed-rank)</h2>",
              f"<p>{e(_correction_text(summary))}.</p>",
              "<table><tr><th>explainer</th><th>metric</th><th>input</th><th>a</th><th>b</th>"
              "<th>n</th><th>mean diff</th><th>95% CI</th><th>d_z</th><th>d_z 95% CI</th>"
              "<th>Wilcoxon p</th><th>adjusted p</th></tr>"]
    for r in summary["pairs"]:
        parts.append(f"<tr><td>{e(r['explainer'])}</td><td>{e(r['metric'])}</td>"
                     f"<td>{e(r['input'])}</td><td>{e(r['a'])}</td><td>{e(r['b'])}</td>"
                     f"<td class=n>{r['n']}</td><td class=n>{num(r['diff_mean'])}</td>"
                     f"<td class=n>{ci(r['ci95'])}</td><td class=n>{num(r.get('d_z'))}</td>"
                     f"<td class=n>{ci(r.get('d_z_ci95'))}</td>"
                     f"<td class=n>{num(r['wilcoxon_p'])}</td>"
                     f"<td class=n>{num(r.get('p_adjusted'))}</td></tr>")
    parts.append("</table>")
    return parts


def _long_tables(summary: Mapping[str, Any]) -> list[str]:
    n_rows = len(summary["metrics"]) + len(summary["pairs"])
    return [f'<details id="{LONG_FORMAT_ID}"><summary>Long format: every mean and every '
            f"paired difference ({n_rows} rows)</summary>", *_long_rows(summary), "</details>"]


def _other_tables(summary: Mapping[str, Any]) -> list[str]:
    return [*_stability_table(summary), *_explainer_table(summary)]


def _metric_tables(summary: Mapping[str, Any]) -> list[str]:
    return [*_wide_table(summary), *_other_tables(summary), *_long_tables(summary)]


def _intro(summary: Mapping[str, Any]) -> str:
    e = html.escape
    s = summary.get("settings", {})
    how = (f"x' = {e(str(s['attack']))} white-box on each model (L∞ ε = "
           f"{e(str(s.get('eps_text', '')))}, last iterate)" if s.get("attack")
           else "x' given")
    where = f"{e(str(s['dataset']))} test images" if s.get("dataset") else "images"
    subset = s.get("subset", "all")
    kept = (f"subset {e(subset)}: the {e(str(summary['n']))} of the first "
            f"{e(str(s.get('n_given')))} {where} every model classifies correctly"
            if subset != "all" else f"first {e(str(summary['n']))} {where} (subset all)")
    noise = s.get("noise_control")
    control = (f"; control: x + δ, random signs of L∞ size {noise['linf']:.4g}, the same δ for "
               f"every model" if noise else "")
    return (f"{kept}; target: {e(s.get('target_text', 'the true label'))}; {how}{control}; "
            f"reference model: {e(str(s.get('reference', '')))}; "
            f"{e(_correction_text(summary))}.")


def html_tables(summary: Mapping[str, Any]) -> str:
    """An HTML fragment for notebooks (``SaliencyReport._repr_html_``): the settings line, the
    models' accuracies and kinds, the wide table, the stability split, the explainer
    differences and (collapsed) the long-format tables.

    Example:
        >>> fragment = html_tables(report.to_dict())
        >>> IPython.display.HTML(fragment)
    """
    return "\n".join([f"<p><b>Saliency</b>: {_intro(summary)}</p>", *_models_table(summary),
                       *_metric_tables(summary)])


def write_html(summary: Mapping[str, Any], grids: Mapping[str, str],
               path: str | os.PathLike, csv_name: str = "metrics.csv") -> Path:
    """``index.html``: the settings, the accuracy table, the wide table, the grids, the
    stability split and explainer differences; and beside it ``metrics_long.html``, the
    long-format tables, linked from the page.

    Args:
        summary: the ``summary.json`` content.
        grids: ``{explainer: PNG file name}``, files in the same folder as ``path``.
        path: where to write (atomically); ``metrics_long.html`` goes into the same folder.
        csv_name: the per-image CSV's file name, linked from the page.
    """
    from robustkit.utils import atomic_write, output_errors

    e = html.escape
    path = Path(path)
    long_path = path.with_name(LONG_FORMAT_PAGE)
    long_page = [head("robustkit inspect: long format"),
                 "<h1>Saliency metrics, long format</h1>",
                 f'<p>{_intro(summary)} Back to <a href="{e(path.name)}">{e(path.name)}</a>.</p>',
                 *_long_rows(summary), tail()]
    with output_errors(long_path):
        atomic_write(long_path, "\n".join(long_page).encode())
    parts = [head("robustkit inspect"),
             "<h1>Saliency of robust and standard models</h1>",
             f"<p>{_intro(summary)} Per-image values: "
             f'<a href="{e(csv_name)}">{e(csv_name)}</a>; summary: '
             '<a href="summary.json">summary.json</a>; long-format tables: '
             f'<a href="{LONG_FORMAT_PAGE}">{LONG_FORMAT_PAGE}</a>.</p>',
             "<h2>Models</h2>", *_models_table(summary),
             *_wide_table(summary, LONG_FORMAT_PAGE)]
    for explainer, name in grids.items():
        parts += [f"<h2>{e(explainer)}</h2>",
                  f'<img src="{e(name)}" alt="{e(explainer)} saliency grid">']
    parts += [*_other_tables(summary), tail()]
    with output_errors(path):
        atomic_write(path, "\n".join(parts).encode())
    return path


def _fmt(v, interval) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")


def text_table(summary: Mapping[str, Any]) -> str:
    """The table ``robustkit inspect`` prints: the settings (target, subset and n, correction
    and its family), accuracies and kinds, then per explainer, metric and input each model's
    mean [95 % CI] and each paired difference with d_z and the adjusted p.

    Example:
        >>> text = text_table(json.loads(Path("runs/inspect/summary.json").read_text()))
        >>> print(text)
    """
    s = summary["settings"]
    attack = (f"{s['attack']} white-box, Linf eps = {s['eps_text']}" if s.get("attack")
              else "given x'")
    where = f"{s['dataset']} test images" if s.get("dataset") else "images"
    subset = s.get("subset", "all")
    kept = (f"{s['n']} of the first {s.get('n_given')} {where} (subset {subset}: every model "
            f"right on x)" if subset != "all" else f"the first {s['n']} {where}")
    lines = [f"\nsaliency on {kept}: {attack}, target = {s.get('target', 'true')} "
             f"({s.get('target_text', 'the true label')})"]
    if s.get("noise_control"):
        lines.append(f"control: x + shared random-sign noise, Linf "
                     f"{s['noise_control']['linf']:.4g} (input 'noise')")
    lines.append(f"p: Wilcoxon, {_correction_text(summary)}")
    labels = list(summary["models"])
    width = max(len("model"), *(len(lb) for lb in labels)) + 2
    lines.append(f"  {'model':<{width}}{'clean':>9}{'adversarial':>13}{'flipped':>9}  kind")
    for lb, m in summary["models"].items():
        lines.append(f"  {lb:<{width}}{100 * m['clean_accuracy']:>8.2f}%"
                     f"{100 * m['adv_accuracy']:>12.2f}%{m.get('flipped', '-'):>9}  "
                     f"{m['kind']} ({m['kind_source']})")
    means = {(r["explainer"], r["metric"], r["input"], r["model"]): r
             for r in summary["metrics"]}
    method = s.get("correction", {}).get("method")
    p_name = f"p_{method}" if method and method != "none" else "p"
    cw = 30
    header = "".join(f"{lb[:cw - 2]:<{cw}}" for lb in labels)
    pair_heads = "".join(f"{(b + ' - ' + labels[0])[:cw - 2]:<{cw}}{'d_z':>8}{p_name:>10}  "
                         for b in labels[1:])
    lines.append(f"\n  {'explainer':<14}{'metric':<20}{'input':<7}{header}{pair_heads}")
    for ex, metric, key in dict.fromkeys((r["explainer"], r["metric"], r["input"])
                                         for r in summary["metrics"]):
        rs = [means[(ex, metric, key, lb)] for lb in labels]
        cells = "".join(f"{_fmt(r['mean'], r['ci95']):<{cw}}" for r in rs)
        diffs = ""
        for p in summary["pairs"]:
            if (p["explainer"], p["metric"], p["input"]) == (ex, metric, key):
                pv = p.get("p_adjusted", p["wilcoxon_p"])
                pv = "-" if pv is None else f"{pv:.3g}"
                dz = "-" if p.get("d_z") is None else f"{p['d_z']:.2f}"
                diffs += f"{_fmt(p['diff_mean'], p['ci95']):<{cw}}{dz:>8}{pv:>10}  "
        lines.append(f"  {ex:<14}{metric:<20}{key:<7}{cells}{diffs}")
    split = [r for r in summary.get("stability_by_prediction", [])
             if r["metric"] == "stability_cos"]
    if split:
        lines.append("\n  stability_cos of x vs x' where x' leaves the prediction unchanged | "
                     "flips it")
        for i in range(0, len(split) - 1, 2):
            u, f = split[i], split[i + 1]
            lines.append(f"  {u['explainer']:<14}{u['model']:<{width}}"
                         + " | ".join(f"{_fmt(r['mean'], None)} (n={r['n']})" for r in (u, f)))
    verdicts = [r["verdict"] for r in summary.get("explainer_differences", [])]
    if verdicts:
        decided = sum(v.endswith("separates the models more") for v in verdicts)
        lines.append(f"\n  explainers compared (|d_z| differences, paired bootstrap CI): "
                     f"{decided} of {len(verdicts)} decided, the others could not be")
    return "\n".join(lines)

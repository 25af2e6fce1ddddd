"""``runs/demo/index.html``: one page with everything ``robustkit demo`` produced.

A header naming the command and the sizes that made it (and "quick run" for one), then: the
evaluations (accuracy per attack, n, ε, each model's kind and how it was decided, the sanity
checks, with every warning or failure and its message listed), the neuron-sensitivity figures
and per-layer table, the AdaptGrad saliency grid with its metric table, and the training runs
(files, the held-out accuracy per epoch as an embedded figure, the TensorBoard command). Every
link and image is relative to the page's folder or embedded, so the folder is self-contained;
the page carries the image-check script of ``robustkit.reports.html``.

Example:
    >>> write_demo_page("runs/demo/index.html", evaluations={"std": results}, seconds=240.0)
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustkit.reports.html import ci, head, num, table, tail

__all__ = ["write_demo_page", "SALIENCY_METRICS"]

# The saliency metrics the page tabulates (all of them are in inspect/index.html).
SALIENCY_METRICS = ("sparseness", "total_variation", "alignment_cos", "edge_spearman",
                    "stability_cos")


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _evaluations(evaluations: Mapping[str, Mapping[str, Any]], links: Mapping[str, str],
                 kinds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    e = html.escape
    keys = list(dict.fromkeys(k for r in evaluations.values() for k in r["accuracy"]))
    # clean first, then PGD, AutoAttack (the strongest single attack) and the worst case last
    keys.sort(key=lambda k: (k != "clean", k == "robust", k == "autoattack"))
    out = ["<table><tr><th>model</th><th>dataset</th><th>n</th><th>L∞ ε</th>"
           + "".join(f"<th>{e(k)}</th>" for k in keys)
           + "<th>kind</th><th>checks</th><th>file</th></tr>"]
    notes = []
    for label, r in evaluations.items():
        by = {sev: [c for c in r.get("checks", []) if _severity(c) == sev]
              for sev in ("fail", "warning")}
        checks = "; ".join(f"{word}: " + ", ".join(c["name"] for c in by[sev])
                           for sev, word in (("fail", "failed"), ("warning", "warnings"))
                           if by[sev]) or "all passed"
        notes += [f"<li><b>{e(label)}</b>: {'failed' if sev == 'fail' else 'warning'} "
                  f"<code>{e(c['name'])}</code>: {e(str(c.get('message', '')))}</li>"
                  for sev in ("fail", "warning") for c in by[sev]]
        kind = kinds.get(label, {}).get("kind", "")
        out.append(f"<tr><td>{e(label)}</td><td>{e(str(r.get('dataset', '')))}</td>"
                   f"<td class=n>{r.get('n_examples', '')}</td>"
                   f"<td class=n>{e(str(r.get('eps_text', r.get('eps', ''))))}</td>"
                   + "".join(f"<td class=n>{_pct(r['accuracy'].get(k))}</td>" for k in keys)
                   + f"<td>{e(kind)}</td><td>{e(checks)}</td>"
                   f'<td><a href="{e(links[label])}">results.json</a></td></tr>')
    out.append("</table>")
    if kinds:
        out.append("<p>Kind: a model is <i>robust</i> when its strongest evaluation, the "
                   "per-image worst case over every attack run (AutoAttack included when it "
                   "ran), leaves "
                   "at least the threshold correct; otherwise <i>standard</i>. The saliency "
                   "section uses these kinds.</p><ul>" + "".join(
                       f"<li>{e(lb)}: {e(k['rule'])}</li>" for lb, k in kinds.items()) + "</ul>")
    if notes:
        out.append("<p>Sanity checks that did not pass cleanly (read the numbers above with "
                   "them):</p><ul class=warnings>" + "".join(notes) + "</ul>")
    return out


def _severity(check: Mapping[str, Any]) -> str:
    """``ok``, ``warning`` or ``fail`` (older results.json files only have ``passed``)."""
    return check.get("severity", "ok" if check.get("passed", True) else "fail")


def _curves(path: Path, runs: Sequence[str]) -> list[str]:
    """The held-out accuracy per epoch of each run (its ``metrics.jsonl``), one embedded PNG."""
    import base64
    import io
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in runs:
        file = path.parent / r / "metrics.jsonl"
        if not file.is_file():
            continue
        for line in file.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("type") != "epoch":
                continue
            for key, v in rec.items():
                if key.startswith("eval/") and isinstance(v, int | float):
                    series.setdefault(r, {}).setdefault(key, []).append((rec["epoch"], v))
    if not series:
        return ["<p>No held-out evaluation was logged (metrics.jsonl).</p>"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for r, curves in series.items():
        for key, points in curves.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, [100 * v for v in ys], marker="o", label=f"{r}: {key}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return ["<p>Held-out accuracy during training (the last images of the training sample, "
            "not the test images above; eval/pgd&lt;k&gt;: the trainer's PGD at the same ε), "
            "from metrics.jsonl:</p>",
            f'<img class=curves src="data:image/png;base64,{data}" '
            'alt="held-out accuracy per epoch">']


def _sensitivity(report: Mapping[str, Any], folder: str) -> list[str]:
    e = html.escape
    models = report["models"]
    layers = list(dict.fromkeys(layer for m in models.values() for layer in m["layers"]))
    rows = [[layer, *(num(m["layers"].get(layer, {}).get("mean")) for m in models.values())]
            for layer in layers]
    first = next(iter(models.values()))
    return [f"<p>Mean neuron sensitivity σ per layer (methods.md §4.1: how far a neuron's "
            f"activation moves from x to x'; x' = {e(str(first.get('attack', '')))} white-box "
            f"on each model, n = {first.get('n', '')}). Lower means the layer is more stable "
            f"under attack. Details: <a href=\"{e(folder)}/sensitivity.json\">sensitivity.json"
            "</a>.</p>",
            f'<img src="{e(folder)}/sigma_mean.png" alt="mean sensitivity per layer">',
            f'<img src="{e(folder)}/intervention.png" alt="intervention test">',
            *table(["layer", *models], rows, [False, *([True] * len(models))])]


def _saliency(summary: Mapping[str, Any], folder: str) -> list[str]:
    e = html.escape
    explainers = list(summary.get("grids", {}))
    explainer = "adaptgrad" if "adaptgrad" in explainers else explainers[0]
    labels = list(summary["models"])
    by_key = {(r["explainer"], r["metric"], r["input"], r["model"]): r
              for r in summary["metrics"]}
    rows = []
    for metric in SALIENCY_METRICS:
        key = "pair" if metric.startswith("stability") else "clean"
        if (explainer, metric, key, labels[0]) in by_key:
            rows.append([metric, key, *(f"{num(by_key[(explainer, metric, key, lb)]['mean'])} "
                                        f"{ci(by_key[(explainer, metric, key, lb)]['ci95'])}"
                                        for lb in labels)])
    kinds = [f"{lb} ({summary['models'][lb].get('kind', '?')})" for lb in labels]
    sources = sorted({str(m.get("kind_source", "")) for m in summary["models"].values()} - {""})
    target = summary.get("settings", {}).get("target_text") or "the true label"
    return [f"<p>{e(explainer)} maps of {e(target)} on x and on x' for the first "
            f"{summary['n']} test images (mean [95% bootstrap CI] over the images). Kinds in "
            f"brackets: {e('; '.join(sources) or 'as given')}. Every "
            f"explainer, metric and paired test: <a href=\"{e(folder)}/index.html\">the inspect "
            "report</a>.</p>",
            f'<img src="{e(folder)}/{e(summary["grids"][explainer])}" '
            f'alt="{e(explainer)} saliency grid">',
            *table(["metric", "input", *kinds], rows, [False, False, *([True] * len(labels))])]


def write_demo_page(path: str | os.PathLike, *,
                    evaluations: Mapping[str, Mapping[str, Any]],
                    evaluation_links: Mapping[str, str],
                    sensitivity: Mapping[str, Any] | None = None,
                    sensitivity_dir: str = "sensitivity",
                    inspect: Mapping[str, Any] | None = None,
                    inspect_dir: str = "inspect",
                    runs: Sequence[str] = (),
                    seconds: float | None = None,
                    kinds: Mapping[str, Mapping[str, Any]] | None = None,
                    command: str | None = None,
                    sizes: str | None = None,
                    quick: bool = False) -> Path:
    """Write the demo's ``index.html``.

    Args:
        path: the page (its folder holds everything it links).
        evaluations: ``{label: results.json content}``.
        evaluation_links: ``{label: path of that results.json}``, relative to the page.
        sensitivity: the ``sensitivity.json`` content, its figures in ``sensitivity_dir``.
        inspect: the inspect ``summary.json`` content, its grids and page in ``inspect_dir``.
        runs: training run folders (relative): their ``config.yaml`` and ``metrics.jsonl``
            are linked, and ``tb/`` is what TensorBoard shows.
        seconds: the demo's wall time, stated in the page.
        kinds: ``{label: robustkit.demo.model_kind(...)}``: the kind column and how each kind
            was decided.
        command: what made the page (``"robustkit demo --quick"``), named in the header.
        sizes: the sizes it ran with, as text, named in the header.
        quick: a quick run: the header says the numbers are a smoke test.
    """
    from robustkit.utils import atomic_write, output_errors

    e = html.escape
    path = Path(path)
    took = "" if seconds is None else f" in {seconds:.0f} s"
    made = f"<code>{e(command or 'make demo')}</code>"
    parts = [head("robustkit demo"), "<h1>robustkit demo" + (" (quick run)" if quick else "")
             + "</h1>",
             f"<p>Everything on this page was computed by {made}{took} on this machine"
             + (f", with {e(sizes)}" if sizes else "") + ". "
             + ("<b>A quick run</b>: tiny sizes and a very short training, a smoke test of the "
                "pipeline; run <code>make demo</code> for numbers worth reading. " if quick
                else "")
             + "All numbers are on small subsets of the test sets (n per row): they show the "
             "pipeline and the direction of the effects, they are not RobustBench numbers.</p>",
             "<h2>1. Robustness</h2>",
             *_evaluations(evaluations, evaluation_links, kinds or {})]
    if sensitivity is not None:
        parts += ["<h2>2. Neuron sensitivity</h2>", *_sensitivity(sensitivity, sensitivity_dir)]
    if inspect is not None:
        parts += ["<h2>3. Saliency</h2>", *_saliency(inspect, inspect_dir)]
    if runs:
        items = "".join(f'<li>{e(r)}: <a href="{e(r)}/config.yaml">config.yaml</a>, '
                        f'<a href="{e(r)}/metrics.jsonl">metrics.jsonl</a></li>' for r in runs)
        parts += ["<h2>4. Training</h2>", f"<ul>{items}</ul>", *_curves(path, runs),
                  "<p>Loss, accuracy, per-layer sensitivity σ (scalars and histograms) and "
                  "saliency panels of x and x' over the epochs: <code>tensorboard --logdir "
                  f"{e(str(path.parent))}</code></p>"]
    parts.append(tail())
    with output_errors(path):
        atomic_write(path, "\n".join(parts).encode())
    return path

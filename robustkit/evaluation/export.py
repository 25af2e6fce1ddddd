"""An ``EvalResult`` as a dict, a DataFrame, a figure, HTML, text and the CLI's files.

The methods of ``EvalResult`` (``to_dict``, ``to_frame``, ``plot``, ``save``, ``table``,
``_repr_html_``) call these. ``save`` writes exactly what ``robustkit evaluate`` writes beside
its ``config.yaml`` and resumable ``state/``: ``results.json`` and ``flags.json``
(``results.write_results``) and RobustBench's ``model_info/<dataset>/<threat_model>/<name>.json``;
the CLI calls it too.
pandas and matplotlib are imported on use (matplotlib through ``Figure``, never ``pyplot``, so
no global figure state).

Example:
    >>> res = robustkit.evaluate("robustkit:mnist_smallcnn_robust", x, y, eps=0.3)
    >>> res.save("runs/eval"); res.to_frame()
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from robustkit.evaluation.results import build_results, write_model_info, write_results

__all__ = ["to_dict", "to_frame", "plot", "save", "table", "to_html"]


def to_dict(result: Any) -> dict[str, Any]:
    """``build_results`` of ``result`` with the settings ``robustkit.evaluate`` recorded.

    Raises:
        ValueError: ``result`` came from ``evaluate_attacks`` alone (no settings to record).
    """
    if not result.meta:
        raise ValueError("result holds flags only (from evaluate_attacks): results.json needs "
                         "the settings robustkit.evaluate records; use robustkit.evaluate")
    return build_results(result, checks=result.checks, **result.meta)


def save(result: Any, folder: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``flags.json`` and, with a dataset, the RobustBench file.

    Returns:
        ``{"results": ..., "flags": ..., "model_info": ...}``: the paths written
        (``model_info`` only when ``dataset`` was given: RobustBench files are per dataset).

    Raises:
        OutputError: a file cannot be written (named; files already written stay intact).
    """
    results = to_dict(result)
    folder = Path(folder)
    paths = {"results": write_results(folder, results, result), "flags": folder / "flags.json"}
    if results["dataset"] is not None:
        paths["model_info"] = write_model_info(folder, results, name=results["name"])
    return paths


def to_frame(result: Any) -> Any:
    """One row per accuracy column (``clean``, each attack, ``robust``), AutoAttack's
    sub-attacks as ``<attack>/<sub>`` rows (accuracy after it, cumulative in its run order).

    Columns: ``accuracy`` (fraction), ``correct`` (count), ``n``, ``time_s`` and
    ``max_perturbation`` (NaN where not measured).
    """
    import pandas as pd

    n = result.n
    flags = {"clean": result.clean, **result.correct, "robust": result.robust}
    rows = []
    for key, f in flags.items():
        rows.append(_row(key, f, n, result.time_s.get(key), result.max_perturbation.get(key)))
        for sub, g in result.components.get(key, {}).items():
            rows.append(_row(f"{key}/{sub}", g, n, None, None))
    return pd.DataFrame(rows).set_index("attack")


def _row(key: str, flags: Any, n: int, time_s: Any, pert: Any) -> dict[str, Any]:
    correct = int(flags.sum())
    return {"attack": key, "accuracy": correct / max(n, 1), "correct": correct, "n": n,
            "time_s": float("nan") if time_s is None else float(time_s),
            "max_perturbation": float("nan") if pert is None else float(pert)}


def plot(result: Any) -> Any:
    """Bars of accuracy (%) per column, clean to robust, labelled with the counts."""
    from matplotlib.figure import Figure

    frame = to_frame(result)
    main = frame[[("/" not in k) for k in frame.index]]
    fig = Figure(figsize=(1.2 + 0.9 * len(main), 3.2), layout="constrained")
    ax = fig.add_subplot()
    pct = 100 * main["accuracy"]
    bars = ax.bar(list(main.index), pct, color=["#4c72b0"] + ["#dd8452"] * (len(main) - 2)
                  + ["#c44e52"])
    ax.bar_label(bars, labels=[f"{p:.1f}%\n{c}/{n}" for p, c, n in
                               zip(pct, main["correct"], main["n"], strict=True)], fontsize=8)
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(_title(result), fontsize=9)
    return fig


def _title(result: Any) -> str:
    m = result.meta
    if not m:
        return f"{result.n} images, protocol {result.protocol}"
    from robustkit.evaluation.results import format_eps

    where = f" on {m['dataset']}" if m["dataset"] else ""  # tensors given without a dataset
    return (f"{m['extra']['name']}{where}, {m['subset']}, "
            f"{m['threat_model']} eps = {format_eps(m['eps'])}")


def to_html(result: Any) -> str:
    """The notebook view: a title, the table (accuracy in %) and the checks not passed."""
    frame = to_frame(result)
    shown = frame.assign(accuracy=(100 * frame["accuracy"]).round(2)).rename(
        columns={"accuracy": "accuracy (%)"})
    bad = [c for c in result.checks if c.severity != "ok"]
    notes = "".join(f"<li><b>{html.escape(c.severity.upper())}</b> [{html.escape(c.name)}]: "
                    f"{html.escape(c.message)}</li>" for c in bad)
    checks = (f"<ul>{notes}</ul>" if bad else
              f"<p>checks: all {len(result.checks)} passed</p>" if result.checks else "")
    return (f"<p><b>{html.escape(_title(result))}</b>, protocol {result.protocol}</p>"
            + shown.to_html(float_format=lambda v: f"{v:.4g}", na_rep="") + checks)


def table(result: Any) -> str:
    """The table and checks ``robustkit evaluate`` prints (accuracy, counts, time per attack;
    AutoAttack's sub-attacks; failed checks first, then warnings)."""
    r = to_dict(result)
    n = r["n_examples"]
    where = f" on {r['dataset']}" if r["dataset"] else ""  # tensors given without a dataset
    lines = [f"\n{r['name']}{where}, {r['subset']}, {r['threat_model']} "
             f"eps = {r['eps_text']} ({r['eps']:.6f}), protocol {r['protocol']['name']}",
             f"  {'attack':<28}{'accuracy':>10}{'correct':>14}{'time':>10}"]
    for key, acc in r["accuracy"].items():
        t = r["time_s"].get(key)
        t_text = "" if t is None else f"{t:.1f} s"
        count = f"{r['n_correct'][key]}/{n}"
        lines.append(f"  {key:<28}{100 * acc:>9.2f}%{count:>14}{t_text:>10}")
        # AutoAttack's sub-attacks, in run order: accuracy after each (cumulative, as AA counts)
        for sub, sub_acc in r.get("components", {}).get(key, {}).items():
            broken = r.get("broken_by", {}).get(key, {}).get(sub)
            note = "" if broken is None else f"{broken} broken"
            lines.append(f"    {'after ' + sub:<26}{100 * sub_acc:>9.2f}%{note:>14}")
    order = {"fail": 0, "warning": 1}
    shown = sorted((c for c in result.checks if c.severity in order),
                   key=lambda c: order[c.severity])
    if not shown:
        lines.append(f"  checks: all {len(result.checks)} passed")
    for c in shown:
        lines.append(f"  {c.severity.upper()} [{c.name}]: {c.message}")
    if any(c.severity == "fail" for c in shown):
        lines.append("  A check FAILED: the robust accuracy above is likely an overestimate (see "
                     "results.json['checks'] and the footnote); try adaptive attacks.")
    return "\n".join(lines)

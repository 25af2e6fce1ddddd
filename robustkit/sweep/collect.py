"""A finished sweep -> one table with CIs, paired tests against a baseline, and the trade-off
figure (architecture.md §2: ``sweep/collect.py``).

Each run's ``sweep_done.json`` (its settings, times, penalty at initialisation) and
``eval/flags.json`` (per-image correctness, the same images for every run) become one row:
accuracies with 95 % Wilson intervals (``scipy.stats.binomtest(...).proportion_ci``). Paired
tests: for each run against the baseline run of the same seed, McNemar's test on the per-image
correctness of one metric (``robust`` by default): exact two-sided binomial on the discordant
pairs when there are fewer than 25 of them, else the χ² statistic with continuity correction
(statsmodels' ``mcnemar`` rule), then Holm's step-down correction over the whole family (every
run x seed compared with the baseline, one metric); the family is stated in ``tests.family``.

Example:
    >>> table = collect("runs/sweep_a", baseline="jr_lam0.02")
    >>> table.runs[["label", "clean", "robust", "robust_lo", "robust_hi"]]
    >>> table.tests[["run", "b", "c", "p", "p_holm"]]; fig = table.figure()
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustkit.errors import ConfigError

__all__ = ["collect", "SweepTable", "mcnemar", "holm", "wilson", "tradeoff_figure",
           "EXACT_BELOW"]

logger = logging.getLogger(__name__)

#: Fewer discordant pairs than this: McNemar's exact binomial test (statsmodels' rule of thumb).
EXACT_BELOW = 25


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (scipy); ``(nan, nan)`` for ``n = 0``."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(a: Sequence[bool], b: Sequence[bool],
            exact: bool | None = None) -> tuple[int, int, float, str]:
    """McNemar's test of paired per-image correctness ``a`` (a run) vs ``b`` (the baseline).

    Returns:
        ``(n01, n10, p, method)``: ``n01`` images right under ``a`` only, ``n10`` right under
        ``b`` only, the two-sided p-value, and ``"exact"`` (binomial, p = 1/2, on the
        ``n01 + n10`` discordant pairs) or ``"chi2"`` (``(|n01 - n10| - 1)² / (n01 + n10)``, 1
        degree of freedom). ``exact=None``: exact below ``EXACT_BELOW`` discordant pairs.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy.stats import binomtest, chi2

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired: lengths {a.size} and {b.size}")
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    d = n01 + n10
    use_exact = d < EXACT_BELOW if exact is None else exact
    if d == 0:
        return n01, n10, 1.0, "exact" if use_exact else "chi2"
    if use_exact:
        return n01, n10, float(binomtest(min(n01, n10), d, 0.5).pvalue), "exact"
    stat = (abs(n01 - n10) - 1) ** 2 / d
    return n01, n10, float(chi2.sf(stat, 1)), "chi2"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order: the one
    implementation of ``robustkit.reports.stats.adjust_p`` (also behind ``inspect``)."""
    from robustkit.reports.stats import adjust_p

    return [float(v) for v in adjust_p(list(pvalues), "holm")]


@dataclass
class SweepTable:
    """One sweep's results.

    Attributes:
        runs: one row per finished run: ``run``, ``label`` (method), ``objective``, one column
            per swept key, ``seed``, ``n``; per accuracy column (``clean``, each attack,
            ``robust``): the accuracy and its Wilson ``_lo``/``_hi``; ``penalty_init``,
            ``train_s``, ``eval_s``, ``epochs``.
        tests: one row per run compared with the baseline (same seed): ``run``, ``baseline``,
            ``metric``, ``n``, ``acc``, ``acc_baseline``, ``diff``, ``b`` (right under the run
            only), ``c`` (under the baseline only), ``method``, ``p``, ``p_holm``.
        family: the correction's family, in words.
        params: the swept keys (columns of ``runs``).
    """

    runs: Any
    tests: Any
    family: str
    params: list[str]
    baseline: str | None = None
    metric: str = "robust"

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """``summary.csv``, ``tests.csv`` (with the family as a comment line), ``tradeoff.png``."""
        from robustkit.utils import output_errors

        folder = Path(folder)
        paths = {"summary": folder / "summary.csv", "tests": folder / "tests.csv",
                 "figure": folder / "tradeoff.png"}
        with output_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
            self.runs.to_csv(paths["summary"], index=False)
            with open(paths["tests"], "w") as f:
                f.write(f"# {self.family}\n")
                self.tests.to_csv(f, index=False)
            self.figure().savefig(paths["figure"], dpi=120, bbox_inches="tight")
        return paths

    def figure(self, y: str | None = None) -> Any:
        """The trade-off figure (see :func:`tradeoff_figure`)."""
        return tradeoff_figure(self, y=y or self.metric)


def collect(source: Any, baseline: str | None = None, metric: str = "robust") -> SweepTable:
    """Read every finished run of a sweep into a ``SweepTable``.

    Args:
        source: a ``SweepSpec`` (its runs, its ``baseline``) or a sweep's output folder (every
            sub-folder holding ``sweep_done.json``).
        baseline: the reference run's name without ``_seed<k>``, or a label: each run of a
            group with as many grid points is paired with the baseline group's run at the same
            position and seed (default: the spec's). Grid points are counted in the spec when
            ``source`` is one, so a half-finished group is paired run by run; from a folder,
            among the finished runs.
        metric: the accuracy column the paired tests compare (``robust``, ``clean`` or an
            attack's name).

    Raises:
        ConfigError: no finished run, an unknown baseline or metric, or runs evaluated on
            different images (their sha256 differ).
    """
    import pandas as pd

    from robustkit.sweep.spec import DONE

    sizes = None  # grid points per label: from the spec (finished or not) when there is one
    if isinstance(source, (str, os.PathLike)):
        folders = sorted(p.parent for p in Path(source).glob(f"*/{DONE}"))
    else:
        folders = [r.out_dir for r in source.runs if (r.out_dir / DONE).is_file()]
        baseline = baseline if baseline is not None else source.baseline
        sizes = {lab: len({r.index for r in source.runs if r.label == lab})
                 for lab in {r.label for r in source.runs}}
    if not folders:
        where = source if isinstance(source, (str, os.PathLike)) else source.out
        raise ConfigError(f"no finished run in {where}")
    records, flags = [], {}
    for folder in folders:
        rec = json.loads((folder / DONE).read_text())
        fl = json.loads((folder / "eval" / "flags.json").read_text())
        flags[rec["name"]] = fl
        records.append(rec)
    digests = {r["images_sha256"] for r in records}
    if len(digests) > 1:
        raise ConfigError("the runs were evaluated on different images (their sha256 differ): "
                          "paired tests need the same images for every run")
    params = list(dict.fromkeys(k for r in records for k in r["params"]))
    rows = []
    for rec in records:
        fl = flags[rec["name"]]
        n = len(fl["labels"])
        row = {"run": rec["name"], "label": rec["label"], "objective": rec["objective"],
               **{k: rec["params"].get(k) for k in params}, "seed": rec["seed"], "n": n}
        for key, values in fl.items():
            if key in ("labels", "components"):
                continue
            k = int(sum(values))
            row[key] = k / n if n else math.nan
            row[f"{key}_lo"], row[f"{key}_hi"] = wilson(k, n)
        row.update(penalty_init=rec.get("penalty_init"), train_s=rec.get("train_s"),
                   eval_s=rec.get("eval_s"), epochs=rec.get("epochs"))
        rows.append(row)
    runs = pd.DataFrame(rows)
    tests, family = _tests(records, flags, baseline, metric, sizes)
    return SweepTable(runs, tests, family, params, baseline, metric)


def _tests(records: list[dict[str, Any]], flags: dict[str, Any], baseline: str | None,
           metric: str, sizes: dict[str, int] | None = None) -> tuple[Any, str]:
    import pandas as pd

    columns = ["run", "baseline", "metric", "n", "acc", "acc_baseline", "diff", "b", "c",
               "method", "p", "p_holm"]
    if baseline is None:
        return pd.DataFrame(columns=columns), "no baseline named: no paired tests"
    labels = {r["label"] for r in records}
    if any(r["name"] == f"{baseline}_seed{r['seed']}" for r in records):
        labels = set()  # a run's name wins over a label of the same spelling
    if baseline in labels:  # matched grids: the baseline group's run at the same position
        refs = {(r["seed"], r.get("index", 0)): r["name"] for r in records
                if r["label"] == baseline}
        # a group's grid size: the spec's when given, so that a half-finished group is
        # paired run by run as it finishes; from a bare folder, the finished runs' positions
        size = sizes or {lab: len({r.get("index", 0) for r in records if r["label"] == lab})
                         for lab in labels}

        def reference(rec: dict[str, Any]) -> str | None:
            if rec["label"] == baseline or size[rec["label"]] != size[baseline]:
                return None  # another grid size: no position to pair with
            return refs.get((rec["seed"], rec.get("index", 0)))
    else:
        refs = {(r["seed"], 0): r["name"] for r in records
                if r["name"] == f"{baseline}_seed{r['seed']}"}

        def reference(rec: dict[str, Any]) -> str | None:
            return refs.get((rec["seed"], 0))
    if not refs:
        raise ConfigError(f"baseline {baseline!r}: no finished run of that name or label")
    rows = []
    for rec in records:
        ref = reference(rec)
        if ref is None or ref == rec["name"]:
            continue
        a, b = flags[rec["name"]], flags[ref]
        if metric not in a or metric not in b:
            raise ConfigError(f"metric {metric!r} is not an accuracy column of {rec['name']} "
                              f"and {ref} (columns: {', '.join(k for k in a if k != 'labels')})")
        if a["labels"] != b["labels"]:
            raise ConfigError(f"{rec['name']} and {ref} were evaluated on different images")
        n01, n10, p, method = mcnemar(np.asarray(a[metric]) == 1, np.asarray(b[metric]) == 1)
        n = len(a[metric])
        acc, acc_b = sum(a[metric]) / n, sum(b[metric]) / n
        rows.append({"run": rec["name"], "baseline": ref, "metric": metric, "n": n, "acc": acc,
                     "acc_baseline": acc_b, "diff": acc - acc_b, "b": n01, "c": n10,
                     "method": method, "p": p})
    for row, ph in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = ph
    pairing = ("the run of the same seed" if baseline not in labels else
               "its run at the same grid position and seed")
    family = (f"Holm over m = {len(rows)} McNemar tests: every run against {baseline} "
              f"({pairing}), on per-image '{metric}' correctness (exact binomial below "
              f"{EXACT_BELOW} discordant pairs, else chi2 with continuity correction)")
    return pd.DataFrame(rows, columns=columns), family


def tradeoff_figure(table: SweepTable, y: str = "robust", x: str = "clean") -> Any:
    """Robust vs clean accuracy, one line per method across its swept values (annotated),
    with Wilson intervals as error bars; a matplotlib ``Figure`` (no pyplot state).

    The seeds of one setting are averaged (their mean accuracy; bars: the widest interval).
    """
    from matplotlib.figure import Figure

    runs = table.runs
    if y not in runs or x not in runs:
        raise ConfigError(f"no accuracy column {y if y not in runs else x!r} in the sweep")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    keys = [k for k in table.params if k in runs and runs[k].notna().any()]
    for label, group in runs.groupby("label", sort=False):
        varied = [k for k in keys if group[k].nunique(dropna=True) > 1]
        by = varied[:1]
        agg = group.groupby(by, dropna=False, sort=True) if by else [(None, group)]
        pts = []
        for value, g in agg:
            pts.append((g[x].mean(), g[y].mean(), g[f"{x}_lo"].min(), g[f"{x}_hi"].max(),
                        g[f"{y}_lo"].min(), g[f"{y}_hi"].max(), value))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xerr = [[p[0] - p[2] for p in pts], [p[3] - p[0] for p in pts]]
        yerr = [[p[1] - p[4] for p in pts], [p[5] - p[1] for p in pts]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=label)
        if by:
            short = by[0].rsplit(".", 1)[-1]
            for p in pts:
                v = p[6][0] if isinstance(p[6], tuple) else p[6]
                ax.annotate(f"{short}={v:g}" if isinstance(v, float) else f"{short}={v}",
                            (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    n = int(runs["n"].iloc[0])
    ax.set_xlabel(f"{x} accuracy (n = {n})")
    ax.set_ylabel(f"{y} accuracy (n = {n})")
    ax.set_title("trade-off per method across its swept values (95 % Wilson CIs)", fontsize=9)
    ax.legend(fontsize=8)
    return fig

"""Explainers compared with each other on the per-image rows of a ``SaliencyReport``: does one
explainer separate two models more than another (a paired bootstrap CI of the difference of
their |d_z| over the same images, ``reports.stats.dz_difference_ci``)?

Example:
    >>> explainer_difference(report.rows, "gradient", "adaptgrad", "total_variation", "clean",
    ...                      "standard", "robust", n=report.n)["verdict"]
    'could not decide (the CI covers 0)'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["explainer_difference", "Table"]

Row = tuple[int, str, str, str, str, float]  # index, model, explainer, input, metric, value

Table = dict[tuple[str, str, str, str], np.ndarray]


def _table(rows: Sequence[Row], n: int) -> Table:
    """``{(explainer, metric, input, model): (n,) values by image index}`` (NaN where absent)."""
    table: Table = {}
    for idx, lb, ex, key, metric, val in rows:
        table.setdefault((ex, metric, key, lb), np.full(n, np.nan))[idx] = val
    return table


def _explainer_difference(table: Table, first: str, second: str, metric: str, key: str,
                          a: str, b: str, seed: int) -> dict[str, Any]:
    from robustkit.reports.stats import d_z, dz_difference_ci

    d1 = table[(first, metric, key, b)] - table[(first, metric, key, a)]
    d2 = table[(second, metric, key, b)] - table[(second, metric, key, a)]
    ok = np.isfinite(d1) & np.isfinite(d2)
    z1, z2 = d_z(d1[ok]), d_z(d2[ok])
    interval = dz_difference_ci(d1[ok], d2[ok], seed)
    if interval is None:
        verdict = "undefined"
    elif interval[0] > 0:
        verdict = f"{second} separates the models more"
    elif interval[1] < 0:
        verdict = f"{first} separates the models more"
    else:
        verdict = "could not decide (the CI covers 0)"
    return {"metric": metric, "input": key, "a": a, "b": b, "first": first, "second": second,
            "n": int(ok.sum()), "d_z_first": z1, "d_z_second": z2,
            "abs_d_z_difference": None if z1 is None or z2 is None else abs(z2) - abs(z1),
            "ci95": list(interval) if interval else None, "verdict": verdict}


def explainer_difference(rows: Sequence[Row], first: str, second: str, metric: str,
                         input: str, a: str, b: str, *, n: int, seed: int = 0) -> dict[str, Any]:
    """How much better ``second`` separates models ``a`` and ``b`` than ``first`` does on one
    metric: ``|d_z|`` of each explainer's paired differences b − a over the images finite for
    both explainers, and the paired bootstrap CI of ``|d_z(second)| − |d_z(first)|``
    (``reports.stats.dz_difference_ci``); ``verdict`` says which separates more, or "could not
    decide" where the CI covers 0.

    Example:
        >>> explainer_difference(report.rows, "gradient", "adaptgrad", "stability_cos", "pair",
        ...                      "standard", "robust", n=report.n)["verdict"]
    """
    table = _table(rows, n)
    for ex in (first, second):
        for lb in (a, b):
            if (ex, metric, input, lb) not in table:
                raise ValueError(f"no values of {metric!r} ({input}) for explainer {ex!r} and "
                                 f"model {lb!r}")
    return _explainer_difference(table, first, second, metric, input, a, b, seed)

"""Statistics for reports, from scipy (never hand-written): bootstrap confidence intervals and the
Wilcoxon signed-rank test of paired per-image values.

Example:
    >>> lo, hi = bootstrap_ci(per_image_values, seed=0)   # 95 % BCa CI of the mean
    >>> p = wilcoxon_p(robust_values, standard_values)     # None when every difference is 0
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

__all__ = ["bootstrap_ci", "wilcoxon_p", "N_RESAMPLES", "CONFIDENCE"]

logger = logging.getLogger(__name__)

# 9,999 resamples is scipy's default and keeps the Monte-Carlo error of a 95 % bound well below
# its width.
N_RESAMPLES = 9999
CONFIDENCE = 0.95
# Elements (resamples x values) per bootstrap batch: bounds the memory of the BCa jackknife,
# which is O(batch x n); below it scipy runs unbatched.
_BOOTSTRAP_ELEMENTS = 10_000_000


def bootstrap_ci(values, seed: int, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """BCa bootstrap CI of the mean of ``values`` (one number per image), via scipy.

    Constant values give ``(v, v)`` (every resample has that mean; BCa is undefined there); a
    BCa interval that comes out undefined on nearly constant data falls back to percentile.
    """
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    n = values.size
    batch = None if n * max(n_resamples, n) <= _BOOTSTRAP_ELEMENTS else max(
        1, _BOOTSTRAP_ELEMENTS // n)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate-data warnings: handled below
            res = bootstrap((values,), np.mean, n_resamples=n_resamples, batch=batch,
                            confidence_level=confidence, method=method,
                            rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
        logger.debug("BCa interval undefined for these values; using the percentile interval")
    raise AssertionError("unreachable: a percentile interval of finite values is finite")


def wilcoxon_p(a, b) -> float | None:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired values, via
    ``scipy.stats.wilcoxon(a, b)`` (its defaults: zero differences dropped, ``"wilcox"``).

    Returns ``None`` when every difference is zero (the test is undefined there; scipy would
    raise or return NaN).

    Args:
        a, b: paired values of one length (e.g. one number per image and model).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired: lengths {a.size} and {b.size}")
    if a.size == 0 or np.all(a == b):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample warnings; the p-value stands as scipy's
        p = float(wilcoxon(a, b).pvalue)
    return p if math.isfinite(p) else None

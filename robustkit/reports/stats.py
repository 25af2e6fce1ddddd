"""Statistics for reports, from scipy (never hand-written): bootstrap confidence intervals.

Example:
    >>> lo, hi = bootstrap_ci(per_image_values, seed=0)   # 95 % BCa CI of the mean
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

__all__ = ["bootstrap_ci", "N_RESAMPLES", "CONFIDENCE"]

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

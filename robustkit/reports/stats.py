"""Statistics for reports: bootstrap confidence intervals (scipy's ``bootstrap``), the Wilcoxon
signed-rank test of paired per-image values (scipy), the paired effect size d_z with its CI, the
paired bootstrap CI of the difference of two d_z on the same images, and multiple-comparison
corrections (Holm, written out: scipy has none; Benjamini-Hochberg: scipy's
``false_discovery_control``).

Example:
    >>> lo, hi = bootstrap_ci(per_image_values, seed=0)   # 95 % BCa CI of the mean
    >>> p = wilcoxon_p(robust_values, standard_values)     # None when every difference is 0
    >>> adjust_p([0.01, None, 0.04], "holm")               # [0.02, None, 0.04]
    >>> dz_difference_ci(d_gradient, d_adaptgrad, seed=0)  # CI of |d_z(b)| - |d_z(a)|
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

__all__ = ["bootstrap_ci", "wilcoxon_p", "N_RESAMPLES", "CONFIDENCE", "CORRECTIONS", "adjust_p",
           "d_z", "dz_ci", "dz_difference_ci"]

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


# Multiple-comparison corrections of ``adjust_p``: Holm's step-down (controls the family-wise
# error rate under any dependence), Benjamini-Hochberg (the false discovery rate; valid for
# positively dependent tests), or none.
CORRECTIONS = ("holm", "bh", "none")


def adjust_p(p, method: str = "holm") -> list[float | None]:
    """Adjusted p-values of one family of tests: every p that is not ``None`` is in the family
    (m = their number); ``None`` (an undefined test) stays ``None``.

    - ``"holm"``: sort ascending, ``p̃_(i) = max_{j <= i} min(1, (m − j + 1) p_(j))``;
    - ``"bh"``: Benjamini-Hochberg, ``p̃_(i) = min_{j >= i} min(1, m p_(j) / j)``
      (``scipy.stats.false_discovery_control(method="bh")``);
    - ``"none"``: the p-values unchanged.

    Raises:
        ValueError: an unknown method, or a p outside [0, 1].

    Example:
        >>> adjust_p([0.01, 0.04, None, 0.03], "holm")
        [0.03, 0.06, None, 0.06]
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    p = list(p)
    where = [i for i, v in enumerate(p) if v is not None]
    values = np.asarray([p[i] for i in where], dtype=np.float64)
    if values.size and not (np.all(values >= 0) and np.all(values <= 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out: list[float | None] = [None] * len(p)
    if method == "none" or values.size == 0:
        adjusted = values
    elif method == "bh":
        from scipy.stats import false_discovery_control

        adjusted = np.asarray(false_discovery_control(values, method="bh"))
    else:
        m = values.size
        order = np.argsort(values, kind="stable")
        stepped = np.minimum(1.0, (m - np.arange(m)) * values[order])
        adjusted = np.empty(m)
        adjusted[order] = np.maximum.accumulate(stepped)
    for i, v in zip(where, adjusted, strict=True):
        out[i] = float(v)
    return out


def _dz(d: np.ndarray, axis: int = -1) -> np.ndarray:
    """d_z along ``axis`` (NaN or ±inf where the standard deviation is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return d.mean(axis=axis) / d.std(axis=axis, ddof=1)


def d_z(d) -> float | None:
    """Cohen's d_z of paired differences: ``mean(d) / sd(d)`` (sd with n − 1); ``None`` when
    fewer than 2 values or sd = 0.

    Example:
        >>> d_z([1.0, 2.0, 3.0])
        2.0
    """
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2 or not d.std(ddof=1) > 0:
        return None
    return float(_dz(d))


def _interval(data: tuple, statistic, seed: int, n_resamples: int, confidence: float,
              method: str) -> tuple[float, float] | None:
    """scipy's paired bootstrap of ``statistic(*data)``; BCa falls back to percentile when it
    comes out undefined; ``None`` when neither is finite (resamples with sd = 0)."""
    from scipy.stats import bootstrap

    n = data[0].size
    batch = None if n * max(n_resamples, n) <= _BOOTSTRAP_ELEMENTS else max(
        1, _BOOTSTRAP_ELEMENTS // n)
    for m in (method, "percentile") if method == "BCa" else (method,):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = bootstrap(data, statistic, n_resamples=n_resamples, batch=batch,
                            confidence_level=confidence, method=m, paired=True,
                            vectorized=True, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return None


def dz_ci(d, seed: int, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
          method: str = "BCa") -> tuple[float, float] | None:
    """Bootstrap CI of d_z over the images (scipy, BCa by default); ``None`` where d_z is
    undefined (fewer than 3 values, sd = 0) or the interval is not finite.

    Example:
        >>> dz_ci(robust_minus_standard, seed=0)
    """
    d = np.asarray(d, dtype=np.float64)
    if d.size < 3 or d_z(d) is None:
        return None
    return _interval((d,), _dz, seed, n_resamples, confidence, method)


def dz_difference_ci(d_a, d_b, seed: int, n_resamples: int = N_RESAMPLES,
                     confidence: float = CONFIDENCE, absolute: bool = True,
                     method: str = "BCa") -> tuple[float, float] | None:
    """Paired bootstrap CI of ``|d_z(d_b)| − |d_z(d_a)|`` (``absolute=False``: of
    ``d_z(d_b) − d_z(d_a)``), where ``d_a`` and ``d_b`` are the per-image paired differences
    (e.g. robust − standard) of two explainers on the same images: each resample draws one set
    of image indices for both (scipy's ``bootstrap(paired=True)``, indices
    ``rng.integers(0, n, (n_resamples, n))`` with ``rng = default_rng(seed)``), so the
    explainers' correlation over images is kept. A CI that covers 0 cannot tell the two
    explainers apart.

    Returns:
        ``(low, high)``, or ``None`` where either d_z is undefined or the interval is not finite.

    Raises:
        ValueError: ``d_a`` and ``d_b`` differ in length.

    Example:
        >>> dz_difference_ci(d_gradient, d_adaptgrad, seed=0)   # > 0: AdaptGrad separates more
    """
    a, b = np.asarray(d_a, dtype=np.float64), np.asarray(d_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"d_a and d_b must be paired: lengths {a.size} and {b.size}")
    if a.size < 3 or d_z(a) is None or d_z(b) is None:
        return None

    def statistic(u, v, axis=-1):
        za, zb = _dz(u, axis), _dz(v, axis)
        return (np.abs(zb) - np.abs(za)) if absolute else zb - za

    return _interval((a, b), statistic, seed, n_resamples, confidence, method)

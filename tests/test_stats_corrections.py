"""``reports.stats`` additions for issue #20: multiple-comparison corrections (Holm, BH) against
statsmodels' ``multipletests`` when installed and always against plain loops written here; d_z,
its bootstrap CI and the paired bootstrap CI of the difference of two d_z against resampling
loops written here with the same seeded draws (percentile: equal to the last digit; BCa: the
Efron-Tibshirani formula written out)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from robustkit.reports.stats import adjust_p, d_z, dz_ci, dz_difference_ci

B = 2000  # resamples in the loops below (fast, and plenty to compare draws one by one)


def _holm_loop(p):
    """Holm (1979) step-down, written as the textbook states it."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):  # rank 0 is the smallest p
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _bh_loop(p):
    """Benjamini-Hochberg step-up: p̃_(i) = min over j >= i of m p_(j) / j."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for k in range(m):
        out[order[k]] = min(1.0, min(m * p[order[j]] / (j + 1) for j in range(k, m)))
    return out


FAMILIES = [
    [0.01, 0.04, 0.03, 0.005],
    [0.2, 0.2, 0.01, 0.6, 0.049, 0.02, 0.02, 1.0],  # ties, a 1
    list(np.random.default_rng(3).uniform(0, 0.1, 40)),
    [0.5],
]


@pytest.mark.parametrize("p", FAMILIES)
def test_holm_and_bh_equal_plain_loops(p):
    assert adjust_p(p, "holm") == pytest.approx(_holm_loop(p), abs=1e-15)
    assert adjust_p(p, "bh") == pytest.approx(_bh_loop(p), abs=1e-12)
    assert adjust_p(p, "none") == p


@pytest.mark.parametrize("p", FAMILIES)
def test_holm_and_bh_equal_statsmodels(p):
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    assert adjust_p(p, "holm") == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert adjust_p(p, "bh") == pytest.approx(list(multipletests(p, method="fdr_bh")[1]))


def test_undefined_tests_are_not_in_the_family():
    """None stays None and does not count in m: the family is the defined tests."""
    p = [0.01, None, 0.04, None, 0.03]
    defined = [0.01, 0.04, 0.03]
    for method, loop in (("holm", _holm_loop), ("bh", _bh_loop)):
        got = adjust_p(p, method)
        assert got[1] is None and got[3] is None
        assert [got[0], got[2], got[4]] == pytest.approx(loop(defined))
    assert adjust_p([None, None], "holm") == [None, None]
    assert adjust_p([], "bh") == []


def test_adjust_p_refuses_bad_input():
    with pytest.raises(ValueError, match="correction must be one of holm, bh, none"):
        adjust_p([0.1], "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust_p([0.1, 1.5], "holm")


def test_d_z():
    d = np.array([0.3, -0.1, 0.8, 0.4, 0.25])
    assert d_z(d) == pytest.approx(d.mean() / d.std(ddof=1))
    assert d_z([1.0, 1.0, 1.0]) is None  # sd = 0
    assert d_z([2.0]) is None


def _loop_percentile(stat, arrays, seed, n_resamples, confidence=0.95):
    """The resampling loop: one set of image indices per resample, shared by every array
    (paired), drawn as rng.integers(0, n, (n_resamples, n)); percentile bounds (linear)."""
    rng = np.random.default_rng(seed)
    n = arrays[0].size
    idx = rng.integers(0, n, (n_resamples, n))
    theta = np.array([stat(*(a[row] for a in arrays)) for row in idx])
    alpha = (1 - confidence) / 2
    return theta, np.quantile(theta, [alpha, 1 - alpha])


def _loop_bca(stat, arrays, seed, n_resamples, confidence=0.95):
    """BCa (Efron & Tibshirani 1993, 14.3): bias z0 from the share of resamples below the
    estimate (ties count half), acceleration from the jackknife (leave one image out of every
    array)."""
    theta, _ = _loop_percentile(stat, arrays, seed, n_resamples, confidence)
    est = stat(*arrays)
    z0 = ndtri(((theta < est).sum() + (theta <= est).sum()) / (2 * theta.size))
    n = arrays[0].size
    jack = np.array([stat(*(np.delete(a, i) for a in arrays)) for i in range(n)])
    u = (n - 1) * (jack.mean() - jack)
    acc = (u ** 3).sum() / n ** 3 / (6 * ((u ** 2).sum() / n ** 2) ** 1.5)
    z = ndtri((1 - confidence) / 2)
    lo = ndtr(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    hi = ndtr(z0 + (z0 - z) / (1 - acc * (z0 - z)))
    return np.quantile(theta, [lo, hi])


def _dz1(d):
    return d.mean() / d.std(ddof=1)


RNG = np.random.default_rng(7)
D1 = RNG.normal(0.8, 1.0, 40)
D2 = 0.5 * D1 + RNG.normal(0.6, 0.4, 40)  # correlated with D1 over the images


@pytest.mark.parametrize("seed", [0, 11])
def test_dz_ci_equals_the_resampling_loop(seed):
    _, expected = _loop_percentile(_dz1, (D1,), seed, B)
    assert dz_ci(D1, seed, n_resamples=B, method="percentile") == pytest.approx(
        tuple(expected), rel=1e-12)
    assert dz_ci(D1, seed, n_resamples=B) == pytest.approx(
        tuple(_loop_bca(_dz1, (D1,), seed, B)), rel=1e-9)
    assert dz_ci(np.ones(5), seed) is None and dz_ci(D1[:2], seed) is None


@pytest.mark.parametrize("absolute", [True, False])
def test_dz_difference_ci_equals_the_paired_resampling_loop(absolute):
    a, b = -D1, D2  # signs differ: |d_z| and signed d_z differences are different statistics

    def stat(u, v):
        return abs(_dz1(v)) - abs(_dz1(u)) if absolute else _dz1(v) - _dz1(u)

    theta, expected = _loop_percentile(stat, (a, b), 5, B)
    got = dz_difference_ci(a, b, 5, n_resamples=B, absolute=absolute, method="percentile")
    assert got == pytest.approx(tuple(expected), rel=1e-12)
    assert dz_difference_ci(a, b, 5, n_resamples=B, absolute=absolute) == pytest.approx(
        tuple(_loop_bca(stat, (a, b), 5, B)), rel=1e-9)
    # the pairing matters: resampling the two explainers' images independently gives another
    # width (|d_z| of the two are positively correlated over the images: wider; the signed
    # d_z of -D1 and D2 negatively: narrower)
    rng = np.random.default_rng(5)
    unpaired = [stat(a[rng.integers(0, 40, 40)], b[rng.integers(0, 40, 40)]) for _ in range(B)]
    ratio = np.ptp(np.quantile(unpaired, [0.025, 0.975])) / (got[1] - got[0])
    assert ratio > 1.2 if absolute else ratio < 0.9


def test_dz_difference_ci_separates_a_known_case():
    """A strong effect (d_z ~ 5) against a weak one (d_z ~ 0.1): the CI excludes 0 on the
    right side; the same differences plus tiny noise: the CI covers 0."""
    rng = np.random.default_rng(0)
    strong = rng.normal(1.0, 0.2, 60)
    weak = rng.normal(0.1, 1.0, 60)
    lo, hi = dz_difference_ci(weak, strong, 0, n_resamples=B)
    assert lo > 0
    lo, hi = dz_difference_ci(strong, weak, 0, n_resamples=B)
    assert hi < 0
    lo, hi = dz_difference_ci(strong, strong + rng.normal(0, 1e-3, 60), 0, n_resamples=B)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="paired"):
        dz_difference_ci(strong, weak[:10], 0)
    assert dz_difference_ci(np.ones(10), weak[:10], 0) is None

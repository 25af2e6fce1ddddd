"""ε formatting and every check threshold at its edge (issue 18 §5; robustkit.evaluation.results
``format_eps``, evaluation.checks, evaluation.masking): the value exactly at each threshold, just
above and just below, on sizes other than 100 so a percentage is not a point count by chance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustkit.evaluation import EvalResult, post_checks, pre_checks
from robustkit.evaluation.checks import ZERO_GRADIENT_FAIL
from robustkit.evaluation.masking import (
    BLACK_BOX_GAIN_FAIL,
    FAIL_MIN_POINTS,
    GRADIENT_GAP_FAIL,
    GRADIENT_GAP_WARN,
    MONOTONE_FAIL,
    masking_checks,
)
from robustkit.evaluation.results import format_eps

# ---- format_eps ------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, text", [
    (8 / 255, "8/255"), (2 / 255, "2/255"), (1 / 255, "1/255"), (4 / 255, "4/255"),
    (16 / 255, "16/255"), (254 / 255, "254/255"),
    (0.3, "0.3"), (0.031, "0.031"), (0.5, "0.5"), (1e-3, "0.001"), (0.1, "0.1"),
    (0, "0"), (0.0, "0"), (1.0, "1"), (255 / 255, "1"), (2.0, "2"), (1.5, "1.5"),
    (1 - 1e-12, "1"), (1 + 1e-12, "1"),  # 255/255 to within 1e-9 is "1", never "255/255"
    # whole numbers of 255ths that a short decimal writes exactly stay decimals, as typed
    (0.2, "0.2"), (51 / 255, "0.2"), (0.6, "0.6"),
    # tiny budgets are not "0/255"
    (1e-12, "1e-12"), (1e-10, "1e-10"),
    # 8/255 to within 1e-9 of a 255th is 8/255; farther is the decimal it is
    ((8 + 5e-10) / 255, "8/255"), ((8 + 2e-9) / 255, "0.0313725"), (0.0313725, "0.0313725"),
    (float("nan"), "nan"), (float("inf"), "inf"),
])
def test_format_eps(eps, text):
    assert format_eps(eps) == text


# ---- masking thresholds on hand-made results -------------------------------------------------


def _flags(n: int, broken) -> torch.Tensor:
    out = torch.ones(n, dtype=torch.bool)
    out[list(broken)] = False
    return out


def _result(n: int, correct: dict[str, torch.Tensor]) -> EvalResult:
    return EvalResult(labels=torch.zeros(n, dtype=torch.long),
                      clean=torch.ones(n, dtype=torch.bool), correct=correct)


def _severity(checks, name):
    return {c.name: c.severity for c in checks}[name]


@pytest.mark.parametrize("n, gain, severity", [
    (100, 1, "warning"), (100, 2, "fail"),  # exactly 2 % and exactly FAIL_MIN_POINTS
    (150, 2, "warning"), (150, 3, "fail"),  # 1.33 % below, 2 % at
    (101, 2, "warning"), (101, 3, "fail"),  # 1.98 % just below, 2.97 % above
    (99, 2, "fail"),  # 2.02 % just above
    (50, 1, "warning"),  # 2 %, but one point: a lucky query
    (10, 1, "warning"), (10, 2, "fail"),
    (100, 0, "ok"),
])
def test_black_box_gain_edges(n, gain, severity):
    assert BLACK_BOX_GAIN_FAIL == 0.02 and FAIL_MIN_POINTS == 2
    res = _result(n, {"pgd20": _flags(n, range(5)), "square": _flags(n, range(5 + gain))})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20, 1)})
    assert _severity(checks, "black_box:square") == severity


@pytest.mark.parametrize("n, gap, severity", [
    (200, 9, "ok"), (200, 10, "warning"),  # 4.5 % below, 5 % at the warning
    (201, 10, "ok"), (199, 10, "warning"),  # 4.98 % just below, 5.03 % just above
    (200, 19, "warning"), (200, 20, "fail"),  # 9.5 %, 10 % at the failure
    (201, 20, "warning"), (199, 20, "fail"),  # 9.95 % just below, 10.05 % just above
    (10, 1, "warning"),  # 10 %, but one point: warns only
    (200, 0, "ok"),
])
def test_gradient_gap_edges(n, gap, severity):
    assert (GRADIENT_GAP_WARN, GRADIENT_GAP_FAIL) == (0.05, 0.10)
    # pgd20 and cw20 (different families: no monotone pair) on the same points
    res = _result(n, {"pgd20": _flags(n, range(1)), "cw20": _flags(n, range(1 + gap))})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20, 1),
                                           "cw20": ("pgd-cw", 20, 1)})
    assert _severity(checks, "gradient_gap:pgd20") == severity
    assert _severity(checks, "gradient_gap:cw20") == "ok"


@pytest.mark.parametrize("n, gap, kw, severity", [
    # n = 1000: tolerance max(1 / 1000, 0.002) = 0.2 %, strict; failure at 2 % (20 points)
    (1000, 2, {}, "ok"), (1000, 3, {}, "warning"), (1000, 19, {}, "warning"),
    (1000, 20, {}, "fail"), (999, 20, {}, "fail"), (1001, 20, {}, "warning"),
    # n = 100: tolerance one sample (1 %), strict: one point reversed is tolerated
    (100, 1, {}, "ok"), (100, 2, {}, "fail"),
    (100, 1, {"min_samples": 0, "rel_tol": 0.01}, "ok"),  # exactly at the tolerance
    (100, 1, {"min_samples": 0, "rel_tol": 0.0099}, "warning"),  # just above it
    (100, 0, {}, "ok"), (100, -5, {}, "ok"),  # the stronger attack is stronger
    # n = 200: tolerance one sample (0.5 %): two points (1 %) warn
    (200, 1, {}, "ok"), (200, 2, {}, "warning"), (200, 4, {}, "fail"),
])
def test_monotone_edges(n, gap, kw, severity):
    assert MONOTONE_FAIL == 0.02
    # pgd20 breaks 30 points, pgd100 (more steps) 30 - gap of them: gap points reversed
    res = _result(n, {"pgd20": _flags(n, range(30)), "pgd100": _flags(n, range(30 - gap))})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20, 1),
                                           "pgd100": ("pgd-ce", 100, 1)}, **kw)
    assert _severity(checks, "monotone:pgd20<pgd100") == severity


@pytest.mark.parametrize("bump, severity", [(0, "ok"), (-1, "ok"), (1, "fail")])
def test_perturbation_edge(bump, severity):
    eps = 8 / 255
    bound = eps * (1 + 1e-4) + 1e-6  # float32 rounding of the projection, and no more
    pert = {0: bound, -1: math.nextafter(bound, 0), 1: math.nextafter(bound, 1)}[bump]
    res = _result(4, {"pgd20": _flags(4, [])})
    res.max_perturbation = {"pgd20": pert}
    assert _severity(post_checks(res, eps=eps), "perturbation:pgd20") == severity


# ---- pre_checks ------------------------------------------------------------------------------


class Identity(nn.Module):
    """The input is the output: ``x`` of shape (N, K, 1, 1) gives logits x[:, :, 0, 0]."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * x.flatten(1)


def _logits_check(rows: torch.Tensor) -> str:
    x = rows[:, :, None, None].double()
    return _severity(pre_checks(Identity(), x, torch.zeros(len(x), dtype=torch.long)), "logits")


def test_logits_check_edges():
    tol = 1e-5
    probs = torch.softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    assert _logits_check(probs) == "fail"
    assert _logits_check(probs * (1 + 0.9 * tol)) == "fail"  # rows sum to 1 within tol
    assert _logits_check(probs * (1 + 1.1 * tol)) == "ok"  # just outside
    assert _logits_check(torch.log(probs)) == "ok"  # log-probabilities are logits


class Jitter(nn.Module):
    """Every second forward pass adds ``d`` to the (zero) output: a randomised model."""

    def __init__(self, d: float):
        super().__init__()
        self.d, self.calls = d, 0
        self.w = nn.Parameter(torch.zeros(4, 10, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x.flatten(1) @ self.w + self.d * (self.calls % 2 == 0)


@pytest.mark.parametrize("d, severity", [(1e-5, "ok"), (1e-5 * (1 + 1e-6), "fail"),
                                         (0.9e-5, "ok"), (1e-3, "fail")])
def test_determinism_edge(d, severity):
    x = torch.zeros(2, 4, 1, 1, dtype=torch.float64)
    checks = pre_checks(Jitter(d), x, torch.zeros(2, dtype=torch.long))
    assert _severity(checks, "deterministic") == severity


class Gate(nn.Module):
    """``W relu(x - 0.5)``: an image with every pixel <= 0.5 has a zero input gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.relu(x.flatten(1) - 0.5))


@pytest.mark.parametrize("n, zero, severity", [
    (100, 0, "ok"), (100, 1, "warning"), (100, 2, "fail"),  # exactly 2 %
    (101, 2, "warning"), (101, 3, "fail"),  # 1.98 % just below, 2.97 %
    (99, 2, "fail"),  # 2.02 % just above
    (50, 1, "warning"),  # 2 % but one point
    (10, 2, "fail"),
])
def test_zero_gradient_edges(n, zero, severity):
    assert ZERO_GRADIENT_FAIL == 0.02
    x = torch.full((n, 3, 2, 2), 0.75)
    x[:zero] = 0.25
    checks = pre_checks(Gate(), x, torch.zeros(n, dtype=torch.long))
    c = next(c for c in checks if c.name == "gradients")
    assert c.severity == severity and c.details["zero_gradient_points"] == zero


@pytest.mark.parametrize("classes, targets, severity", [(10, 9, "ok"), (10, 10, "fail"),
                                                        (11, 10, "ok"), (9, 9, "fail")])
def test_n_classes_edge(classes, targets, severity):
    x = torch.rand(2, classes, 1, 1, dtype=torch.float64) * 5
    checks = pre_checks(Identity(), x, torch.zeros(2, dtype=torch.long), num_targets=targets)
    assert _severity(checks, "n_classes") == severity
    assert "n_classes" not in {c.name for c in pre_checks(Identity(), x, torch.zeros(
        2, dtype=torch.long), num_targets=0)}


def test_logits_check_edges_of_each_bound():
    """Probabilities: every output < 1 + tol and > -tol, rows summing to 1 within tol (strict);
    tol = 2**-16 so that each row below sits exactly on the bound it tests."""
    tol = 2.0**-16

    def severity(*rows):
        x = torch.tensor(rows, dtype=torch.float64)[:, :, None, None]
        checks = pre_checks(Identity(), x, torch.zeros(len(x), dtype=torch.long), tol=tol)
        return _severity(checks, "logits")

    assert severity([1.0, 0.0, 0.0]) == "fail"  # one-hot rows are probabilities
    assert severity([1 + tol / 2, -tol / 4, -tol / 4]) == "fail"
    assert severity([1 + tol, -tol / 2, -tol / 2]) == "ok"  # max at 1 + tol
    assert severity([1 + 2 * tol, -tol / 2, -tol / 2, -tol / 2, -tol / 2]) == "ok"
    assert severity([1 + tol / 2, -tol / 2, 0.0]) == "fail"
    assert severity([1 + tol / 2, -tol, tol / 2]) == "ok"  # min at -tol
    assert severity([0.5, 0.5 + tol / 2]) == "fail"
    assert severity([0.5, 0.5 + tol]) == "ok"  # row sum at 1 + tol


class Drift(nn.Module):
    """Logits ``m`` (float64) except on the forward passes in ``off``, which add ``d``."""

    def __init__(self, m: float, d: float, off: tuple[int, ...]):
        super().__init__()
        self.m, self.d, self.off, self.calls = m, d, off, 0
        self.w = nn.Parameter(torch.zeros(4, 10, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x.flatten(1) @ self.w + self.m + self.d * (self.calls in self.off)


def _deterministic(model, **kw):
    x = torch.zeros(2, 4, 1, 1, dtype=torch.float64)
    return _severity(pre_checks(model, x, torch.zeros(2, dtype=torch.long), **kw),
                     "deterministic")


@pytest.mark.parametrize("rel, severity", [(1 - 1e-6, "ok"), (1 + 1e-6, "fail")])
def test_determinism_tolerance_scales_with_large_logits(rel, severity):
    """|logits| ~ 1000: passes may differ by tol x the first pass's largest |logit|."""
    assert _deterministic(Drift(1000.0, 1e-5 * 1000 * rel, off=(2,))) == severity


def test_determinism_compares_every_pass_with_the_first():
    """Only the first pass differs (passes 2 and 3 agree with each other): randomised."""
    assert _deterministic(Drift(0.0, 1e-3, off=(1,))) == "fail"


def test_determinism_default_repeats_and_a_single_pass():
    """Three passes by default (a fourth that differs is not looked at); one pass shows no
    randomness."""
    assert _deterministic(Drift(0.0, 1e-3, off=(4,))) == "ok"
    assert _deterministic(Drift(0.0, 1e-3, off=(4,)), repeats=4) == "fail"
    assert _deterministic(Drift(0.0, 1e-3, off=(2,)), repeats=1) == "ok"


def test_min_effort_edge():
    """Two steps make an attack iterative (it enters the gradient-gap check); one does not."""
    res = _result(100, {"pgd1": _flags(100, range(1)), "pgd2": _flags(100, range(2)),
                        "pgd20": _flags(100, range(30))})
    checks = masking_checks(res, strength={"pgd1": ("pgd-ce", 1, 1), "pgd2": ("pgd-ce", 2, 1),
                                           "pgd20": ("pgd-ce", 20, 1)})
    assert {c.name for c in checks if c.name.startswith("gradient_gap")} == {
        "gradient_gap:pgd2", "gradient_gap:pgd20"}
    assert _severity(checks, "gradient_gap:pgd2") == "fail"


def test_a_pair_strength_entry_is_one_restart():
    """``(family, steps)`` reads as one restart, so pgd20x2 ranks over it."""
    res = _result(100, {"pgd20": _flags(100, range(30)), "pgd20x2": _flags(100, range(20))})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20),
                                           "pgd20x2": ("pgd-ce", 20, 2)})
    assert _severity(checks, "monotone:pgd20<pgd20x2") == "fail"


def test_fractions_on_a_single_point():
    """One evaluated point: a gap of one point is the whole set (100 %), a warning only."""
    res = _result(1, {"pgd20": _flags(1, []), "cw20": _flags(1, [0])})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20, 1),
                                           "cw20": ("pgd-cw", 20, 1)})
    c = next(c for c in checks if c.name == "gradient_gap:pgd20")
    assert (c.severity, c.details["gap"]) == ("warning", 1.0)
    assert "(100.00% of the evaluated)" in c.message


def test_n_classes_with_a_single_forward_pass():
    """``repeats=1``: the class count comes from the one forward pass there is."""
    x = torch.rand(2, 10, 1, 1, dtype=torch.float64) * 5
    checks = pre_checks(Identity(), x, torch.zeros(2, dtype=torch.long), num_targets=9,
                        repeats=1)
    c = next(c for c in checks if c.name == "n_classes")
    assert c.severity == "ok" and c.details == {"num_classes": 10, "num_targets": 9}


class TinySlope(nn.Module):
    """float32 logits whose input gradient is tiny (~1e-43, subnormal) but not zero."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(4, 10)
        w[:, 0] = 1e-43
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_zero_gradient_check_is_per_point_not_a_batch_average():
    """Each point's own gradient is tested (the loss is summed): averaged over a batch of 1024
    the ~1e-43 gradients would underflow to exact zeros and the check would fail every point."""
    n = 1024
    x = torch.rand(n, 4, 1, 1)
    checks = pre_checks(TinySlope(), x, torch.zeros(n, dtype=torch.long))
    c = next(c for c in checks if c.name == "gradients")
    assert (c.severity, c.details["zero_gradient_points"]) == ("ok", 0)

"""Check severities and the gradient-masking thresholds on hand-made EvalResults
(robustkit.evaluation.checks, masking, and their footnote in results.model_info)."""

from __future__ import annotations

import pytest
import torch

from robustkit.evaluation import Check, EvalResult, post_checks
from robustkit.evaluation.masking import (
    BLACK_BOX_GAIN_FAIL,
    GRADIENT_GAP_FAIL,
    GRADIENT_GAP_WARN,
    masking_checks,
)
from robustkit.evaluation.results import build_results, model_info

N = 100
STRENGTH = {"pgd20": ("pgd-ce", 20)}


def _flags(broken: range | list[int], n: int = N) -> torch.Tensor:
    out = torch.ones(n, dtype=torch.bool)
    out[list(broken)] = False
    return out


def _aa(clean, seen, by_sub: dict[str, list[int]]):
    """AutoAttack components: ``by_sub`` = points each sub-attack broke (first), in run order."""
    after, out = seen.clone(), {}
    for sub, points in by_sub.items():
        after = after.clone()
        after[points] = False
        out[sub] = after
    return out


def _result(correct, components=None, protocol="standalone", clean=None):
    clean = torch.ones(N, dtype=torch.bool) if clean is None else clean
    return EvalResult(labels=torch.zeros(N, dtype=torch.long), clean=clean, correct=correct,
                      protocol=protocol, components=components or {})


def _severities(checks, prefix):
    return {c.name: c.severity for c in checks if c.name.startswith(prefix)}


def test_check_severity_and_dict():
    c = Check("x", "warning", "m")
    assert c.passed and not Check("x", "fail", "m").passed and Check("x", "ok", "m").passed
    assert c.to_dict() == {"name": "x", "passed": True, "severity": "warning", "message": "m",
                           "details": {}}
    with pytest.raises(ValueError, match="severity"):
        Check("x", True, "m")


def _square_after_pgd(square_only: int, pgd_broken=range(50, 60)):
    """pgd20 breaks ``pgd_broken``; AutoAttack's APGD-CE breaks the same points and Square
    ``square_only`` more (points 0, 1, ...), plus one point PGD also broke (not a gain)."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": list(pgd_broken)[:-1], "apgd-t": [],
                            "square": [*range(square_only), list(pgd_broken)[-1]]})
    return _result({"pgd20": _flags(pgd_broken), "autoattack": comp["square"]},
                   {"autoattack": comp})


@pytest.mark.parametrize("gain, severity", [(0, "ok"), (1, "warning"),
                                            (int(BLACK_BOX_GAIN_FAIL * N) - 1, "warning"),
                                            (int(BLACK_BOX_GAIN_FAIL * N), "fail"),
                                            (30, "fail")])
def test_square_inside_autoattack_thresholds(gain, severity):
    res = _square_after_pgd(gain)
    checks = post_checks(res, eps=1.0, strength=STRENGTH)
    assert _severities(checks, "black_box") == {"black_box:autoattack/square": severity}
    c = next(c for c in checks if c.name == "black_box:autoattack/square")
    assert c.details["only_black_box"] == gain  # the point PGD also broke is not counted


def test_one_point_never_fails_on_a_tiny_set():
    """1 of 10 points is 10 % but a single lucky Square query: a warning, not a failure."""
    seen = torch.ones(10, dtype=torch.bool)
    after = seen.clone()
    after[0] = False
    res = EvalResult(labels=torch.zeros(10, dtype=torch.long), clean=seen.clone(),
                     correct={"pgd20": seen.clone(), "aa": after},
                     components={"aa": {"apgd-ce": seen.clone(), "square": after}})
    assert _severities(masking_checks(res), "black_box") == {"black_box:aa/square": "warning"}


def test_square_gain_counts_only_points_every_gradient_attack_missed():
    """Standalone: Square's points that PGD broke are no sign of masking; points PGD missed
    are, even though AutoAttack's own gradient sub-attacks ran first."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": [0], "square": list(range(1, 11))})
    pgd_breaks_them = _result({"pgd20": _flags(range(0, 11)), "autoattack": comp["square"]},
                              {"autoattack": comp})
    assert _severities(masking_checks(pgd_breaks_them), "black_box") == {
        "black_box:autoattack/square": "ok"}
    pgd_misses_them = _result({"pgd20": _flags([0]), "autoattack": comp["square"]},
                              {"autoattack": comp})
    assert _severities(masking_checks(pgd_misses_them), "black_box") == {
        "black_box:autoattack/square": "fail"}


def test_cascade_square_after_pgd_fails():
    """clean, pgd20, autoattack in cascade: AutoAttack only saw what PGD-20 missed."""
    pgd = _flags(range(0, 40))
    comp = _aa(pgd, pgd, {"apgd-ce": [40], "square": list(range(41, 61))})
    res = _result({"pgd20": pgd, "autoattack": comp["square"]}, {"autoattack": comp},
                  protocol="cascade")
    checks = post_checks(res, eps=1.0, strength=STRENGTH)
    assert _severities(checks, "black_box")["black_box:autoattack/square"] == "fail"
    assert _severities(checks, "gradient_gap") == {"gradient_gap:pgd20": "ok",
                                                   "gradient_gap:autoattack/apgd-ce": "ok"}


def test_cascade_square_before_pgd_still_fails():
    """autoattack, then pgd20 in cascade: PGD-20 never saw the points Square broke, so they
    count as missed by every gradient attack (PGD-20's cumulative flags must not claim them)."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": list(range(10)), "square": list(range(10, 30))})
    aa = comp["square"]
    res = _result({"autoattack": aa, "pgd20": aa & _flags([30])}, {"autoattack": comp},
                  protocol="cascade")
    checks = masking_checks(res, strength=STRENGTH)
    assert _severities(checks, "black_box") == {"black_box:autoattack/square": "fail"}
    assert next(c for c in checks if c.name.startswith("black_box")).details[
        "only_black_box"] == 20


def test_standalone_square_and_torchattacks_square_are_black_box():
    res = _result({"pgd20": _flags(range(10)), "square": _flags(range(20)),
                   "torchattacks:Square(n_queries=100)": _flags(range(10))})
    assert _severities(masking_checks(res), "black_box") == {
        "black_box:square": "fail", "black_box:torchattacks:Square(n_queries=100)": "ok"}


@pytest.mark.parametrize("gap, severity", [(int(GRADIENT_GAP_WARN * N) - 1, "ok"),
                                           (int(GRADIENT_GAP_WARN * N), "warning"),
                                           (int(GRADIENT_GAP_FAIL * N) - 1, "warning"),
                                           (int(GRADIENT_GAP_FAIL * N), "fail"), (68, "fail")])
def test_gradient_gap_thresholds(gap, severity):
    """PGD-20 left ``gap`` more points correct than AutoAttack's APGD on the same points."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": list(range(gap + 5)), "apgd-t": [], "square": []})
    res = _result({"pgd20": _flags(range(5)), "autoattack": comp["square"]}, {"autoattack": comp})
    checks = post_checks(res, eps=1.0, strength=STRENGTH)
    assert _severities(checks, "gradient_gap") == {
        "gradient_gap:pgd20": severity, "gradient_gap:autoattack/apgd-ce+apgd-t": "ok"}
    c = next(c for c in checks if c.name == "gradient_gap:pgd20")
    assert c.details["vs"] == "autoattack/apgd-ce+apgd-t" and c.details["points"] == gap


def test_gradient_gap_compares_on_the_same_points():
    """Cascade (autoattack first, then pgd20): PGD-20 only saw AutoAttack's survivors, so its
    high cumulative accuracy is not a gap; PGD-20 breaking 12 of them is a gap of AutoAttack."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": list(range(40)), "square": []})
    aa = comp["square"]
    res = _result({"autoattack": aa, "pgd20": aa & _flags(range(40, 52))}, {"autoattack": comp},
                  protocol="cascade")
    assert _severities(masking_checks(res, strength=STRENGTH), "gradient_gap") == {
        "gradient_gap:pgd20": "ok", "gradient_gap:autoattack/apgd-ce": "fail"}


def test_single_step_attacks_and_unknown_attacks_are_not_gap_checked():
    res = _result({"fgsm": _flags(range(10)), "pgd20": _flags(range(60)),
                   "custom": _flags(range(5))})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20), "fgsm": ("pgd-ce", 1)})
    assert _severities(checks, "gradient_gap") == {}


def test_monotone_thresholds():
    strength = {"pgd20": ("pgd-ce", 20), "pgd100": ("pgd-ce", 100)}
    # one sample is tolerated (min_samples=1); 2 % of the points (and 2 points) fail
    for reversal, tolerance, severity in ((0, {}, "ok"), (1, {}, "ok"),
                                          (1, {"min_samples": 0, "rel_tol": 0.0}, "warning"),
                                          (2, {}, "fail")):
        res = _result({"pgd20": _flags(range(10)), "pgd100": _flags(range(10 - reversal))})
        checks = masking_checks(res, strength=strength, **tolerance)
        assert _severities(checks, "monotone") == {"monotone:pgd20<pgd100": severity}


def test_failures_reach_results_json_and_the_footnote():
    res = _square_after_pgd(30)
    checks = post_checks(res, eps=1.0, strength=STRENGTH)
    results = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=8 / 255,
                            seed=0, subset="first 100 test images",
                            attacks={"pgd20": {"family": "pgd"},
                                     "autoattack": {"family": "autoattack"}}, checks=checks)
    entry = next(c for c in results["checks"] if c["name"] == "black_box:autoattack/square")
    assert entry["passed"] is False and entry["severity"] == "fail"
    note = model_info(results)["footnote"]
    assert "gradient-masking check failed: autoattack/square broke 30 points" in note
    fine = _square_after_pgd(0)
    results = build_results(fine, model="m", dataset="cifar10", threat_model="Linf",
                            eps=8 / 255, seed=0, subset="first 100 test images",
                            checks=post_checks(fine, eps=1.0, strength=STRENGTH),
                            attacks={"pgd20": {}, "autoattack": {"family": "autoattack"}})
    assert "check" not in model_info(results)["footnote"]

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


# ---- what results.json keeps of each pre-check: message and details, ok and not ok -----------


class _Net(torch.nn.Module):
    """``fc(x.flatten(1))`` with an optional twist in ``forward`` (see the tests below)."""

    def __init__(self, k: int = 10, twist=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(12, k)
        self.twist = twist

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return self.twist(self, out) if self.twist else out


def _pre(model, n=4, **kw):
    from robustkit.evaluation import pre_checks

    x, y = torch.rand(n, 3, 2, 2), torch.zeros(n, dtype=torch.long)
    return {c.name: c.to_dict() for c in pre_checks(model.eval(), x, y, **kw)}


def _entry(severity, message, details=None):
    return {"passed": severity != "fail", "severity": severity, "message": message,
            "details": {} if details is None else details}


def test_pre_checks_records_of_a_sound_model():
    got = _pre(_Net(), num_targets=9)
    assert list(got) == ["eval_mode", "logits", "deterministic", "dynamic", "gradients",
                         "n_classes"]
    assert {k: {f: v for f, v in d.items() if f != "name"} for k, d in got.items()} == {
        "eval_mode": _entry("ok", "model is in eval mode", {"training_modules": []}),
        "logits": _entry("ok", "outputs are logits"),
        "deterministic": _entry("ok", "forward pass is deterministic", {"max_diff": 0.0}),
        "dynamic": _entry("ok", "forward pass takes no gradients", {"calls": 0}),
        "gradients": _entry("ok", "input gradients are non-zero", {"zero_gradient_points": 0}),
        "n_classes": _entry("ok", "10 classes for 9 target classes",
                            {"num_classes": 10, "num_targets": 9}),
    }


def test_pre_checks_without_targets_skip_the_class_count():
    assert list(_pre(_Net(k=2))) == ["eval_mode", "logits", "deterministic", "dynamic",
                                      "gradients"]


def test_pre_check_records_when_they_fire():
    from robustkit.evaluation import pre_checks

    def entry(d):
        return {f: v for f, v in d.items() if f != "name"}

    probs = _pre(_Net(twist=lambda m, out: out.softmax(-1)))["logits"]
    assert entry(probs) == _entry(
        "fail", "outputs look like probabilities (rows sum to 1); attacks need logits")

    def noisy(m, out):
        m.calls = getattr(m, "calls", 0) + 1
        return out + 1e-3 * (m.calls == 2)

    assert entry(_pre(_Net(twist=noisy))["deterministic"]) == _entry(
        "fail", "forward pass is randomised (outputs differ by 0.001); use EOT attacks "
        "(AutoAttack version='rand')", {"max_diff": pytest.approx(1e-3, rel=1e-5)})

    def grad(t):  # any function called "grad" counts, as in AutoAttack's check_dynamic
        return t

    assert entry(_pre(_Net(twist=lambda m, out: grad(out)))["dynamic"]) == _entry(
        "warning", "forward pass computes gradients (a dynamic defence); AutoAttack may be "
        "insufficient", {"calls": 1})

    assert entry(_pre(_Net(), num_targets=10)["n_classes"]) == _entry(
        "fail", "10 classes for 10 target classes: too few classes for the targeted attacks",
        {"num_classes": 10, "num_targets": 10})

    # 12 submodules in train mode: the first 10 are named
    model = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(10)], _Net())
    check = pre_checks(model.train(), torch.rand(2, 3, 2, 2), torch.zeros(2, dtype=torch.long))[0]
    assert entry(check.to_dict()) == _entry(
        "warning", "model is in train mode; it is evaluated in eval mode",
        {"training_modules": ["", *map(str, range(9))]})
    assert model.training

    zero = torch.full((100, 3, 2, 2), 0.75)
    zero[:2] = 0.25  # relu(x - 0.5) = 0 there: no input gradient

    gated = _Net()
    gated.forward = lambda x: gated.fc(torch.relu(x.flatten(1) - 0.5))
    got = {c.name: c for c in pre_checks(gated, zero, torch.zeros(100, dtype=torch.long))}
    assert entry(got["gradients"].to_dict()) == _entry(
        "fail", "2 of 100 points have a zero input gradient; gradient-based attacks are "
        "unreliable there", {"zero_gradient_points": 2})


@pytest.mark.parametrize("name", ["grad", "backward", "_make_grads"])
def test_dynamic_check_matches_each_autograd_name(name):
    """A forward pass that calls a function of any of AutoAttack's three names warns."""
    namespace: dict = {}
    exec(f"def {name}(t):\n    return t", namespace)
    fn = namespace[name]
    got = _pre(_Net(twist=lambda m, out: fn(out)))["dynamic"]
    assert (got["severity"], got["details"]) == ("warning", {"calls": 1})


def test_dynamic_check_gives_back_the_running_tracer():
    """A debugger's or coverage's trace function is still installed after the check."""
    import sys

    def tracer(frame, event, arg):
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        _pre(_Net())
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(before)


def test_pre_checks_log_ok_at_info_and_the_rest_at_warning(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="robustkit.evaluation.checks"):
        _pre(_Net(), num_targets=10)
    got = [(r.levelno, r.getMessage()) for r in caplog.records
           if r.name == "robustkit.evaluation.checks"]
    assert (logging.INFO, "check logits [ok]: outputs are logits") in got
    assert (logging.WARNING, "check n_classes [fail]: 10 classes for 10 target classes: too "
            "few classes for the targeted attacks") in got
    assert [lvl for lvl, _ in got] == [logging.INFO] * 5 + [logging.WARNING]


def test_finite_logits_records():
    from types import SimpleNamespace

    from robustkit.evaluation.checks import finite_logits

    ok = finite_logits(_result({"pgd20": _flags([])}))
    assert (ok.severity, ok.message, ok.details) == (
        "ok", "logits are finite on every evaluated point",
        {"nonfinite_points": 0, "per_pass": {}})
    # a result object from before nonfinite existed has nothing non-finite to report
    assert finite_logits(SimpleNamespace(n=4)).severity == "ok"
    res = _result({"pgd20": _flags([])})
    res.nonfinite = {"clean": ~_flags(range(25)), "pgd20": ~_flags([30, 31]),
                     "autoattack": ~_flags([])}
    bad = finite_logits(res)
    assert (bad.severity, bad.message) == (
        "fail", "the model's logits are NaN or inf on 27 of 100 points (25 under clean, "
        "2 under pgd20); they are counted as incorrect")
    assert bad.details == {"nonfinite_points": 27,
                           "per_pass": {"clean": 25, "pgd20": 2, "autoattack": 0},
                           "first_points": list(range(20))}


# ---- what results.json keeps of each post-check: message and details ------------------------


def _post_records(checks):
    return {c.name: (c.severity, c.message, c.details) for c in checks}


def test_post_check_records_of_every_kind():
    """200 points; pgd20, pgd100 (PGD-CE), cw20, cw40 (CW) and Square. Each gap below is the
    difference in correct points on the same points (as the checks compute it)."""
    n = 200

    def flags(broken):
        return _flags(broken, n)

    res = EvalResult(labels=torch.zeros(n, dtype=torch.long), clean=torch.ones(n, dtype=bool),
                     correct={"pgd20": flags(range(29)), "pgd100": flags(range(20)),
                              "cw20": flags(range(30)), "cw40": flags(range(30)),
                              "square": flags([*range(10), *range(40, 45)])},
                     max_perturbation={"pgd20": 0.03, "square": 0.05})
    strength = {"pgd20": ("pgd-ce", 20, 1), "pgd100": ("pgd-ce", 100, 1),
                "cw20": ("pgd-cw", 20, 1), "cw40": ("pgd-cw", 40, 1)}
    got = _post_records(post_checks(res, eps=8 / 255, strength=strength))
    white = ["pgd20", "pgd100", "cw20", "cw40"]
    assert got == {
        "finite_logits": ("ok", "logits are finite on every evaluated point",
                          {"nonfinite_points": 0, "per_pass": {}}),
        "perturbation:pgd20": ("ok", "max perturbation 0.03 <= eps 0.0313725",
                               {"max_perturbation": 0.03, "eps": 8 / 255}),
        "perturbation:square": ("fail", "max perturbation 0.05 EXCEEDS eps 0.0313725",
                                {"max_perturbation": 0.05, "eps": 8 / 255}),
        "black_box:square": (
            "fail", "square broke 5 points (2.50% of the evaluated) that every gradient attack "
            "(pgd20, pgd100, cw20, cw40) missed: possible gradient masking, try adaptive attacks",
            {"only_black_box": 5, "fraction": 0.025, "gradient_attacks": white}),
        "gradient_gap:pgd20": (
            "ok", "pgd20 left 1 more points (0.50% of the evaluated) correct than cw20 on the "
            "same points", {"gap": 0.005, "points": 1, "vs": "cw20"}),
        # a tie (10 points more than cw20 and than cw40): the earlier attack is named
        "gradient_gap:pgd100": (
            "warning", "pgd100 left 10 more points (5.00% of the evaluated) correct than cw20 "
            "on the same points: gradients unreliable or the weaker attack misconfigured "
            "(gradient masking?)", {"gap": 0.05, "points": 10, "vs": "cw20"}),
        "gradient_gap:cw20": (
            "ok", "cw20 is as strong as every other iterative gradient attack on the same points",
            {"gap": 0.0, "points": 0, "vs": "cw40"}),
        "gradient_gap:cw40": (
            "ok", "cw40 is as strong as every other iterative gradient attack on the same points",
            {"gap": 0.0, "points": 0, "vs": "cw20"}),
        "monotone:pgd20<pgd100": (
            "fail", "pgd100 left 9 more points correct than pgd20 on the same points: more "
            "steps and restarts gave a higher accuracy (masking?)",
            {"gap": 0.045, "robust_to_strong_only": 9, "family": "pgd-ce"}),
        "monotone:cw20<cw40": (
            "ok", "cw40 left 0 more points correct than cw20 on the same points",
            {"gap": 0.0, "robust_to_strong_only": 0, "family": "pgd-cw"}),
    }
    fine = EvalResult(labels=torch.zeros(n, dtype=torch.long), clean=torch.ones(n, dtype=bool),
                      correct={"pgd20": flags(range(29)), "square": flags(range(10))})
    assert _post_records(masking_checks(fine))["black_box:square"] == (
        "ok", "square broke 0 points (0.00% of the evaluated) that every gradient attack "
        "(pgd20) missed", {"only_black_box": 0, "fraction": 0.0, "gradient_attacks": ["pgd20"]})


def test_autoattack_units_and_their_group():
    """AutoAttack named "aa/v2": its sub-attacks are units named after it, its gradient
    sub-attacks together are one iterative unit (breaking what any of them broke), and that
    group is not listed as one more gradient attack Square got past."""
    seen = torch.ones(N, dtype=torch.bool)
    comp = _aa(seen, seen, {"apgd-ce": list(range(5)), "apgd-t": list(range(5, 20)),
                            "square": [20, 21, 22]})
    res = _result({"pgd20": _flags(range(20)), "aa/v2": comp["square"]}, {"aa/v2": comp})
    got = _post_records(masking_checks(res, strength=STRENGTH))
    assert set(got) == {"black_box:aa/v2/square", "gradient_gap:pgd20",
                        "gradient_gap:aa/v2/apgd-ce+apgd-t"}
    assert got["black_box:aa/v2/square"][0] == "fail"
    assert got["black_box:aa/v2/square"][2]["gradient_attacks"] == [
        "pgd20", "aa/v2/apgd-ce", "aa/v2/apgd-t"]
    assert got["gradient_gap:aa/v2/apgd-ce+apgd-t"] == (
        "ok", "aa/v2/apgd-ce+apgd-t is as strong as every other iterative gradient attack on "
        "the same points", {"gap": 0.0, "points": 0, "vs": "pgd20"})


def test_post_checks_pass_their_options_on():
    res = _result({"pgd20": _flags(range(10)), "pgd100": _flags(range(9)),
                   "mybb": _flags(range(20))})
    strength = {"pgd20": ("pgd-ce", 20, 1), "pgd100": ("pgd-ce", 100, 1)}

    def run(**kw):
        return _severities(post_checks(res, eps=1.0, strength=strength, **kw), "")

    # one point of 100 reversed: tolerated by min_samples=1 (the default), not by 0.2 %
    assert run()["monotone:pgd20<pgd100"] == "ok" and "black_box:mybb" not in run()
    assert run(black_box=("mybb",))["black_box:mybb"] == "fail"
    assert run(min_samples=0)["monotone:pgd20<pgd100"] == "warning"
    assert run(min_samples=0, rel_tol=0.0099)["monotone:pgd20<pgd100"] == "warning"
    assert run(min_samples=0, rel_tol=0.01)["monotone:pgd20<pgd100"] == "ok"


def test_post_checks_monotone_defaults_on_200_points():
    """Defaults: a reversal warns above max(1 / n, 0.2 %): on 200 points, two reversed are
    1 % (a warning), one is 0.5 % (tolerated)."""
    n = 200
    strength = {"pgd20": ("pgd-ce", 20, 1), "pgd100": ("pgd-ce", 100, 1)}
    for reversed_, severity in ((1, "ok"), (2, "warning")):
        res = EvalResult(labels=torch.zeros(n, dtype=torch.long),
                         clean=torch.ones(n, dtype=torch.bool),
                         correct={"pgd20": _flags(range(10), n),
                                  "pgd100": _flags(range(10 - reversed_), n)})
        checks = _severities(post_checks(res, eps=1.0, strength=strength), "monotone")
        assert checks == {"monotone:pgd20<pgd100": severity}

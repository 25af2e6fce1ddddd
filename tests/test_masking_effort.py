"""The ``monotone`` masking check ranks attacks by (steps, restarts) (issue 18 §4;
robustkit.evaluation.masking, attacks.specs.strength): restarts count (``pgd20x5`` over
``pgd20``), ``pgd20x5`` and ``pgd50`` are never failed against each other in either order, and
restarts of a single step do not make an attack iterative (``pgd1x20`` is not over ``pgd10``:
the product ``steps x restarts`` called the sound shipped MNIST model masked for it)."""

from __future__ import annotations

import pytest
import torch

from robustkit.attacks.specs import parse_attacks, strength
from robustkit.evaluation import EvalResult, post_checks
from robustkit.evaluation.masking import masking_checks

N = 100


def _result(broken: dict[str, int]) -> EvalResult:
    """Each attack breaks its first ``broken[name]`` points (nested sets: the stronger attack
    breaks everything the weaker one does), in the given order."""
    correct = {}
    for name, k in broken.items():
        flags = torch.ones(N, dtype=torch.bool)
        flags[:k] = False
        correct[name] = flags
    return EvalResult(labels=torch.zeros(N, dtype=torch.long),
                      clean=torch.ones(N, dtype=torch.bool), correct=correct)


def _monotone(text: str, broken: dict[str, int]) -> dict[str, str]:
    specs = parse_attacks(text)
    res = _result({s.name: broken[s.name] for s in specs})  # result order = --attacks order
    return {c.name: c.severity for c in masking_checks(res, strength=strength(specs))
            if c.name.startswith("monotone")}


@pytest.mark.parametrize("text", ["pgd20x5,pgd50", "pgd50,pgd20x5"])
@pytest.mark.parametrize("broken", [{"pgd20x5": 40, "pgd50": 30},  # the restarts win by 10 %
                                    {"pgd20x5": 30, "pgd50": 40}])  # the steps win by 10 %
def test_pgd20x5_and_pgd50_are_not_failed_against_each_other(text, broken):
    assert _monotone(text, broken) == {}


@pytest.mark.parametrize("text", ["pgd20,pgd20x5,pgd50", "pgd50,pgd20x5,pgd20"])
def test_restarts_count(text):
    """pgd20x5 leaving 5 % more points correct than pgd20 fails (steps alone would tie them);
    pgd20x5 and pgd50 each over pgd20, not against each other."""
    checks = _monotone(text, {"pgd20": 30, "pgd20x5": 25, "pgd50": 35})
    assert checks == {"monotone:pgd20<pgd20x5": "fail", "monotone:pgd20<pgd50": "ok"}


@pytest.mark.parametrize("text", ["pgd1x20,pgd10", "pgd10,pgd1x20"])
def test_restarts_of_one_step_are_not_iterations(text):
    """The reproduced false alarm: twenty single ε/4 steps left 3 % more points correct than
    ten chained steps on the shipped robust SmallCNN, and monotone:pgd10<pgd1x20 failed."""
    specs = parse_attacks(text)
    res = _result({s.name: {"pgd1x20": 1, "pgd10": 4}[s.name] for s in specs})
    names = {c.name: c.severity for c in post_checks(res, eps=1.0, strength=strength(specs))}
    assert not any(k.startswith("monotone") for k in names)
    assert "gradient_gap:pgd1x20" not in names  # not iterative: no gap check either
    assert "gradient_gap:pgd10" not in names  # the only iterative attack: nothing to compare


def test_a_chain_gives_the_neighbouring_pairs_only():
    checks = _monotone("pgd100x5,pgd20,pgd50,pgd20x5,pgd10x5,cw30,cw30x2",
                       {"pgd20": 10, "pgd50": 11, "pgd20x5": 12, "pgd100x5": 13, "pgd10x5": 11,
                        "cw30": 5, "cw30x2": 6})
    assert checks == {
        "monotone:pgd20<pgd20x5": "ok", "monotone:pgd20<pgd50": "ok",
        "monotone:pgd10x5<pgd20x5": "ok", "monotone:pgd20x5<pgd100x5": "ok",
        "monotone:pgd50<pgd100x5": "ok", "monotone:cw30<cw30x2": "ok"}  # no CE/CW mixing


def test_pgd_and_cw_are_separate_families():
    assert strength(parse_attacks("pgd20,cw20x2,fgsm")) == {
        "pgd20": ("pgd-ce", 20, 1), "cw20x2": ("pgd-cw", 20, 2)}


def test_pairs_of_the_older_strength_form_still_work():
    """``(family, effort)`` pairs (library callers): effort steps, one restart."""
    res = _result({"pgd20": 10, "pgd100": 7})
    checks = masking_checks(res, strength={"pgd20": ("pgd-ce", 20), "pgd100": ("pgd-ce", 100)})
    assert {c.name: c.severity for c in checks if c.name.startswith("monotone")} == {
        "monotone:pgd20<pgd100": "fail"}

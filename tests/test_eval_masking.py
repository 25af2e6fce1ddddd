"""Gradient masking is flagged with the default attacks: the issue's masked model (input
quantisation plus a tiny decoy linear term) fails the Square check end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks import AutoAttack
from robustkit.attacks.pgd import PGD
from robustkit.evaluation import evaluate_attacks, post_checks
from robustkit.evaluation.results import build_results, model_info
from robustkit.testing import LinearModel, random_batch

EPS = 0.05  # less than half a quantisation step (1/8): only pixels near a rounding edge move


class Masked(nn.Module):
    """``f(round(4x)/4) - 1e-3 * f_lin(x)``: the rounding has a zero gradient, so the input
    gradient is the decoy's alone, non-zero and pointing the wrong way."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LinearModel((3, 8, 8), 10)

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4) - 1e-3 * self.net.fc(x.flatten(1))


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    build = AutoAttack.build

    def few_queries(self, device):
        aa = build(self, device)
        aa.square.n_queries = 100  # 5,000 in the real thing; 100 already breaks most points
        aa.apgd.n_restarts = 1  # as version="standard" sets it ("custom" keeps the default 5)
        return aa

    monkeypatch.setattr(AutoAttack, "build", few_queries)


def _evaluate(model, attacks_of, protocol="standalone"):
    x, _ = random_batch(64, (3, 8, 8), 10, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct
    attacks = attacks_of(model)
    res = evaluate_attacks(model, (x, y), attacks, batch_size=64, protocol=protocol)
    checks = post_checks(res, eps=EPS, strength={"pgd10": ("pgd-ce", 10)})
    results = build_results(res, model="masked", dataset="cifar10", threat_model="Linf", eps=EPS,
                            seed=0, subset="first 64 test images", checks=checks,
                            attacks={k: {"family": "autoattack", "version": "custom"}
                                     if k == "autoattack" else {"family": "pgd"} for k in attacks})
    return res, {c.name: c for c in checks}, results


def _default(model):  # the default evaluation's shape: PGD, then AutoAttack (which has Square)
    return {"pgd10": PGD(model, eps=EPS, alpha=EPS / 4, steps=10),
            "autoattack": AutoAttack(model, eps=EPS, version="custom",
                                     attacks=["apgd-ce", "square"])}


@pytest.mark.parametrize("protocol", ["standalone", "cascade"])
def test_masked_model_fails_the_square_check(protocol):
    res, checks, results = _evaluate(Masked().eval(), _default, protocol)
    acc = res.accuracy()
    assert acc["pgd10"] > 0.3 and acc["autoattack"] < acc["pgd10"] - 0.2  # the pattern
    square = checks["black_box:autoattack/square"]
    assert square.severity == "fail" and not square.passed
    assert square.details["only_black_box"] >= 0.2 * 64
    entry = next(c for c in results["checks"] if c["name"] == "black_box:autoattack/square")
    assert entry["passed"] is False and entry["severity"] == "fail"
    assert "gradient-masking check failed: autoattack/square" in model_info(results)["footnote"]


def test_masked_model_fails_with_a_standalone_square():
    """``--attacks clean,pgd10,square`` builds Square as a one-attack AutoAttack."""
    def attacks(model):
        return {"pgd10": PGD(model, eps=EPS, alpha=EPS / 4, steps=10),
                "square": AutoAttack(model, eps=EPS, version="custom", attacks=["square"])}

    _, checks, _ = _evaluate(Masked().eval(), attacks)
    assert checks["black_box:square/square"].severity == "fail"


def test_a_normal_model_passes():
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).eval()
    res, checks, results = _evaluate(model, lambda m: {
        "pgd10": PGD(m, eps=0.02, alpha=0.005, steps=10),
        "autoattack": AutoAttack(m, eps=0.02, version="custom", attacks=["apgd-ce", "square"])})
    assert 0 < res.accuracy()["autoattack"] < 1  # the attacks did something, not everything
    assert checks["black_box:autoattack/square"].severity == "ok"
    assert all(c.severity == "ok" for c in checks.values()), {
        k: c.message for k, c in checks.items() if c.severity != "ok"}
    assert "check" not in model_info(results).get("footnote", "")

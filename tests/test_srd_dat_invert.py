"""SRD-DAT's inverted budget map (issue 20 (c), an ablation): fragile samples get the larger
budget, ``ε_i = c_i·[ε_lo + (ε_hi − ε_lo)·(1 − r_i^q)]``, misclassified samples unchanged.

Oracle: Module A written out per sample in plain Python floats (probabilities, gap, skewness
with the uniform rule, ŝ, r, ε), on clean logits the test writes itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustkit.attacks.base import AttackResult
from robustkit.objectives import SRDDAT, TrainContext, create_objective
from robustkit.objectives.functional import budget_map

K, M = 10, 4
S_MAX = (K - 2) / math.sqrt(K - 1)

# (label, clean logits): robust, fragile, misclassified, flat rivals, near-uniform, tie-ish
_ROWS = [
    (0, [30, 4, 4, 4, 4, 4, 4, 4, 4, 4]),
    (1, [8, 12, 11, 3, 3, 3, 3, 3, 3, 3]),
    (5, [3, 3, 3, 3, 3, 10, 14, 3, 3, 3]),  # misclassified
    (9, [9, 9, 9, 9, 9, 9, 9, 9, 9, 13]),
    (2, [13, 13, 13.4, 13, 13, 13, 13, 3, 3, 3]),
    (0, [16, 15.5, 2, 2, 2, 2, 2, 2, 2, 2]),
    (7, [4, 4, 4, 4, 4, 4, 4, 17, 15, 4]),
    (3, [3, 12, 3, 3, 3, 3, 11, 3, 3, 3]),  # misclassified
]


class Groups(nn.Module):
    """logit_k = mean of x's k-th group of M pixels: the test writes the clean logits."""

    def forward(self, x):
        return x.flatten(1).view(-1, K, M).mean(2)


class Probe:
    """An attack that records the budgets and step sizes it is given."""

    def perturb(self, x, y, **kw):
        self.kw = kw
        return AttackResult(x.clone(), {})


def _batch():
    logits = torch.tensor([row for _, row in _ROWS], dtype=torch.float64)
    x = logits[:, None, :, None].expand(-1, 1, K, M).contiguous()
    return x, torch.tensor([y for y, _ in _ROWS])


def _reference(eps_lo, eps_hi, q, lambda_gap, misclassified, invert):
    """Module A per sample, plain floats."""
    out = []
    for y, row in _ROWS:
        z = [math.exp(v - max(row)) for v in row]
        p = [v / sum(z) for v in z]
        order = sorted(p, reverse=True)
        gap = order[0] - order[1]
        dev = [v - 1 / K for v in p]
        m2 = sum(d * d for d in dev) / K
        m3 = sum(d ** 3 for d in dev) / K
        s = 0.0 if m2 < 1e-12 else m3 / m2 ** 1.5
        s_hat = 0.5 * (1 + max(-1.0, min(1.0, s / S_MAX)))
        r = lambda_gap * gap + (1 - lambda_gap) * s_hat
        correct = max(range(K), key=lambda k: p[k]) == y
        if not correct:
            out.append(0.0 if misclassified == "clean" else eps_hi)
        elif invert:
            out.append(eps_lo + (eps_hi - eps_lo) * (1 - r ** q))
        else:
            out.append(eps_lo + (eps_hi - eps_lo) * r ** q)
    return torch.tensor(out, dtype=torch.float64)


def _budgets(**hp):
    probe = Probe()
    objective = SRDDAT(Groups().double(), probe, **hp)
    x, y = _batch()
    adv = objective.perturb(x, y, TrainContext(epoch=2, epochs=10))
    assert torch.equal(adv.info["eps"], probe.kw["eps"])
    return probe.kw["eps"].double(), probe.kw["alpha"].double()


@pytest.mark.parametrize("q", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("misclassified", ["clean", "uniform"])
def test_inverted_budgets_against_a_per_sample_reference(q, misclassified):
    hp = dict(eps_lo=0.1, eps_hi=0.3, q=q, lambda_gap=0.6, step_ratio=0.25,
              misclassified=misclassified)
    eps, alpha = _budgets(**hp, invert_budget=True)
    want = _reference(0.1, 0.3, q, 0.6, misclassified, invert=True)
    torch.testing.assert_close(eps, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(alpha, 0.25 * eps)
    default, _ = _budgets(**hp)  # the default map is unchanged, against the same reference
    torch.testing.assert_close(default, _reference(0.1, 0.3, q, 0.6, misclassified, False),
                               rtol=1e-6, atol=1e-8)
    correct = torch.tensor([i not in (2, 7) for i in range(len(_ROWS))])
    # the reflection within [eps_lo, eps_hi]: the two maps' budgets sum to eps_lo + eps_hi
    torch.testing.assert_close((eps + default)[correct],
                               torch.full((int(correct.sum()),), 0.4, dtype=torch.float64))
    torch.testing.assert_close(eps[~correct], default[~correct])  # misclassified: unchanged
    # fragile samples get the larger budget: the order of budgets is reversed
    r_order = torch.argsort(default[correct])
    assert torch.equal(torch.argsort(eps[correct], descending=True), r_order)


def test_budget_map_invert_edges():
    score = torch.tensor([0.0, 0.25, 1.0, 1.7, -0.3])  # out-of-range scores are clamped
    correct = torch.tensor([True, True, True, True, False])
    eps = budget_map(score, correct, 0.1, 0.5, q=2.0, misclassified="uniform", invert=True)
    want = [0.5, 0.1 + 0.4 * (1 - 0.0625), 0.1, 0.1, 0.5]
    torch.testing.assert_close(eps, torch.tensor(want))
    default = budget_map(score, correct, 0.1, 0.5, q=2.0, misclassified="uniform")
    torch.testing.assert_close(default, torch.tensor([0.1, 0.1 + 0.4 * 0.0625, 0.5, 0.5, 0.5]))


def test_registry_default_and_bad_values():
    objective = create_objective("srd_dat", Groups(), invert_budget=True)
    assert objective.invert_budget is True
    assert SRDDAT(Groups()).invert_budget is False
    with pytest.raises(ValueError, match="invert_budget"):
        SRDDAT(Groups(), invert_budget="yes")

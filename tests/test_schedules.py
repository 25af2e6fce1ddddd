"""The training schedules (robustkit/objectives/schedules.py, methods.md §2.4, §3.3, §7.1) against
the papers' rules written out plainly, at every epoch, plus every edge of the module.

FAT (zjfheart/Friendly-Adversarial-Training: FAT.py, FAT_for_TRADES.py) and GAIRAT (GAIRAT.py)
count epochs from 1: their loops run ``for epoch in range(start_epoch, epochs)`` and call
``adjust_tau(epoch + 1, ...)`` / ``adjust_Lambda(epoch + 1)``. FAT's 120-epoch rule is τ = 0 for
epochs <= 50, 1 for <= 90, 2 after (methods.md §2.4), so 0-based epoch 50 (the 51st) has τ = 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from robustkit.attacks.base import AttackResult
from robustkit.objectives import FAT, TrainContext
from robustkit.objectives import schedules as S
from robustkit.testing import LinearModel


def _fat_paper_tau(epoch_from_1: int) -> int:
    """FAT.py's adjust_tau (120 epochs, dynamictau=True), verbatim in substance."""
    if epoch_from_1 <= 50:
        return 0
    if epoch_from_1 <= 90:
        return 1
    return 2


def _rescaled_tau(epoch_from_1: int, epochs: int, rule=((50 / 120, 0), (90 / 120, 1))) -> int:
    """The same rule with its breakpoints as fractions of T (epochs counted from 1)."""
    for fraction, tau in rule:
        if epoch_from_1 <= fraction * epochs + 1e-9:
            return tau
    return 2


# ----------------------------------------------------------------------------- FAT's τ
def test_fat_tau_every_epoch_of_the_papers_120_epoch_run():
    got = [S.tau_schedule(e, 120, S.FAT_TAU) for e in range(120)]
    assert got == [_fat_paper_tau(e + 1) for e in range(120)]
    assert (got.count(0), got.count(1), got.count(2)) == (50, 40, 30)
    assert got[49] == 0 and got[50] == 1 and got[89] == 1 and got[90] == 2


@pytest.mark.parametrize("epochs, expected", [
    (10, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]),  # 50/120·10 = 4.17, 90/120·10 = 7.5
    (3, [0, 1, 2]),  # 1.25, 2.25
    (12, [0] * 5 + [1] * 4 + [2] * 3),  # 5, 9: breakpoints exactly on epochs
])
def test_fat_tau_rescaled_to_short_runs(epochs, expected):
    got = [S.tau_schedule(e, epochs, S.FAT_TAU) for e in range(epochs)]
    assert got == expected == [_rescaled_tau(e + 1, epochs) for e in range(epochs)]


class _Probe:
    """An attack that records the τ it is given and returns x unchanged."""

    def __init__(self) -> None:
        self.taus: list[int | None] = []

    def perturb(self, x, y, **kw):
        self.taus.append(kw.get("tau"))
        n = x.shape[0]
        return AttackResult(x.clone(), {"steps_used": torch.zeros(n, dtype=torch.long)})


@pytest.mark.parametrize("epochs", [120, 10, 3])
@pytest.mark.parametrize("base", ["at", "trades"])
def test_fat_objective_uses_the_papers_tau_at_every_epoch(epochs, base):
    probe = _Probe()
    model = LinearModel((1, 2, 2), 3)
    fat = FAT(model, probe, base=base, omega=0.0)  # default tau_schedule = FAT_TAU
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2])
    for epoch in range(epochs):
        ctx = TrainContext(epoch=epoch, epochs=epochs)
        out = fat(x, y, ctx)
        expected = _rescaled_tau(epoch + 1, epochs)
        if epochs == 120:
            expected = _fat_paper_tau(epoch + 1)
        assert probe.taus[-1] == expected, (epoch, epochs)
        assert float(out.metrics["tau_t"]) == expected


def test_fat_tau_constants():
    assert S.FAT_TAU == ((50 / 120, 0), (90 / 120, 1), (1.0, 2))
    assert S.SRD_TAU == ((0.4, 0), (0.75, 1), (1.0, 2))
    # SRD-DAT's rounded rule: 0.4T epochs at τ = 0, up to 0.75T at 1, then 2 (T = 20: 8, 7, 5)
    got = [S.tau_schedule(e, 20) for e in range(20)]
    assert (got.count(0), got.count(1), got.count(2)) == (8, 7, 5)


# ----------------------------------------------------------------------------- tau_schedule
def test_tau_schedule_int_and_none_are_constant():
    for epoch in (0, 3, 9):
        assert S.tau_schedule(epoch, 10, 0) == 0
        assert S.tau_schedule(epoch, 10, 7) == 7
        assert S.tau_schedule(epoch, 10, None) is None


def test_tau_schedule_breakpoints_exactly_on_an_epoch_despite_float_error():
    assert 0.28 * 100 > 28 and 0.57 * 100 < 57  # 28.000000000000004 and 56.99999999999999
    sched = ((0.28, 0), (0.57, 1), (1.0, 4))
    got = [S.tau_schedule(e, 100, sched) for e in range(100)]
    assert got.index(1) == 28 and got.index(4) == 57  # the 57th epoch (0-based 56) <= 0.57·100
    got = [S.tau_schedule(e, 10, sched) for e in range(10)]
    assert got == [0, 0, 1, 1, 1, 4, 4, 4, 4, 4]  # 2.8 and 5.7
    assert [S.tau_schedule(e, 10, ((0.4, 0), (1.0, 1))) for e in (3, 4)] == [0, 1]  # 4th <= 4


def test_tau_schedule_past_the_last_breakpoint_keeps_its_tau():
    sched = ((0.2, 0), (0.5, 1))
    assert [S.tau_schedule(e, 10, sched) for e in range(10)] == [0, 0] + [1] * 8
    assert S.tau_schedule(9, 10, ((0.5, 3),)) == 3
    assert S.tau_schedule(15, 10, S.FAT_TAU) == 2  # past T too
    assert S.tau_schedule(0, 1, S.FAT_TAU) == 2  # T = 1: the one epoch is past 50/120
    assert S.tau_schedule(0, 3, ((1 / 3, 5), (1.0, 6))) == 5


def test_tau_schedule_accepts_lists_and_integral_floats():
    assert S.tau_schedule(0, 10, [[0.5, 1.0], [1, 2]]) == 1
    assert isinstance(S.tau_schedule(0, 10, [[0.5, 1.0], [1, 2]]), int)
    S.check_tau_schedule([[0.5, 1.0], [1, 2]])
    S.check_tau_schedule(((1.0, 0),))


@pytest.mark.parametrize("epoch, epochs, match", [(0, 0, "epochs"), (3, -1, "epochs"),
                                                  (-1, 10, "epoch")])
def test_schedules_refuse_bad_epochs(epoch, epochs, match):
    for fn in (lambda: S.tau_schedule(epoch, epochs, S.FAT_TAU),
               lambda: S.tau_schedule(epoch, epochs, None),
               lambda: S.gamma_t(epoch, epochs),
               lambda: S.gairat_lambda(epoch, epochs),
               lambda: S.warmup_done(epoch, epochs, 0.1)):
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("bad", [
    True, False, -1, (), [],
    ((0.5, 1), (0.5, 2)),  # not increasing
    ((0.6, 0), (0.5, 1)),  # decreasing
    ((0.0, 1),),  # fraction 0
    ((-0.1, 1),),
    ((1.2, 1),),  # beyond T
    ((0.5, 1.5),),  # non-integer τ
    ((0.5, -1),),  # negative τ
    ((0.5, True),),  # a bool is not a τ
    ((0.5,),), ((0.5, 1, 2),), "abc", 0.5, ((None, 1),),
])
def test_check_tau_schedule_refusals(bad):
    # the message opens with the argument's default name (the config key), nothing around it
    with pytest.raises(ValueError, match=r"^tau_schedule[ :]"):
        S.check_tau_schedule(bad)


def test_check_tau_schedule_names_the_argument_and_accepts_the_valid():
    with pytest.raises(ValueError, match="my_tau"):
        S.check_tau_schedule(-2, name="my_tau")
    for ok in (None, 0, 3, S.FAT_TAU, S.SRD_TAU, ((0.5, 0),), ((0.25, 0), (0.5, 0), (1.0, 0))):
        S.check_tau_schedule(ok)


# ----------------------------------------------------------------------------- gamma_t
def _gamma_rule(epoch, epochs, gamma_max, start, end):
    """methods.md §3.3 B item 4: 0 before start·T, linear to γ_max at end·T, then γ_max."""
    t = epoch / epochs
    if t < start:
        return 0.0
    if t >= end:
        return gamma_max
    return gamma_max * (t - start) / (end - start)


@pytest.mark.parametrize("epochs, gamma_max, ramp", [(10, 1.0, (0.3, 0.6)), (120, 2.5, (0.3, 0.6)),
                                                     (7, 1.0, (0.2, 0.9)), (20, 3.0, (0.0, 0.5)),
                                                     (10, 1.0, (0.5, 1.0))])
def test_gamma_t_every_epoch(epochs, gamma_max, ramp):
    for epoch in range(epochs):
        got = S.gamma_t(epoch, epochs, gamma_max, ramp)
        assert got == pytest.approx(_gamma_rule(epoch, epochs, gamma_max, *ramp), abs=1e-12)


def test_gamma_t_before_at_mid_end_after():
    assert S.gamma_t(2, 10) == 0.0  # before 0.3T
    assert S.gamma_t(3, 10) == 0.0  # at the start: the ramp begins at 0
    assert S.gamma_t(4, 10) == pytest.approx(1 / 3)  # inside, not the midpoint
    assert S.gamma_t(45, 100, 2.0) == pytest.approx(1.0)  # the midpoint
    assert S.gamma_t(6, 10) == 1.0  # at the end
    assert S.gamma_t(9, 10, 1.5) == 1.5  # after
    assert S.gamma_t(35, 100, 1.0) == pytest.approx(1 / 6)  # asymmetric: pins (t - a)/(b - a)
    assert S.gamma_t(0, 10, 1.0, (0.0, 0.0)) == 1.0  # a step at 0: on from the start


def test_gamma_t_equal_ends_is_a_step():
    assert [S.gamma_t(e, 10, 2.0, (0.5, 0.5)) for e in range(10)] == [0.0] * 5 + [2.0] * 5
    # the step lands on its epoch despite 0.1·3 = 0.30000000000000004 > 3/10
    assert [S.gamma_t(e, 10, 1.0, (0.1 * 3, 0.1 * 3)) for e in (2, 3)] == [0.0, 1.0]
    assert S.gamma_t(3, 10, 1.0, (0.3, 0.7)) == 0.0 and S.gamma_t(7, 10, 1.0, (0.3, 0.7)) == 1.0


@pytest.mark.parametrize("ramp", [(0.6, 0.3), (-0.1, 0.5)])
def test_gamma_t_refuses_a_bad_ramp(ramp):
    with pytest.raises(ValueError, match="ramp"):
        S.gamma_t(1, 10, 1.0, ramp)


# ----------------------------------------------------------------------------- GAIRAT's λ
def _gairat_reference(epoch_from_1, epochs, lam, lambda_max, schedule, switch):
    """GAIRAT.py's adjust_Lambda (WRN branch): λ_max until epoch ``switch``, then λ or the
    linear decay ``λ_max - (epoch/epochs)·(λ_max - λ)``; the loop passes epoch + 1."""
    if epoch_from_1 < switch:
        return lambda_max
    if schedule == "fixed":  # the reference's 'piecewise'
        return lam
    return lambda_max - (epoch_from_1 / epochs) * (lambda_max - lam)


@pytest.mark.parametrize("schedule, lambda_max", [("fixed", math.inf), ("linear", 5.0),
                                                  ("fixed", 3.0)])
def test_gairat_lambda_every_epoch_of_120(schedule, lambda_max):
    got = [S.gairat_lambda(e, 120, -1.0, 0.5, lambda_max, schedule) for e in range(120)]
    expected = [_gairat_reference(e + 1, 120, -1.0, lambda_max, schedule, 60) for e in range(120)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[58] == lambda_max and got[59] != lambda_max  # the switch: 60th epoch (0-based 59)


def test_gairat_lambda_burn_in_boundary_with_float_error():
    # burn_in 0.55 of 100 = 55.00000000000001: the 55th epoch (0-based 54) switches
    assert [S.gairat_lambda(e, 100, -1.0, 0.55) for e in (53, 54)] == [math.inf, -1.0]
    assert [S.gairat_lambda(e, 10, -1.0, 0.3) for e in (1, 2)] == [math.inf, -1.0]
    assert S.gairat_lambda(0, 10, -2.0, 0.0) == -2.0  # no burn-in
    assert S.gairat_lambda(9, 10, -1.0, 1.0) == -1.0  # the last epoch reaches burn_in = 1


def test_gairat_lambda_linear_needs_a_finite_lambda_max():
    assert S.gairat_lambda(10, 120, schedule="linear") == math.inf  # still burning in: no error
    with pytest.raises(ValueError, match="finite lambda_max"):
        S.gairat_lambda(59, 120, schedule="linear")
    with pytest.raises(ValueError, match="schedule"):
        S.gairat_lambda(59, 120, schedule="piecewise")


# ----------------------------------------------------------------------------- warm-up
def test_warmup_done_boundary():
    assert [S.warmup_done(e, 100, 0.55) for e in (54, 55)] == [False, True]  # 55.00000000000001
    assert [S.warmup_done(e, 10, 0.3) for e in (2, 3)] == [False, True]
    assert all(S.warmup_done(e, 10, 0.0) for e in range(10))
    assert not any(S.warmup_done(e, 10, 1.0) for e in range(10))
    assert [S.warmup_done(e, 120, 10 / 120) for e in (9, 10)] == [False, True]

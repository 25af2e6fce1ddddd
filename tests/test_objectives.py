"""Objectives (methods.md §2–§3, issue 4 §6): seam properties over OBJECTIVES, reductions of one
method to another, Module A/B properties, schedules, AWP and SampleMemory."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from robustkit.attacks.base import AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.objectives import (
    AWP,
    FAT,
    GAIRAT,
    MART,
    OBJECTIVES,
    PGDAT,
    SRDDAT,
    TRADES,
    Natural,
    SampleMemory,
    TrainContext,
    accepted_hparams,
    create_objective,
)
from robustkit.objectives import functional as Fn
from robustkit.objectives import schedules as S
from robustkit.testing import LinearModel, TinyCNN, random_batch

N, SHAPE, K = 8, (3, 8, 8), 10
# small but real settings so every objective runs in milliseconds on CPU
FAST = {
    "natural": {},
    "pgd_at": {"steps": 2},
    "trades": {"steps": 2},
    "mart": {"steps": 2},
    "fat": {"steps": 3, "tau_schedule": 1},
    "gairat": {"steps": 2, "burn_in": 0.1},
    "awp": {"inner": "trades", "steps": 2},
    "srd_dat": {"k_max": 3, "misclassified": "uniform", "score_ema": True},
    "fast_at": {"method": "n_fgsm"},
    "igr": {},
    "jr": {},
    "sagr": {},
    "sns": {"steps": 2},
}
CTX = TrainContext(epoch=7, epochs=10, step=0, idx=torch.arange(N))


def _model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(in_channels=3, num_classes=K).train()


def _batch():
    return random_batch(N, SHAPE, K, seed=1)


def _fresh(model, state, objective, x, y, ctx, seed=0):
    """Run ``objective`` from the same weights, BN statistics and RNG state."""
    model.load_state_dict(state)
    torch.manual_seed(seed)
    return objective(x, y, ctx)


def test_registry_is_complete():
    assert set(OBJECTIVES) == {"natural", "pgd_at", "trades", "mart", "fat", "gairat", "awp",
                               "srd_dat", "fast_at", "igr", "jr", "sagr", "sns"}
    assert set(FAST) == set(OBJECTIVES)


# ----------------------------------------------------------------------------- seam properties
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("training", [True, False])
def test_objective_contract(name, training):
    model = _model().train(training)
    modes = [m.training for m in model.modules()]
    x, y = _batch()
    x_before = x.clone()
    obj = create_objective(name, model, **FAST[name])
    out = obj(x, y, CTX)
    # the objective never writes .grad (no backward/zero_grad/optimizer inside)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert x.grad is None and torch.equal(x, x_before)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (N, K)
    for key, v in out.metrics.items():
        assert isinstance(v, torch.Tensor) and not v.requires_grad, key
        assert v.dim() == 0 or v.shape == (N,), key
    assert any(k.startswith("loss/") for k in out.metrics)
    if obj.attack is not None or name == "fast_at":  # attacked objectives report the attack
        assert "acc_adv" in out.metrics and "steps_per_sample" in out.metrics
    out.loss.backward()
    obj.after_step()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_abort_step_leaves_the_parameters_as_before_loss(name):
    """The trainer's promise on NonFiniteLossError: after loss() and abort_step() (no optimizer
    step) every parameter is bitwise what it was, whatever loss() did to it (AWP's w + v)."""
    model = _model()
    x, y = _batch()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    obj = create_objective(name, model, **FAST[name])
    obj(x, y, CTX)
    obj.abort_step()
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]), k


def test_create_objective_errors():
    model = _model()
    with pytest.raises(ValueError, match="known: natural, pgd_at"):
        create_objective("pgd", model)
    with pytest.raises(ValueError, match=r"'bata'.*did you mean 'beta'.*accepted: beta, eps"):
        create_objective("trades", model, bata=6.0)
    with pytest.raises(ValueError, match=r"'omega_mx'.*'omega_max'"):
        create_objective("srd_dat", model, omega_mx=3.0)
    with pytest.raises(ValueError, match=r"'bta'.*trades"):  # AWP forwards to its inner objective
        create_objective("awp", model, inner="trades", bta=1.0)
    with pytest.raises(ValueError, match="attack"):
        Natural(model, attack=PGD(model))
    awp = create_objective("awp", model, inner="trades", beta=2.0, gamma=1e-2)
    assert awp.inner.beta == 2.0 and awp.gamma == 1e-2


def test_srd_dat_hyperparameters_match_methods_table():
    """§3.4: every name exposed with its default."""
    expected = {"eps_hi": 8 / 255, "eps_lo": 4 / 255, "q": 1.0, "lambda_gap": 0.7,
                "step_ratio": 0.25, "k_max": 10, "tau_schedule": ((0.4, 0), (0.75, 1), (1.0, 2)),
                "inner_loss": "kl", "misclassified": "clean", "beta": 6.0, "gamma_max": 1.0,
                "gamma_ramp": (0.3, 0.6), "omega_max": 5.0, "eta0": 1 / 16, "score_ema": None,
                "mart_factor": False, "beta_ce": 0.0, "invert_budget": False}
    params = inspect.signature(SRDDAT.__init__).parameters
    assert set(accepted_hparams("srd_dat")) == set(expected)
    built = SRDDAT(_model())
    for key, value in expected.items():
        assert params[key].default == value, key
        assert getattr(built, key) == value, key  # the value in use, not only the signature's


@pytest.mark.parametrize("bad", [{"omega_max": 0.5}, {"eps_lo": 0.1}, {"misclassified": "x"},
                                 {"tau_schedule": ((0.5, 1), (0.4, 2))}, {"inner_loss": "cw"},
                                 {"k_max": 0}, {"score_ema": 1.0}, {"gamma_ramp": (0.6, 0.3)}])
def test_srd_dat_rejects_bad_hparams(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SRDDAT(_model(), **bad)


@pytest.mark.parametrize("bad, match", [
    ({"eps_hi": 0.0, "eps_lo": 0.0}, "eps_hi must"), ({"eps_hi": 1.5}, "eps_hi must"),
    ({"eps_lo": -0.01}, "eps_lo must"), ({"eps_lo": 9 / 255}, "eps_lo must"),
    ({"q": 0.0}, "q must"), ({"q": -1.0}, "q must"),
    ({"lambda_gap": -0.1}, "lambda_gap must"), ({"lambda_gap": 1.5}, "lambda_gap must"),
    ({"step_ratio": 0.0}, "step_ratio must"),
    ({"k_max": True}, "k_max must"), ({"k_max": 2.5}, "k_max must"), ({"k_max": 0}, "k_max must"),
    ({"beta": -0.5}, "beta must"), ({"gamma_max": -1.0}, "gamma_max must"),
    ({"gamma_ramp": (0.1, 0.2, 0.3)}, r"gamma_ramp must be \(start, end\)"),
    ({"gamma_ramp": (1.5, 1.5)}, r"gamma_ramp\[0\] must"),
    ({"gamma_ramp": (-0.1, 0.5)}, r"gamma_ramp\[0\] must"),
    ({"gamma_ramp": (0.2, 1.5)}, r"gamma_ramp\[1\] must"),
    ({"gamma_ramp": (0.5, 0.4)}, r"gamma_ramp\[1\] must"),
    ({"omega_max": 0.99}, "omega_max must"),
    ({"eta0": 0.0}, "eta0 must"), ({"eta0": 1.5}, "eta0 must"),
    ({"score_ema": -0.1}, "score_ema must"), ({"score_ema": 1.0}, "score_ema must be < 1"),
    ({"score_ema": 1.5}, "score_ema must"), ({"score_ema": "0.5"}, "score_ema must"),
    ({"beta_ce": -1.0}, "beta_ce must"),
])
def test_srd_dat_argument_checks_name_the_argument(bad, match):
    """Every check, just outside its bound; the message opens with the argument's name."""
    with pytest.raises(ValueError, match=match):
        SRDDAT(_model(), **bad)


@pytest.mark.parametrize("ok", [
    {"eps_hi": 1.0}, {"eps_lo": 0.0}, {"eps_lo": 8 / 255}, {"q": 1e-6}, {"lambda_gap": 0.0},
    {"lambda_gap": 1.0}, {"step_ratio": 1e-6}, {"k_max": 1}, {"beta": 0.0}, {"beta": 0.5},
    {"gamma_max": 0.0}, {"gamma_ramp": (0.0, 0.0)}, {"gamma_ramp": (1.0, 1.0)},
    {"omega_max": 1.0}, {"eta0": 1.0}, {"eta0": 1e-6}, {"score_ema": 0.0}, {"beta_ce": 0.0},
    {"beta_ce": 0.5},
])
def test_srd_dat_accepts_its_bounds(ok):
    srd = SRDDAT(_model(), **ok)
    (key, value), = ok.items()
    assert getattr(srd, key) == value


def test_default_attacks_are_paper_defaults_on_the_bare_module():
    model = _model()
    wrapped = nn.DataParallel(model)  # a wrapper: the attack must get the module inside
    cases = {
        PGDAT(wrapped): ("ce", True, 8 / 255, 2 / 255, 10),
        TRADES(wrapped): ("kl", "normal", 8 / 255, 0.007, 10),
        MART(wrapped): ("ce", "normal", 8 / 255, 0.007, 10),
        FAT(wrapped): ("ce", True, 8 / 255, 0.007, 10),
        FAT(wrapped, base="trades"): ("kl", "normal", 8 / 255, 0.007, 10),
        GAIRAT(wrapped): ("ce", True, 8 / 255, 0.007, 10),
        SRDDAT(wrapped): ("kl", "normal", 8 / 255, 0.25 * 8 / 255, 10),
        SRDDAT(wrapped, eps_hi=16 / 255, step_ratio=0.5, k_max=4, inner_loss="ce"):
            ("ce", "normal", 16 / 255, 8 / 255, 4),
    }
    for obj, (loss, start, eps, alpha, steps) in cases.items():
        a = obj.attack
        assert isinstance(a, PGD) and a.model is model and a.select == "last", obj
        assert (a.loss, a.random_start, a.steps) == (loss, start, steps), obj
        assert a.eps == pytest.approx(eps) and a.alpha == pytest.approx(alpha), obj
    assert FAT(model).attack.step_noise == 0.001  # FAT.py's ω; FAT_for_TRADES.py has none
    assert FAT(model, base="trades").attack.step_noise == 0.0
    mine = PGD(model, eps=0.1, steps=1)
    assert create_objective("pgd_at", model, attack=mine).attack is mine


# ----------------------------------------------------------------------------- reductions
def test_trades_beta_zero_is_cross_entropy():
    model = _model()
    x, y = _batch()
    out = TRADES(model, beta=0.0, steps=2)(x, y)
    assert torch.equal(out.loss, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("train", [True, False])
def test_srd_dat_reduces_to_trades(train):
    model = _model().train(train)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    eps, alpha, steps = 0.031, 0.007, 5
    trades = TRADES(model, beta=6.0, eps=eps, alpha=alpha, steps=steps)
    srd = SRDDAT(model, eps_hi=eps, eps_lo=eps, misclassified="uniform", tau_schedule=steps,
                 gamma_max=0.0, step_ratio=alpha / eps, k_max=steps, beta=6.0)
    ctx = TrainContext(epoch=9, epochs=10)
    a = _fresh(model, state, trades, x, y, ctx)
    b = _fresh(model, state, srd, x, y, ctx)
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    assert torch.allclose(a.metrics["loss/kl"], b.metrics["loss/kl"], atol=1e-7, rtol=0)
    assert torch.equal(b.metrics["omega_i"], torch.ones(N))
    assert b.metrics["steps_per_sample"] == a.metrics["steps_per_sample"] == steps


@pytest.mark.parametrize("epoch", [0, 5, 9])  # τ = 0, 1, 2 under the schedule below
def test_srd_dat_reduces_to_fat_for_trades(epoch):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    eps, alpha, steps, sched = 0.1, 0.03, 6, ((0.4, 0), (0.75, 1), (1.0, 2))
    fat = FAT(model, base="trades", eps=eps, alpha=alpha, steps=steps, tau_schedule=sched,
              beta=6.0, omega=0.0)
    srd = SRDDAT(model, eps_hi=eps, eps_lo=eps, misclassified="uniform", tau_schedule=sched,
                 gamma_max=0.0, step_ratio=alpha / eps, k_max=steps, beta=6.0)
    ctx = TrainContext(epoch=epoch, epochs=10)
    a = _fresh(model, state, fat, x, y, ctx)
    b = _fresh(model, state, srd, x, y, ctx)
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    assert a.metrics["steps_per_sample"] == b.metrics["steps_per_sample"] < steps  # it stopped
    assert a.metrics["tau_t"] == b.metrics["tau_t"] == S.tau_schedule(epoch, 10, sched)


def test_fat_with_tau_k_is_pgd_at():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    fat = FAT(model, base="at", eps=8 / 255, alpha=2 / 255, steps=4, tau_schedule=4, omega=0.0)
    at = PGDAT(model, eps=8 / 255, alpha=2 / 255, steps=4)
    a = _fresh(model, state, fat, x, y, CTX)
    b = _fresh(model, state, at, x, y, CTX)
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    assert a.metrics["steps_per_sample"] == 4


def test_fat_defaults():
    model = _model()
    fat = FAT(model)
    assert (fat.base, fat.eps, fat.alpha, fat.steps, fat.tau_schedule, fat.beta, fat.omega) == (
        "at", 8 / 255, 0.007, 10, S.FAT_TAU, 6.0, 0.001)
    assert FAT(model, base="trades").omega == 0.0  # FAT_for_TRADES.py adds no step noise


@pytest.mark.parametrize("bad, match", [
    ({"base": "mart"}, "base must be 'at' or 'trades', got 'mart'"),
    ({"tau_schedule": ((0.5, 1), (0.4, 2))}, "tau_schedule: fractions must increase"),
    ({"tau_schedule": -1}, "tau_schedule must be >= 0"),
    ({"eps": -0.01}, "eps must lie"), ({"eps": 1.5}, "eps must lie"),
    ({"alpha": 0.0}, "alpha must lie"), ({"steps": 0}, r"steps must lie in \[1"),
    ({"beta": -0.5}, "beta must lie"), ({"omega": -0.001}, "omega must lie"),
])
def test_fat_argument_checks_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        FAT(_model(), **bad)


@pytest.mark.parametrize("ok", [{"eps": 0.0}, {"eps": 1.0}, {"alpha": 1e-6}, {"steps": 1},
                                {"beta": 0.0}, {"beta": 0.5}, {"omega": 0.0}])
def test_fat_accepts_its_bounds(ok):
    (key, value), = ok.items()
    assert getattr(FAT(_model(), **ok), key) == value


def test_fat_own_attack_needs_omega_zero_and_loss_needs_perturb():
    model = _model()
    mine = PGD(model, eps=0.1, steps=1)
    message = ("omega > 0 needs the built-in attack (attack=None); pass omega=0 and give your "
               "attack its own step noise (PGD(step_noise=...))")
    for omega in (None, 0.5, 1e-4):  # None: base "at"'s 0.001
        with pytest.raises(ValueError, match=re.escape(message)):
            FAT(model, mine, omega=omega)
    assert FAT(model, mine, omega=0.0).attack is mine
    x, y = _batch()
    with pytest.raises(ValueError, match=re.escape("FAT.loss needs the AttackResult of perturb()")):
        FAT(model).loss(x, y, None, CTX)


def test_fat_for_trades_loss_logits_and_metrics():
    """base "trades": CE(f(x)) + β·mean KL(p(x) ‖ p(x')) with the default β = 6, the clean
    logits returned, and the terms logged under their names (methods.md §7.3)."""
    torch.manual_seed(0)
    model = LinearModel(SHAPE, K)  # no BatchNorm: the passes below see the same function
    x, y = _batch()
    fat = FAT(model, base="trades", steps=3, tau_schedule=1)
    adv = fat.perturb(x, y, CTX)
    out = fat.loss(x, y, adv, CTX)
    with torch.no_grad():
        logits, logits_adv = model(x), model(adv.x_adv)
    log_p, log_q = F.log_softmax(logits, 1), F.log_softmax(logits_adv, 1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    ce = F.cross_entropy(logits, y)
    assert kl > 1e-4  # so β = 6 is pinned (β = 7 moves the loss by kl)
    torch.testing.assert_close(out.logits.detach(), logits)
    torch.testing.assert_close(out.loss.detach(), ce + 6.0 * kl)
    torch.testing.assert_close(out.metrics["loss/ce"], ce)
    torch.testing.assert_close(out.metrics["loss/kl"], kl)
    assert out.metrics["acc_adv"] == (logits_adv.argmax(1) == y).float().mean()
    assert out.metrics["tau_t"] == 1.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("base", ["at", "trades"])
def test_fat_metrics_on_the_inputs_device(device, base):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model().to(device)
    x, y = _batch()
    out = FAT(model, base=base, steps=2)(x.to(device), y.to(device), CTX)
    assert out.loss.device.type == device and "tau_t" in out.metrics
    for key, value in out.metrics.items():
        assert value.device.type == device, key


def test_srd_dat_reduces_to_pgd_at_adversarial_term():
    """§3.5 item 2: CE inner loss, uniform start, no early stop, uniform weights: x̃ and the
    (unit-weight) CE(f(x̃)) term are PGD-AT's."""
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    eps, alpha = 8 / 255, 2 / 255
    attack = PGD(model, eps=eps, alpha=alpha, steps=3, loss="ce", random_start=True,
                 select="last")
    srd = SRDDAT(model, attack, eps_hi=eps, eps_lo=eps, misclassified="uniform", tau_schedule=3,
                 gamma_max=0.0, step_ratio=alpha / eps, k_max=3, inner_loss="ce", beta_ce=1.0)
    at = PGDAT(model, eps=eps, alpha=alpha, steps=3)
    a = _fresh(model, state, at, x, y, CTX)
    b = _fresh(model, state, srd, x, y, CTX)
    assert torch.allclose(a.loss, b.metrics["loss/ce_adv"], atol=1e-6, rtol=0)


def test_gairat_burn_in_is_pgd_at():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    ctx = TrainContext(epoch=10, epochs=120)  # before epoch 60 of 120: λ = +inf
    a = _fresh(model, state, GAIRAT(model, alpha=2 / 255, steps=3), x, y, ctx)
    b = _fresh(model, state, PGDAT(model, steps=3), x, y, ctx)
    assert torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    assert torch.equal(a.metrics["omega_i"], torch.ones(N))


def test_mart_without_perturbation_is_its_bce_on_x():
    model = _model().eval()  # eval: the two passes see the same BN statistics, so KL = 0
    x, y = _batch()
    attack = PGD(model, eps=0.0, steps=1, random_start=False, select="last")
    out = MART(model, attack)(x, y)
    p = F.softmax(model(x), dim=1)
    other = p.scatter(1, y[:, None], 0.0).amax(dim=1)
    expected = F.cross_entropy(model(x), y) - torch.log(1.0001 - other + 1e-12).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


# ----------------------------------------------------------------------------- Module A
@pytest.mark.parametrize("k", [3, 10, 100])
def test_skewness_bounds_and_invariances(k):
    one_hot = torch.eye(k)[:2]
    assert torch.allclose(Fn.skewness(one_hot), torch.tensor(Fn.max_skewness(k)), atol=1e-5)
    assert torch.allclose(Fn.normalized_skewness(one_hot), torch.ones(2))
    uniform = torch.full((2, k), 1.0 / k)
    assert torch.equal(Fn.skewness(uniform), torch.zeros(2))
    assert torch.equal(Fn.normalized_skewness(uniform), torch.full((2,), 0.5))
    p = torch.softmax(3 * torch.randn(5, k, dtype=torch.float64), dim=1)
    perm = torch.randperm(k)
    assert torch.allclose(Fn.skewness(p), Fn.skewness(p[:, perm]))
    # oracle: scipy's population skewness (bias=True) of the K probabilities
    assert torch.allclose(Fn.skewness(p), torch.from_numpy(stats.skew(p.numpy(), axis=1)))
    s_hat = Fn.normalized_skewness(p)
    assert ((s_hat >= 0) & (s_hat <= 1)).all()


def test_max_skewness_and_gap():
    assert Fn.max_skewness(10) == pytest.approx(8 / 3)
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0]])
    assert torch.allclose(Fn.confidence_gap(p), torch.tensor([0.3, 0.0]))


def test_binary_classification_gap_and_skewness():
    """K = 2: the gap is |p_0 - p_1|, the skewness is 0 (s_max(2) = 0), so ŝ = ½ exactly."""
    p = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(Fn.confidence_gap(p), torch.tensor([0.4, 0.8, 0.0], dtype=p.dtype))
    assert Fn.max_skewness(2) == 0.0
    s_hat = Fn.normalized_skewness(p)
    assert s_hat.dtype == p.dtype and torch.equal(s_hat, torch.full((3,), 0.5, dtype=p.dtype))
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        Fn.max_skewness(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_skewness_stays_in_0_1_despite_rounding(dtype):
    """The one-hot (s = s_max) and the mirrored one-hot (s = -s_max) land a rounding error
    outside ±s_max for some K (K = 3: float64 one-hot above, float32 mirror below); ŝ is still in
    [0, 1]."""
    for k in range(3, 41):
        one_hot = torch.zeros(1, k, dtype=dtype)
        one_hot[0, 0] = 1
        mirror = torch.full((1, k), 1 / (k - 1), dtype=dtype)
        mirror[0, -1] = 0
        s_hat = Fn.normalized_skewness(torch.cat([one_hot, mirror]))
        assert 0 <= s_hat.min() and s_hat.max() <= 1, k
        assert s_hat.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_robustness_score_and_budget_map_defaults():
    gap = torch.tensor([0.2, 0.9], dtype=torch.float64)
    s_hat = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(Fn.robustness_score(gap, s_hat), 0.7 * gap + 0.3 * s_hat)  # λ_g = 0.7
    score = torch.tensor([0.25, 0.5], dtype=torch.float64)
    eps = Fn.budget_map(score, torch.tensor([True, True]), 0.1, 0.3)  # q = 1: linear
    assert torch.allclose(eps, 0.1 + 0.2 * score)


def test_budget_map_clamps_a_score_rounded_outside_0_1():
    """A score a rounding error outside [0, 1] still maps into [eps_lo, eps_hi] (no NaN from a
    negative base to a fractional power)."""
    score = torch.tensor([-1e-6, 1 + 1e-6, 0.5])
    for q in (1.0, 0.5, 2.0):
        eps = Fn.budget_map(score, torch.ones(3, dtype=torch.bool), 0.1, 0.3, q=q)
        assert eps[0] == pytest.approx(0.1, abs=1e-9) and eps[1] == pytest.approx(0.3, abs=1e-9)
        assert 0.1 <= eps.min() and eps.max() <= 0.3


def test_budget_map_bounds():
    score = torch.rand(100)
    correct = torch.rand(100) > 0.3
    eps = Fn.budget_map(score, correct, 4 / 255, 8 / 255, q=2.0)
    assert (eps[~correct] == 0).all()
    assert ((eps[correct] >= 4 / 255 - 1e-9) & (eps[correct] <= 8 / 255 + 1e-9)).all()
    ends = Fn.budget_map(torch.tensor([0.0, 1.0]), torch.tensor([True, True]), 0.1, 0.3)
    assert torch.allclose(ends, torch.tensor([0.1, 0.3]))
    order = score[correct].argsort()
    assert (eps[correct][order].diff() >= 0).all()  # monotone in the score
    uni = Fn.budget_map(score, correct, 4 / 255, 8 / 255, misclassified="uniform")
    assert torch.allclose(uni[~correct], torch.tensor(8 / 255))


def test_srd_dat_budgets_follow_clean_correctness():
    model = _model()
    x, y = _batch()
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    model.train()
    y = torch.where(torch.arange(N) % 2 == 0, pred, (pred + 1) % K)  # half right, half wrong
    srd = SRDDAT(model, eps_lo=2 / 255, eps_hi=10 / 255, k_max=2)
    adv = srd.perturb(x, y, CTX)
    eps = adv.info["eps"]
    right = pred == y
    assert (eps[~right] == 0).all() and torch.equal(adv.x_adv[~right], x[~right])
    assert ((eps[right] >= 2 / 255 - 1e-7) & (eps[right] <= 10 / 255 + 1e-7)).all()
    delta = (adv.x_adv - x).flatten(1).abs().amax(1)
    assert (delta <= eps + 1e-6).all() and adv.x_adv.min() >= 0 and adv.x_adv.max() <= 1


# ----------------------------------------------------------------------------- Module B
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=40), st.floats(0, 3),
       st.floats(1, 8), st.data())
def test_power_weights_properties(values, gamma, omega_max, data):
    v = torch.tensor(values, dtype=torch.float64)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values),
                                           max_size=len(values))))
    w = Fn.power_weights(v, mask, gamma, omega_max)
    assert torch.equal(w[~mask], torch.ones(int((~mask).sum()), dtype=w.dtype))
    if mask.any():
        assert w[mask].mean().item() == pytest.approx(1.0, rel=1e-9, abs=1e-9)
        assert w.min() >= 0 and w.max() <= omega_max + 1e-9
        assert torch.allclose(Fn.power_weights(7.5 * v, mask, gamma, omega_max), w)
        if gamma == 0:
            assert torch.equal(w, torch.ones_like(w))


def test_clip_renormalize_fixed_point():
    w = Fn.clip_renormalize(torch.tensor([100.0, 1.0, 1.0, 1.0]), omega_max=2.0)
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))


@pytest.mark.parametrize("weights, omega_max, expected", [
    ([], 5.0, []),
    ([0.3], 5.0, [1.0]),  # one weight: mean 1 is 1
    ([0.0, 0.0, 0.0], 5.0, [1.0, 1.0, 1.0]),  # nothing carries the mass: spread evenly
    ([1.0, 0.0, 0.0], 1.5, [1.5, 0.75, 0.75]),  # clipped, then the rest over the zeros
    ([4.0, 1.0, 0.0, 0.0], 1.2, [1.2, 1.2, 0.8, 0.8]),  # two clipped, then the zeros
])
def test_clip_renormalize_small_and_zero_weights(weights, omega_max, expected):
    got = Fn.clip_renormalize(torch.tensor(weights, dtype=torch.float64), omega_max)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_power_weights_default_clip_extreme_scales_and_zero_divergences():
    v = torch.tensor([100.0] + [1.0] * 9, dtype=torch.float64)
    everyone = torch.ones(10, dtype=torch.bool)
    w = Fn.power_weights(v, everyone, 1.0)  # ω_max = 5 by default (methods.md §3.4)
    assert w[0] == pytest.approx(5.0) and w[1:].tolist() == pytest.approx([5 / 9] * 9)
    # invariant to the scale of v even where v^γ itself would under- or overflow float32
    base = Fn.power_weights(torch.tensor([1.0, 2.0, 4.0]), torch.ones(3, dtype=torch.bool), 2.0)
    assert base.tolist() == pytest.approx([3 / 21, 12 / 21, 48 / 21], rel=1e-6)
    for scale in (1e-20, 1e20):
        got = Fn.power_weights(scale * torch.tensor([1.0, 2.0, 4.0]),
                               torch.ones(3, dtype=torch.bool), 2.0)
        torch.testing.assert_close(got, base)
    # all-zero or non-finite divergences carry no ranking: uniform over P
    mask = torch.tensor([True, True, False])
    for bad in (torch.zeros(3), torch.tensor([math.inf, 1.0, 2.0]), torch.tensor([math.nan] * 3)):
        assert torch.equal(Fn.power_weights(bad, mask, 1.0), torch.ones(3))
    once = torch.tensor([100.0, 1.0, 1.0, 1.0]) * 4 / 103  # a single renormalise ...
    assert once.clamp(max=2.0).mean() < 1  # ... then clip would lose mass


def test_srd_dat_weights_in_loss():
    model = _model()
    x, y = _batch()
    srd = SRDDAT(model, misclassified="uniform", k_max=2, omega_max=3.0)
    out = srd(x, y, TrainContext(epoch=9, epochs=10))
    om = out.metrics["omega_i"]
    assert om.mean().item() == pytest.approx(1.0, abs=1e-5) and om.max() <= 3.0 + 1e-6
    assert not torch.equal(om, torch.ones(N))  # γ = 1 at the end: weights are not uniform
    assert out.metrics["gamma_t"] == 1.0


def test_per_sample_kl_matches_trades_reference_form():
    a, b = torch.randn(6, K), torch.randn(6, K)
    ref = F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="sum") / 6
    assert torch.allclose(Fn.per_sample_kl(a, b).mean(), ref, atol=1e-6)
    assert torch.allclose(Fn.per_sample_kl(a, a), torch.zeros(6), atol=1e-6)


def test_gair_weights():
    kappa = torch.tensor([0, 2, 5, 10])
    w = Fn.gair_weights(kappa, steps=10, lam=-1.0)
    assert w.sum().item() == pytest.approx(4.0) and (w.diff() < 0).all()
    assert torch.equal(Fn.gair_weights(kappa, 10, math.inf), torch.ones(4))
    burn_in = Fn.gair_weights(torch.tensor([0, 3]), 10, math.inf)  # long κ in, float out
    assert burn_in.dtype == torch.float32 and torch.equal(burn_in, torch.ones(2))
    assert Fn.gair_weights(torch.tensor([0, 3]), 10, -1.0).dtype == torch.float32


def test_input_gradient_of_linear_model_is_analytic():
    model = LinearModel((3, 4, 4), K)
    x, y = random_batch(5, (3, 4, 4), K, seed=2)
    grad, logits = Fn.input_gradient(model, x, y)
    p = F.softmax(logits.detach(), 1)
    expected = (p - F.one_hot(y, K).float()) @ model.fc.weight.detach()
    assert torch.allclose(grad.flatten(1), expected, atol=1e-6)
    assert model.fc.weight.grad is None
    assert not grad.requires_grad  # create_graph=False by default: a plain tensor
    # create_graph=True keeps the graph: a penalty on the gradient reaches the weights
    grad2, _ = Fn.input_gradient(model, x, y, create_graph=True)
    torch.testing.assert_close(grad2.detach(), grad)
    assert grad2.requires_grad
    (dw,) = torch.autograd.grad(grad2.pow(2).sum(), model.fc.weight)
    assert dw.abs().max() > 0


def test_accuracy_and_check_hparam():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert Fn.accuracy(logits, torch.tensor([0, 1, 1, 2])).item() == pytest.approx(0.5)
    assert Fn.accuracy(logits, torch.tensor([0, 1, 2, 0])).item() == 1.0
    assert Fn.check_hparam("a", 0) == 0.0 and isinstance(Fn.check_hparam("a", 3), float)
    assert Fn.check_hparam("a", 1e9) == 1e9  # default bounds: [0, inf]
    with pytest.raises(ValueError, match=r"^a must lie in \[0\.0, inf\], got -1e-09$"):
        Fn.check_hparam("a", -1e-9)
    assert Fn.check_hparam("b", 1e-12, 0.0, 1.0, low_open=True) == 1e-12
    with pytest.raises(ValueError, match=r"^b must lie in \(0\.0, 1\.0\], got 0\.0$"):
        Fn.check_hparam("b", 0.0, 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^b must lie in \[0\.5, 1\.0\], got 1\.5$"):
        Fn.check_hparam("b", 1.5, 0.5, 1.0)
    for bad in (True, "0.5", None, [1.0]):
        with pytest.raises(ValueError, match="^c must be a number"):
            Fn.check_hparam("c", bad)
    with pytest.raises(ValueError, match="^d must lie in"):
        Fn.check_hparam("d", math.nan)


# ----------------------------------------------------------------------------- efficiency
def test_srd_dat_computed_batch_shrinks():
    model = _model()
    x, y = _batch()
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # every sample starts correct, so every one is attacked
    model.train()
    sizes: list[int] = []
    model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    srd = SRDDAT(model, eps_hi=0.3, eps_lo=0.3, step_ratio=0.25, k_max=6, inner_loss="ce")
    adv = srd.perturb(x, y, TrainContext(epoch=0, epochs=10))  # τ = 0: freeze at first error
    assert sizes[0] == N  # Module A's clean pass
    pgd = sizes[1:]
    assert pgd[0] == N and min(pgd) < N and pgd == sorted(pgd, reverse=True)
    assert sum(pgd) == int(adv.info["steps_used"].sum())  # one forward per gradient evaluation
    sizes.clear()
    srd_k = SRDDAT(model, eps_hi=0.3, eps_lo=0.3, k_max=6, inner_loss="ce", tau_schedule=6)
    srd_k.perturb(x, y, TrainContext(epoch=0, epochs=10))
    assert sizes == [N] * 7


def test_srd_dat_gradient_evaluations_at_most_trades():
    model = _model()
    x, y = _batch()
    for epoch in (0, 5, 9):
        ctx = TrainContext(epoch=epoch, epochs=10)
        srd = SRDDAT(model, k_max=10)(x, y, ctx).metrics["steps_per_sample"]
        trades = TRADES(model, steps=10)(x, y, ctx).metrics["steps_per_sample"]
        assert srd <= trades == 10


# ----------------------------------------------------------------------------- schedules
def test_tau_schedule_boundaries():
    # FAT.py's adjust_tau(epoch + 1): epochs 1-50 of 120 (0-based 0-49) τ = 0, 51-90 τ = 1
    assert [S.tau_schedule(e, 120, S.FAT_TAU) for e in (0, 49, 50, 89, 90, 119)] == \
        [0, 0, 1, 1, 2, 2]
    assert [S.tau_schedule(e, 100) for e in (39, 40, 74, 75, 99)] == [0, 1, 1, 2, 2]
    assert [S.tau_schedule(e, 10) for e in (3, 4, 6, 7)] == [0, 1, 1, 2]
    assert S.tau_schedule(3, 10, 7) == 7 and S.tau_schedule(3, 10, None) is None
    assert S.tau_schedule(9, 10, ((0.5, 3),)) == 3  # the last τ holds past the last fraction
    for bad in (((0.5, 1), (0.5, 2)), ((1.2, 1),), ((0.5, -1),), ((0.5, 1.5),), -1, ()):
        with pytest.raises(ValueError, match="tau_schedule"):
            S.check_tau_schedule(bad)
    with pytest.raises(ValueError, match="epochs"):
        S.tau_schedule(0, 0)


def test_gamma_schedule_boundaries():
    got = [S.gamma_t(e, 10, 2.0) for e in range(10)]
    assert got[:4] == [0.0, 0.0, 0.0, 0.0]
    assert got[4] == pytest.approx(2 / 3) and got[5] == pytest.approx(4 / 3)
    assert got[6:] == [2.0] * 4
    assert S.gamma_t(4, 10, 1.0, ramp=(0.5, 0.5)) == 0.0 and S.gamma_t(5, 10, 1.0, (0.5, 0.5)) == 1
    # methods.md §3.3 Module B item 4, written out: 0 before aT, linear to γ_max at bT, then γ_max
    for epochs, gamma_max, (a, b) in [(100, 1.5, (0.3, 0.6)), (50, 0.7, (0.2, 0.7))]:
        for epoch in range(epochs):
            t = epoch / epochs
            expected = 0.0 if t < a else gamma_max if t >= b else gamma_max * (t - a) / (b - a)
            got = S.gamma_t(epoch, epochs, gamma_max, (a, b))
            assert got == pytest.approx(expected, abs=1e-12), (epochs, epoch)


def test_gairat_lambda_and_warmup():
    assert S.gairat_lambda(58, 120) == math.inf and S.gairat_lambda(59, 120) == -1.0
    lin = S.gairat_lambda(59, 120, lam=-1.0, lambda_max=5.0, schedule="linear")
    assert lin == pytest.approx(5.0 - 60 / 120 * 6.0)
    assert S.warmup_done(0, 10, 0.0) and not S.warmup_done(1, 10, 0.2) and S.warmup_done(2, 10, .2)


# ----------------------------------------------------------------------------- AWP
def _conv_linear_weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() > 1}


def test_awp_restores_weights_exactly_without_optimizer_step():
    model = _model()
    x, y = _batch()
    before = {k: v.clone() for k, v in model.named_parameters()}
    awp = AWP(model, inner="pgd_at", steps=2, gamma=1e-2)
    adv = awp.perturb(x, y, CTX)
    out = awp.loss(x, y, adv, CTX)
    for name, p in model.named_parameters():  # perturbed: ‖v_l‖ = γ‖w_l‖ on conv/linear only
        diff = (p.detach() - before[name]).norm()
        if p.dim() > 1:
            assert diff.item() == pytest.approx(1e-2 * before[name].norm().item(), rel=1e-4)
        else:
            assert diff == 0, name
    assert all(p.grad is None for p in model.parameters())
    out.loss.backward()
    awp.after_step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_awp_keeps_only_the_optimizer_update():
    model = _model()
    x, y = _batch()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    awp = AWP(model, inner="trades", steps=2, gamma=5e-3)
    out = awp(x, y, CTX)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    with torch.no_grad():  # a plain SGD step (torch.optim's first step costs seconds of imports)
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    awp.after_step()
    for name, p in model.named_parameters():  # w - lr·∇L(w + v): gradient at w + v, update of w
        assert torch.allclose(p.detach(), w0[name] - 0.1 * grads[name], atol=1e-6), name


def test_awp_ascent_pass_leaves_batchnorm_statistics_alone():
    x, y = _batch()
    counts = []
    for gamma in (0.0, 5e-3):  # γ = 0 skips the ascent pass entirely
        model = _model()
        awp = AWP(model, inner="trades", steps=1, gamma=gamma)
        awp(x, y, CTX)
        counts.append(int(model.features[1].num_batches_tracked))
    assert counts[0] == counts[1] == 2  # one clean and one adversarial training forward


def test_awp_warmup_is_the_inner_objective():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    ctx = TrainContext(epoch=0, epochs=10)
    a = _fresh(model, state, AWP(model, inner="trades", steps=2, warmup=0.5), x, y, ctx)
    b = _fresh(model, state, TRADES(model, steps=2), x, y, ctx)
    assert torch.equal(a.loss, b.loss) and a.metrics["awp_active"] == 0


# ----------------------------------------------------------------------------- memory
def test_sample_memory_round_trip():
    mem = SampleMemory()
    idx = torch.tensor([3, 7, 1])
    assert torch.isnan(mem.get("score", idx)).all()
    mem.update("score", idx, torch.tensor([0.3, 0.7, 0.1]))
    got = mem.get("score", torch.tensor([7, 0, 3, 100]))
    assert got[0] == pytest.approx(0.7) and got[2] == pytest.approx(0.3)
    assert torch.isnan(got[1]) and torch.isnan(got[3])
    other = SampleMemory()
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.get("score", idx), mem.get("score", idx))
    with pytest.raises(ValueError, match="idx"):
        mem.update("score", torch.tensor([-1]), torch.tensor([0.0]))


def test_srd_dat_score_ema_and_state_dict():
    model = _model().eval()
    x, y = _batch()
    idx = torch.arange(10, 10 + N)
    srd = SRDDAT(model, k_max=1, score_ema=0.5)
    first = srd.perturb(x, y, TrainContext(idx=idx)).info["score"]
    x2 = (x + 0.2).clamp(0, 1)
    raw = SRDDAT(model, k_max=1).perturb(x2, y, TrainContext()).info["score"]
    second = srd.perturb(x2, y, TrainContext(idx=idx)).info["score"]
    assert torch.allclose(second, 0.5 * first + 0.5 * raw)
    clone = SRDDAT(model, k_max=1, score_ema=0.5)
    clone.load_state_dict(srd.state_dict())
    assert torch.equal(clone.memory.get("score", idx), second)
    with pytest.raises(ValueError, match="idx"):
        srd.perturb(x, y, TrainContext())
    with pytest.raises(ValueError):
        SRDDAT(model).load_state_dict(srd.state_dict())  # no memory to load into
    with pytest.raises(ValueError, match=r"unexpected SRDDAT state keys \['score'\]"):
        clone.load_state_dict({"score": second})  # not under "memory."
    assert torch.equal(clone.memory.get("score", idx), second)  # nothing loaded


def test_srd_dat_score_ema_true_is_mu_0_7_and_false_is_off():
    model = _model().eval()
    x, y = _batch()
    idx = torch.arange(N)
    x2 = (x + 0.2).clamp(0, 1)
    raw1 = SRDDAT(model, k_max=1).perturb(x, y, TrainContext()).info["score"]
    raw2 = SRDDAT(model, k_max=1).perturb(x2, y, TrainContext()).info["score"]
    assert (raw1 - raw2).abs().max() > 1e-2
    on = SRDDAT(model, k_max=1, score_ema=True)
    on.perturb(x, y, TrainContext(idx=idx))
    second = on.perturb(x2, y, TrainContext(idx=idx)).info["score"]
    torch.testing.assert_close(second, 0.7 * raw1 + 0.3 * raw2)
    off = SRDDAT(model, k_max=1, score_ema=False)
    assert off.memory is None and off.score_ema is None and off.state_dict() == {}
    off.perturb(x, y, TrainContext())  # no idx needed
    assert torch.equal(off.perturb(x2, y, TrainContext()).info["score"], raw2)


def test_srd_dat_loss_needs_its_own_perturb_result():
    model = _model()
    x, y = _batch()
    srd = SRDDAT(model, k_max=1)
    for adv in (None, AttackResult(x.clone(), {"steps_used": torch.ones(N)})):
        with pytest.raises(ValueError, match="SRDDAT.loss needs the AttackResult"):
            srd.loss(x, y, adv, TrainContext())


_GATHER_CHILD = """
import sys, torch, torch.distributed as dist
from robustkit.objectives.memory import SampleMemory
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
mem = SampleMemory()
idx = torch.tensor([[0, 2, 4], [1, 3]][rank])  # ranks hold batches of different sizes
mem.update("s", idx, 10.0 * idx)
print(mem.state_dict()["s"].tolist())
dist.destroy_process_group()
"""


def test_sample_memory_all_gathers_across_ranks(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER_CHILD, str(r), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    lines = [out.strip().splitlines()[-1] for out, _ in outs]
    assert lines == ["[0.0, 10.0, 20.0, 30.0, 40.0]"] * 2


# ----------------------------------------------------------------------------- real data (slow)
@pytest.mark.slow
def test_real_mnist_srd_dat_is_robust_and_cheaper_than_trades(shared_data):
    """1,500 MNIST digits, 3 epochs each: TRADES and SRD-DAT beat natural training under PGD-20
    at ε = 0.2, and SRD-DAT spends fewer gradient evaluations per sample than TRADES."""
    from robustkit.data import load_dataset
    from robustkit.models import create_model

    train = load_dataset("mnist", "train", root=shared_data)
    test = load_dataset("mnist", "test", root=shared_data)
    xtr, ytr = train.x[:1500].float() / 255, train.y[:1500]
    xte, yte = test.x[:500].float() / 255, test.y[:500]
    eps, epochs, batch = 0.2, 3, 100
    settings_ = {
        "natural": {},
        "trades": {"eps": eps, "alpha": 0.05, "steps": 10},
        "srd_dat": {"eps_hi": eps, "eps_lo": eps / 2, "step_ratio": 0.25, "k_max": 10},
    }
    results = {}
    for name, hp in settings_.items():
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
        obj = create_objective(name, model, **hp)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        spent = []
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(ytr))
            for i in range(0, len(ytr), batch):
                b = perm[i:i + batch]
                out = obj(xtr[b], ytr[b], TrainContext(epoch, epochs, idx=b))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                obj.after_step()
                spent.append(float(out.metrics.get("steps_per_sample", torch.tensor(0.0))))
        model.eval()
        x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=20)(xte, yte)
        with torch.no_grad():
            clean = (model(xte).argmax(1) == yte).float().mean().item()
            robust = (model(x_adv).argmax(1) == yte).float().mean().item()
        results[name] = (clean, robust, sum(spent) / len(spent))
    print(results)
    assert results["natural"][0] > 0.6, results  # the short run does learn the digits
    for name in ("trades", "srd_dat"):
        assert results[name][0] > 0.6, results
        assert results[name][1] > results["natural"][1] + 0.1, results
    assert results["srd_dat"][2] < results["trades"][2] == 10, results

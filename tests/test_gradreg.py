"""Gradient regularisers (methods.md §5, issue #12 §3): IGR, JR and SAGR.

Independent oracles, written out plainly here (architecture.md §5, "mistake-proof"):

- the full per-sample Jacobian from ``torch.autograd.functional.jacobian`` (``create_graph=True``,
  one sample at a time), from which ‖J‖²_F, g_y, g_F = Σ_{k≠y} p_k/(1 - p_y)·g_k and the four
  SAGR terms are recomputed, values and parameter gradients;
- IGR's penalty from a loop of single-sample ``torch.autograd.grad`` calls;
- ``facebookresearch/jacobian_regularizer``'s ``JacobianReg.forward`` (which returns ½ of the
  estimate) fed the same random vectors;
- ``torch.autograd.gradcheck`` in float64 of each regulariser with respect to the parameters.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.objectives import (
    IGR,
    JR,
    OBJECTIVES,
    PGDAT,
    SAGR,
    Natural,
    TrainContext,
    create_objective,
)
from robustkit.objectives.igr import input_gradient_penalty
from robustkit.objectives.jr import jacobian_norm_sq
from robustkit.objectives.sagr import TERMS, sagr_terms
from robustkit.testing import ConstantModel, TinyCNN, random_batch

SHAPE, K = (2, 3, 3), 5  # D = 18 pixels, 5 classes: every Jacobian is 5 x 18
CTX = TrainContext()
# hand-picked SAGR weights, all different, so a swapped pair changes the value
WEIGHTS = {"a_pos": 0.3, "a_neg": 1.7, "b_pos": 2.9, "b_neg": 0.6}


def _mlp(dtype=torch.float64, seed=0) -> nn.Module:
    """A smooth (tanh) MLP: every regulariser is differentiable, finite differences converge."""
    torch.manual_seed(seed)
    d = int(torch.tensor(SHAPE).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, K)).to(dtype)


def _batch(n=4, seed=1, dtype=torch.float64):
    x, y = random_batch(n, SHAPE, K, seed=seed)
    return x.to(dtype), y


def _cnn(train=True) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(in_channels=2, num_classes=K).double().train(train)


def _params(model):
    return [p for p in model.parameters()]


def _grads(value, model):
    # the logits' Jacobian does not depend on the last bias: its gradient is a zero tensor
    return torch.autograd.grad(value, _params(model), retain_graph=True, allow_unused=True,
                               materialize_grads=True)


def _close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- oracles
def _jacobians(model, x, log_prob=False):
    """``(N, K, D)`` per-sample Jacobians of the logits (or log-probabilities), with graphs."""
    def f(xi):
        z = model(xi.unsqueeze(0))[0]
        return F.log_softmax(z, dim=0) if log_prob else z
    return torch.stack([
        torch.autograd.functional.jacobian(f, xi, create_graph=True).flatten(1) for xi in x])


def _sagr_oracle(model, x, y, a_pos, a_neg, b_pos, b_neg, mode="aggregate", top_m=2,
                 log_prob=False):
    """The four weighted terms of methods.md §5.3 per sample, from the full Jacobian."""
    jac = _jacobians(model, x, log_prob)
    z = model(x).detach()
    out = {t: [] for t in TERMS}
    for i in range(len(x)):
        yi = int(y[i])
        p = torch.softmax(z[i], 0)
        q = p / (1 - p[yi])  # p_k / (1 - p_y), detached
        false = [k for k in range(K) if k != yi]
        gy = jac[i, yi]
        out["true_pos"].append(a_pos * gy.clamp(min=0).pow(2).sum())
        out["true_neg"].append(a_neg * (-gy).clamp(min=0).pow(2).sum())
        if mode == "aggregate":
            rows = [(1.0, sum(q[k] * jac[i, k] for k in false))]
        elif mode == "topM":
            ranked = sorted(false, key=lambda k: -float(z[i, k]))[:top_m]
            rows = [(q[k], jac[i, k]) for k in ranked]
        else:
            rows = [(1.0, jac[i, k]) for k in false]
        out["false_pos"].append(sum(w * b_pos * g.clamp(min=0).pow(2).sum() for w, g in rows))
        out["false_neg"].append(sum(w * b_neg * (-g).clamp(min=0).pow(2).sum() for w, g in rows))
    return {t: torch.stack(v) for t, v in out.items()}


def _reference_jacobian_reg(x, z, n):
    """``facebookresearch/jacobian_regularizer:jacobian/jacobian.py`` ``JacobianReg(n)(x, z)``,
    in substance: returns (1/2)·tr|dz/dx|², its README's loss is ``CE + lambda_JR·R``."""
    b, c = z.shape
    num_proj = c if n == -1 else n
    j2 = 0
    for ii in range(num_proj):
        if n == -1:
            v = torch.zeros(b, c)
            v[:, ii] = 1
        else:
            v = torch.randn(b, c)
            v = v / torch.norm(v, 2, 1, True)
        (jv,) = torch.autograd.grad(z.reshape(-1), x, v.reshape(-1), retain_graph=True,
                                    create_graph=True)
        j2 = j2 + c * torch.norm(jv) ** 2 / (num_proj * b)
    return 0.5 * j2


class _FixedAttack(Attack):
    """A deterministic x' (a fixed ±eps pattern, clipped) that counts its calls."""

    def __init__(self, model, eps=0.05):
        super().__init__(model, eps=eps)
        self.calls = 0

    def _perturb(self, x, y):
        self.calls += 1
        sign = torch.ones_like(x).flatten(1)
        sign[:, ::2] = -1
        x_adv = (x + self.eps * sign.view_as(x)).clamp(0, 1)
        n = len(x)
        return AttackResult(x_adv, {"eps": torch.full((n,), self.eps),
                                    "steps_used": torch.full((n,), 3)})


# ----------------------------------------------------------------------------- registry, API
def test_registered_with_the_methods_defaults():
    assert {"igr": IGR, "jr": JR, "sagr": SAGR}.items() <= OBJECTIVES.items()
    defaults = {
        IGR: {"lam": 0.05, "method": "double_backprop", "h": 0.01},
        JR: {"lam": 0.01, "n_proj": 1, "generator": None},  # methods.md §5.2: n = 1, README λ
        SAGR: {"lam": 1.0, "a_pos": 0.1, "a_neg": 1.0, "b_pos": 2.0, "b_neg": 1.0,  # §5.3
               "false_classes": "aggregate", "top_m": 2, "grad_of": "logit",
               "adversarial": None, "eps": 8 / 255, "alpha": 2 / 255, "steps": 10},
    }
    for cls, expected in defaults.items():
        params = inspect.signature(cls.__init__).parameters
        assert {k for k in params if k not in ("self", "model", "attack")} == set(expected)
        for key, value in expected.items():
            assert params[key].default == value, (cls, key)


@pytest.mark.parametrize("name, bad", [
    ("igr", {"method": "fd"}), ("igr", {"h": 0.0}), ("igr", {"lam": -1.0}),
    ("jr", {"n_proj": 0}), ("jr", {"n_proj": -2}), ("jr", {"n_proj": 1.5}),
    ("sagr", {"false_classes": "top2"}), ("sagr", {"top_m": 0}), ("sagr", {"grad_of": "prob"}),
    ("sagr", {"b_pos": -2.0}), ("sagr", {"lam": float("nan")}),
])
def test_bad_hyperparameters_are_refused_by_name(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_objective(name, _mlp(), **bad)


@pytest.mark.parametrize("cls", [IGR, JR])
def test_clean_only_objectives_refuse_an_attack(cls):
    model = _mlp()
    with pytest.raises(ValueError, match="attack"):
        cls(model, attack=PGD(model))


CASES = [("igr", {}), ("igr", {"method": "finite_difference"}), ("jr", {}),
         ("jr", {"n_proj": -1}), ("sagr", {}), ("sagr", {"false_classes": "topM"}),
         ("sagr", {"false_classes": "all", "grad_of": "log_prob"}),
         ("sagr", {"adversarial": True, "steps": 2, "alpha": 0.01, "eps": 0.02})]


@pytest.mark.parametrize("name, kw", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("training", [True, False])
def test_objective_contract(name, kw, training):
    """The seam (test_objectives.py's contract): no .grad written, x and every submodule's mode
    untouched, a finite scalar with a graph, detached metrics, backward reaches every parameter."""
    model = _cnn(training)
    modes = [m.training for m in model.modules()]
    x, y = _batch(6)
    x.requires_grad_(True)  # even a leaf that requires grad gets no .grad
    x_before = x.detach().clone()
    out = create_objective(name, model, **kw)(x, y, CTX)
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert torch.equal(x.detach(), x_before)
    assert [m.training for m in model.modules()] == modes
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (6, K)
    for key, v in out.metrics.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), key
    assert "loss/" + name in out.metrics
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# ----------------------------------------------------------------------------- gradcheck
class _Functional(nn.Module):
    """``model`` run with the given parameter tensors (for gradcheck in the parameters)."""

    def __init__(self, model, names, tensors):
        super().__init__()
        self.inner, self.values = model, dict(zip(names, tensors, strict=True))

    def forward(self, x):
        return functional_call(self.inner, self.values, (x,))


REGULARISERS = {
    "igr": lambda m, x, y: input_gradient_penalty(m, x, y)[0],
    "jr_exact": lambda m, x, y: jacobian_norm_sq(m, x, n_proj=-1)[0],
    # the same two random projections at every evaluation: a fixed function of the parameters
    "jr_random": lambda m, x, y: jacobian_norm_sq(
        m, x, n_proj=2, generator=torch.Generator().manual_seed(5))[0],
    # "all": the SAGR path with no detached weights (q and the top-M choice are constants of
    # the parameters in the analytic gradient, so they are checked by the oracle below instead)
    "sagr_all": lambda m, x, y: sum(
        sagr_terms(m, x, y, false_classes="all", **WEIGHTS)[0].values()),
}


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_gradcheck_in_the_parameters(name):
    model = _mlp()
    x, y = _batch(3)
    names = [n for n, _ in model.named_parameters()]
    tensors = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def fn(*ts):
        return REGULARISERS[name](_Functional(model, names, ts), x, y).mean()

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- IGR
@pytest.mark.parametrize("n", [1, 5])
def test_igr_penalty_equals_a_per_sample_loop(n):
    model = _mlp()
    x, y = _batch(n)
    pen, ce, logits = input_gradient_penalty(model, x, y)
    expected = []
    for i in range(n):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi, create_graph=True)
        expected.append(g.pow(2).sum())
    expected = torch.stack(expected)
    _close(pen, expected)
    _close(ce, F.cross_entropy(model(x), y, reduction="none"))
    for a, b in zip(_grads(pen.mean(), model), _grads(expected.mean(), model), strict=True):
        _close(a, b)
    out = IGR(model, lam=0.7)(x, y, CTX)
    _close(out.loss, F.cross_entropy(model(x), y) + 0.7 * expected.mean())
    _close(out.metrics["loss/igr"], expected.mean().detach())


def test_igr_finite_difference_approaches_the_exact_norm():
    """Finlay & Oberman: ((ℓ(x + h d) - ℓ(x))/h)² → ‖∇ℓ‖² with error O(h) (float64, smooth);
    its parameter gradient (d detached) tends to the double-backprop one too."""
    model = _mlp()
    x, y = _batch(4)
    exact, _, _ = input_gradient_penalty(model, x, y)
    g_exact = _grads(exact.mean(), model)
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        fd, _, _ = input_gradient_penalty(model, x, y, method="finite_difference", h=h)
        errors.append(((fd - exact).abs() / exact).max().item())
        g_fd = _grads(fd.mean(), model)
    assert errors[0] < 0.1 and errors[2] < 1e-3
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5  # first order in h
    for a, b in zip(g_fd, g_exact, strict=True):
        _close(a, b, rtol=1e-2, atol=1e-5)


def test_igr_finite_difference_is_zero_without_gradient():
    model = ConstantModel(num_classes=K, sensitivity=0.0).double()
    x, y = _batch(3)
    fd, _, _ = input_gradient_penalty(model, x, y, method="finite_difference")
    assert torch.equal(fd, torch.zeros(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- JR
def test_jr_exact_equals_the_full_jacobian():
    model = _mlp()
    x, y = _batch(4)
    est, _ = jacobian_norm_sq(model, x, n_proj=-1)
    fro = _jacobians(model, x).pow(2).sum((1, 2))
    _close(est, fro)
    for a, b in zip(_grads(est.mean(), model), _grads(fro.mean(), model), strict=True):
        _close(a, b)


@pytest.mark.parametrize("n_proj", [1, 3])
def test_jr_random_projection_estimator_is_unbiased(n_proj):
    """Average of R independent estimates per sample vs the exact ‖J‖²_F. K·vᵀJJᵀv has finite
    variance, so by the CLT the mean lies within 5 standard errors (estimated from the draws)
    except with probability < 1e-6; the seed is fixed, so the test is deterministic anyway.
    With R = 4000 the standard error is ~2 % of ‖J‖²_F here, far below a missing factor K
    (-80 %) or a wrong 1/n_proj (x3 or /3)."""
    model = _mlp().eval()
    n, reps = 3, 4000
    x, _ = _batch(n)
    exact = _jacobians(model, x).pow(2).sum((1, 2)).detach()
    est, _ = jacobian_norm_sq(model, x.repeat(reps, 1, 1, 1), n_proj=n_proj,
                              generator=torch.Generator().manual_seed(0))
    draws = est.detach().view(reps, n)
    mean, se = draws.mean(0), draws.std(0) / reps ** 0.5
    assert (draws.std(0) > 0.05 * exact).all()  # really random
    assert ((mean - exact).abs() < 5 * se).all(), (mean, exact, se)


@pytest.mark.parametrize("n_proj", [1, 2, -1])
def test_jr_loss_is_the_reference_code_with_its_half(n_proj):
    """facebookresearch/jacobian_regularizer: ``CE + lambda_JR·JacobianReg(n)(x, z)``, with the
    same random vectors (global RNG, float32)."""
    model = _mlp(torch.float32)
    x, y = _batch(5, dtype=torch.float32)
    torch.manual_seed(11)
    out = JR(model, lam=0.3, n_proj=n_proj)(x, y, CTX)
    torch.manual_seed(11)
    xr = x.clone().requires_grad_(True)
    z = model(xr)
    expected = F.cross_entropy(z, y) + 0.3 * _reference_jacobian_reg(xr, z, n_proj)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["loss/jr"], 2 * (expected.detach() - out.metrics[
        "loss/ce"]) / 0.3, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SAGR
@pytest.mark.parametrize("mode, log_prob", [("aggregate", False), ("topM", False),
                                            ("all", False), ("aggregate", True)])
def test_sagr_terms_equal_the_jacobian_oracle(mode, log_prob):
    """Each of the four terms, value and parameter gradient (q detached, normalised by
    1 - p_y; [u]₊ and [u]₋ with their own weights; top-M by logit)."""
    model = _mlp()
    x, y = _batch(6, seed=3)
    terms, _ = sagr_terms(model, x, y, false_classes=mode, top_m=2,
                          grad_of="log_prob" if log_prob else "logit", **WEIGHTS)
    oracle = _sagr_oracle(model, x, y, **WEIGHTS, mode=mode, top_m=2, log_prob=log_prob)
    for t in TERMS:
        _close(terms[t], oracle[t])
        for a, b in zip(_grads(terms[t].mean(), model), _grads(oracle[t].mean(), model),
                        strict=True):
            _close(a, b)


def test_sagr_top_m_with_every_false_class_is_the_q_weighted_sum():
    """M = K - 1 (and any larger M, capped) covers every false class, each weighted by q_k."""
    model = _mlp()
    x, y = _batch(4)
    full = _sagr_oracle(model, x, y, **WEIGHTS, mode="topM", top_m=K - 1)
    for m in (K - 1, K + 3):
        terms, _ = sagr_terms(model, x, y, false_classes="topM", top_m=m, **WEIGHTS)
        for t in TERMS:
            _close(terms[t], full[t])


def test_sagr_with_unit_weights_and_every_row_is_the_frobenius_norm_and_twice_jr():
    """methods.md §5.3 reduction: a± = b± = 1 with every false row gives ‖J‖²_F exactly
    ([u]₊² + [u]₋² = u²), and JR's loss applies ½λ to it (so SAGR's penalty is twice JR's)."""
    model = _mlp()
    x, y = _batch(5)
    fro = _jacobians(model, x).pow(2).sum((1, 2))
    ones = {"a_pos": 1.0, "a_neg": 1.0, "b_pos": 1.0, "b_neg": 1.0}
    terms, _ = sagr_terms(model, x, y, false_classes="all", **ones)
    _close(sum(terms.values()), fro)
    lam = 0.4
    ce = F.cross_entropy(model(x), y)
    sagr = SAGR(model, lam=lam, false_classes="all", **ones)(x, y, CTX).loss - ce
    jr = JR(model, lam=lam, n_proj=-1)(x, y, CTX).loss - ce
    _close(sagr, lam * fro.mean())
    _close(sagr, 2 * jr)


def test_sagr_logs_four_terms_summing_to_r():
    model = _mlp()
    x, y = _batch(6)
    out = SAGR(model, lam=2.5)(x, y, CTX)
    m = out.metrics
    parts = [m[f"loss/sagr_{t}"] for t in TERMS]
    assert all(p > 0 for p in parts)
    _close(sum(parts), m["loss/sagr"])
    _close(out.loss.detach(), m["loss/ce"] + 2.5 * m["loss/sagr"])
    oracle = _sagr_oracle(model, x, y, a_pos=0.1, a_neg=1.0, b_pos=2.0, b_neg=1.0)
    for t in TERMS:  # the defaults of methods.md §5.3
        _close(m[f"loss/sagr_{t}"], oracle[t].mean().detach())


# ----------------------------------------------------------------------------- invariances
def _sagr_per_sample(m, x, y, mode):
    return torch.stack(list(sagr_terms(m, x, y, false_classes=mode, **WEIGHTS)[0].values()), 1)


PER_SAMPLE = {
    "igr": lambda m, x, y: input_gradient_penalty(m, x, y)[0],
    "igr_fd": lambda m, x, y: input_gradient_penalty(m, x, y, method="finite_difference")[0],
    "jr_exact": lambda m, x, y: jacobian_norm_sq(m, x, n_proj=-1)[0],
    "sagr_aggregate": lambda m, x, y: _sagr_per_sample(m, x, y, "aggregate"),
    "sagr_topM": lambda m, x, y: _sagr_per_sample(m, x, y, "topM"),
    "sagr_all": lambda m, x, y: _sagr_per_sample(m, x, y, "all"),
}


@pytest.mark.parametrize("name", sorted(PER_SAMPLE))
def test_per_sample_terms_do_not_depend_on_the_batch(name):
    """Eval mode (BatchNorm on running statistics): sample i's penalty alone = within a batch."""
    model = _cnn(train=False)
    x, y = _batch(5)
    batch = PER_SAMPLE[name](model, x, y)
    alone = torch.cat([PER_SAMPLE[name](model, x[i:i + 1], y[i:i + 1]) for i in range(5)])
    _close(batch, alone, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name, kw", [("igr", {}), ("igr", {"method": "finite_difference"}),
                                      ("jr", {}), ("sagr", {}), ("sagr", {"false_classes":
                                                                          "topM"})])
def test_lambda_zero_is_natural_training(name, kw):
    model = _cnn(train=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(6)
    ref = Natural(model)(x, y, CTX)
    g_ref = _grads(ref.loss, model)
    model.load_state_dict(state)
    out = create_objective(name, model, lam=0.0, **kw)(x, y, CTX)
    _close(out.loss, ref.loss, rtol=0, atol=0)
    _close(out.metrics["loss/ce"], ref.metrics["loss/ce"], rtol=0, atol=0)
    for a, b in zip(_grads(out.loss, model), g_ref, strict=True):
        _close(a, b, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- SAGR+AT
def test_sagr_at_regularises_the_attacks_x_adv():
    model = _mlp()
    x, y = _batch(5)
    attack = _FixedAttack(model, eps=0.05)
    x_adv = attack(x, y)
    attack.calls = 0
    out = SAGR(model, attack, lam=0.8, **WEIGHTS)(x, y, CTX)
    assert attack.calls == 1
    at_adv = sum(_sagr_oracle(model, x_adv, y, **WEIGHTS).values())
    at_clean = sum(_sagr_oracle(model, x, y, **WEIGHTS).values())
    assert not torch.allclose(at_adv, at_clean, rtol=1e-3)
    _close(out.loss, F.cross_entropy(model(x_adv), y) + 0.8 * at_adv.mean())
    _close(out.logits, model(x_adv))  # the adversarial logits are returned, as PGD-AT
    m = out.metrics
    assert {"loss/ce_adv", "acc_adv", "steps_per_sample", "eps_mean"} <= set(m)
    assert "loss/ce" not in m and m["steps_per_sample"] == 3
    # λ = 0: PGD-AT on the same x'
    at = SAGR(model, attack, lam=0.0)(x, y, CTX)
    pgdat = PGDAT(model, attack)(x, y, CTX)
    _close(at.loss, pgdat.loss, rtol=0, atol=0)
    for a, b in zip(_grads(at.loss, model), _grads(pgdat.loss, model), strict=True):
        _close(a, b, rtol=1e-12, atol=1e-15)


def test_sagr_at_default_attack_is_madry_pgd_on_the_bare_module():
    model = _mlp()
    wrapped = nn.DataParallel(model)
    assert SAGR(wrapped).attack is None
    a = SAGR(wrapped, adversarial=True, eps=0.3, alpha=0.01, steps=40).attack
    assert isinstance(a, PGD) and a.model is model and a.select == "last"
    assert (a.loss, a.random_start, a.steps, a.eps, a.alpha) == ("ce", True, 40, 0.3, 0.01)
    mine = _FixedAttack(model)
    assert SAGR(model, mine).attack is mine and SAGR(model, mine).adversarial
    with pytest.raises(ValueError, match="adversarial"):
        SAGR(model, mine, adversarial=False)

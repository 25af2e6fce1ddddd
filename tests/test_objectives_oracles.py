"""Independent oracles for the objectives (issue 9 §2): each reference is written out plainly here,
after the authors' code, and compared in float64 with the objective.

A reduction that compares two robustkit code paths shares their helpers and so cannot catch a
mistake inside them (architecture.md §5, "mistake-proof"); these tests recompute from scratch:

- TRADES' and MART's inner attacks: the loops of yaodongyu/TRADES:trades.py and
  YisenWang/MART:mart.py (start x + 0.001·N(0, I), K signed steps, clip to the ball then [0, 1],
  model in eval mode), fed the same noise by reseeding the global generator;
- TRADES' and MART's outer losses and their parameter gradients (methods.md §2.2, §2.3);
- GAIRAT's Tanh weights (methods.md §2.4, GAIR.py) and the weighted loss;
- AWP's ascent step ``v_l = γ‖w_l‖ g_l/‖g_l‖`` (Wu et al. 2020, utils_awp.py) and its direction.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustkit.attacks.base import AttackResult
from robustkit.objectives import AWP, GAIRAT, MART, TRADES, TrainContext
from robustkit.objectives import functional as Fn
from robustkit.testing import TinyCNN

N, SHAPE, K = 6, (3, 8, 8), 10
CTX = TrainContext(epoch=0, epochs=1)


def _model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(in_channels=3, num_classes=K).double().train()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # pixels in [0.005, 0.995]: the 0.001·N(0, I) start (|z| < 5 here) stays inside [0, 1], where
    # robustkit's projected start and the reference's unprojected one coincide; ε = 0.1 still
    # lets the steps reach the [0, 1] box for the pixels near its edges
    x = 0.005 + 0.99 * torch.rand((N, *SHAPE), generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return x, y


def _adv_in_ball(x: torch.Tensor, eps: float, seed: int = 2) -> torch.Tensor:
    """A fixed x' in the ε-ball ∩ [0, 1] (outer-loss oracles need no attack)."""
    g = torch.Generator().manual_seed(seed)
    return (x + eps * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1)).clamp(0, 1)


def _grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


# ----------------------------------------------------------------------------- inner attacks
def _reference_inner_attack(model, x, y, noise, *, loss, eps, alpha, steps):
    """trades.py / mart.py's loop, verbatim in substance (model.eval() before it, as there)."""
    model.eval()
    x_adv = x.detach() + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            if loss == "kl":  # nn.KLDivLoss(size_average=False): KL(p(x) ‖ p(x')), summed
                loss_value = F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                      F.softmax(model(x), dim=1), reduction="sum")
            else:
                loss_value = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_value, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


@pytest.mark.parametrize("cls, loss", [(TRADES, "kl"), (MART, "ce")])
def test_inner_attack_equals_the_reference_loop(cls, loss):
    model = _model()
    x, y = _batch()
    eps, alpha, steps = 0.1, 0.03, 5
    objective = cls(model, eps=eps, alpha=alpha, steps=steps)
    torch.manual_seed(5)
    adv = objective.perturb(x, y, CTX)
    assert model.training  # the attack restored train mode
    torch.manual_seed(5)  # the same draw: robustkit's start is its first and only draw
    noise = torch.randn(x.shape, dtype=torch.float64)
    ref = _reference_inner_attack(model, x, y, noise, loss=loss, eps=eps, alpha=alpha,
                                  steps=steps)
    assert torch.allclose(adv.x_adv, ref, atol=1e-12, rtol=0)
    # the comparison has teeth: the iterate left the start, and some pixels sit on the [0, 1] box
    assert (adv.x_adv - x).abs().amax() > 0.05
    assert ((adv.x_adv == 0) | (adv.x_adv == 1)).any()


# ----------------------------------------------------------------------------- outer losses
def test_trades_loss_and_gradients_equal_the_reference():
    """trades.py: CE(f(x), y) + β·KLDivLoss(sum)(log p(x'), p(x)) / B, train mode, gradients
    through both p(x) and p(x')."""
    model = _model()
    x, y = _batch()
    x_adv = _adv_in_ball(x, 0.1)
    beta = 6.0
    out = TRADES(model, beta=beta, steps=1).loss(x, y, AttackResult(x_adv), CTX)
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    p_nat = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
    logits_adv = model(x_adv)
    log_p_adv = logits_adv - torch.logsumexp(logits_adv, dim=1, keepdim=True)
    kl = (p_nat * (torch.log(p_nat) - log_p_adv)).sum() / N
    ref = loss_natural + beta * kl
    assert abs(out.loss.item() - ref.item()) < 1e-12
    assert float(out.metrics["loss/kl"]) == pytest.approx(kl.item(), abs=1e-12)
    for a, b in zip(_grads(out.loss, model), _grads(ref, model), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


def test_mart_loss_and_gradients_equal_the_reference():
    """mart.py: BCE on the adversarial logits with the most likely wrong class (argsort), plus
    β·Σ_k KL(p(x) ‖ p(x'))·(1.0000001 − p_y(x)) / B; the weight is not detached."""
    model = _model()
    x, y = _batch()
    x_adv = _adv_in_ball(x, 0.3)  # a large ball: the KL term is far from 0
    beta = 6.0
    out = MART(model, beta=beta, steps=1).loss(x, y, AttackResult(x_adv), CTX)
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    rows = torch.arange(N)
    loss_adv = (F.cross_entropy(logits_adv, y)
                - torch.log(1.0001 - adv_probs[rows, new_y] + 1e-12).mean())
    nat_probs = F.softmax(logits, dim=1)
    kl = (nat_probs * (torch.log(nat_probs) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    loss_robust = (kl * (1.0000001 - nat_probs[rows, y])).sum() / N
    ref = loss_adv + beta * loss_robust
    assert beta * loss_robust.item() > 1e-3  # the KL term weighs in the comparison
    assert abs(out.loss.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(out.loss, model), _grads(ref, model), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------- GAIRAT
def _gair_reference(kappa: list[int], steps: int, lam: float) -> torch.Tensor:
    """GAIR.py's Tanh weights, one float at a time: ((λ + (⌊K/2⌋ − κ)·5/⌊K/2⌋).tanh() + 1)/2,
    then scaled to sum to B (methods.md §2.4)."""
    half = int(steps / 2)
    w = [(math.tanh(lam + (half - k) * 5 / half) + 1) / 2 for k in kappa]
    return torch.tensor([wi * len(w) / sum(w) for wi in w], dtype=torch.float64)


@pytest.mark.parametrize("steps", [10, 7, 3, 2])  # odd K: ⌊K/2⌋ = 3, not 3.5; ⌊K/2⌋ = 1
@pytest.mark.parametrize("lam", [-1.0, 0.0, 1.5])
def test_gair_weights_equal_the_formula(steps, lam):
    kappa = list(range(steps + 1))
    got = Fn.gair_weights(torch.tensor(kappa), steps, lam).double()
    ref = _gair_reference(kappa, steps, lam)
    assert torch.allclose(got, ref, rtol=1e-5, atol=0)  # relative: the tiny weights count too
    assert not got.requires_grad


def test_gairat_loss_is_the_weighted_ce_of_the_formula():
    model = _model()
    x, y = _batch()
    x_adv = _adv_in_ball(x, 0.1)
    steps, kappa = 7, [0, 1, 3, 4, 6, 7]
    objective = GAIRAT(model, steps=steps, lam=-1.0, burn_in=0.0)
    adv = AttackResult(x_adv, {"kappa": torch.tensor(kappa)})
    out = objective.loss(x, y, adv, TrainContext(epoch=5, epochs=10))
    ce = F.cross_entropy(model(x_adv), y, reduction="none")
    ref = (_gair_reference(kappa, steps, -1.0) * ce).mean()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(out.metrics["omega_i"].double(), _gair_reference(kappa, steps, -1.0),
                          rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- AWP
def _weights(model) -> dict[str, torch.nn.Parameter]:
    """utils_awp.py's diff_in_weights: parameters with > 1 dims named ``*weight``."""
    return {n: p for n, p in model.named_parameters() if p.dim() > 1 and n.endswith("weight")}


def test_awp_ascent_step_equals_the_reference_and_raises_the_inner_loss():
    model = _model()
    x, y = _batch()
    gamma = 1e-3  # small: the first-order increase Σ γ‖w_l‖‖g_l‖ dominates
    awp = AWP(model, inner="pgd_at", eps=0.1, alpha=0.03, steps=2, gamma=gamma)
    adv = awp.perturb(x, y, CTX)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    w = {n: p.detach().clone() for n, p in _weights(model).items()}
    # the reference: g_l = ∂CE(f_w(x'), y)/∂w_l in train mode, v_l = γ‖w_l‖·g_l/‖g_l‖
    loss_w = F.cross_entropy(model(adv.x_adv), y)
    g = dict(zip(w, torch.autograd.grad(loss_w, list(_weights(model).values())), strict=True))
    v_ref = {n: gamma * w[n].norm() * g[n] / g[n].norm() for n in w}
    model.load_state_dict(buffers)  # undo the reference forward's BatchNorm update
    out = awp.loss(x, y, adv, CTX)
    for n, p in _weights(model).items():
        assert torch.allclose(p.detach() - w[n], v_ref[n], rtol=1e-9, atol=1e-15), n
    assert out.loss.item() > loss_w.item()  # an ascent: the inner loss grew at w + v
    awp.after_step()
    for n, p in _weights(model).items():
        assert torch.equal(p.detach(), w[n]), n

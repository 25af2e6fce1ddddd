"""SNS, sensitive-neuron stabilisation (methods.md §4.3): reductions to PGD-AT and TRADES, the
loss against a plain re-derivation (features from direct submodule calls, not FeatureTap),
top-k = the k largest σ, the distances by hand, two separate train-mode passes, gradients
through both branches, the per-epoch selection and its resume, layers and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.base import AttackResult
from robustkit.models import create_model
from robustkit.objectives import PGDAT, SNS, TRADES, TrainContext, create_objective
from robustkit.objectives.sns import default_layers, neuron_distance
from robustkit.testing import IdentityFeatures, TinyCNN, random_batch

N, SHAPE, K = 8, (3, 8, 8), 10
CTX = TrainContext(epoch=0, epochs=10, step=0, idx=torch.arange(N))


def _model(double: bool = False) -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=K).train()
    return model.double() if double else model


def _batch(double: bool = False):
    x, y = random_batch(N, SHAPE, K, seed=1)
    g = torch.Generator().manual_seed(2)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    return (x.double(), y, x_adv.double()) if double else (x, y, x_adv)


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference_loss(model, x, y, x_adv, layers, lam, ratio):
    """SNS written out plainly: separate train-mode passes, features by calling the submodules
    directly, σ per channel, ``torch.topk``, per-element L1, averaged over layers."""
    conv, bn = model.features[0], model.features[1]
    logits_adv = model(x_adv)
    feats = {"features.0": (conv(x), conv(x_adv))}
    # BN output in train mode normalises with the *batch* statistics, as in the passes
    feats["features.1"] = (bn(feats["features.0"][0]), bn(feats["features.0"][1]))
    terms = []
    for name in layers:
        a, b = feats[name]
        sigma = (a - b).detach().abs().mean(dim=(2, 3)).mean(0)
        k = math.ceil(ratio * a.shape[1])
        idx = torch.topk(sigma, k).indices
        terms.append((a[:, idx] - b[:, idx]).abs().mean())
    return F.cross_entropy(logits_adv, y) + lam * sum(terms) / len(terms)


# ------------------------------------------------------------------------------ reductions
def test_lambda_zero_is_pgd_at_exactly():
    """Same loss, parameter gradients and BN statistics as PGD-AT from the same attack seed."""
    x, y, _ = _batch()
    outs = []
    for cls, kw in ((PGDAT, {}), (SNS, {"lam": 0.0})):
        model = _model()
        obj = cls(model, eps=8 / 255, alpha=2 / 255, steps=3, **kw)
        torch.manual_seed(5)  # the uniform random start
        out = obj(x, y, CTX)
        outs.append((out.loss, _grads(model, out.loss), model.state_dict(), out.logits))
    (l0, g0, s0, z0), (l1, g1, s1, z1) = outs
    assert torch.equal(l0, l1) and torch.equal(z0, z1)
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def test_lambda_zero_with_trades_base_is_trades():
    x, y, _ = _batch()
    outs = []
    for cls, kw in ((TRADES, {}), (SNS, {"lam": 0.0, "base": "trades"})):
        model = _model()
        obj = cls(model, beta=3.0, eps=8 / 255, steps=3, **kw)
        assert obj.attack.settings()["loss"] == "kl"
        assert obj.attack.settings()["random_start"] == "normal"
        assert obj.attack.settings()["alpha"] == pytest.approx(0.007)
        torch.manual_seed(5)
        out = obj(x, y, CTX)
        outs.append((out.loss, _grads(model, out.loss)))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ the loss itself
@pytest.mark.parametrize("layers", [["features.0"], ["features.0", "features.1"]])
def test_loss_and_gradients_match_a_plain_rederivation(layers):
    """Catches a joint [x; x'] pass, a missing H·W normalisation, the smallest σ instead of the
    largest, a detached branch and a sum (not mean) over layers."""
    x, y, x_adv = _batch(double=True)
    lam, ratio = 0.7, 0.3  # k = ceil(0.3 · 8) = 3
    model = _model(double=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    obj = SNS(model, lam=lam, layers=layers, ratio=ratio, steps=1)
    out = obj.loss(x, y, AttackResult(x_adv), CTX)
    got = _grads(model, out.loss)
    model.load_state_dict(state)
    ref = _reference_loss(model, x, y, x_adv, layers, lam, ratio)
    want = _grads(model, ref)
    assert torch.allclose(out.loss, ref, rtol=1e-12, atol=1e-14)
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), name
    assert out.metrics["loss/sns"] > 0 and out.logits.shape == (N, K)


def test_online_topk_is_the_k_largest_sigma_of_the_batch():
    """F = the input: channel c of x' is x + δ_c, so σ_c = |δ_c|; k = ceil(0.3 · 10) = 3."""
    model = IdentityFeatures((10, 2, 2), K)
    x = 0.3 + 0.4 * torch.rand(4, 10, 2, 2)
    delta = torch.tensor([0.05, -0.2, 0.01, 0.15, -0.02, 0.0, 0.12, -0.03, 0.08, 0.04])
    x_adv = x + delta.view(1, -1, 1, 1)
    obj = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.3, steps=1)
    out = obj.loss(x, torch.zeros(4, dtype=torch.long), AttackResult(x_adv), CTX)
    assert obj.selected["net.feat"].tolist() == [1, 3, 6]  # |δ| 0.2, 0.15, 0.12, largest first
    assert out.metrics["loss/sns"].item() == pytest.approx((0.2 + 0.15 + 0.12) / 3, rel=1e-5)
    sigma = out.metrics["sigma/net.feat"].item()
    assert sigma == pytest.approx(delta.abs().mean().item(), rel=1e-5)
    # another batch, other sensitive channels: the set follows the batch (online)
    obj.loss(x, torch.zeros(4, dtype=torch.long), AttackResult(x - delta.flip(0).view(1, -1, 1, 1)),
             CTX)
    assert obj.selected["net.feat"].tolist() == [8, 6, 3]


def test_distances_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    b = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]], [[0.0, 0.0], [0.0, -1.0]]]])
    assert neuron_distance(a, b, "l1").tolist() == [[0.75, 0.5]]  # (1+0+2+0)/4, 2/4
    assert neuron_distance(a, b, "l2").tolist() == [[1.25, 1.0]]  # (1+0+4+0)/4, 4/4
    cos = neuron_distance(a, b, "cos")
    assert cos[0, 0].item() == pytest.approx(1 - 35 / math.sqrt(30 * 45))
    assert cos[0, 1].item() == pytest.approx(2.0)  # opposite maps
    zero = torch.zeros(1, 1, 2, 2)  # a dead channel: finite, cos taken as 0
    assert neuron_distance(zero, zero, "cos").item() == pytest.approx(1.0)
    lin = neuron_distance(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]]), "l1")
    assert lin.tolist() == [[0.5, 3.0]]  # a linear layer: H·W = 1


def test_only_cos_is_blind_to_the_feature_scale():
    """Why the shipped configs use cos: a ReLU network can scale a layer's features by c and undo
    it downstream, which scales the L1 (L2) term by c (c²) but leaves 1 − cos unchanged; dead
    features (all zero) cost the most under cos, nothing under L1."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    c = 1e-3
    torch.testing.assert_close(neuron_distance(c * a, c * b, "l1"), c * neuron_distance(a, b, "l1"))
    torch.testing.assert_close(neuron_distance(c * a, c * b, "l2"),
                               c * c * neuron_distance(a, b, "l2"))
    torch.testing.assert_close(neuron_distance(c * a, c * b, "cos"), neuron_distance(a, b, "cos"))
    zero = torch.zeros(1, 2, 3, 3)
    assert neuron_distance(zero, zero, "l1").max() == 0
    assert neuron_distance(zero, zero, "cos").min() == 1


@pytest.mark.parametrize("distance, want", [("l1", 1.0), ("l2", 1.0), ("cos", 0.0)])
def test_sensitive_set_is_ranked_by_sigma_whatever_the_distance(distance, want):
    """Channel 0 moves by [1, 1, 1, 1] (σ = 1), channel 1 by [3, 0, 0, 0] (σ = 0.75, but squared
    L2 2.25 and 1 − cos > 0): k = 1 picks channel 0 for every distance, so the term is channel
    0's distance: L1 1, squared L2 1, and 1 − cos = 0 (a constant map scaled from 1 to 2)."""
    model = IdentityFeatures((2, 2, 2), K)
    x = torch.ones(1, 2, 2, 2)
    x_adv = x + torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]]])
    obj = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.5, distance=distance, steps=1)
    out = obj.loss(x, torch.zeros(1, dtype=torch.long), AttackResult(x_adv), CTX)
    assert obj.selected["net.feat"].tolist() == [0]
    assert out.metrics["loss/sns"].item() == pytest.approx(want, abs=1e-6)


def test_cos_on_a_linear_layer_is_refused():
    obj = SNS(_model(), layers=["fc"], distance="cos", steps=1)
    x, y, x_adv = _batch()
    with pytest.raises(ValueError, match="H·W > 1.*fc"):
        obj.loss(x, y, AttackResult(x_adv), CTX)


# ------------------------------------------------------------------------- passes and graph
def test_batchnorm_sees_two_separate_train_mode_passes():
    x, y, x_adv = _batch()
    model = _model()
    ref = _model()
    SNS(model, lam=1.0, layers=["features.0"], steps=1).loss(x, y, AttackResult(x_adv), CTX)
    ref(x)
    ref(x_adv)
    joint = _model()
    joint(torch.cat([x, x_adv]))
    bn, bn_ref, bn_joint = model.features[1], ref.features[1], joint.features[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 2
    assert not torch.allclose(bn_joint.running_var, bn_ref.running_var)  # the test can tell


def test_gradients_flow_through_both_branches_and_not_into_the_attack():
    model = _model()
    x, y, x_adv = _batch()
    obj = SNS(model, lam=1.0, layers=["features.0", "features.1"], ratio=0.5, steps=2)
    adv = obj.perturb(x, y, CTX)
    assert not adv.x_adv.requires_grad and adv.x_adv.grad_fn is None  # the attack is detached
    grads = {}
    for lam in (0.0, 1.0):
        obj.lam = lam
        xc = x.clone().requires_grad_(True)
        xa = x_adv.clone().requires_grad_(True)
        loss = obj.loss(xc, y, AttackResult(xa), CTX).loss
        grads[lam] = torch.autograd.grad(loss, [xc, xa], allow_unused=True)
    # PGD-AT base: x reaches the loss only through the clean features of the regulariser
    assert grads[0.0][0] is None and grads[1.0][0].abs().sum() > 0
    # and x' through CE plus its own features
    assert not torch.allclose(grads[0.0][1], grads[1.0][1])


def test_contract_metrics_modes_hooks_and_grads():
    model = _model()
    model.features[1].eval()  # a frozen BN must stay frozen
    modes = [m.training for m in model.modules()]
    x, y, _ = _batch()
    obj = create_objective("sns", model, steps=2, layers=["features.0", "fc"])
    out = obj(x, y, CTX)
    assert [m.training for m in model.modules()] == modes and _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert out.logits.shape == (N, K)
    want = {"loss/ce_adv", "loss/sns", "acc_adv", "acc_clean", "steps_per_sample",
            "sigma/features.0", "sigma/fc"}
    assert want <= set(out.metrics)
    for key, v in out.metrics.items():
        assert not v.requires_grad and v.dim() == 0, key
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    bad = torch.rand(2, 5, 8, 8)  # 5 channels: the first conv raises inside the tap
    with pytest.raises(RuntimeError):  # a failing forward leaves no hook behind either
        obj.loss(bad, y[:2], AttackResult(bad), CTX)
    assert _hooks(model) == 0


# ------------------------------------------------------------------------- per-epoch top-k
def test_epoch_topk_fixes_the_set_from_the_previous_epoch_and_survives_resume():
    model = IdentityFeatures((10, 2, 2), K)
    y = torch.zeros(4, dtype=torch.long)
    x = 0.3 + 0.4 * torch.rand(4, 10, 2, 2)

    def delta(**channels):
        d = torch.zeros(10)
        for c, v in channels.items():
            d[int(c[1:])] = v
        return d.view(1, -1, 1, 1)

    obj = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.1, topk="epoch", steps=1)

    def step(obj, d, epoch):
        obj.loss(x, y, AttackResult(x + d), TrainContext(epoch=epoch))
        return obj.selected["net.feat"].tolist()

    assert step(obj, delta(c0=0.20, c9=0.10), 0) == [0]  # epoch 0: the first batch decides ...
    assert step(obj, delta(c9=0.25), 0) == [0]  # ... for the whole epoch (online would say 9)
    state = obj.state_dict()
    assert set(state) == {"epoch", "pairs", "sigma_sum/net.feat"} and state["pairs"] == 8
    # epoch 1: epoch 0's mean σ is 0.1 for channel 0 and (0.1 + 0.25) / 2 for channel 9
    assert step(obj, delta(c8=0.15), 1) == [9]
    assert step(obj, delta(c8=0.15), 1) == [9]
    fresh = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.1, topk="epoch", steps=1)
    fresh.load_state_dict(state)  # resumed after epoch 0: the same set
    assert step(fresh, delta(c8=0.15), 1) == [9]
    # epoch 2 follows epoch 1's σ alone (channel 8), not the sum since epoch 0 (channel 9)
    assert step(obj, delta(c0=0.5), 2) == [8]
    with pytest.raises(ValueError, match="expected keys"):
        fresh.load_state_dict({"epoch": torch.tensor(0)})
    with pytest.raises(ValueError, match="no state"):
        SNS(model, layers=["net.feat"], steps=1).load_state_dict(state)


def test_a_non_finite_batch_gives_a_non_finite_loss_for_the_trainer_not_an_error():
    """An fp16 overflow makes σ NaN: SNS must hand the trainer a non-finite loss (it skips or
    aborts the step) instead of raising, and in "epoch" mode that batch must not poison the
    next epoch's set."""
    model = IdentityFeatures((10, 2, 2), K)
    y = torch.zeros(4, dtype=torch.long)
    x = 0.3 + 0.4 * torch.rand(4, 10, 2, 2)
    d = torch.zeros(1, 10, 1, 1)
    d[0, 3] = 0.2
    broken = (x + d).clone()
    broken[0, 5] = float("nan")
    online = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.1, steps=1)
    out = online.loss(x, y, AttackResult(broken), CTX)
    assert not torch.isfinite(out.loss)
    obj = SNS(model, lam=1.0, layers=["net.feat"], ratio=0.1, topk="epoch", steps=1)
    obj.loss(x, y, AttackResult(x + d), TrainContext(epoch=0))
    assert not torch.isfinite(obj.loss(x, y, AttackResult(broken), TrainContext(epoch=0)).loss)
    assert obj.state_dict()["pairs"] == 4  # the broken batch is not counted
    out = obj.loss(x, y, AttackResult(x + d), TrainContext(epoch=1))
    assert obj.selected["net.feat"].tolist() == [3] and torch.isfinite(out.loss)


# ------------------------------------------------------------------------- layers, errors
def test_default_layers_follow_methods_table():
    small = create_model("small_cnn", 10, in_channels=1, input_size=28)
    assert default_layers(small) == ["model.feature_extractor.conv3",
                                     "model.feature_extractor.conv4"]
    assert default_layers(create_model("preact_resnet18", 10)) == ["model.layer3", "model.layer4"]
    assert default_layers(create_model("cifar_cnn", 10)) == ["model.block3", "model.block4"]
    assert default_layers(TinyCNN()) == ["features.0"]
    assert SNS(small, steps=1).layers == default_layers(small)
    with pytest.raises(ValueError, match="name the regularised modules"):
        default_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


@pytest.mark.parametrize("kw, match", [
    ({"layers": ["features.9"]}, r"unknown layer.*features\.0.*fc"),
    ({"layers": "features.0"}, "list of module names"),
    ({"lam": -1.0}, "lam"),
    ({"ratio": 0.0}, "ratio"),
    ({"distance": "l3"}, "distance"),
    ({"topk": "batch"}, "topk"),
    ({"base": "mart"}, "base"),
])
def test_bad_arguments_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        SNS(_model(), steps=1, **kw)


def test_registry_and_alpha_defaults():
    obj = create_objective("sns", _model(), steps=1)
    assert isinstance(obj, SNS) and obj.alpha == pytest.approx(2 / 255)
    assert obj.attack.settings()["loss"] == "ce" and obj.attack.settings()["select"] == "last"
    with pytest.raises(ValueError, match="'lamb'.*'lam'"):
        create_objective("sns", _model(), lamb=1.0)

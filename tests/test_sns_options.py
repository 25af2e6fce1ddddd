"""SNS options of issue 20 (b): the relative L1 distance and the λ warm-up.

Oracles written out in the tests: a per-sample loop for ``‖F(x') − F(x)‖₁ / sg(‖F(x)‖₁)``,
its gradient by hand (the denominator a constant), and ``λ·min(1, t/k)`` per epoch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustkit.attacks.base import AttackResult
from robustkit.objectives import SNS, TrainContext, create_objective
from robustkit.objectives.sns import neuron_distance
from robustkit.testing import IdentityFeatures, TinyCNN, random_batch

K = 10
EPS = 1e-6  # the documented eps added to the detached ‖F(x)‖₁


def _pair(shape, seed=0, double=True):
    """Features of very different scales and relative changes per sample, so a batch-global
    ratio (Σ_n‖ΔF_n‖ / Σ_n‖F_n‖, dominated by the largest sample) differs from the per-sample
    mean."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    scale = torch.logspace(-2, 2, shape[0], dtype=dtype).reshape(-1, *[1] * (len(shape) - 1))
    a = scale * torch.randn(shape, generator=g, dtype=dtype)
    level = torch.linspace(0.05, 1.0, shape[0], dtype=dtype).reshape(scale.shape)
    b = a + scale * level * torch.randn(shape, generator=g, dtype=dtype)
    return a, b


def _loop_relative_l1(a, b):
    """Per sample n: Σ_{c,hw} |a − b| / (Σ_{c,hw} |a| + eps); returns (N,) floats."""
    out = []
    for n in range(a.shape[0]):
        num = sum(abs(float(u) - float(v)) for u, v in zip(a[n].flatten(), b[n].flatten(),
                                                           strict=True))
        den = sum(abs(float(u)) for u in a[n].flatten()) + EPS
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (4, 6)], ids=["conv", "linear"])
def test_relative_l1_against_a_per_sample_loop(shape):
    a, b = _pair(shape)
    d = neuron_distance(a, b, "relative_l1")
    assert d.shape == shape[:2]
    want = _loop_relative_l1(a, b)
    torch.testing.assert_close(d.mean(-1), want, rtol=1e-12, atol=0)
    # each channel's entry is its share, C·‖ΔF^c‖₁ / (‖F‖₁ + eps)
    c = shape[1]
    for n in range(shape[0]):
        den = a[n].abs().sum() + EPS
        for ch in range(c):
            share = c * (a[n, ch] - b[n, ch]).abs().sum() / den
            assert d[n, ch].item() == pytest.approx(share.item(), rel=1e-12)
    # per sample, then the mean: not one ratio of batch sums
    glob = (a - b).abs().sum() / a.abs().sum()
    assert abs(d.mean().item() - glob.item()) > 0.01


def test_relative_l1_gradient_does_not_flow_through_the_denominator():
    """d/da of mean_n ‖a_n − b_n‖₁ / D_n with D_n = sg(‖a_n‖₁) + eps is sign(a − b) / (N·D_n);
    through D_n it would add −mean term·sign(a)/D_n, which differs."""
    a, b = _pair((3, 2, 3, 3), seed=1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    neuron_distance(a, b, "relative_l1").mean().backward()
    n = a.shape[0]
    den = (a.detach().abs().sum(dim=(1, 2, 3)) + EPS).reshape(-1, 1, 1, 1)
    want = torch.sign(a.detach() - b.detach()) / (n * den)
    torch.testing.assert_close(a.grad, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.grad, -want, rtol=1e-12, atol=1e-15)


def test_relative_l1_is_scale_free_and_finite_on_dead_features():
    a, b = _pair((4, 3, 5, 5), seed=2)
    for c in (1e-1, 1e3):  # up to the eps (‖F‖₁ of the smallest sample here is about 0.4)
        torch.testing.assert_close(neuron_distance(c * a, c * b, "relative_l1"),
                                   neuron_distance(a, b, "relative_l1"), rtol=1e-4, atol=0)
    zero = torch.zeros(2, 3, 2, 2)
    assert neuron_distance(zero, zero, "relative_l1").abs().max() == 0
    d = neuron_distance(zero, torch.ones(2, 3, 2, 2), "relative_l1")
    assert torch.isfinite(d).all() and d.mean().item() == pytest.approx(12 / EPS)
    half = neuron_distance(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), "relative_l1")
    assert half.mean().item() == pytest.approx(8 / (8 + EPS))  # ‖ΔF‖ = ‖F‖: 1


def test_sns_relative_l1_term_is_the_mean_over_samples_of_the_selected_neurons_ratio():
    """The loss term: top-k by σ (paper L1), then per sample ‖ΔF_S‖₁ / sg(‖F_S(x)‖₁) over the
    selected channels only, mean over samples; the loss is CE(f(x')) + λ·term."""
    x, x_adv = _pair((5, 6, 2, 2), seed=3, double=False)
    x, x_adv = x.abs(), x_adv.abs()
    y = torch.arange(5) % K
    model = IdentityFeatures((6, 2, 2), K)
    lam, ratio = 0.4, 0.5  # k = 3 of 6 channels
    obj = SNS(model, lam=lam, layers=["net.feat"], ratio=ratio, distance="relative_l1", steps=1)
    ctx = TrainContext(epoch=0, epochs=1)
    out = obj.loss(x, y, AttackResult(x_adv), ctx)
    sigma = (x - x_adv).abs().mean(dim=(2, 3)).mean(0)
    idx = torch.topk(sigma, 3).indices
    want = _loop_relative_l1(x[:, idx].double(), x_adv[:, idx].double()).mean()
    assert sorted(obj.selected["net.feat"].tolist()) == sorted(idx.tolist())
    assert out.metrics["loss/sns"].item() == pytest.approx(want.item(), rel=1e-5)
    ce = F.cross_entropy(model(x_adv), y)
    assert out.loss.item() == pytest.approx((ce + lam * want).item(), rel=1e-5)


def test_relative_l1_through_the_registry_and_on_a_linear_layer():
    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=K).train()
    obj = create_objective("sns", model, distance="relative_l1", layers=["fc"], steps=1)
    x, y = random_batch(4, (3, 8, 8), K, seed=1)
    out = obj.loss(x, y, AttackResult((x + 0.05).clamp(0, 1)), TrainContext())
    assert torch.isfinite(out.loss) and out.metrics["loss/sns"] > 0


# -------------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize("k, epochs, want", [
    (3, 10, {0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1.0, 9: 1.0}),
    (1, 5, {0: 0.0, 1: 1.0, 4: 1.0}),
    (20, 10, {0: 0.0, 1: 1 / 20, 9: 9 / 20}),  # longer than the run: never reaches λ
    (0, 10, {0: 1.0, 9: 1.0}),  # off: λ from the first epoch
])
def test_lam_warmup_values_per_epoch(k, epochs, want):
    lam = 0.6
    obj = SNS(TinyCNN(in_channels=3, num_classes=K), lam=lam, lam_warmup_epochs=k, steps=1)
    for epoch, frac in want.items():
        assert obj.lam_at(epoch, epochs) == pytest.approx(lam * frac, rel=1e-12, abs=1e-15), epoch
    assert obj.lam_at(0, epochs) == (0.0 if k else lam)  # exact at the edges
    if k and k <= epochs - 1:
        assert obj.lam_at(k, epochs) == lam and obj.lam_at(k - 1, epochs) < lam


def test_the_loss_uses_the_epochs_lambda_and_logs_it():
    """Epoch 0 of a 2-epoch warm-up: the base loss bit for bit (the term computed and logged);
    epoch 1: base + λ/2·term; epoch 2: base + λ·term."""
    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=K).train()
    lam = 0.8
    obj = SNS(model, lam=lam, lam_warmup_epochs=2, layers=["features.0"], steps=1)
    x, y = random_batch(6, (3, 8, 8), K, seed=1)
    adv = AttackResult((x + 0.05).clamp(0, 1))
    for epoch, frac in ((0, 0.0), (1, 0.5), (2, 1.0), (7, 1.0)):
        out = obj.loss(x, y, adv, TrainContext(epoch=epoch, epochs=8))
        base, term = out.metrics["loss/ce_adv"], out.metrics["loss/sns"]
        assert term > 0 and out.metrics["lam_t"].item() == pytest.approx(lam * frac)
        if frac == 0:
            assert torch.equal(out.loss.detach(), base)
        else:
            assert out.loss.item() == pytest.approx((base + lam * frac * term).item(), rel=1e-6)
    plain = SNS(model, lam=lam, layers=["features.0"], steps=1)
    assert "lam_t" not in plain.loss(x, y, adv, TrainContext(epoch=0, epochs=8)).metrics


@pytest.mark.parametrize("bad", [-1, float("nan"), "3", True])
def test_bad_warmup_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="lam_warmup_epochs"):
        SNS(TinyCNN(in_channels=3, num_classes=K), lam_warmup_epochs=bad, steps=1)

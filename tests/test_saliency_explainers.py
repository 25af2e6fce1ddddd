"""Explainers (methods.md §6.2): properties, analytic values, captum oracles, independent
test-side reimplementations fed the same noise, and the display reductions.

Oracles are float64 so "equal" can mean 1e-10, far below any plausible mistake.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.special import erfinv
from scipy.stats import norm
from torch import nn

from robustkit.saliency import (
    EXPLAINERS,
    AdaptGrad,
    Explainer,
    Gradient,
    GradientXInput,
    IntegratedGradients,
    SmoothGrad,
    absolute_map,
    create_explainer,
    percentile_scale,
    repo_scale,
    signed_map,
)
from robustkit.testing import LinearModel, TinyCNN

# Small settings per registered name: everything registered is tested (architecture.md §5).
FAST = {
    "gradient": {},
    "gradient_x_input": {},
    "gxi": {},
    "smoothgrad": {"n_samples": 4, "seed": 0},
    "adaptgrad": {"n_samples": 4, "seed": 0},
    "ig": {"n_steps": 5},
    "integrated_gradients": {"n_steps": 5},
    "ig-adaptgrad": {"n_steps": 3, "n_samples": 3, "seed": 0},
}
Z95 = math.sqrt(2) * erfinv(0.95)  # 1.959964: scipy, independent of the library's torch erfinv


def tiny(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(in_channels=3, num_classes=10, size=8).to(dtype).eval()


def smooth_mlp() -> nn.Module:
    """Analytic (tanh) so Gauss–Legendre integrates its path to machine precision."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def batch(n=3, shape=(3, 8, 8), seed=1, dtype=torch.float64):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def raw_grad(model, x, target):
    """Test-side gradient: plain autograd, none of the library's code."""
    leaf = x.detach().clone().requires_grad_(True)
    out = model(leaf)
    return torch.autograd.grad(out[torch.arange(len(x)), target].sum(), leaf)[0]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


class Recorder(Explainer):
    """Inner explainer that records the rows it is asked about and maps each row to itself,
    or to NaN in its last element when ``nan_above`` is set and the row's first element exceeds
    it (a NaN anywhere in the map must drop the sample)."""

    def __init__(self, model, nan_above=None):
        super().__init__(model)
        self.rows, self.nan_above = [], nan_above

    def _attribute(self, x, target):
        self.rows.append(x.clone())
        out = x.clone()
        if self.nan_above is not None:
            bad = out.flatten(1)[:, 0] > self.nan_above
            out.view(len(out), -1)[bad, -1] = float("nan")
        return out


# ---------------------------------------------------------------- registry and contract


def test_registry_names_and_errors():
    assert set(FAST) == set(EXPLAINERS)
    assert {"gradient", "gradient_x_input", "gxi", "smoothgrad", "adaptgrad", "ig",
            "ig-adaptgrad"} <= set(EXPLAINERS)
    model = tiny()
    with pytest.raises(ValueError, match="known:.*adaptgrad"):
        create_explainer("saliency_map", model)
    with pytest.raises(ValueError, match="accepted:.*confidence"):
        create_explainer("adaptgrad", model, confidense=0.9)
    with pytest.raises(ValueError, match="takes no inner"):
        create_explainer("gradient", model, inner=Gradient(model))
    with pytest.raises(ValueError, match="different model"):
        create_explainer("ig", model, inner=Gradient(tiny()))
    ig_ag = create_explainer("ig-adaptgrad", model, n_steps=7, confidence=0.99, seed=3)
    assert isinstance(ig_ag, IntegratedGradients) and isinstance(ig_ag.inner, AdaptGrad)
    assert (ig_ag.n_steps, ig_ag.inner.confidence, ig_ag.inner.seed) == (7, 0.99, 3)
    sg = SmoothGrad(model, seed=0)
    ig_sg = create_explainer("ig", model, inner=sg)
    assert ig_sg.inner is sg and isinstance(create_explainer("gxi", model), GradientXInput)


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_shape_dtype_detached(name):
    model = tiny(torch.float32)
    x = batch(dtype=torch.float32)
    a = create_explainer(name, model, **FAST[name]).attribute(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.grad_fn is None and not a.requires_grad and torch.isfinite(a).all()


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_no_side_effects(name):
    model = tiny(torch.float32).train()
    model.features[1].eval()  # a frozen BatchNorm: mixed modes must come back as they were
    modes = [m.training for m in model.modules()]
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    x = batch(dtype=torch.float32).requires_grad_(True)
    x.grad = torch.full_like(x, 7.0)
    x_before = x.detach().clone()
    base = batch(seed=2, dtype=torch.float32).requires_grad_(True)
    non_leaf = base * 1.0  # inside someone else's graph
    plain = batch(seed=3, dtype=torch.float32)
    explainer = create_explainer(name, model, **FAST[name])
    with torch.no_grad():  # enables grad itself
        explainer.attribute(x)
    explainer.attribute(non_leaf)
    explainer.attribute(plain)
    assert torch.equal(x.grad, torch.full_like(x, 7.0)) and torch.equal(x.detach(), x_before)
    assert x.requires_grad and base.grad is None
    assert not plain.requires_grad and plain.grad is None
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert all(p.grad is None for p in params[1:])
    assert [m.training for m in model.modules()] == modes
    assert hook_count(model) == hooks
    # eval mode during attribution: BatchNorm's running statistics are not updated
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_attribution_runs_in_eval_mode_and_restores_mode_on_error():
    model, x = tiny(), batch()
    t = torch.tensor([1, 2, 3])
    in_eval = Gradient(model).attribute(x, t)
    in_train = Gradient(model.train()).attribute(x, t)
    torch.testing.assert_close(in_train, in_eval, rtol=0, atol=0)
    assert model.training  # back to train
    # with batch statistics the map would differ: the test can see the mode
    assert not torch.allclose(raw_grad(model.train(), x, t), in_eval)

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    broken = nn.Sequential(nn.BatchNorm2d(3), Broken()).double().train()
    with pytest.raises(RuntimeError, match="boom"):
        Gradient(broken).attribute(x, 0)
    assert all(m.training for m in broken.modules())


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_internal_batch_size_invariance(name):
    model, x = tiny(), batch(n=5)
    ref = create_explainer(name, model, **FAST[name]).attribute(x)
    for rows in (1, 2, 7, 64):  # smaller than N, not dividing N, larger than N·samples
        got = create_explainer(name, model, internal_batch_size=rows, **FAST[name]).attribute(x)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


class Counting(nn.Module):
    """Records the batch size of every forward."""

    def __init__(self):
        super().__init__()
        self.net, self.seen = tiny(), []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return self.net(x)


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_internal_batch_size_bounds_every_forward(name):
    model = Counting()
    create_explainer(name, model, internal_batch_size=2, **FAST[name]).attribute(batch(n=5))
    assert model.seen and max(model.seen) <= 2


@pytest.mark.parametrize("wrapper", [
    lambda g: SmoothGrad(g, n_samples=4, seed=0, internal_batch_size=2),
    lambda g: AdaptGrad(g, n_samples=4, seed=0, internal_batch_size=2),
    lambda g: IntegratedGradients(g, n_steps=5, internal_batch_size=2),
])
def test_a_wrappers_internal_batch_size_bounds_an_unbounded_inner(wrapper):
    model = Counting()  # Gradient's default: as many rows as it is handed
    wrapper(Gradient(model)).attribute(batch(n=5), 0)
    assert max(model.seen) <= 2


def test_internal_batch_sizes_mixed_across_levels():
    model, x = tiny(), batch(n=3)
    ref = IntegratedGradients(AdaptGrad(model, n_samples=3, seed=1), n_steps=4).attribute(x)
    for inner_rows, ig_rows in ((1, None), (2, 5), (None, 1), (4, 2)):
        ig = IntegratedGradients(AdaptGrad(model, n_samples=3, seed=1,
                                           internal_batch_size=inner_rows),
                                 n_steps=4, internal_batch_size=ig_rows)
        torch.testing.assert_close(ig.attribute(x), ref, rtol=1e-10, atol=1e-12)


def test_seed_generator_and_global_rng_reproducibility():
    model, x = tiny(), batch()
    a = SmoothGrad(model, n_samples=3, seed=3)
    assert torch.equal(a.attribute(x), a.attribute(x))  # a fresh seeded generator per call
    assert not torch.equal(a.attribute(x), SmoothGrad(model, n_samples=3, seed=4).attribute(x))
    gen = torch.Generator().manual_seed(5)
    b = AdaptGrad(model, n_samples=3, generator=gen)
    first, second = b.attribute(x), b.attribute(x)  # the generator is consumed
    assert not torch.equal(first, second)
    again = AdaptGrad(model, n_samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.attribute(x), first)
    torch.manual_seed(11)
    g1 = AdaptGrad(model, n_samples=3).attribute(x)
    torch.manual_seed(11)
    assert torch.equal(AdaptGrad(model, n_samples=3).attribute(x), g1)


@pytest.mark.parametrize("build", [
    lambda m: SmoothGrad(m, n_samples=0),
    lambda m: SmoothGrad(m, n_samples=2.5),
    lambda m: SmoothGrad(m, stdev=-0.1),
    lambda m: SmoothGrad(m, bounds=(1.0, 0.0)),
    lambda m: SmoothGrad(m, bounds=(0.0, math.inf)),
    lambda m: AdaptGrad(m, confidence=1.0),
    lambda m: AdaptGrad(m, confidence=0.0),
    lambda m: AdaptGrad(m, seed=0, generator=torch.Generator()),
    lambda m: IntegratedGradients(m, n_steps=0),
    lambda m: IntegratedGradients(m, method="trapezoid"),
    lambda m: IntegratedGradients(m, baseline="black"),
    lambda m: Gradient(m, internal_batch_size=0),
    lambda m: SmoothGrad("gradient"),
    lambda m: Gradient(lambda x: x),
])
def test_constructors_refuse_bad_arguments(build):
    with pytest.raises(ValueError):
        build(tiny())


def test_inputs_and_targets_are_validated():
    model, x = tiny(), batch()
    g = Gradient(model)
    for bad_target in (1.5, torch.tensor([True, False, True]), torch.tensor([1, 2]), 10, -1):
        with pytest.raises(ValueError, match="target"):
            g.attribute(x, bad_target)
    assert g.attribute(x[:0]).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="NaN"):
        g.attribute(x.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="floating"):
        g.attribute(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        Gradient(nn.Flatten(0)).attribute(x)
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradients(model, baseline=torch.zeros(5, 8, 8)).attribute(x)


# ---------------------------------------------------------------- analytic values


def test_gradient_of_linear_model_is_the_target_weight_row():
    model = LinearModel((3, 4, 4), 5).double().eval()
    x = batch(n=4, shape=(3, 4, 4))
    w = model.fc.weight.detach()
    target = torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(Gradient(model).attribute(x, target),
                               w[target].view(4, 3, 4, 4), rtol=1e-12, atol=0)
    torch.testing.assert_close(Gradient(model).attribute(x, 2), w[[2] * 4].view(4, 3, 4, 4),
                               rtol=1e-12, atol=0)
    # Gradient × Input of a linear model: w_c ⊙ x
    torch.testing.assert_close(GradientXInput(model).attribute(x, target),
                               w[target].view(4, 3, 4, 4) * x, rtol=1e-12, atol=0)


def test_default_target_is_the_predicted_class():
    model, x = tiny(), batch(n=6, seed=4) * 3  # bright inputs: predictions vary
    pred = model(x).argmax(1)
    assert len(set(pred.tolist())) > 1
    torch.testing.assert_close(Gradient(model).attribute(x), Gradient(model).attribute(x, pred))
    # the target is the clean prediction, also for noisy samples whose prediction flips
    gen = torch.Generator().manual_seed(0)
    noisy_pred = model(x + 1.0 * torch.randn(x.shape, generator=gen, dtype=x.dtype)).argmax(1)
    assert (noisy_pred != pred).any()  # precondition: the mistake would show
    sg = SmoothGrad(model, n_samples=4, stdev=1.0, seed=0)
    torch.testing.assert_close(sg.attribute(x), sg.attribute(x, pred), rtol=0, atol=0)
    ig = IntegratedGradients(model, n_steps=4)  # the black baseline predicts another class
    torch.testing.assert_close(ig.attribute(x), ig.attribute(x, pred), rtol=0, atol=0)


@pytest.mark.parametrize("baseline", [0.0, "tensor"])
def test_ig_completeness(baseline):
    model = smooth_mlp()
    x = batch(n=3, shape=(3, 4, 4))
    b = batch(n=1, shape=(3, 4, 4), seed=9)[0] if baseline == "tensor" else baseline
    t = model(x).argmax(1)
    b_full = torch.as_tensor(b, dtype=x.dtype).expand_as(x)
    delta = (model(x) - model(b_full))[torch.arange(3), t].detach()
    gl = IntegratedGradients(model, baseline=b, n_steps=50).attribute(x)
    # Gauss–Legendre with 50 nodes is exact to rounding for this analytic path
    torch.testing.assert_close(gl.flatten(1).sum(1), delta, rtol=1e-9, atol=1e-12)
    # right Riemann sums converge as O(1/n), about |g(1) − g(0)| / (2n): measured 3e-5..1e-4
    # of |Δ| at n = 2000 (and ten times that at n = 200), so 1e-3 leaves a 10x margin
    rie = IntegratedGradients(model, baseline=b, n_steps=2000, method="riemann").attribute(x)
    assert ((rie.flatten(1).sum(1) - delta).abs() <= 1e-3 * delta.abs() + 1e-9).all()


# ---------------------------------------------------------------- captum oracles


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_gradient_and_gxi_match_captum():
    captum = pytest.importorskip("captum.attr")
    model, x = tiny(), batch()
    t = torch.tensor([1, 7, 3])
    torch.testing.assert_close(Gradient(model).attribute(x, t),
                               captum.Saliency(model).attribute(x, target=t, abs=False),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(GradientXInput(Gradient(model)).attribute(x, t),
                               captum.InputXGradient(model).attribute(x, target=t),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann", "riemann_left", "riemann_right",
                                    "riemann_middle"])
@pytest.mark.parametrize("baseline", ["zero", "tensor"])
def test_ig_matches_captum(method, baseline):
    captum = pytest.importorskip("captum.attr")
    model, x = tiny(), batch()
    t = torch.tensor([1, 7, 3])
    b = batch(seed=5) if baseline == "tensor" else 0.0
    theirs = captum.IntegratedGradients(model).attribute(
        x, baselines=b, target=t, n_steps=7,
        method="riemann_right" if method == "riemann" else method)
    ours = IntegratedGradients(Gradient(model), baseline=b, n_steps=7,
                               method=method).attribute(x, t)
    # captum builds its Riemann α with float32 torch.linspace: agreement to ~1e-7 relative
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def _fixed_noise(x, n, seed, sigma):
    """The library's noise contract: sample j is one randn(x.shape) draw, j = 1..n in order."""
    gen = torch.Generator().manual_seed(seed)
    return [sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(n)]


@pytest.mark.parametrize("include_clean", [False, True])
def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(monkeypatch, include_clean):
    captum = pytest.importorskip("captum.attr")
    from captum.attr._core.noise_tunnel import NoiseTunnel

    model, x = tiny(), batch()
    t = torch.tensor([1, 7, 3])
    n, bounds, stdev = 6, (-1.0, 3.0), 0.15
    sigma = stdev * (bounds[1] - bounds[0])  # 0.6: stdev is a fraction of the range U − L
    noise = torch.stack(_fixed_noise(x, n, 0, sigma))  # (n, N, ...)

    def add_noise(inp, stdev_, nt_samples):  # captum's rows are image-major: i·n + j
        assert nt_samples == n and stdev_ == sigma
        return inp.repeat_interleave(n, dim=0) + noise.transpose(0, 1).reshape(-1, *x.shape[1:])

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(add_noise))
    tunnel = captum.NoiseTunnel(captum.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, stdevs=sigma, target=t, abs=False)
    ours = SmoothGrad(Gradient(model), n_samples=n, stdev=stdev, bounds=bounds,
                      include_clean=include_clean, seed=0).attribute(x, t)
    if include_clean:  # the repository's (n+1)-average counts the clean gradient once
        tunnel = (raw_grad(model, x, t) + n * tunnel) / (n + 1)
    torch.testing.assert_close(ours, tunnel, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- AdaptGrad


def test_adaptgrad_sigma_values():
    x = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9, 0.75], dtype=torch.float64).view(1, 1, 1, 6)
    expected = torch.tensor([0.0, 0.0, 0.5, 0.2, 0.1, 0.25], dtype=torch.float64) / Z95
    model = tiny()
    torch.testing.assert_close(AdaptGrad(model).sigma(x).flatten(), expected, rtol=1e-12, atol=0)
    assert abs(0.5 / Z95 - 0.2551) < 1e-4  # methods.md §6.2: at most 0.255, at mid-grey
    z99 = math.sqrt(2) * erfinv(0.99)
    torch.testing.assert_close(AdaptGrad(model, confidence=0.99).sigma(x)[0, 0, 0, 2],
                               torch.tensor(0.5 / z99, dtype=torch.float64), rtol=1e-12, atol=0)
    other = AdaptGrad(model, bounds=(-1.0, 1.0)).sigma(torch.tensor([[0.0, -1.0, 0.8]]))
    torch.testing.assert_close(other, torch.tensor([[1.0, 0.0, 0.2]]) / Z95)


def test_adaptgrad_matches_a_reimplementation_with_the_same_noise():
    model, x = tiny(), batch()
    x[0, 0, :2] = 0.0  # saturated pixels: no noise there
    x[1, 1, :2] = 1.0
    t = torch.tensor([2, 5, 9])
    n, seed = 7, 3
    sigma = torch.minimum(x, 1 - x) / Z95
    acc = raw_grad(model, x, t)  # the clean gradient is one of the n + 1 samples
    for xi in _fixed_noise(x, n, seed, sigma):
        acc = acc + raw_grad(model, x + xi, t)  # not clipped to [0, 1]
    ours = AdaptGrad(Gradient(model), n_samples=n, seed=seed).attribute(x, t)
    torch.testing.assert_close(ours, acc / (n + 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("include_clean", [True, False])
def test_zero_noise_gives_the_inner_map(include_clean):
    model, x = tiny(), batch()
    g = Gradient(model).attribute(x)
    sg = SmoothGrad(model, n_samples=5, stdev=0.0, include_clean=include_clean, seed=0)
    torch.testing.assert_close(sg.attribute(x), g, rtol=1e-12, atol=1e-15)
    binary = (x > 0.5).double()  # every pixel at a bound: σ = 0 everywhere
    ag = AdaptGrad(model, n_samples=5, include_clean=include_clean, seed=0)
    torch.testing.assert_close(ag.attribute(binary), Gradient(model).attribute(binary),
                               rtol=1e-12, atol=1e-15)


def test_adaptgrad_samples_leave_the_box_with_probability_at_most_one_minus_c():
    n = 4000
    x = torch.linspace(0, 1, 65, dtype=torch.float64).view(1, 1, 5, 13)  # 0, 1 and 0.5 included
    rec = Recorder(tiny())
    AdaptGrad(rec, n_samples=n, seed=0).attribute(x, 0)
    rows = torch.cat(rec.rows)
    assert rows.shape[0] == n + 1 and torch.equal(rows[0], x[0])  # the clean row first
    noisy = rows[1:].flatten(1)
    freq = ((noisy < 0) | (noisy > 1)).double().mean(0)
    # Exact leaving probability per coordinate: Φ(−z) below the near bound plus Φ(−z·far/near)
    # beyond the far one, ≤ 1 − c with equality at mid-grey only. Binomial sd ≤ sqrt(.05·.95/n)
    # = 0.0034; 5 sd keeps 65 coordinates below a 2e-5 false-alarm rate under a fixed seed.
    v = x.flatten()
    near, far = torch.minimum(v, 1 - v), torch.maximum(v, 1 - v)
    inside = near > 0
    p = torch.zeros_like(v)
    p[inside] = torch.from_numpy(norm.sf(Z95) + norm.sf(Z95 * (far / near)[inside].numpy()))
    tol = 5 * math.sqrt(0.05 * 0.95 / n)
    assert (freq <= 0.05 + tol).all()
    assert ((freq - p).abs() <= tol).all()
    assert abs(float(freq[32]) - 0.05) <= tol  # mid-grey: exactly 1 − c, noise not clipped
    assert torch.equal(noisy[:, ~inside], v[~inside].expand(n, -1))  # saturated: untouched


def test_nan_samples_are_dropped_per_image(caplog):
    model = tiny()
    x = torch.tensor([[0.5, 0.3], [0.2, 0.6]], dtype=torch.float64).view(2, 1, 1, 2)
    rec = Recorder(model, nan_above=0.5)  # about half of image 0's samples, ~0 of image 1's
    with caplog.at_level(logging.WARNING, logger="robustkit.saliency"):
        out = AdaptGrad(rec, n_samples=200, seed=0, internal_batch_size=3).attribute(x, 0)
    rows = torch.cat(rec.rows).view(201, 2, 2)  # (sample, image, pixel) in draw order
    keep = rows[:, :, 0] <= 0.5
    assert 40 < int((~keep[:, 0]).sum()) < 160 and bool(keep[:, 1].all())
    expected = torch.stack([rows[keep[:, i], i].mean(0) for i in range(2)]).view_as(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    assert "dropped" in caplog.text
    all_nan = Recorder(model, nan_above=-1.0)
    assert torch.isnan(SmoothGrad(all_nan, n_samples=2, seed=0).attribute(x, 0)).all()


# ---------------------------------------------------------------- IG over any inner


@pytest.mark.parametrize("method", ["riemann", "gausslegendre"])
def test_ig_over_adaptgrad_is_the_weighted_path_average_times_x_minus_baseline(method):
    model, x = tiny(), batch(n=2)
    t = torch.tensor([4, 6])
    b, n = 0.25, 4
    ig = IntegratedGradients(AdaptGrad(model, n_samples=3,
                                       generator=torch.Generator().manual_seed(5)),
                             baseline=b, n_steps=n, method=method)
    got = ig.attribute(x, t)
    # test side: AdaptGrad called at each path point in path order, drawing from the same stream
    ag = AdaptGrad(model, n_samples=3, generator=torch.Generator().manual_seed(5))
    if method == "riemann":
        alphas, weights = [(k + 1) / n for k in range(n)], [1 / n] * n
    else:
        nodes, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = ((nodes + 1) / 2).tolist(), (w / 2).tolist()
    avg = sum(w * ag.attribute(b + a * (x - b), t) for a, w in zip(alphas, weights, strict=True))
    torch.testing.assert_close(got, (x - b) * avg, rtol=1e-10, atol=1e-12)


def test_ig_repository_form():
    model, x = tiny(), batch(n=2)
    t = torch.tensor([4, 6])
    b, n = 1.0, 5  # the repository's BlackBaseline
    path = [b + j / n * (x - b) for j in range(n)]  # j = 0..n−1: the baseline in, x out
    expected = (raw_grad(model, x, t) + sum(raw_grad(model, p, t) for p in path)) / (n + 1)
    got = IntegratedGradients(Gradient(model), baseline=b, n_steps=n, method="repo")
    torch.testing.assert_close(got.attribute(x, t), (x - b) * expected, rtol=1e-10, atol=1e-12)
    # over AdaptGrad: the endpoint x keeps the *vanilla* gradient (the repository's grads[0])
    ag = AdaptGrad(model, n_samples=3, generator=torch.Generator().manual_seed(2))
    expected = (raw_grad(model, x, t) + sum(ag.attribute(p, t) for p in path)) / (n + 1)
    got = IntegratedGradients(AdaptGrad(model, n_samples=3,
                                        generator=torch.Generator().manual_seed(2)),
                              baseline=b, n_steps=n, method="repo").attribute(x, t)
    torch.testing.assert_close(got, (x - b) * expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- display


def test_channel_reductions():
    a = torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert torch.equal(signed_map(a), torch.full((2, 2, 2), 2.0))
    assert torch.equal(absolute_map(a), torch.full((2, 2, 2), 6.0))
    with pytest.raises(ValueError, match="N, C, H, W"):
        signed_map(torch.zeros(2, 2, 2))


def test_percentile_scale_against_numpy():
    gen = torch.Generator().manual_seed(0)
    maps = -torch.rand(3, 10, 10, generator=gen, dtype=torch.float64) * 5  # mostly negative
    maps[:, 0, :3] = torch.tensor([40.0, 2.0, 1.0], dtype=torch.float64)
    for signed in (True, False):
        got = percentile_scale(maps, q=99, signed=signed)
        for m, g in zip(maps.numpy(), got.numpy(), strict=True):
            s = np.percentile(np.abs(m), 99)  # of |a|, not of the signed values
            np.testing.assert_allclose(g, np.clip(m / s, -1 if signed else 0, 1), rtol=1e-12)
    assert (percentile_scale(maps).amax(dim=(1, 2)) == 1).all()  # the 40 saturates
    spike = torch.zeros(2, 4, 4, dtype=torch.float64)
    spike[0, 1, 1] = -3.0  # percentile 0: scaled by the largest |value| instead
    assert torch.equal(percentile_scale(spike)[0, 1, 1], torch.tensor(-1.0, dtype=torch.float64))
    assert torch.equal(percentile_scale(spike)[1], spike[1])  # all-zero map stays zero


def test_repo_scale_matches_the_repository_functions():
    def visualize_noabsscale(s):  # AiShare-WHU/AdaptGrad utils.py, transcribed
        span = abs(np.percentile(s, 99))
        return np.clip(s / (2 * span), -1, 1)

    def visualize_absscale(s):
        vmax, vmin = abs(np.percentile(s, 99)), np.min(s)
        return np.clip((s - vmin) / (vmax - vmin), 0, 1)

    maps = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for signed, ref in ((True, visualize_noabsscale), (False, visualize_absscale)):
        got = repo_scale(maps, signed=signed)
        for m, g in zip(maps.numpy(), got.numpy(), strict=True):
            np.testing.assert_allclose(g, ref(m), rtol=1e-12)

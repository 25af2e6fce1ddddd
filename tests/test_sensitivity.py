"""robustkit.sensitivity: FeatureTap's hygiene, σ against the two published formulas written
plainly here (the Beihang group's per-neuron mean L1 normalised by the feature size, and
MindSpore MindArmour's NeuronMetric), batch-size invariance, ranking and overlap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.models import create_model
from robustkit.sensitivity import (
    FeatureTap,
    SensitivityMeter,
    intervention_test,
    jaccard,
    neuron_sensitivity,
    patched_logits,
    per_sample_sensitivity,
    resolve_layers,
    top_k_neurons,
)
from robustkit.testing import TinyCNN, random_batch


def _model():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, in_channels=1, input_size=28).double().eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(last.weight, std=0.1)  # SmallCNN zero-initialises it (TRADES' code): all
    return model                           # logits would be 0 and every prediction class 0


def _pairs(n=10, seed=0):
    x, _ = random_batch(n, (1, 28, 28), seed=seed)
    x = x.double()
    g = torch.Generator().manual_seed(seed + 1)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1)).clamp(0, 1)
    return x, x_adv


def _features(model, x, layer):
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.update(f=o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["f"]


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_tap_captures_named_outputs_and_removes_every_hook_even_on_error():
    model = TinyCNN().eval()
    x, _ = random_batch(4, (3, 32, 32))
    with FeatureTap(model, ["features.0", "fc"]) as tap:
        assert _hooks(model) == 2
        logits = model(x)
        feats = tap.take()
    assert _hooks(model) == 0
    assert feats["features.0"].shape == (4, 8, 32, 32) and torch.equal(feats["fc"], logits)
    assert not feats["fc"].requires_grad
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTap(model, "auto"):
            model(x)
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    with FeatureTap(model, ["fc"], detach=False) as tap:
        model(x)
        assert tap.take()["fc"].requires_grad  # SNS needs the graph
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer9'\].*features.0, fc"):
        FeatureTap(model, ["layer9"])
    with pytest.raises(RuntimeError, match="run a forward pass"):
        with FeatureTap(model, ["fc"]) as tap:
            tap.take()
    assert FeatureTap(model, "auto").layers == ["features.0", "fc"]


def test_sigma_is_zero_for_identical_pairs():
    model = _model()
    x, _ = _pairs()
    for reduction in ("elementwise", "spatial_mean"):
        sigma = neuron_sensitivity(model, x, x, "auto", reduction=reduction)
        assert all(float(s.abs().max()) == 0.0 for s in sigma.values())


def test_elementwise_equals_the_papers_formula_and_spatial_mean_equals_mindarmour():
    model = _model()
    x, x_adv = _pairs(12)
    layer = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]  # 2nd conv
    fx, fa = _features(model, x, layer), _features(model, x_adv, layer)
    n, c, h, w = fx.shape
    # Beihang evaluation code: per neuron, the mean over samples of the L1 difference of the
    # feature map divided by its size H*W.
    paper = torch.stack([sum((fx[i, m] - fa[i, m]).abs().sum() / (h * w) for i in range(n)) / n
                         for m in range(c)])
    # MindArmour NeuronMetric: channel means first, then the L1 norm over the batch (no 1/N).
    mind = torch.stack([sum(abs(fx[i, m].mean() - fa[i, m].mean()) for i in range(n))
                        for m in range(c)])
    got = neuron_sensitivity(model, x, x_adv, [layer])[layer]
    got_mind = neuron_sensitivity(model, x, x_adv, [layer], reduction="spatial_mean")[layer]
    torch.testing.assert_close(got, paper, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_mind, mind, rtol=1e-12, atol=1e-12)
    assert (got_mind <= n * got + 1e-12).all()  # cancellation only makes it smaller
    rel = neuron_sensitivity(model, x, x_adv, [layer], relative=True)[layer]
    clean = torch.stack([sum(fx[i, m].abs().sum() / (h * w) for i in range(n)) / n
                         for m in range(c)])
    torch.testing.assert_close(rel, paper / (clean + 1e-8), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["elementwise", "spatial_mean"])
def test_result_does_not_depend_on_the_batch_size(reduction):
    model = _model()
    x, x_adv = _pairs(11)
    ref = neuron_sensitivity(model, x, x_adv, "auto", reduction=reduction, batch_size=11)
    for bs in (1, 3, 5):
        got = neuron_sensitivity(model, x, x_adv, "auto", reduction=reduction, batch_size=bs)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-15)


def test_meter_restores_the_mode_and_refuses_empty_or_mismatched_input():
    model = _model().train()
    meter = SensitivityMeter(model, "auto")
    with pytest.raises(ValueError, match="no pairs"):
        meter.compute()
    x, x_adv = _pairs(4)
    with pytest.raises(ValueError, match="same shape"):
        meter.update(x, x_adv[:2])
    meter.update(x, x_adv)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="reduction"):
        SensitivityMeter(model, "auto", reduction="max")


def test_top_k_is_the_k_largest_and_jaccard_counts_overlap():
    sigma = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5, 0.0, 0.2, 0.7, 0.4, 0.6])
    assert top_k_neurons(sigma, ratio=0.1).tolist() == [1]
    assert top_k_neurons(sigma, ratio=0.25).tolist() == [1, 3, 7]  # ceil(2.5) = 3, stable ties
    assert set(top_k_neurons(sigma, k=4).tolist()) == set(sigma.topk(4).indices.tolist())
    with pytest.raises(ValueError, match="ratio"):
        top_k_neurons(sigma, ratio=0.0)
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert jaccard(torch.tensor([1]), torch.tensor([1])) == 1.0
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


def test_replacing_every_neuron_of_a_layer_restores_the_clean_logits():
    """A network cut at a layer sees only that layer's output: restoring all of its channels to
    their clean values must give the clean logits exactly; restoring none, the adversarial ones;
    restoring some, neither."""
    model = _model()
    x, x_adv = _pairs(6)
    layer = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    c = model.get_submodule(layer).out_channels
    with torch.no_grad():
        clean, adv = model(x), model(x_adv)
    torch.testing.assert_close(patched_logits(model, x, x_adv, layer, torch.arange(c)), clean,
                               rtol=0, atol=0)
    none = patched_logits(model, x, x_adv, layer, torch.arange(0))
    torch.testing.assert_close(none, adv, rtol=0, atol=0)
    half = patched_logits(model, x, x_adv, layer, torch.arange(c // 2))
    assert not torch.allclose(half, clean) and not torch.allclose(half, adv)
    assert _hooks(model) == 0


def test_intervention_test_reports_topk_random_and_bounds():
    model = _model()
    x, x_adv = _pairs(16)
    y = model(x).argmax(1)  # every clean point correct
    layer = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    sigma = neuron_sensitivity(model, x, x_adv, [layer])[layer]
    out = intervention_test(model, x, x_adv, y, layer, sigma, ratio=1.0, draws=2)
    assert out["clean"] == 1.0 and out["topk"] == 1.0 == out["random"]  # all neurons: clean
    out = intervention_test(model, x, x_adv, y, layer, sigma, ratio=0.25, draws=3)
    assert out["k"] == -(-sigma.numel() // 4)
    assert all(0.0 <= out[key] <= 1.0 for key in ("topk", "random", "adv", "clean"))
    with pytest.raises(ValueError, match="draws"):
        intervention_test(model, x, x_adv, y, layer, sigma, draws=0)


def test_random_draws_are_k_distinct_neurons_other_than_the_top_k(monkeypatch):
    import robustkit.sensitivity.intervention as iv

    model = _model()
    x, x_adv = _pairs(4)
    layer = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1]
    sigma = torch.arange(32, dtype=torch.float64)  # top-4 = 31, 30, 29, 28
    seen = []
    real = iv.patched_logits
    monkeypatch.setattr(iv, "patched_logits",
                        lambda m, a, b, lay, neurons: seen.append(neurons) or real(m, a, b, lay,
                                                                                  neurons))
    iv.intervention_test(model, x, x_adv, torch.zeros(4, dtype=torch.long), layer, sigma,
                         ratio=0.125, draws=4)
    *rand, top = seen
    assert top.tolist() == [31, 30, 29, 28]
    assert all(r.numel() == 4 and len(set(r.tolist())) == 4 for r in rand)
    assert any(set(r.tolist()) != set(top.tolist()) for r in rand)
    assert len({tuple(sorted(r.tolist())) for r in rand}) > 1  # different draws


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["x", "x_adv"])
def test_non_finite_pairs_are_refused_naming_the_argument(which, value):
    """One NaN pixel in one x' made every σ of a layer NaN, returned without a word."""
    model = _model()
    x, x_adv = _pairs(6)
    bad = {"x": x.clone(), "x_adv": x_adv.clone()}
    bad[which][4, 0, 1, 2] = value
    match = rf"^{which} contains NaN or infinite values \(pair\(s\) \[4\]\)"
    layer = resolve_layers(model, "auto")[0]
    sigma = torch.rand(_features(model, x, layer).shape[1])
    for call in (lambda: neuron_sensitivity(model, bad["x"], bad["x_adv"], batch_size=4),
                 lambda: per_sample_sensitivity(model, bad["x"], bad["x_adv"]),
                 lambda: SensitivityMeter(model).update(bad["x"], bad["x_adv"]),
                 lambda: intervention_test(model, bad["x"], bad["x_adv"],
                                           torch.zeros(6, dtype=torch.long), layer, sigma)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_top_k_refuses_a_non_finite_sigma(value):
    """A descending sort puts NaN first: the broken neuron was returned as the most sensitive."""
    sigma = torch.tensor([0.3, 0.9, 0.1, 0.5])
    sigma[2] = value
    with pytest.raises(ValueError, match=r"sigma contains NaN or infinite values \(neuron\(s\) "
                                         r"\[2\]\)"):
        top_k_neurons(sigma, k=1)


def test_layers_have_one_name_and_a_unique_end_of_it_is_an_alias():
    """The shipped SmallCNN's layers are model.feature_extractor.conv2 ...: the README's
    sigma["model.conv2"] was a KeyError. Outputs key by the full name; "conv2" (or any unique
    dotted end of the name) is accepted as input wherever a layer is named."""
    model = _model()
    full = "model.feature_extractor.conv2"
    assert resolve_layers(model, ["conv2"]) == [full]
    assert resolve_layers(model, ["feature_extractor.conv2", "fc3"]) == [
        full, "model.classifier.fc3"]
    assert resolve_layers(model, [full]) == [full]  # the full name is its own alias
    with pytest.raises(ValueError, match=r"'relu1' is ambiguous.*model\.feature_extractor\.relu1"
                                         r", model\.classifier\.relu1"):
        resolve_layers(model, ["relu1"])
    with pytest.raises(ValueError, match="twice"):
        resolve_layers(model, ["conv2", full])
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['v2'\]"):
        resolve_layers(model, ["v2"])  # a dotted end, not any end of the string
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \[''\]"):
        resolve_layers(model, [""])  # the model itself is not a layer
    x, x_adv = _pairs(4)
    sigma = neuron_sensitivity(model, x, x_adv, ["conv2"])
    assert list(sigma) == [full]
    torch.testing.assert_close(sigma[full], neuron_sensitivity(model, x, x_adv, [full])[full])
    assert list(per_sample_sensitivity(model, x, x_adv, ["conv2"])) == [full]
    with FeatureTap(model, ["conv2"]) as tap:
        model(x)
        assert list(tap.take()) == [full]
    y = torch.zeros(4, dtype=torch.long)
    by_alias, by_name = (
        intervention_test(model, x, x_adv, y, name, sigma[full],
                          generator=torch.Generator().manual_seed(0)) for name in ("conv2", full))
    assert by_alias == by_name


def test_an_exact_module_name_wins_over_an_alias():
    outer = nn.Sequential()
    outer.add_module("fc", nn.Linear(3, 3))
    outer.add_module("head", nn.Sequential())
    outer.head.add_module("fc", nn.Linear(3, 3))
    assert resolve_layers(outer, ["fc"]) == ["fc"]
    assert resolve_layers(outer, ["head.fc"]) == ["head.fc"]

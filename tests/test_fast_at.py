"""fast_at: FGSM with a random start (Wong et al. 2020) and N-FGSM (de Jorge et al. 2022).

Oracles are the papers' single steps written plainly here (delta = U(-k eps, k eps) clipped to
the image, one signed step, optional projection), driven by the same random numbers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from robustkit.attacks import FGSM
from robustkit.objectives import FastAT, TrainContext, create_objective
from robustkit.testing import LinearModel, TinyCNN, random_batch


def _setup(n=8, seed=0):
    torch.manual_seed(seed)
    model = TinyCNN().double()
    x, y = random_batch(n, (3, 32, 32), seed=seed)
    return model, x.double(), y


def _reference(model, x, y, eps, alpha, k, project, u):
    """The papers' step (pdejorge/N-FGSM train.py, locuslab/fast_adversarial), eval mode."""
    delta = ((2 * u - 1) * k * eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    model.eval()
    d = delta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
    model.train()
    delta = delta + alpha * g.sign()
    if project:
        delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


@pytest.mark.parametrize("method, ratio, k, project", [("fgsm_rs", 1.25, 1.0, True),
                                                        ("n_fgsm", 1.0, 2.0, False)])
def test_step_equals_the_papers_reference(method, ratio, k, project):
    model, x, y = _setup()
    eps = 8 / 255
    obj = FastAT(model, eps=eps, method=method, generator=torch.Generator().manual_seed(3))
    assert (obj.alpha, obj.noise, obj.project) == (pytest.approx(ratio * eps), k, project)
    assert obj.method == method
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    expected = _reference(model, x, y, eps, ratio * eps, k, project, u)
    got = obj.perturb(x, y, TrainContext())
    torch.testing.assert_close(got.x_adv, expected, rtol=0, atol=1e-12)
    assert model.training  # the mode is restored


def test_zero_noise_and_alpha_eps_is_fgsm_training():
    """noise = 0 and alpha = eps reduce fast_at to plain FGSM training (Goodfellow et al.)."""
    model, x, y = _setup()
    eps = 0.05
    obj = FastAT(model, eps=eps, method="fgsm_rs", alpha=eps, noise=0.0)
    x_fgsm = FGSM(model, eps=eps)(x, y)  # before the training pass moves BN's running stats
    torch.testing.assert_close(obj.perturb(x, y, TrainContext()).x_adv, x_fgsm, rtol=0,
                               atol=1e-12)
    out = obj(x, y, TrainContext())
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x_fgsm), y), rtol=0, atol=1e-12)


def test_n_fgsm_perturbation_stays_within_k_plus_one_eps_and_the_box():
    model, x, y = _setup(16)
    eps = 8 / 255
    obj = FastAT(model, eps=eps, method="n_fgsm", generator=torch.Generator().manual_seed(0))
    x_adv = obj.perturb(x, y, TrainContext()).x_adv
    d = (x_adv - x).abs().amax(dim=(1, 2, 3))
    assert (d <= 3 * eps + 1e-12).all()  # (k + 1) eps with k = 2
    assert (d > eps).any()  # no projection: it does leave the eps-ball
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    x_adv = FastAT(model, eps=eps, method="fgsm_rs").perturb(x, y, TrainContext()).x_adv
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= eps + 1e-12).all()


def test_parameters_grads_untouched_by_the_step_and_bad_arguments_refused():
    model, x, y = _setup(4)
    FastAT(model, eps=0.1).perturb(x, y, TrainContext())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="method"):
        FastAT(model, method="pgd")
    with pytest.raises(ValueError, match="noise"):
        FastAT(model, noise=-1.0)
    with pytest.raises(ValueError, match="attack must be None"):
        FastAT(model, attack=FGSM(model))
    with pytest.raises(ValueError, match="did you mean 'noise'"):
        create_objective("fast_at", model, nois=2.0)


@pytest.mark.parametrize("method, ratio, k, project", [("fgsm_rs", 1.25, 1.0, True),
                                                        ("n_fgsm", 1.0, 2.0, False)])
def test_default_path_step_loss_and_gradients_equal_the_oracle(method, ratio, k, project):
    """The whole default path (global RNG, eps 8/255): the step above, then the mean CE of the
    *train-mode* model on x + δ and its parameter gradients; BatchNorm makes the modes differ."""
    model, x, y = _setup(8, seed=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert (model.eval()(x) - model.train()(x)).abs().max() > 1e-2  # modes differ here
    model.load_state_dict(twin.state_dict())  # undo the running-stat update of that pass
    eps = 8 / 255
    obj = FastAT(model, method=method)
    torch.manual_seed(5)
    adv = obj.perturb(x, y, TrainContext())
    out = obj.loss(x, y, adv, TrainContext())

    torch.manual_seed(5)
    u = torch.rand(x.shape, dtype=x.dtype)  # the objective's draw: one U[0, 1) per pixel
    expected = _reference(twin, x, y, eps, ratio * eps, k, project, u)
    assert ((x + (2 * u - 1) * k * eps < 0) | (x + (2 * u - 1) * k * eps > 1)).any()  # clipped
    torch.testing.assert_close(adv.x_adv, expected, rtol=0, atol=1e-12)
    twin.train()
    loss = F.cross_entropy(twin(expected), y)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        logits = twin(expected)  # train mode: the training pass's own logits are returned
    torch.testing.assert_close(out.logits.detach(), logits, rtol=1e-12, atol=1e-12)
    assert out.metrics["loss/ce_adv"] == out.loss.detach()
    assert out.metrics["acc_adv"] == (logits.argmax(1) == y).double().mean()
    assert adv.info["steps_used"].dtype == torch.long
    assert torch.equal(adv.info["steps_used"], torch.ones(8, dtype=torch.long))
    torch.testing.assert_close(adv.info["eps"], torch.full((8,), eps))
    delta = (expected - x).abs().flatten(1).amax(1)
    torch.testing.assert_close(out.metrics["delta_linf_mean"], delta.mean(), rtol=1e-12, atol=0)
    if not project:
        assert delta.max() > eps  # N-FGSM leaves the ε-ball
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    want = torch.autograd.grad(loss, list(twin.parameters()))
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, alpha_ratio, project", [("n_fgsm", 0.5, True),
                                                         ("fgsm_rs", 2.0, False)])
def test_explicit_alpha_and_project_override_the_methods_defaults(method, alpha_ratio, project):
    model, x, y = _setup()
    eps = 8 / 255
    k = {"fgsm_rs": 1.0, "n_fgsm": 2.0}[method]
    obj = FastAT(model, eps=eps, method=method, alpha=alpha_ratio * eps, project=project,
                 generator=torch.Generator().manual_seed(3))
    assert (obj.alpha, obj.project) == (pytest.approx(alpha_ratio * eps), project)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    expected = _reference(model, x, y, eps, alpha_ratio * eps, k, project, u)
    got = obj.perturb(x, y, TrainContext()).x_adv
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    linf = (got - x).abs().amax()
    assert linf <= eps + 1e-12 if project else linf > eps + 1e-3


def test_a_pixel_without_gradient_stays_at_its_random_start():
    """sign(0) = 0: a pixel the loss does not depend on is not stepped (a linear model that reads
    half of the pixels)."""
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).double()
    with torch.no_grad():
        model.fc.weight[:, ::2] = 0
    x, y = random_batch(4, (3, 8, 8), seed=1)
    x = x.double()
    eps = 8 / 255
    obj = FastAT(model, eps=eps, method="n_fgsm", generator=torch.Generator().manual_seed(3))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    start = (x + ((2 * u - 1) * 2 * eps).clamp(-x, 1 - x))
    got = obj.perturb(x, y, TrainContext()).x_adv
    torch.testing.assert_close(got, _reference(model, x, y, eps, eps, 2.0, False, u), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(got.flatten(1)[:, ::2], start.flatten(1)[:, ::2], rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("bad, match", [({"eps": -0.01}, "eps must lie"),
                                        ({"eps": 1.5}, "eps must lie"),
                                        ({"alpha": -0.01}, "alpha must lie"),
                                        ({"noise": -1.0}, "noise must lie")])
def test_argument_checks_name_the_argument(bad, match):
    model, _, _ = _setup(2)
    with pytest.raises(ValueError, match=match):
        FastAT(model, **bad)


def test_bounds_accepted_and_loss_needs_perturb():
    model, x, y = _setup(2)
    for ok in ({"eps": 0.0}, {"eps": 1.0}, {"alpha": 0.0}, {"noise": 0.0}):
        (key, value), = ok.items()
        assert getattr(FastAT(model, **ok), key) == value
    with pytest.raises(ValueError, match=re.escape("FastAT.loss needs the AttackResult of "
                                                   "perturb()")):
        FastAT(model).loss(x, y, None, TrainContext())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_noise_drawn_on_the_generators_device_and_info_on_the_inputs(device):
    """The global RNG draws on the inputs' device; a generator on another device (a CPU one for
    CUDA inputs) draws there; every tensor returned is on the inputs' device."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, x, y = _setup(4)
    model, x, y = model.to(device), x.to(device), y.to(device)
    eps = 8 / 255
    torch.manual_seed(5)
    got = FastAT(model, eps=eps).perturb(x, y, TrainContext())
    torch.manual_seed(5)
    u = torch.rand(x.shape, dtype=x.dtype, device=device)
    torch.testing.assert_close(got.x_adv, _reference(model, x, y, eps, 1.25 * eps, 1.0, True, u),
                               rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(3)  # on the CPU
    got = FastAT(model, eps=eps, generator=g).perturb(x, y, TrainContext())
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    torch.testing.assert_close(got.x_adv, _reference(model, x, y, eps, 1.25 * eps, 1.0, True,
                                                     u.to(device)), rtol=0, atol=1e-12)
    for key, value in got.info.items():
        assert value.device.type == device, key
    out = FastAT(model, eps=eps).loss(x, y, got, TrainContext())
    for key, value in out.metrics.items():
        assert value.device.type == device, key

"""robustkit.attacks: contract tests over every registered attack, oracles, analytic steps and
the properties of PGD's options (per-sample eps, early stopping, restarts, targeted, select)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from robustkit.attacks import ATTACKS, FGSM, PGD, AutoAttack, TorchAttack, create_attack
from robustkit.attacks import losses as L
from robustkit.testing import LinearModel, TinyCNN, random_batch

EPS = {"Linf": 4 / 255, "L2": 0.25}  # a random TinyCNN (no fc bias) is broken at most points
CONTRACT = [*ATTACKS, "torchattacks:PGD"]


def _setup(n=8, dtype=torch.float32, seed=0):
    """A TinyCNN and a batch labelled by its own predictions (every clean point is correct).

    The fc bias is zeroed: otherwise one class wins by its bias alone and almost nothing breaks.
    """
    torch.manual_seed(seed)
    model = TinyCNN().to(dtype).eval()
    with torch.no_grad():
        model.fc.bias.zero_()
    x, _ = random_batch(n, (3, 32, 32), seed=seed)
    x = x.to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _eps(name, norm):
    # AutoAttack returns x itself where it fails: a larger budget makes sure it breaks a point.
    return EPS[norm] * (2 if name == "autoattack" else 1)


def _build(name, model, norm="Linf", eps=None):
    eps = _eps(name, norm) if eps is None else eps
    if name == "pgd":
        return create_attack("pgd", model, eps=eps, alpha=eps / 4, steps=5, norm=norm)
    if name == "fgsm":
        return create_attack("fgsm", model, eps=eps, norm=norm)
    if name == "autoattack":  # the official code: cheap only in the custom APGD-CE version
        return create_attack("autoattack", model, eps=eps, norm=norm, version="custom",
                             attacks=["apgd-ce"])
    if name.startswith("torchattacks:"):
        pytest.importorskip("torchattacks")
        cls = "PGD" if norm == "Linf" else "PGDL2"
        return create_attack(f"torchattacks:{cls}", model, eps=eps, alpha=eps / 4, steps=5)
    raise AssertionError(f"no builder for registered attack {name!r}: add one")


def _dist(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ------------------------------------------------------------------ contract, every attack
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("name", CONTRACT)
def test_ball_and_box(name, norm):
    model, x, y = _setup(4 if name == "autoattack" else 8)
    x_adv = _build(name, model, norm)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (_dist(x_adv, x, norm) <= _eps(name, norm) + 1e-6).all()
    assert (x_adv != x).any()  # it did attack


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("name", ["pgd", "fgsm"])
def test_per_sample_eps_ball(name, norm):
    model, x, y = _setup()
    eps = torch.linspace(0, EPS[norm], 8)
    eps[3] = 0
    result = _build(name, model, norm).perturb(x, y, eps=eps)
    assert (_dist(result.x_adv, x, norm) <= eps + 1e-6).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.x_adv[eps == 0], x[eps == 0])
    assert torch.equal(result.info["eps"], eps)


@pytest.mark.parametrize("name", CONTRACT)
def test_no_side_effects_and_no_grad(name):
    model, x, y = _setup(4 if name == "autoattack" else 8)
    model.train()
    params = list(model.parameters())
    sentinels = {}
    for i, p in enumerate(params):  # half the parameters carry a .grad, half have None
        if i % 2 == 0:
            p.grad = torch.full_like(p, 7.0)
            sentinels[i] = p.grad.clone()
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    modes = []
    hook = model.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    x_before = x.clone()
    with torch.no_grad():
        x_adv = _build(name, model)(x, y)
    hook.remove()
    assert (x_adv != x).any()  # gradients flowed although the caller disabled them
    assert model.training and modes and not any(modes)  # eval inside, train mode restored
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    for i, p in enumerate(params):
        if i in sentinels:
            assert torch.equal(p.grad, sentinels[i])
        else:
            assert p.grad is None
        assert p.requires_grad
    assert torch.equal(x, x_before) and x.grad is None and not x.requires_grad


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_best_never_decreases_the_loss(norm):
    model, x, y = _setup()
    for random_start in (False, True):
        attack = PGD(model, eps=EPS[norm] / 4, alpha=EPS[norm] / 16, steps=3, norm=norm,
                     random_start=random_start, stop_on_success=random_start)
        x_adv = attack(x, y)
        assert (_ce(model, x_adv, y) >= _ce(model, x, y) - 1e-6).all()
    assert (_ce(model, AutoAttack(model, eps=EPS[norm], norm=norm, version="custom",
                                  attacks=["apgd-ce"])(x[:4], y[:4]), y[:4])
            >= _ce(model, x[:4], y[:4]) - 1e-6).all()


# ------------------------------------------------------------------ oracles and analytic steps
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_equals_torchattacks_step_for_step(norm):
    ta = pytest.importorskip("torchattacks")
    model, x, y = _setup(dtype=torch.float64)  # float64: no sign() ties from rounding
    eps, alpha = (8 / 255, 2 / 255) if norm == "Linf" else (0.5, 0.1)
    for steps in (1, 3, 10):
        ours = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False, norm=norm,
                   select="last")(x, y)
        cls = ta.PGD if norm == "Linf" else ta.PGDL2
        theirs = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
        assert (ours - theirs).abs().max() <= 1e-6
        assert (ours != x).any()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("cls", [PGD, FGSM])
def test_one_step_on_a_linear_model_is_analytic(norm, cls):
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).double().eval()
    x, y = random_batch(6, (3, 8, 8), seed=1)
    x = x.double()
    eps = 0.05 if norm == "Linf" else 0.5
    W, b = model.fc.weight, model.fc.bias
    with torch.no_grad():  # d CE / dx = W^T (p - e_y)
        p = torch.softmax(x.flatten(1) @ W.T + b, 1)
        g = ((p - F.one_hot(y, 10)) @ W).view_as(x)
    if norm == "Linf":
        expected = (x + eps * g.sign()).clamp(0, 1)
    else:
        expected = (x + eps * g / (g.flatten(1).norm(dim=1) + 1e-10).view(-1, 1, 1, 1)).clamp(0, 1)
    if cls is PGD:
        attack = PGD(model, eps=eps, alpha=eps, steps=1, random_start=False, norm=norm,
                     select="last")
    else:
        attack = FGSM(model, eps=eps, norm=norm)
    torch.testing.assert_close(attack(x, y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_step_noise_is_added_before_the_projection(norm):
    """FAT's step: x + α·step(g) + ω·N(0, I), then one projection (ball, then [0, 1] box); the
    noise comes from the attack's generator (no random start, so it is the first draw)."""
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).double().eval()
    x, y = random_batch(6, (3, 8, 8), seed=1)
    x = x.double()
    eps, omega = (0.05, 0.02) if norm == "Linf" else (0.5, 0.2)
    W, b = model.fc.weight, model.fc.bias
    with torch.no_grad():
        p = torch.softmax(x.flatten(1) @ W.T + b, 1)
        g = ((p - F.one_hot(y, 10)) @ W).view_as(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    if norm == "Linf":
        step = x + 0.5 * eps * g.sign() + omega * noise
        expected = torch.min(torch.max(step, x - eps), x + eps).clamp(0, 1)
    else:
        step = x + 0.5 * eps * g / (g.flatten(1).norm(dim=1) + 1e-10).view(-1, 1, 1, 1)
        delta = step + omega * noise - x
        factor = (eps / delta.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
        expected = (x + delta * factor).clamp(0, 1)
    attack = PGD(model, eps=eps, alpha=0.5 * eps, steps=1, random_start=False, norm=norm,
                 select="last", step_noise=omega, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(attack(x, y), expected, rtol=0, atol=1e-12)
    plain = PGD(model, eps=eps, alpha=0.5 * eps, steps=1, random_start=False, norm=norm,
                select="last")
    assert (attack(x, y) != plain(x, y)).any()  # the noise really moves the iterate


def test_steps_do_not_depend_on_the_batch():
    model, x, y = _setup(4, dtype=torch.float64)
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)
    together = attack(x, y)
    alone = torch.cat([attack(x[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ early stopping and shrinking
class _BatchSizes:
    def __init__(self, model):
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.sizes.append(a[0].shape[0]))


def test_stop_on_success_shrinks_the_batch_and_loses_nothing():
    model, x, y = _setup(16, dtype=torch.float64)
    y[:2] = (y[:2] + 1) % 10  # two points the clean input already fools
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = PGD(model, eps=2 / 255, alpha=0.5 / 255, steps=10, generator=gen()).perturb(x, y)
    sizes = _BatchSizes(model)
    stop = PGD(model, eps=2 / 255, alpha=0.5 / 255, steps=10, stop_on_success=True,
               generator=gen()).perturb(x, y)
    sizes.handle.remove()
    s = sizes.sizes
    assert s[0] == 16 and s[1] <= 14  # the clean check, then never the two fooled points
    assert all(a >= b for a, b in zip(s, s[1:], strict=False)) and s[-1] < s[1]
    with torch.no_grad():  # the flags describe x_adv: no success is ever reported as robust
        pred = model(stop.x_adv).argmax(1)
    assert torch.equal(stop.info["success"], pred != y)
    assert stop.info["success"][:2].all() and torch.equal(stop.x_adv[:2], x[:2])
    assert stop.info["success"].sum() >= plain.info["success"].sum()
    assert (stop.info["steps_used"] <= plain.info["steps_used"]).all()
    assert stop.info["stopped"][stop.info["success"]].all()


def _fat_reference(model, x, y, eps, alpha, steps, tau):
    """FAT's early-stopped PGD written naively (masks on the full batch, no shrinking)."""
    xa, counter = x.clone(), torch.full_like(y, tau)
    frozen = torch.zeros_like(y, dtype=torch.bool)
    kappa = torch.zeros_like(y)
    for _ in range(steps):
        xa.requires_grad_(True)
        logits = model(xa)
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)
        xa = xa.detach()
        wrong = logits.argmax(1) != y
        kappa += (~wrong & ~frozen).long()
        freeze = wrong & (counter == 0) & ~frozen
        counter -= (wrong & (counter > 0) & ~frozen).long()
        frozen |= freeze
        step = ((xa + alpha * g.sign()).clamp(x - eps, x + eps)).clamp(0, 1)
        xa = torch.where(frozen.view(-1, 1, 1, 1), xa, step)
    return xa, frozen, kappa


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_tau_matches_the_fat_reference(tau):
    model, x, y = _setup(12, dtype=torch.float64)
    y[0] = (y[0] + 1) % 10  # misclassified at the start: tau = 0 freezes it at x_0 = x
    eps, alpha, steps = 2 / 255, 0.5 / 255, 6
    sizes = _BatchSizes(model)
    r = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False,
            select="last").perturb(x, y, tau=tau)
    sizes.handle.remove()
    ref, frozen, kappa = _fat_reference(model, x, y, eps, alpha, steps, tau)
    torch.testing.assert_close(r.x_adv, ref, rtol=0, atol=1e-9)
    assert torch.equal(r.info["stopped"], frozen) and frozen.any() and not frozen.all()
    assert torch.equal(r.info["kappa"], kappa)
    assert sizes.sizes[-1] < sizes.sizes[0]  # frozen samples leave the computed batch
    if tau == 0:
        assert torch.equal(r.x_adv[0], x[0]) and r.info["steps_used"][0] == 1
        with torch.no_grad():  # a frozen sample is kept at its first misclassified iterate
            assert (model(r.x_adv[frozen]).argmax(1) != y[frozen]).all()


@pytest.mark.parametrize("select", ["last", "best"])
def test_tau_at_least_steps_is_plain_pgd(select):
    model, x, y = _setup(12, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    make = lambda: PGD(model, eps=16 / 255, alpha=4 / 255, steps=6, select=select,  # noqa: E731
                       generator=gen())
    plain = make().perturb(x, y)
    for tau in (6, 9):
        r = make().perturb(x, y, tau=tau)
        assert torch.equal(r.x_adv, plain.x_adv)
        assert torch.equal(r.info["kappa"], plain.info["kappa"])
        assert not r.info["stopped"].any()


def test_kappa_and_steps_used_bounds():
    model, x, y = _setup(12)
    for kw in ({}, {"tau": 1}, {"tau": 0}):
        r = PGD(model, eps=16 / 255, steps=7).perturb(x, y, **kw)
        assert ((r.info["kappa"] >= 0) & (r.info["kappa"] <= 7)).all()
        assert ((r.info["steps_used"] >= 0) & (r.info["steps_used"] <= 7)).all()
    assert (r.info["kappa"] < r.info["steps_used"]).any() or not r.info["stopped"].any()


def test_zero_eps_samples_never_reach_the_model():
    model, x, y = _setup(8)
    eps = torch.full((8,), 8 / 255)
    eps[[1, 4, 5]] = 0
    sizes = _BatchSizes(model)
    r = PGD(model, steps=4, random_start="normal").perturb(x, y, eps=eps, alpha=eps / 4)
    sizes.handle.remove()
    assert set(sizes.sizes) == {5}
    assert torch.equal(r.x_adv[[1, 4, 5]], x[[1, 4, 5]])
    assert r.info["steps_used"][[1, 4, 5]].eq(0).all() and r.info["steps_used"][0] == 4


def test_restarts_are_never_worse():
    model, x, y = _setup(16)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    one = PGD(model, eps=1 / 255, alpha=1 / 255, steps=1, generator=gen()).perturb(x, y)
    sizes = _BatchSizes(model)
    three = PGD(model, eps=1 / 255, alpha=1 / 255, steps=1, restarts=3,
                generator=gen()).perturb(x, y)
    sizes.handle.remove()
    s1, s3 = one.info["success"], three.info["success"]
    assert (s3 | ~s1).all()  # a point broken with one restart stays broken
    both_failed = ~s1 & ~s3
    ce1, ce3 = _ce(model, one.x_adv, y), _ce(model, three.x_adv, y)
    assert (ce3[both_failed] >= ce1[both_failed] - 1e-6).all()
    assert s3.sum() > s1.sum() or (ce3[both_failed] > ce1[both_failed]).any()
    # restart 0 is the 1-restart run (1 step + the final check); then only unbroken samples
    assert sizes.sizes[:2] == [16] * 2 and sizes.sizes[2] == int((~s1).sum())


def test_targeted():
    model, x, y = _setup(8)
    target = (y + 3) % 10
    r = PGD(model, eps=16 / 255, alpha=2 / 255, steps=20, targeted=True).perturb(
        x, y, target=target)
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert torch.equal(r.info["success"], pred == target) and r.info["success"].any()
    gen = torch.Generator().manual_seed(0)
    r = PGD(model, steps=2, targeted=True, generator=gen).perturb(x, y)
    assert (r.info["target"] != y).all()
    with pytest.raises(ValueError, match="target"):
        PGD(model).perturb(x, y, target=target)


def test_kl_uses_given_clean_logits():
    model, x, y = _setup(8)
    with torch.no_grad():
        clean = model(x)
    counts = _BatchSizes(model)
    a = PGD(model, loss="kl", random_start="normal", steps=3,
            generator=torch.Generator().manual_seed(0)).perturb(x, y, clean_logits=clean)
    n_given = len(counts.sizes)
    b = PGD(model, loss="kl", random_start="normal", steps=3,
            generator=torch.Generator().manual_seed(0)).perturb(x, y)
    counts.handle.remove()
    assert n_given == 3 + 1 and len(counts.sizes) - n_given == 3 + 2
    torch.testing.assert_close(a.x_adv, b.x_adv)


# ------------------------------------------------------------------ losses
def test_losses_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(L.ce(z, y), F.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(L.cw(z, y), torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(L.cw(z, y, kappa=1.5), torch.tensor([-1.0, 1.5]))
    torch.testing.assert_close(L.kl(z, y, clean_logits=z), torch.zeros(2))
    assert (L.kl(z.flip(1), y, clean_logits=z) > 0).all()
    # DLR: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
    torch.testing.assert_close(L.dlr(z, y), torch.tensor([-(2 - 1) / (2 - 0), -(1 - 3) / (3 - 1)]))
    t = torch.tensor([1, 1])
    assert L.cw_targeted(z, t)[1] < 0 < L.cw_targeted(z, t)[0]
    assert set(L.LOSSES) == {"ce", "cw", "kl", "dlr"}
    with pytest.raises(ValueError, match="clean_logits"):
        L.kl(z, y)


def test_dlr_needs_three_classes():
    with pytest.raises(ValueError, match="3 classes"):
        L.dlr(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    model = LinearModel((3, 4, 4), 2).eval()
    x, _ = random_batch(4, (3, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="3 classes"):
        PGD(model, loss="dlr")(x, torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ foundation-v2 defects
class _Periodic(torch.nn.Module):
    """Two classes; z_1 = 5 + mean_i cos(2π·3·x_i), z_0 = 0. Class 1 always wins (no success),
    and CE(y=1) is maximal at the troughs of the cosine, so big signed steps overshoot them:
    the last iterate is often not the best one."""

    def forward(self, x):
        z1 = 5 + torch.cos(2 * torch.pi * 3 * x).flatten(1).mean(1)
        return torch.stack([torch.zeros_like(z1), z1], 1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_best_iterate_is_the_highest_loss_iterate_of_a_plain_loop(norm):
    """select="best" returns the iterate of maximal loss (no success is possible here), checked
    against every iterate of a plain PGD loop written here; the last iterate is worse."""
    model = _Periodic().double()
    x, _ = random_batch(6, (1, 4, 4), seed=3)
    x, y = x.double(), torch.ones(6, dtype=torch.long)
    eps, alpha, steps = (0.3, 0.13, 6) if norm == "Linf" else (1.2, 0.5, 6)

    def loss(xa):
        return F.cross_entropy(model(xa), y, reduction="none")

    xa, iterates = x.clone(), []
    for _ in range(steps):  # the reference: x_{t+1} = Π(x_t + α·dir(∇CE)), no random start
        iterates.append(xa)
        xg = xa.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(xg).sum(), xg)
        if norm == "Linf":
            xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        else:
            xa = xa + alpha * g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
            d = xa - x
            d = d * (eps / d.flatten(1).norm(dim=1).clamp(min=1e-12)).clamp(max=1).view(-1, 1, 1, 1)
            xa = (x + d).clamp(0, 1)
    iterates.append(xa)
    losses = torch.stack([loss(it) for it in iterates])  # (steps + 1, N)
    assert (losses[-1] < losses.max(0).values - 1e-6).any(), "setup must make last != best"
    best = PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False,
               select="best")(x, y)
    last = PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False,
               select="last")(x, y)
    torch.testing.assert_close(loss(best), losses.max(0).values, rtol=0, atol=1e-9)
    torch.testing.assert_close(last, iterates[-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_float_overrides_replace_the_constructor_values(norm):
    """perturb(alpha=0.02) steps by 0.02 and FGSM(eps=0.1).perturb(eps=0.2) by 0.2 (a float
    override once fell back to the constructor's value; only tensors worked)."""
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).double().eval()
    x, y = random_batch(6, (3, 8, 8), seed=1)
    x = (0.25 + 0.5 * x.double())  # in [0.25, 0.75]: no box clipping for steps <= 0.25
    tensor = PGD(model, eps=0.2, alpha=0.01, steps=1, norm=norm, random_start=False,
                 select="last").perturb(x, y, alpha=torch.full((6,), 0.02, dtype=x.dtype))
    floated = PGD(model, eps=0.2, alpha=0.01, steps=1, norm=norm, random_start=False,
                  select="last").perturb(x, y, alpha=0.02)
    torch.testing.assert_close(floated.x_adv, tensor.x_adv, rtol=0, atol=1e-12)
    d = (floated.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    torch.testing.assert_close(size, torch.full((6,), 0.02, dtype=x.dtype), rtol=0, atol=1e-9)
    d = (FGSM(model, eps=0.1, norm=norm).perturb(x, y, eps=0.2).x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    torch.testing.assert_close(size, torch.full((6,), 0.2, dtype=x.dtype), rtol=0, atol=1e-9)
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match="alpha"):
            PGD(model).perturb(x, y, alpha=bad)


def test_targeted_dlr_is_apgd_t_loss():
    """methods.md §1.5: APGD-T maximises -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12).
    The issue's numbers: z = [1, 5, 3, .5, 0], y = 0, t = 2 -> 0.4706 (not -0.4706)."""
    z = torch.tensor([[1.0, 5.0, 3.0, 0.5, 0.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    official = -(1.0 - 3.0) / (5.0 - 0.5 * (1.0 + 0.5) + 1e-12)
    assert abs(official - 0.4706) < 1e-4
    torch.testing.assert_close(-L.dlr_targeted(z, t, y=y), torch.tensor([official]))
    with pytest.raises(ValueError, match="needs y"):
        L.dlr_targeted(z, t)
    # Through PGD: one targeted DLR step on a linear model moves along sign(∇ official loss).
    torch.manual_seed(0)
    model = LinearModel((1, 4, 4), 5).double().eval()
    x, _ = random_batch(4, (1, 4, 4), seed=2)
    x = 0.25 + 0.5 * x.double()
    yy, tt = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 0])
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    srt = logits.sort(1, descending=True).values
    off = -(logits.gather(1, yy[:, None]) - logits.gather(1, tt[:, None])).squeeze(1) / (
        srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
    (g,) = torch.autograd.grad(off.sum(), xg)
    expected = (x + 0.01 * g.sign()).clamp(0, 1)
    got = PGD(model, eps=0.01, alpha=0.01, steps=1, random_start=False, loss="dlr",
              targeted=True, select="last").perturb(x, yy, target=tt).x_adv
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_pgd_that_cannot_reach_eps_warns(caplog):
    with caplog.at_level("WARNING", logger="robustkit.attacks.pgd"):
        PGD(TinyCNN(), eps=0.3, alpha=0.01, steps=5)
    assert "cannot reach eps" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="robustkit.attacks.pgd"):
        PGD(TinyCNN(), eps=0.3, alpha=0.075, steps=4)  # exactly eps: fine
        FGSM(TinyCNN(), eps=0.3)
    assert "cannot reach" not in caplog.text


def test_repr_lists_every_setting():
    """Evaluation fingerprints an attack by its settings: two PGDs that differ only in steps,
    alpha, loss, restarts, start, targeted or noise must not look the same."""
    model = TinyCNN()
    base = dict(eps=8 / 255, alpha=2 / 255, steps=10)
    variants = [dict(steps=40), dict(alpha=1 / 255), dict(loss="cw"), dict(restarts=2),
                dict(random_start=False), dict(targeted=True), dict(step_noise=1e-3),
                dict(stop_on_success=True), dict(select="last")]
    reprs = {repr(PGD(model, **base))} | {repr(PGD(model, **{**base, **v})) for v in variants}
    assert len(reprs) == len(variants) + 1
    assert repr(AutoAttack(model, version="custom", attacks=["apgd-ce"])) != repr(
        AutoAttack(model, version="custom", attacks=["apgd-ce", "square"]))
    assert repr(AutoAttack(model, seed=0)) != repr(AutoAttack(model, seed=1))


# ------------------------------------------------------------------ factory and validation
def test_factory_errors_are_clear():
    model = TinyCNN()
    with pytest.raises(ValueError, match="known: .*pgd"):
        create_attack("pgdd", model)
    with pytest.raises(ValueError, match="accepted: .*'eps'"):
        create_attack("pgd", model, epsilon=0.1)
    assert isinstance(create_attack("fgsm", model, eps=0.1), FGSM)
    pytest.importorskip("torchattacks")
    with pytest.raises(ValueError, match="close: .*'PGD'"):
        create_attack("torchattacks:pgd", model)
    with pytest.raises(ValueError, match="accepted: .*'alpha'"):
        create_attack("torchattacks:PGD", model, step_size=0.1)
    assert create_attack("torchattacks:PGDL2", model).norm == "L2"


@pytest.mark.parametrize("kw, match", [
    ({"eps": -1}, "eps"), ({"norm": "L1"}, "norm"), ({"steps": 1.5}, "steps"),
    ({"random_start": "gauss"}, "random_start"), ({"loss": "mse"}, "loss"),
    ({"restarts": 0}, "restarts"), ({"select": "first"}, "select"),
    ({"restarts": 2, "select": "last"}, "restarts"), ({"loss": "kl", "targeted": True}, "kl"),
    ({"step_noise": -0.1}, "step_noise"), ({"step_noise": float("nan")}, "step_noise"),
    ({"steps": 0}, r"steps must be an int >= 1, got 0"),  # returned x: "robust" = clean
])
def test_pgd_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        PGD(TinyCNN(), **kw)


def test_bad_overrides():
    model, x, y = _setup(4)
    with pytest.raises(ValueError, match="eps"):
        PGD(model).perturb(x, y, eps=torch.ones(3))
    with pytest.raises(ValueError, match="tau"):
        PGD(model).perturb(x, y, tau=-1)
    with pytest.raises(ValueError, match="version"):
        AutoAttack(model, version="fast")
    with pytest.raises(ValueError, match="attacks"):
        AutoAttack(model, version="custom")


@pytest.mark.parametrize("name", CONTRACT)
def test_bad_tensors_are_refused_naming_the_argument(name):
    """NaN images once passed the [0, 1] check and came back NaN; a label-0 NaN image then
    counted as correct. Other integer label dtypes are cast; the rest is a ValueError."""
    model, x, y = _setup(4)
    attack = _build(name, model)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        attack(bad, y)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        attack(bad, y)
    with pytest.raises(ValueError, match="y must hold integer"):
        attack(x, y.float())
    with pytest.raises(ValueError, match="floating-point"):
        attack((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="float64 but the model"):
        attack(x.double(), y)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attack(x * 2, y)
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        attack(x, y[:3])
    assert attack(x, y.to(torch.int32)).shape == x.shape  # other integer dtypes are cast


@pytest.mark.parametrize("label", [10, -1, 99])
@pytest.mark.parametrize("name", CONTRACT)
def test_labels_outside_the_model_classes_are_refused_naming_y(name, label):
    """A label >= K (or < 0) ended in torch's 'Target 10 is out of bounds' deep in a loss, or
    in nothing at all (AutoAttack returned x). Checked on the attack's own first forward."""
    model, x, y = _setup(4)
    y = y.clone()
    y[2] = label
    with pytest.raises(ValueError, match=rf"y must be in \[0, 10\) .*got label\(s\) {label}$"):
        _build(name, model)(x, y)
    assert not model._forward_hooks  # the check leaves no hook behind


@pytest.mark.parametrize("name", CONTRACT)
def test_a_wrong_channel_count_is_refused_naming_x(name):
    model, x, y = _setup(4)
    with pytest.raises(ValueError, match=r"x has 1 channel, the model expects 3 .*\(4, 1, 32, 32"):
        _build(name, model)(x[:, :1], y)
    assert not model._forward_hooks
    assert _build(name, model)(x, y).shape == x.shape  # the same attack still works


def test_a_normalized_model_refuses_a_wrong_channel_count():
    """Normalize's (1, C, 1, 1) mean once broadcast a 1-channel x to C channels: an MNIST batch
    went through a CIFAR model without a word."""
    from robustkit.models import create_model

    model = create_model("small_cnn", 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                         in_channels=3, input_size=28).eval()
    y = torch.zeros(2, dtype=torch.long)
    for c in (1, 2):
        with pytest.raises(ValueError, match=rf"x has {c} channels?, the model expects 3"):
            PGD(model, eps=0.1, alpha=0.05, steps=2)(torch.rand(2, c, 28, 28), y)


def test_an_error_that_is_not_about_channels_keeps_its_type():
    """Only a failure of the first forward that a channel count explains becomes a ValueError
    naming x; anything else (here the model's own bug) propagates unchanged."""

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise RuntimeError("a bug in the model")

    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        PGD(Broken(), eps=0.1, alpha=0.05, steps=2)(x, torch.zeros(2, dtype=torch.long))


def test_torchattacks_missing_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install robustkit\[torchattacks\]"):
        TorchAttack(TinyCNN(), "PGD")


# ------------------------------------------------------------------ real model (slow)
@pytest.mark.slow
def test_real_resnet18_standard_model():
    """pyautoattack's example ResNet-18 (a standard, non-robust CIFAR-10 model) on the first 32
    shipped CIFAR-10 test images: PGD-20 with stop_on_success loses nothing against
    torchattacks' PGD-20, breaks (nearly) every point, and needs far fewer gradient steps."""
    ta = pytest.importorskip("torchattacks")
    pytest.importorskip("pyautoattack")
    from robustkit.data import load_dataset
    from robustkit.testing import pyautoattack_resnet18

    model = pyautoattack_resnet18()
    ds = load_dataset("sample-cifar10", "test")
    x, y = ds.x[:32].float() / 255, ds.y[:32]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert clean.float().mean() > 0.8
    r = PGD(model, eps=8 / 255, alpha=2 / 255, steps=20, stop_on_success=True).perturb(x, y)
    x_ta = ta.PGD(model, steps=20)(x, y)
    with torch.no_grad():
        ours = (model(r.x_adv).argmax(1) == y).float().mean()
        theirs = (model(x_ta).argmax(1) == y).float().mean()
    assert ours <= theirs and ours <= 0.05
    assert r.info["steps_used"].float().mean() < 5  # a standard model falls within a few steps

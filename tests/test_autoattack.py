"""robustkit.attacks.AutoAttack against pyautoattack called directly, and resuming."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.attacks import AutoAttack
from robustkit.testing import TinyCNN, random_batch

pyautoattack = pytest.importorskip("pyautoattack")

EPS = 1 / 255  # APGD-CE breaks some points of the TinyCNN below, APGD-T some more, not all


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two shared cores: intra-op threads only add contention for these tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(n=8):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():  # without it one class wins by its bias and nothing breaks
        model.fc.bias.zero_()
    x, _ = random_batch(n, (3, 32, 32), seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one point misclassified from the start
    return model, x, y


def _direct(model, x, y, attacks, batch_size=500):
    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="custom", attacks=attacks,
                                 device="cpu", seed=0)
    return aa.run_standard_evaluation(x, y, batch_size=batch_size)


def test_adapter_equals_pyautoattack():
    model, x, y = _setup()
    x_ref, y_ref = _direct(model, x, y, ["apgd-ce"])
    rng = torch.get_rng_state()
    model.train()
    result = AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce"]).perturb(x, y)
    assert model.training  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # pyautoattack's seeding did not leak
    assert torch.equal(result.x_adv, x_ref)
    robust = ~result.info["success"]
    assert torch.equal(robust, y_ref == y)
    assert robust.any() and not robust.all() and not robust[0]


def test_fab_leaves_parameter_grads_alone():
    model, x, y = _setup(2)
    for p in model.parameters():
        p.grad = None
    AutoAttack(model, eps=EPS, version="custom", attacks=["fab"]).perturb(x, y)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_resume_from_state(tmp_path):
    model, x, y = _setup()
    attacks = ["apgd-ce", "apgd-t"]
    adapter = AutoAttack(model, eps=EPS, version="custom", attacks=attacks)
    path = tmp_path / "sub" / "aa_state.json"
    full = adapter.perturb(x, y, state_path=path)
    state = json.loads(path.read_text())
    assert sorted(state["_run_attacks"]) == sorted(attacks)
    assert state["_robust_flags"] == (~full.info["success"]).tolist()

    # A finished state: nothing runs again (not one forward) and the flags are the same.
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    again = adapter.perturb(x, y, state_path=path)
    hook.remove()
    assert not calls and torch.equal(again.info["success"], full.info["success"])

    # Interrupted after APGD-CE: the state pyautoattack writes at that point (its format).
    _, y_ce = _direct(model, x, y, ["apgd-ce"])
    state["_run_attacks"] = ["apgd-ce"]
    state["_robust_flags"] = (y_ce == y).tolist()
    path.write_text(json.dumps(state))
    resumed = adapter.perturb(x, y, state_path=path)
    assert torch.equal(resumed.info["success"], full.info["success"])
    newly = (y_ce == y) & resumed.info["success"]  # broken by APGD-T in the resumed run
    assert torch.equal(resumed.x_adv[newly], full.x_adv[newly])
    assert torch.equal(resumed.x_adv[~newly], x[~newly])  # pyautoattack's convention
    assert sorted(json.loads(path.read_text())["_run_attacks"]) == sorted(attacks)


def test_resume_rejects_a_foreign_state(tmp_path):
    model, x, y = _setup(4)
    path = tmp_path / "aa_state.json"
    AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce"]).perturb(
        x, y, state_path=path)
    with pytest.raises(ValueError, match="written for attacks"):
        AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-t"]).perturb(
            x, y, state_path=path)
    with pytest.raises(ValueError, match="robust flags"):
        AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce"]).perturb(
            x[:3], y[:3], state_path=path)


@pytest.mark.parametrize("kw, match", [
    ({"version": "fast"}, "version"), ({"version": "custom"}, "attacks"),
    ({"attacks": ["apgd-ce"]}, "custom"), ({"version": "custom", "attacks": ["pgd"]}, "unknown"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        AutoAttack(TinyCNN(), **kw)

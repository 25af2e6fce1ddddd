"""robustkit.attacks.AutoAttack against pyautoattack called directly, per-sub-attack flags, and
resuming."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.attacks import AutoAttack
from robustkit.attacks.autoattack import MISCLASSIFIED, NOT_BROKEN
from robustkit.evaluation import runner
from robustkit.testing import (
    HalfMaskedLinear,
    TinyCNN,
    random_batch,
    shrink_autoattack,
)

pyautoattack = pytest.importorskip("pyautoattack")

EPS = 1 / 255  # APGD-CE breaks some points of the TinyCNN below, APGD-T some more, not all


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


class Interrupted(Exception):
    """A crash inside an attack (not KeyboardInterrupt, which would stop pytest itself)."""


def _half_masked(n=24):
    model = HalfMaskedLinear().eval()
    x, _ = random_batch(n, (3, 8, 8), seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one point misclassified from the start
    return model, x, y


@pytest.fixture
def small_standard(monkeypatch):
    """AutoAttack standard whose backend runs ``shrink_autoattack``'s settings."""
    build = AutoAttack.build
    monkeypatch.setattr(AutoAttack, "build",
                        lambda self, device: shrink_autoattack(build(self, device)))
    model, x, y = _half_masked()
    return AutoAttack(model, eps=0.05), model, x, y


def test_one_attack_at_a_time_equals_one_pyautoattack_call(small_standard):
    adapter, model, x, y = small_standard
    ref = adapter.build("cpu")  # the same backend object settings, run in one call
    x_ref, y_ref = ref.run_standard_evaluation(x, y, batch_size=500)
    res = adapter.perturb(x, y)
    assert torch.equal(res.x_adv, x_ref)
    assert torch.equal(res.info["success"], y_ref != y)
    by = res.info["broken_by"]
    assert adapter.components == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # every sub-attack broke something, and some points stay robust: the test has teeth
    assert sorted(set(by.tolist())) == [MISCLASSIFIED, NOT_BROKEN, 0, 1, 2, 3]
    assert by[0] == MISCLASSIFIED
    # broken_by k: robust under the sub-attacks before k (pyautoattack on that prefix), not after
    for k in range(4):
        prefix = pyautoattack.AutoAttack(model, norm="Linf", eps=0.05, version="custom",
                                         attacks=adapter.components[:k + 1], device="cpu", seed=0)
        for name in ("apgd", "apgd_targeted", "fab", "square"):  # the standard version's objects
            setattr(prefix, name, getattr(ref, name))
        _, y_k = prefix.run_standard_evaluation(x, y, batch_size=500)
        assert torch.equal(y_k == y, (by == NOT_BROKEN) | (by > k)), k


def test_settings_are_the_versions_own():
    """Each sub-attack runs on the object version='standard' configured (not 'custom' defaults)."""
    aa = AutoAttack(TinyCNN(), eps=8 / 255, seed=3).build("cpu")
    assert list(aa.attacks_to_run) == AutoAttack(TinyCNN()).components
    assert (aa.apgd.n_restarts, aa.apgd.n_iter, aa.apgd.seed) == (1, 100, 3)
    assert (aa.apgd_targeted.n_target_classes, aa.apgd_targeted.n_restarts,
            aa.apgd_targeted.n_iter) == (9, 1, 100)
    assert (aa.fab.n_target_classes, aa.fab.n_restarts, aa.fab.n_iter) == (9, 1, 100)
    assert (aa.square.n_queries, aa.square.p_init, aa.square.seed) == (5000, 0.8, 3)
    for version in ("plus", "rand"):
        assert AutoAttack(TinyCNN(), version=version).components == list(
            AutoAttack(TinyCNN(), version=version).build("cpu").attacks_to_run)
    assert AutoAttack.resumable and NOT_BROKEN == runner.NOT_BROKEN


def test_resume_after_an_interruption(small_standard, tmp_path, monkeypatch):
    adapter, model, x, y = small_standard
    full = adapter.perturb(x, y)
    path = tmp_path / "sub" / "aa_state.json"
    from pyautoattack import AutoAttack as Backend

    run = Backend.run_standard_evaluation
    calls = []

    def interrupted(self, *a, **kw):  # the third sub-attack (FAB-T) is interrupted
        calls.append(list(self.attacks_to_run))
        if len(calls) == 3:
            raise Interrupted
        return run(self, *a, **kw)

    monkeypatch.setattr(Backend, "run_standard_evaluation", interrupted)
    with pytest.raises(Interrupted):
        adapter.perturb(x, y, state_path=path)
    state = json.loads(path.read_text())
    assert state["_run_attacks"] == ["apgd-ce", "apgd-t"]  # pyautoattack's keys, plus broken_by
    calls.clear()
    resumed = adapter.perturb(x, y, state_path=path)
    assert calls == [["fab-t"], ["square"]]  # the finished sub-attacks are not run again
    assert torch.equal(resumed.info["broken_by"], full.info["broken_by"])
    assert torch.equal(resumed.info["success"], full.info["success"])
    late = resumed.info["broken_by"] >= 2  # broken after the interruption: their x_adv is back
    assert torch.equal(resumed.x_adv[late], full.x_adv[late])
    assert torch.equal(resumed.x_adv[~late], x[~late])  # pyautoattack's convention
    state = json.loads(path.read_text())
    assert state["_run_attacks"] == adapter.components
    assert state["_robust_flags"] == (~full.info["success"]).tolist()
    assert state["broken_by"] == full.info["broken_by"].tolist()
    # A finished state: nothing runs again (not one forward) and the flags are the same.
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(1))
    again = adapter.perturb(x, y, state_path=path)
    hook.remove()
    assert not seen and torch.equal(again.info["broken_by"], full.info["broken_by"])


def test_a_state_without_the_per_attack_record_is_recomputed(small_standard, tmp_path):
    """pyautoattack's own file does not say which attack broke which point: start afresh."""
    adapter, _, x, y = small_standard
    path = tmp_path / "aa_state.json"
    full = adapter.perturb(x, y, state_path=path)
    state = json.loads(path.read_text())
    del state["broken_by"]
    state["_attacks_to_run"] = str(set(adapter.components))  # as pyautoattack writes it
    path.write_text(json.dumps(state))
    again = adapter.perturb(x, y, state_path=path)
    assert torch.equal(again.x_adv, full.x_adv)
    assert torch.equal(again.info["broken_by"], full.info["broken_by"])


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
    ({"version": "custom", "attacks": ["square", "square"]}, "twice"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        AutoAttack(TinyCNN(), **kw)

"""Resumable evaluation: every attack setting is fingerprinted; AutoAttack's per-sub-attack flags
survive an interruption (robustkit.evaluation.state, runner)."""

from __future__ import annotations

import json

import pytest
import torch

from robustkit.attacks import AutoAttack
from robustkit.attacks.pgd import PGD
from robustkit.evaluation import StateMismatchError, evaluate_attacks
from robustkit.evaluation.results import build_results, write_results
from robustkit.testing import (
    HalfMaskedLinear,
    LinearModel,
    TinyCNN,
    random_batch,
    shrink_autoattack,
)


def _tiny(n=32):
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).eval()
    x, _ = random_batch(n, (3, 8, 8), 10, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct: PGD does real work
    return model, x, y


def test_stale_settings_refused_then_recomputed(tmp_path):
    """The issue's case: PGD(steps=1), then PGD(steps=40) in one state_dir got the 1-step flags."""
    model, x, y = _tiny()

    def pgd(steps):
        return {"pgd": PGD(model, eps=0.03, alpha=0.01, steps=steps, generator=torch.Generator())}

    first = evaluate_attacks(model, (x, y), pgd(1), batch_size=8, state_dir=tmp_path)
    with pytest.raises(StateMismatchError, match=r"attacks\.pgd\.steps: 1 -> 40"):
        evaluate_attacks(model, (x, y), pgd(40), batch_size=8, state_dir=tmp_path)
    again = evaluate_attacks(model, (x, y), pgd(40), batch_size=8, state_dir=tmp_path,
                             overwrite=True)
    fresh = evaluate_attacks(model, (x, y), pgd(40), batch_size=8)
    assert torch.equal(again.correct["pgd"], fresh.correct["pgd"])
    assert again.accuracy()["pgd"] < first.accuracy()["pgd"]  # the stale flags were not reused


@pytest.mark.parametrize("setting", [
    {"alpha": 0.02}, {"loss": "cw"}, {"restarts": 2}, {"random_start": False},
    {"targeted": True}, {"select": "last"}, {"norm": "L2"},
])
def test_every_pgd_setting_is_fingerprinted(tmp_path, setting):
    model = LinearModel((3, 8, 8), 10).eval()
    x, y = random_batch(4, (3, 8, 8), 10)
    base = dict(eps=0.03, alpha=0.01, steps=1)
    evaluate_attacks(model, (x, y), {"pgd": PGD(model, **base)}, state_dir=tmp_path)
    key = next(iter(setting))
    with pytest.raises(StateMismatchError, match=rf"attacks\.pgd\.{key}:"):
        evaluate_attacks(model, (x, y), {"pgd": PGD(model, **{**base, **setting})},
                         state_dir=tmp_path)


def test_autoattack_settings_are_fingerprinted(tmp_path):
    model = LinearModel((3, 8, 8), 10).eval()
    x, y = random_batch(4, (3, 8, 8), 10)
    y[:] = 0  # nothing clean-correct or almost: only the fingerprint matters here
    aa = {"aa": AutoAttack(model, eps=0.01, version="custom", attacks=["apgd-ce"], seed=0)}
    evaluate_attacks(model, (x, y), aa, state_dir=tmp_path)
    for other, key in ((AutoAttack(model, eps=0.01, version="custom", attacks=["apgd-ce"],
                                   seed=1), "seed"),
                       (AutoAttack(model, eps=0.01), "version")):
        with pytest.raises(StateMismatchError, match=rf"attacks\.aa\.{key}:"):
            evaluate_attacks(model, (x, y), {"aa": other}, state_dir=tmp_path)


class Interrupted(Exception):
    """A crash inside an attack (not KeyboardInterrupt, which would stop pytest itself)."""


@pytest.fixture
def small_aa(monkeypatch):
    build = AutoAttack.build
    monkeypatch.setattr(AutoAttack, "build",
                        lambda self, device: shrink_autoattack(build(self, device)))
    model = HalfMaskedLinear().eval()
    x, _ = random_batch(24, (3, 8, 8), seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_components_recorded_and_resumed(small_aa, tmp_path, monkeypatch):
    model, x, y = small_aa
    attacks = {"autoattack": AutoAttack(model, eps=0.05)}
    full = evaluate_attacks(model, (x, y), attacks, batch_size=8)
    comp = full.components["autoattack"]
    assert list(comp) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert torch.equal(comp["square"], full.correct["autoattack"])  # the last one is the total
    counts = [int(c.sum()) for c in comp.values()]
    assert counts == sorted(counts, reverse=True) and counts[0] < 24 and counts[-1] > 0

    # Interrupt the second chunk inside AutoAttack's third sub-attack, then resume.
    from pyautoattack import AutoAttack as Backend

    run, calls = Backend.run_standard_evaluation, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 7:  # chunk 0: 4 sub-attacks; chunk 1: apgd-ce, apgd-t, then fab-t
            raise Interrupted
        return run(self, *a, **kw)

    monkeypatch.setattr(Backend, "run_standard_evaluation", interrupted)
    with pytest.raises(Interrupted):
        evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=tmp_path)
    assert (tmp_path / "aastate_autoattack_00001.json").exists()
    saved = json.loads((tmp_path / "flags_autoattack.json").read_text())
    assert saved["components"] == list(comp) and list(saved["batches"]) == ["0"]
    monkeypatch.setattr(Backend, "run_standard_evaluation", run)
    res = evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=tmp_path)
    for sub in comp:
        assert torch.equal(res.components["autoattack"][sub], comp[sub]), sub
    assert torch.equal(res.correct["autoattack"], full.correct["autoattack"])

    # ... and a third run restores everything from the state, components included.
    monkeypatch.setattr(Backend, "run_standard_evaluation", interrupted)
    calls.clear()
    again = evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=tmp_path)
    assert not calls
    assert all(torch.equal(again.components["autoattack"][s], comp[s]) for s in comp)

    # results.json counts what each sub-attack broke; flags.json keeps the per-point flags.
    results = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=0.05,
                            seed=0, subset="first 24 test images")
    broken = results["broken_by"]["autoattack"]
    assert sum(broken.values()) == int(res.clean.sum() - res.correct["autoattack"].sum())
    assert results["components"]["autoattack"]["apgd-ce"] == counts[0] / 24
    write_results(tmp_path, results, res)
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert flags["components"]["autoattack"]["fab-t"] == comp["fab-t"].int().tolist()


def test_components_under_cascade_follow_the_attacked_points(small_aa):
    model, x, y = small_aa
    attacks = {"pgd": PGD(model, eps=0.05, alpha=0.02, steps=3),
               "autoattack": AutoAttack(model, eps=0.05)}
    res = evaluate_attacks(model, (x, y), attacks, batch_size=8, protocol="cascade")
    seen = res.attacked("autoattack")
    assert torch.equal(seen, res.clean & res.correct["pgd"])
    for flags in res.components["autoattack"].values():
        assert not (flags & ~seen).any()  # False where AutoAttack did not run


def test_components_is_a_reserved_name():
    x, y = random_batch(4, (3, 8, 8), 10)
    model = LinearModel((3, 8, 8), 10)
    with pytest.raises(ValueError, match="reserved"):
        evaluate_attacks(model, (x, y), {"components": PGD(model, steps=1)})

"""evaluate_attacks, the sanity checks and the result files (evaluation, checks, results)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.evaluation import (
    EvalResult,
    StateMismatchError,
    evaluate_attacks,
    post_checks,
    pre_checks,
)
from robustkit.evaluation.results import (
    FULL_TEST_SIZE,
    build_results,
    format_eps,
    model_info,
    write_model_info,
)
from robustkit.testing import ConstantModel, LinearModel, TinyCNN, random_batch

K = 5  # classes of the pixel model


class PixelModel(nn.Module):
    """Predicts the class nearest to ``pixel(0,0,0) * (K - 1)``: smooth logits, known argmax."""

    def forward(self, x):
        v = x[:, 0, 0, 0:1] * (K - 1)
        return -10.0 * (v - torch.arange(K, dtype=x.dtype, device=x.device)) ** 2


def pixel_data(n=12, wrong=(0, 9)):
    """x whose pixel (0,0,0) encodes y (or y+1 for the ``wrong`` ids) and pixel (0,0,1) the id."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 2, 2, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    shown = y.clone()
    shown[list(wrong)] = (y[list(wrong)] + 1) % K
    x[:, 0, 0, 0] = shown.float() / (K - 1)
    x[:, 0, 0, 1] = torch.arange(n).float() / 100
    return x, y


class FlipAttack(Attack):
    """Breaks exactly the points whose id is in ``flip``; records the ids it saw; optionally
    raises on its ``fail_at``-th call (an interruption)."""

    def __init__(self, model, flip, fail_at=None):
        super().__init__(model, eps=1.0)
        self.flip, self.fail_at, self.calls, self.seen = set(flip), fail_at, 0, []

    def _perturb(self, x, y):
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls += 1
        ids = (x[:, 0, 0, 1] * 100).round().long()
        self.seen += ids.tolist()
        x_adv = x.clone()
        hit = torch.tensor([int(i) in self.flip for i in ids])
        x_adv[hit, 0, 0, 0] = ((y[hit] + 1) % K).float() / (K - 1)
        return AttackResult(x_adv)


class CountingPGD(Attack):
    """PGD with a call counter and an optional interruption (exposes PGD's generator)."""

    def __init__(self, model, interrupt_at=None):
        super().__init__(model, eps=8 / 255)
        self.inner = PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, stop_on_success=True,
                         generator=torch.Generator())
        self.generator = self.inner.generator
        # not named like a constructor argument: an interruption is not a setting of the attack
        self.fail_at, self.calls = interrupt_at, 0

    def _perturb(self, x, y):
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls += 1
        return self.inner.perturb(x, y)


def test_constant_model_exact_accuracy():
    x, y = random_batch(50, (3, 8, 8), 10, seed=3)
    res = evaluate_attacks(ConstantModel(10, label=3), (x, y), {}, batch_size=7)
    assert res.accuracy()["clean"] == pytest.approx((y == 3).float().mean().item(), abs=0)
    assert res.accuracy()["robust"] == res.accuracy()["clean"]
    assert torch.equal(res.clean, y == 3)


@pytest.mark.parametrize("protocol", ["standalone", "cascade"])
def test_robust_is_per_example_and(protocol):
    x, y = pixel_data()
    model = PixelModel()
    a, b = FlipAttack(model, {1, 2, 5}), FlipAttack(model, {2, 7, 9})
    res = evaluate_attacks(model, (x, y), {"a": a, "b": b}, batch_size=4, protocol=protocol)
    ids = torch.arange(12)
    clean = ~torch.isin(ids, torch.tensor([0, 9]))
    not_a = ~torch.isin(ids, torch.tensor([1, 2, 5]))
    not_b = ~torch.isin(ids, torch.tensor([2, 7, 9]))
    assert torch.equal(res.clean, clean)
    assert torch.equal(res.robust, clean & not_a & not_b)
    assert res.accuracy()["robust"] == (clean & not_a & not_b).sum().item() / 12
    assert sorted(a.seen) == ids[clean].tolist()  # attacks only see clean-correct points
    if protocol == "standalone":  # each attack alone: its own accuracy
        assert torch.equal(res.correct["b"], clean & not_b)
        assert sorted(b.seen) == ids[clean].tolist()
    else:  # later attacks only see what is still robust; accuracies are cumulative
        assert torch.equal(res.correct["b"], clean & not_a & not_b)
        assert sorted(b.seen) == ids[clean & not_a].tolist()


def test_batch_size_invariance_and_dataset_input():
    x, y = pixel_data()
    model = PixelModel()
    one = evaluate_attacks(model, (x, y), {"a": FlipAttack(model, {3, 4})}, batch_size=100)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(12))
    other = evaluate_attacks(model, ds, {"a": FlipAttack(model, {3, 4})}, batch_size=5)
    assert torch.equal(one.robust, other.robust) and torch.equal(one.labels, y)


def test_mode_restored_rng_untouched_and_clean_in_eval_mode():
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).train()
    x, y = random_batch(16, (3, 8, 8), 10, seed=0)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # labels = eval-mode predictions: clean acc must be 1
    model.train()
    state = torch.random.get_rng_state()
    res = evaluate_attacks(model, (x, y), {"pgd": PGD(model, steps=2, generator=torch.Generator())},
                           batch_size=8)
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), state)
    assert res.accuracy()["clean"] == 1.0
    assert res.max_perturbation["pgd"] <= 8 / 255 + 1e-6


def test_seeded_batches_make_pgd_reproducible():
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).eval()
    x, y = random_batch(24, (3, 8, 8), 10, seed=5)
    y = model(x).argmax(1).detach()  # all clean-correct, so PGD does real work
    run = [evaluate_attacks(model, (x, y), {"pgd": CountingPGD(model)}, batch_size=8, seed=s)
           for s in (0, 0)]
    assert torch.equal(run[0].correct["pgd"], run[1].correct["pgd"])


def test_resume_matches_uninterrupted_and_skips_done_batches(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).eval()
    x, y = random_batch(40, (3, 8, 8), 10, seed=2)
    y[::2] = model(x).argmax(1).detach()[::2]  # half clean-correct
    full = evaluate_attacks(model, (x, y), {"pgd": CountingPGD(model)}, batch_size=4, seed=7)
    n_batches = -(-int(full.clean.sum()) // 4)
    assert n_batches >= 4
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_attacks(model, (x, y), {"pgd": CountingPGD(model, interrupt_at=3)}, batch_size=4,
                         seed=7, state_dir=tmp_path)
    again = CountingPGD(model)
    res = evaluate_attacks(model, (x, y), {"pgd": again}, batch_size=4, seed=7,
                           state_dir=tmp_path)
    assert again.calls == n_batches - 3  # the 3 finished batches are not recomputed
    assert torch.equal(res.correct["pgd"], full.correct["pgd"])
    assert torch.equal(res.robust, full.robust)
    third = CountingPGD(model)
    evaluate_attacks(model, (x, y), {"pgd": third}, batch_size=4, seed=7, state_dir=tmp_path)
    assert third.calls == 0


def test_fingerprint_mismatch_refused_or_overwritten(tmp_path):
    x, y = pixel_data()
    model = PixelModel()
    evaluate_attacks(model, (x, y), {"a": FlipAttack(model, {1})}, batch_size=4,
                     state_dir=tmp_path, fingerprint={"eps": 0.1})
    with pytest.raises(StateMismatchError, match="eps"):
        evaluate_attacks(model, (x, y), {"a": FlipAttack(model, {1})}, batch_size=4,
                         state_dir=tmp_path, fingerprint={"eps": 0.2})
    with pytest.raises(StateMismatchError, match="batch_size"):
        evaluate_attacks(model, (x, y), {"a": FlipAttack(model, {1})}, batch_size=5,
                         state_dir=tmp_path, fingerprint={"eps": 0.1})
    fresh = FlipAttack(model, {1})
    evaluate_attacks(model, (x, y), {"a": fresh}, batch_size=4, state_dir=tmp_path,
                     fingerprint={"eps": 0.2}, overwrite=True)
    assert fresh.calls == 3  # 10 clean-correct points in batches of 4, all recomputed


class ClaimAttack(Attack):
    """Returns x unchanged but claims success on every point (a resumed AutoAttack chunk does
    this for points broken before the interruption)."""

    def __init__(self, model):
        super().__init__(model, eps=0.0)

    def _perturb(self, x, y):
        return AttackResult(x.clone(), {"success": torch.ones(len(x), dtype=torch.bool)})


def test_claimed_success_counts_as_broken():
    x, y = pixel_data()
    res = evaluate_attacks(PixelModel(), (x, y), {"claim": ClaimAttack(PixelModel())})
    assert res.accuracy()["claim"] == 0.0 and res.accuracy()["clean"] == 10 / 12


def test_autoattack_chunks_match_the_adapter(tmp_path):
    from robustkit.attacks import AutoAttack

    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8).eval()
    x, y = random_batch(12, (3, 8, 8), 10, seed=4)
    y[:8] = model(x).argmax(1).detach()[:8]
    aa = AutoAttack(model, eps=4 / 255, version="custom", attacks=["apgd-ce"], seed=0)
    res = evaluate_attacks(model, (x, y), {"aa": aa}, batch_size=64, state_dir=tmp_path)
    clean = res.clean.nonzero().flatten()
    direct = ~aa.perturb(x[clean], y[clean]).info["success"]
    assert torch.equal(res.correct["aa"][clean], direct)
    assert not list(tmp_path.glob("aastate_*"))  # the finished chunk's AutoAttack state is gone


def test_bad_arguments():
    x, y = pixel_data()
    with pytest.raises(ValueError, match="reserved"):
        evaluate_attacks(PixelModel(), (x, y), {"clean": FlipAttack(PixelModel(), {})})
    with pytest.raises(ValueError, match="protocol"):
        evaluate_attacks(PixelModel(), (x, y), {}, protocol="all")


# ----------------------------------------------------------------------------- checks
class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = LinearModel((3, 8, 8), 10)

    def forward(self, x):
        return F.softmax(self.net(x), dim=1)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = LinearModel((3, 8, 8), 10)

    def forward(self, x):
        return self.net(x) + torch.rand(x.shape[0], 10)


class Dynamic(nn.Module):
    """Takes an input gradient inside its forward (a 'dynamic' defence)."""

    def __init__(self):
        super().__init__()
        self.net = LinearModel((3, 8, 8), 10)

    def forward(self, x):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.net(xg).sum(), xg)
        return self.net((x - 0.01 * g.sign()).clamp(0, 1))


def failed(checks):
    return {c.name for c in checks if not c.passed}


def flagged(checks):
    return {c.name: c.severity for c in checks if c.severity != "ok"}


def test_pre_checks_pass_on_a_plain_model():
    x, y = random_batch(8, (3, 8, 8), 10)
    checks = pre_checks(LinearModel((3, 8, 8), 10).eval(), x, y, num_targets=9)
    assert [c.name for c in checks] == ["eval_mode", "logits", "deterministic", "dynamic",
                                        "gradients", "n_classes"]
    assert failed(checks) == set()


@pytest.mark.parametrize("model, expected, severity", [
    (Softmax(), "logits", "fail"),
    (Noisy(), "deterministic", "fail"),
    (Dynamic(), "dynamic", "warning"),
    (ConstantModel(10, sensitivity=0.0), "gradients", "fail"),
    (nn.Sequential(nn.Dropout(0.5), LinearModel((3, 8, 8), 10)).train(), "eval_mode", "warning"),
])
def test_pre_checks_fire(model, expected, severity):
    x, y = random_batch(8, (3, 8, 8), 10)
    was = model.training
    assert flagged(pre_checks(model, x, y))[expected] == severity
    assert model.training == was


def test_n_classes_check():
    x, y = random_batch(8, (3, 8, 8), 5)
    assert flagged(pre_checks(LinearModel((3, 8, 8), 5).eval(), x, y, num_targets=9)) == {
        "n_classes": "fail"}


def _result(clean, **correct):
    t = lambda v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    return EvalResult(labels=torch.zeros(len(clean), dtype=torch.long), clean=t(clean),
                      correct={k: t(v) for k, v in correct.items()},
                      max_perturbation={k: 0.01 for k in correct})


def test_post_checks_flag_masking_signs():
    c = [1] * 10
    res = _result(c, pgd20=[1] * 6 + [0] * 4, pgd100=[1] * 9 + [0], square=[1] * 3 + [0] * 7)
    res.max_perturbation["square"] = 0.5
    bad = failed(post_checks(res, eps=8 / 255, strength={"pgd20": ("pgd-ce", 20),
                                                          "pgd100": ("pgd-ce", 100)}))
    assert bad == {"black_box:square", "monotone:pgd20<pgd100", "perturbation:square",
                   "gradient_gap:pgd100"}
    ok = _result(c, pgd20=[1] * 6 + [0] * 4, pgd100=[1] * 5 + [0] * 5, square=[1] * 7 + [0] * 3)
    assert failed(post_checks(ok, eps=8 / 255, strength={"pgd20": ("pgd-ce", 20),
                                                          "pgd100": ("pgd-ce", 100)})) == set()


def test_post_check_tolerates_one_sample():
    res = _result([1] * 10, pgd20=[1] * 5 + [0] * 5, pgd100=[1] * 6 + [0] * 4)
    assert failed(post_checks(res, eps=1, strength={"pgd20": ("pgd-ce", 20),
                                                    "pgd100": ("pgd-ce", 100)})) == set()


# ----------------------------------------------------------------------------- result files
PCT = re.compile(r"^\d{1,3}\.\d\d$")


def _results(n=1000, dataset="cifar10", version="standard", eps=8 / 255):
    clean = [1] * (n * 9 // 10) + [0] * (n - n * 9 // 10)
    aa = [1] * (n // 2) + [0] * (n - n // 2)
    res = _result(clean, pgd20=[1] * (n * 6 // 10) + [0] * (n - n * 6 // 10), autoattack=aa)
    settings = {"pgd20": {"class": "PGD", "family": "pgd"},
                "autoattack": {"class": "AutoAttack", "family": "autoattack", "version": version}}
    return build_results(res, model="resnet18", dataset=dataset, threat_model="Linf", eps=eps,
                         seed=0, subset=f"first {n} test images", architecture="ResNet18",
                         attacks=settings, checks=post_checks(res, eps=eps))


def test_results_schema():
    r = json.loads(json.dumps(_results()))  # JSON-serialisable
    for key in ("model", "dataset", "threat_model", "eps", "n_examples", "seed", "accuracy",
                "time_s", "robustkit_version", "subset", "checkpoint", "architecture",
                "attacks", "checks", "versions", "protocol"):
        assert key in r
    assert r["accuracy"] == {"clean": 0.9, "pgd20": 0.6, "autoattack": 0.5, "robust": 0.5}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in r["accuracy"].values())
    assert r["eps"] == 8 / 255 and r["eps_text"] == "8/255" and r["n_examples"] == 1000
    assert "torch" in r["versions"] and "pyautoattack" in r["versions"]


def test_robustbench_json(tmp_path):
    info = model_info(_results())
    assert {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
            "venue", "architecture", "eps", "clean_acc", "reported",
            "autoattack_acc"} <= set(info)
    assert info["clean_acc"] == "90.00" and info["autoattack_acc"] == "50.00"
    assert PCT.match(info["clean_acc"]) and PCT.match(info["autoattack_acc"])
    assert "first 1000 test images" in info["footnote"] and "not a leaderboard" in info["footnote"]
    full = model_info(_results(n=10_000))
    assert "footnote" not in full and full["eps"] == "8/255"
    assert "AA-plus" in model_info(_results(n=10_000, version="plus"))["footnote"]
    tiny = model_info(_results(n=10_000, dataset="tinyimagenet"))
    assert tiny["footnote"] == "AA-standard (not a leaderboard number)"
    path = write_model_info(tmp_path, _results(), name="rn18")
    assert path == tmp_path / "model_info" / "cifar10" / "Linf" / "rn18.json"
    assert json.loads(path.read_text())["name"] == "rn18"


def test_robustbench_json_without_autoattack():
    r = _results()
    r["attacks"].pop("autoattack")
    info = model_info(r)
    assert info["autoattack_acc"] is None and "AutoAttack not run" in info["footnote"]


def test_format_eps():
    assert format_eps(8 / 255) == "8/255" and format_eps(0.5) == "0.5"
    assert format_eps(0.031) == "0.031" and format_eps(0.3) == "0.3"


def test_cascade_is_labelled_in_both_json_files():
    """clean, pgd, autoattack in cascade: the AutoAttack column is 'robust after PGD and AA'."""
    from robustkit.attacks import AutoAttack

    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).eval()
    x, y = random_batch(12, (3, 8, 8), 10, seed=4)
    y = model(x).argmax(1).detach()
    attacks = {"pgd": PGD(model, eps=0.02, alpha=0.005, steps=3),
               "autoattack": AutoAttack(model, eps=0.02, version="custom", attacks=["apgd-ce"])}
    settings = {"pgd": {"class": "PGD", "family": "pgd"},
                "autoattack": {"class": "AutoAttack", "family": "autoattack",
                               "version": "standard"}}
    n = FULL_TEST_SIZE["cifar10"]  # a full-test-set run: only the cascade needs a footnote
    for protocol in ("cascade", "standalone"):
        res = evaluate_attacks(model, (x, y), attacks, protocol=protocol)
        res.labels = torch.zeros(n, dtype=torch.long)  # pretend the full test set (flags unused)
        r = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=8 / 255,
                          seed=0, subset="the test set", attacks=settings)
        meaning = r["accuracy_meaning"]
        note = model_info(r).get("footnote", "")
        if protocol == "cascade":
            assert meaning["autoattack"]["cumulative_after"] == ["pgd", "autoattack"]
            assert "after pgd" in meaning["autoattack"]["description"]
            assert "cascade" in note and "after pgd" in note and "not AutoAttack alone" in note
        else:
            assert meaning["autoattack"]["cumulative_after"] == ["autoattack"]
            assert note == ""
    assert meaning["pgd"]["cumulative_after"] == ["pgd"]
    assert meaning["robust"]["cumulative_after"] == ["pgd", "autoattack"]


# ---- results.json and the RobustBench entry, field by field -----------------------------------


def _aa_result(n=10, protocol="standalone"):
    """clean 8/10; pgd breaks point 0; fgsm breaks 0, 2; AutoAttack (APGD-CE then Square)
    breaks 0, 2 (APGD-CE) and 3 (Square); timings and perturbations as measured."""
    t = lambda k: torch.tensor([i < k for i in range(n)])  # noqa: E731
    clean = t(8)
    flags = lambda *broken: clean & ~torch.isin(torch.arange(n), torch.tensor(broken))  # noqa: E731
    comp = {"apgd-ce": flags(0, 2), "square": flags(0, 2, 3)}
    return EvalResult(labels=torch.arange(n) % 3, clean=clean,
                      correct={"pgd": flags(0), "fgsm": flags(0, 2), "autoattack": flags(0, 2, 3)},
                      time_s={"clean": 0.12345, "pgd": 2.0004, "fgsm": 1.5, "autoattack": 7.77777},
                      max_perturbation={"pgd": 0.03, "fgsm": 0.031, "autoattack": 0.0312},
                      protocol=protocol, components={"autoattack": comp})


def test_build_results_fields(tmp_path):
    from robustkit.evaluation import Check
    from robustkit.evaluation.results import PROTOCOL_NOTES, sha256_file

    res = _aa_result()
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    checks = [Check("logits", "ok", "outputs are logits"),
              {"name": "old", "passed": False, "message": "from a dict"}]
    r = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=8 / 255,
                      seed=3, subset="first 10 test images", checkpoint=ckpt, checks=checks,
                      extra={"name": "run1", "seed": 4})
    assert r["checkpoint"] == {"path": str(ckpt), "sha256": sha256_file(ckpt), "tag": "best"}
    assert r["protocol"] == {"name": "standalone", "note": PROTOCOL_NOTES["standalone"]}
    assert r["accuracy"] == {"clean": 0.8, "pgd": 0.7, "fgsm": 0.6, "autoattack": 0.5,
                             "robust": 0.5}
    assert r["n_correct"] == {"clean": 8, "pgd": 7, "fgsm": 6, "autoattack": 5, "robust": 5}
    assert r["components"] == {"autoattack": {"apgd-ce": 0.6, "square": 0.5}}
    assert r["broken_by"] == {"autoattack": {"apgd-ce": 2, "square": 1}}
    assert r["time_s"] == {"clean": 0.123, "pgd": 2.0, "fgsm": 1.5, "autoattack": 7.778}
    assert r["max_perturbation"] == {"pgd": 0.03, "fgsm": 0.031, "autoattack": 0.0312}
    assert r["checks"] == [
        {"name": "logits", "passed": True, "severity": "ok", "message": "outputs are logits",
         "details": {}},
        {"name": "old", "passed": False, "message": "from a dict"}]  # a dict is kept as it is
    assert r["attacks"] == {"pgd": {}, "fgsm": {}, "autoattack": {}}  # none given
    assert (r["name"], r["seed"]) == ("run1", 4)  # extra is merged last
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", r["created"])
    # other checkpoint names carry no tag; no checkpoint is null
    for stem, tag in (("last", "last"), ("epoch3", None)):
        (tmp_path / f"{stem}.pt").write_bytes(b"w")
        assert build_results(res, model="m", dataset="d", threat_model="Linf", eps=0.1,
                             seed=0, subset="s", checkpoint=tmp_path / f"{stem}.pt")[
            "checkpoint"]["tag"] == tag
    assert build_results(res, model="m", dataset="d", threat_model="Linf", eps=0.1, seed=0,
                         subset="s")["checkpoint"] is None


def test_components_of_a_single_point():
    one = EvalResult(labels=torch.zeros(1, dtype=torch.long), clean=torch.ones(1, dtype=bool),
                     correct={"aa": torch.ones(1, dtype=bool)},
                     components={"aa": {"apgd-ce": torch.ones(1, dtype=bool)}})
    r = build_results(one, model="m", dataset="d", threat_model="Linf", eps=0.1, seed=0,
                      subset="s")
    assert r["components"] == {"aa": {"apgd-ce": 1.0}} and r["n_correct"]["aa"] == 1


def test_accuracy_meaning_in_words():
    from robustkit.evaluation.results import accuracy_meaning

    aa_subs = "; autoattack's sub-attacks ran in cascade: apgd-ce, square"
    assert accuracy_meaning(_aa_result(protocol="cascade")) == {
        "clean": {"cumulative_after": [], "description": "accuracy without attack"},
        "pgd": {"cumulative_after": ["pgd"],
                "description": "accuracy under pgd alone (run on every clean-correct point)"},
        "fgsm": {"cumulative_after": ["pgd", "fgsm"],
                 "description": "robust accuracy after pgd and then fgsm (cascade: fgsm ran only "
                                "on the points still robust after pgd)"},
        "autoattack": {"cumulative_after": ["pgd", "fgsm", "autoattack"],
                       "description": "robust accuracy after pgd, fgsm and then autoattack "
                                      "(cascade: autoattack ran only on the points still robust "
                                      "after pgd, fgsm)" + aa_subs},
        "robust": {"cumulative_after": ["pgd", "fgsm", "autoattack"],
                   "description": "per-example worst case: correct under every attack"},
    }
    standalone = accuracy_meaning(_aa_result())
    assert standalone["fgsm"] == {
        "cumulative_after": ["fgsm"],
        "description": "accuracy under fgsm alone (run on every clean-correct point)"}
    assert standalone["autoattack"]["description"] == (
        "accuracy under autoattack alone (run on every clean-correct point)" + aa_subs)


def test_flags_json(tmp_path):
    from robustkit.evaluation.results import write_results

    res = _aa_result(n=4)
    path = write_results(tmp_path, {"a": 1}, res)
    assert path == tmp_path / "results.json" and json.loads(path.read_text()) == {"a": 1}
    assert json.loads((tmp_path / "flags.json").read_text()) == {
        "labels": [0, 1, 2, 0], "clean": [1, 1, 1, 1], "pgd": [0, 1, 1, 1],
        "fgsm": [0, 1, 0, 1], "autoattack": [0, 1, 0, 0], "robust": [0, 1, 0, 0],
        "components": {"autoattack": {"apgd-ce": [0, 1, 0, 1], "square": [0, 1, 0, 0]}}}


def _info(res, *, n=None, dataset="cifar10", eps=8 / 255, settings=None, **kw):
    r = build_results(res, model="m", dataset=dataset, threat_model="Linf", eps=eps, seed=0,
                      subset="first 10 test images", attacks=settings, **kw)
    if n is not None:
        r["n_examples"] = n
    return r


AA = {"pgd": {"family": "pgd"}, "fgsm": {"family": "fgsm"},
      "autoattack": {"family": "autoattack"}}  # no "version": the standard one


def test_robustbench_entry_fields_and_footnotes():
    full = FULL_TEST_SIZE["cifar10"]
    clean = model_info(_info(_aa_result(), n=full, settings=AA))
    assert clean == {"link": "", "name": "m", "authors": "", "additional_data": False,
                     "number_forward_passes": 1, "dataset": "cifar10", "venue": "N/A",
                     "architecture": "", "eps": "8/255", "clean_acc": "80.00", "reported": None,
                     "autoattack_acc": "50.00"}
    # a subset, another eps, cascade after two attacks, a worse attack than AutoAttack
    worse = _aa_result(protocol="cascade")
    worse.correct["fgsm"][4] = False
    info = model_info(_info(worse, eps=0.5, settings=AA), name="entry",
                      meta={"venue": "ICML"})
    assert (info["name"], info["venue"]) == ("entry", "ICML")
    assert info["footnote"] == (
        "AA-standard on the first 10 test images, eps = 0.5 instead of 8/255 (not a "
        "leaderboard number); cascade: AutoAttack ran only on the points still robust after "
        "pgd, fgsm, so autoattack_acc is the robust accuracy after pgd, fgsm and AutoAttack "
        "together, not AutoAttack alone; worst case over all attacks run: 40.00%")
    # without AutoAttack, and without any attack
    no_aa = model_info(_info(_aa_result(), settings={"pgd": {}, "fgsm": {}, "autoattack": {}}))
    assert no_aa["autoattack_acc"] is None and no_aa["footnote"] == (
        "AutoAttack not run; worst case over pgd, fgsm, autoattack: 50.00% on the first 10 "
        "test images; not a leaderboard number")
    bare = EvalResult(labels=torch.zeros(2, dtype=torch.long), clean=torch.ones(2, dtype=bool))
    assert model_info(_info(bare))["footnote"] == (
        "AutoAttack not run; worst case over none: 100.00% on the first 10 test images; not "
        "a leaderboard number")


def test_robustbench_footnote_of_a_cascade_read_without_accuracy_meaning():
    """results.json files from before accuracy_meaning: the attacks before AutoAttack are read
    from the accuracy columns."""
    r = _info(_aa_result(protocol="cascade"), n=FULL_TEST_SIZE["cifar10"], settings=AA)
    with_meaning = model_info(r)["footnote"]
    del r["accuracy_meaning"]
    assert model_info(r)["footnote"] == with_meaning == (
        "AA-standard (not a leaderboard number); cascade: AutoAttack ran only on the points "
        "still robust after pgd, fgsm, so autoattack_acc is the robust accuracy after pgd, fgsm "
        "and AutoAttack together, not AutoAttack alone")


def test_failed_checks_in_the_footnote_by_severity_or_passed():
    """A check dict fails by its severity, or (older results.json) by ``passed``."""
    r = _info(_aa_result(), n=FULL_TEST_SIZE["cifar10"], settings=AA, checks=[
        {"name": "a", "severity": "fail", "message": "severity fail"},
        {"name": "b", "severity": "warning", "passed": False, "message": "x"},
        {"name": "c", "passed": False, "message": "passed False"},
        {"name": "d", "passed": True, "message": "x"},
        {"name": "e", "message": "x"},
        {"name": "black_box:square", "severity": "fail", "message": "masked"}])
    assert model_info(r)["footnote"] == (
        "check a failed: severity fail; check c failed: passed False; gradient-masking check "
        "failed: masked")


def test_robustbench_entry_file(tmp_path):
    r = _info(_aa_result(), settings=AA, architecture="WRN-28-10")
    path = write_model_info(tmp_path, r, name="n", meta={"link": "https://x"})
    info = json.loads(path.read_text())
    assert (info["link"], info["architecture"], info["name"]) == ("https://x", "WRN-28-10", "n")
    for field in ("dataset", "threat_model"):
        with pytest.raises(ValueError, match=f"{field} must be a non-empty string"):
            write_model_info(tmp_path, {**r, field: ""}, name="n")


def test_versions_and_file_hash(tmp_path):
    import hashlib
    import importlib.metadata
    import platform

    from robustkit.evaluation.results import sha256_file, versions

    def installed(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    got = versions(("robustkit-no-such-package",))
    assert got == {"python": platform.python_version(),
                   **{p: installed(p) for p in ("robustkit", "torch", "torchvision",
                                                "pyautoattack", "torchattacks")},
                   "robustkit-no-such-package": None}
    assert got["torch"] is not None
    data = torch.randint(0, 256, ((5 << 20) // 2,), dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "w.pt").write_bytes(data)  # 2.5 MiB: three blocks
    assert sha256_file(tmp_path / "w.pt") == hashlib.sha256(data).hexdigest()


# ---- evaluate_attacks: arguments, defaults and EvalResult's own answers ----------------------


@pytest.mark.parametrize("kw, match", [
    ({"norm": "L1"}, r"norm must be 'Linf', 'L2' or None, got 'L1'"),
    ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
    ({"batch_size": -3}, r"batch_size must be an int >= 1, got -3"),
    ({"batch_size": 2.5}, r"batch_size must be an int >= 1, got 2.5"),
    ({"batch_size": True}, r"batch_size must be an int >= 1, got True"),
])
def test_bad_arguments_are_named(kw, match):
    x, y = pixel_data()
    with pytest.raises(ValueError, match=match):
        evaluate_attacks(PixelModel(), (x, y), {}, **kw)


def test_batch_size_one_is_allowed():
    x, y = pixel_data(n=3, wrong=())
    assert evaluate_attacks(PixelModel(), (x, y), {}, batch_size=1).accuracy()["clean"] == 1.0


def test_default_batch_size_is_256(tmp_path):
    """A run with the default resumes as batch_size=256 and not as any other size."""
    x, y = pixel_data()
    evaluate_attacks(PixelModel(), (x, y), {}, state_dir=tmp_path)
    evaluate_attacks(PixelModel(), (x, y), {}, state_dir=tmp_path, batch_size=256)
    with pytest.raises(StateMismatchError, match="batch_size"):
        evaluate_attacks(PixelModel(), (x, y), {}, state_dir=tmp_path, batch_size=257)


def test_batches_go_to_the_model_device_by_default(monkeypatch):
    """``device=None``: the device of the model's first parameter or buffer, else the CPU."""
    from robustkit.evaluation import protocol

    seen = []

    class Stop(Exception):
        pass

    def runner(**kw):
        seen.append(kw["device"])
        raise Stop

    monkeypatch.setattr(protocol, "_Runner", runner)
    x, y = pixel_data()
    on_meta = nn.Linear(2, K, device="meta")
    buffer_only = nn.BatchNorm1d(2, affine=False, device="meta")
    for model in (on_meta, buffer_only, PixelModel()):
        with pytest.raises(Stop):
            evaluate_attacks(model, (x, y), {})
    with pytest.raises(Stop):
        evaluate_attacks(on_meta, (x, y), {}, device="cpu")
    assert [d.type for d in seen] == ["meta", "meta", "cpu", "cpu"]


def test_attacked_names_the_unknown_attack():
    res = _result([1, 1], pgd=[1, 0])
    with pytest.raises(ValueError, match=r"name: no attack 'fgsm'; known: \['pgd'\]"):
        res.attacked("fgsm")


def test_accuracy_of_a_single_point():
    res = _result([1], pgd=[0])
    assert res.accuracy() == {"clean": 1.0, "pgd": 0.0, "robust": 0.0}


class CoinAttack(Attack):
    """Breaks each point with probability 1/2, drawn from torch's global RNG."""

    def __init__(self, model):
        super().__init__(model, eps=1.0)

    def _perturb(self, x, y):
        x_adv = x.clone()
        hit = torch.rand(len(x)) < 0.5
        x_adv[hit, 0, 0, 0] = ((y[hit] + 1) % K).float() / (K - 1)
        return AttackResult(x_adv)


def test_the_seed_reaches_the_attacks():
    x, y = pixel_data(n=40, wrong=())
    def run(seed):
        return evaluate_attacks(PixelModel(), (x, y), {"coin": CoinAttack(PixelModel())},
                                batch_size=8, seed=seed).correct["coin"]

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_progress_bars_and_timings_per_pass():
    x, y = pixel_data()
    bars = []

    class Bar:
        def __init__(self, name, total):
            self.name, self.total, self.done = name, total, 0
            bars.append(self)

        def update(self, k):
            self.done += k

        def close(self):
            pass

    res = evaluate_attacks(PixelModel(), (x, y), {"flip": FlipAttack(PixelModel(), {1})},
                           batch_size=5, progress=Bar)
    assert [b.name for b in bars] == ["clean", "flip"] and all(b.done == b.total for b in bars)
    assert list(res.time_s) == ["clean", "flip"]


class ShiftAttack(Attack):
    """Moves two free pixels of every point by 0.3 and 0.4 (an L2 step of 0.5, Linf 0.4)."""

    def __init__(self, model):
        super().__init__(model, eps=1.0)

    def _perturb(self, x, y):
        x_adv = x.clone()
        x_adv[:, 0, 1, 0] = (x[:, 0, 1, 0] - 0.3).where(x[:, 0, 1, 0] > 0.5, x[:, 0, 1, 0] + 0.3)
        x_adv[:, 0, 1, 1] = (x[:, 0, 1, 1] - 0.4).where(x[:, 0, 1, 1] > 0.5, x[:, 0, 1, 1] + 0.4)
        return AttackResult(x_adv)


def test_max_perturbation_in_the_threat_norm():
    """``norm`` measures every attack's perturbation in the threat model's norm (by default
    the attack's own, L∞ here)."""
    x, y = pixel_data()
    attack = {"shift": ShiftAttack(PixelModel())}
    own = evaluate_attacks(PixelModel(), (x, y), attack).max_perturbation["shift"]
    l2 = evaluate_attacks(PixelModel(), (x, y), attack, norm="L2").max_perturbation["shift"]
    assert own == pytest.approx(0.4) and l2 == pytest.approx(0.5)

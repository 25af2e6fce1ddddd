"""results.json, flags.json and the RobustBench model_info entry field by field (issue 18,
mutation round of robustkit.evaluation.results): hand-made ``EvalResult`` objects and results
dictionaries, every value compared with the one written out here."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re

import pytest
import torch

import robustkit
from robustkit.evaluation import EvalResult
from robustkit.evaluation.checks import Check
from robustkit.evaluation.results import (
    PROTOCOL_NOTES,
    accuracy_meaning,
    build_results,
    model_info,
    sha256_file,
    versions,
    write_model_info,
    write_results,
)

T = torch.tensor


def _result(protocol: str = "standalone") -> EvalResult:
    """8 points, 6 clean-correct; pgd20 leaves 4, cw20 leaves 3 (2 under both)."""
    return EvalResult(
        labels=T([0, 1, 2, 3, 4, 5, 6, 7]),
        clean=T([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool),
        correct={"pgd20": T([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool),
                 "cw20": T([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)},
        time_s={"clean": 0.123456, "pgd20": 1.23456, "cw20": 2.0004},
        max_perturbation={"pgd20": 0.031, "cw20": 0.03},
        protocol=protocol)


def test_sha256_file_of_a_file_over_one_block(tmp_path):
    """The whole file is hashed (1 MiB blocks: 2.5 MiB read in three)."""
    data = torch.randint(0, 256, (5 << 19,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    (tmp_path / "w.pt").write_bytes(data)
    assert sha256_file(tmp_path / "w.pt") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_versions_names_every_package_and_none_when_absent():
    v = versions(("numpy", "no-such-package-robustkit-test"))
    assert list(v) == ["python", "robustkit", "torch", "torchvision", "pyautoattack",
                       "torchattacks", "numpy", "no-such-package-robustkit-test"]
    assert v["python"] == platform.python_version()
    for pkg in ("robustkit", "torch", "torchvision", "pyautoattack", "torchattacks", "numpy"):
        assert v[pkg] == importlib.metadata.version(pkg) and v[pkg]
    assert v["no-such-package-robustkit-test"] is None


def test_build_results_field_by_field(tmp_path):
    res = _result()
    ck = Check("logits", "ok", "outputs are logits")
    as_dict = {"name": "old", "passed": True, "severity": "ok", "message": "m", "details": {}}
    out = build_results(res, model="m.py:net", dataset="cifar10", threat_model="Linf",
                        eps=8 / 255, seed=3, subset="first 8 test images",
                        checks=[ck, as_dict], extra={"note": 1})
    assert out["checkpoint"] is None
    assert out["protocol"] == {"name": "standalone", "note": PROTOCOL_NOTES["standalone"]}
    assert out["accuracy"] == {"clean": 0.75, "pgd20": 0.5, "cw20": 0.375, "robust": 0.25}
    assert out["n_correct"] == {"clean": 6, "pgd20": 4, "cw20": 3, "robust": 2}
    assert out["time_s"] == {"clean": 0.123, "pgd20": 1.235, "cw20": 2.0}
    assert out["max_perturbation"] == {"pgd20": 0.031, "cw20": 0.03}
    assert out["checks"] == [ck.to_dict(), as_dict]  # a dict is kept as given
    assert out["attacks"] == {"pgd20": {}, "cw20": {}}
    assert (out["eps_text"], out["seed"], out["note"]) == ("8/255", 3, 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", out["created"])
    assert out["robustkit_version"] == robustkit.__version__


@pytest.mark.parametrize("stem, tag", [("best", "best"), ("last", "last"), ("epoch3", None)])
def test_build_results_checkpoint_path_hash_and_tag(tmp_path, stem, tag):
    p = tmp_path / f"{stem}.pt"
    p.write_bytes(b"weights")
    out = build_results(_result(), model="m", dataset="cifar10", threat_model="Linf", eps=0.5,
                        seed=0, subset="s", checkpoint=p)
    assert out["checkpoint"] == {"path": str(p), "sha256": hashlib.sha256(b"weights").hexdigest(),
                                 "tag": tag}


def test_components_of_a_single_point_are_fractions_of_one():
    res = EvalResult(labels=T([0]), clean=T([True]), correct={"aa": T([False])},
                     components={"aa": {"apgd-ce": T([False]), "apgd-t": T([False])}})
    out = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=0.5,
                        seed=0, subset="s")
    assert out["components"] == {"aa": {"apgd-ce": 0.0, "apgd-t": 0.0}}
    res.components["aa"] = {"apgd-ce": T([True]), "apgd-t": T([True])}
    res.correct["aa"] = T([True])
    out = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=0.5,
                        seed=0, subset="s")
    assert out["components"] == {"aa": {"apgd-ce": 1.0, "apgd-t": 1.0}}


def test_accuracy_meaning_in_full():
    res = _result()
    res.correct["aa"] = res.correct["cw20"].clone()
    res.components = {"aa": {"apgd-ce": res.correct["cw20"], "square": res.correct["cw20"]}}
    clean = {"cumulative_after": [], "description": "accuracy without attack"}
    robust = {"cumulative_after": ["pgd20", "cw20", "aa"],
              "description": "per-example worst case: correct under every attack"}
    assert accuracy_meaning(res) == {
        "clean": clean,
        "pgd20": {"cumulative_after": ["pgd20"], "description":
                  "accuracy under pgd20 alone (run on every clean-correct point)"},
        "cw20": {"cumulative_after": ["cw20"], "description":
                 "accuracy under cw20 alone (run on every clean-correct point)"},
        "aa": {"cumulative_after": ["aa"], "description":
               "accuracy under aa alone (run on every clean-correct point); aa's sub-attacks "
               "ran in cascade: apgd-ce, square"},
        "robust": robust}
    res.protocol = "cascade"
    assert accuracy_meaning(res) == {
        "clean": clean,
        "pgd20": {"cumulative_after": ["pgd20"], "description":
                  "accuracy under pgd20 alone (run on every clean-correct point)"},
        "cw20": {"cumulative_after": ["pgd20", "cw20"], "description":
                 "robust accuracy after pgd20 and then cw20 (cascade: cw20 ran only on the "
                 "points still robust after pgd20)"},
        "aa": {"cumulative_after": ["pgd20", "cw20", "aa"], "description":
               "robust accuracy after pgd20, cw20 and then aa (cascade: aa ran only on the "
               "points still robust after pgd20, cw20); aa's sub-attacks ran in cascade: "
               "apgd-ce, square"},
        "robust": robust}


def test_write_results_flags(tmp_path):
    res = _result()
    res.components = {"pgd20": {"a": res.correct["pgd20"]}}
    write_results(tmp_path, {"x": 1}, res)
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 1}
    assert json.loads((tmp_path / "flags.json").read_text()) == {
        "labels": list(range(8)), "clean": [1, 1, 1, 1, 1, 1, 0, 0],
        "pgd20": [1, 1, 1, 1, 0, 0, 0, 0], "cw20": [1, 1, 0, 0, 1, 0, 0, 0],
        "robust": [1, 1, 0, 0, 0, 0, 0, 0],
        "components": {"pgd20": {"a": [1, 1, 1, 1, 0, 0, 0, 0]}}}


# ---- model_info ------------------------------------------------------------------------------


def _results(**kw) -> dict:
    """A results.json dictionary: full CIFAR-10 test set, Linf 8/255, AA-standard alone."""
    out = {"model": "m.py:net", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255,
           "eps_text": "8/255", "n_examples": 10_000, "subset": "full test set",
           "protocol": {"name": "standalone"},
           "accuracy": {"clean": 0.9, "autoattack": 0.5, "robust": 0.5},
           "attacks": {"autoattack": {"family": "autoattack", "version": "standard"}},
           "checks": []}
    out.update(kw)
    return out


BASE_INFO = {"link": "", "name": "m.py:net", "authors": "", "additional_data": False,
             "number_forward_passes": 1, "dataset": "cifar10", "venue": "N/A",
             "architecture": "", "eps": "8/255", "clean_acc": "90.00", "reported": None,
             "autoattack_acc": "50.00"}


def test_model_info_of_a_leaderboard_run_has_every_field_and_no_footnote():
    assert model_info(_results()) == BASE_INFO
    # settings without a version are AA-standard; the architecture when known
    info = model_info(_results(attacks={"autoattack": {"family": "autoattack"}},
                               architecture="ResNet18"), name="entry")
    assert info == {**BASE_INFO, "architecture": "ResNet18", "name": "entry"}


def test_model_info_without_autoattack():
    acc = {"clean": 0.9, "pgd20": 0.6, "cw20": 0.55, "robust": 0.5}
    info = model_info(_results(accuracy=acc, attacks={"pgd20": {"family": "pgd"},
                                                      "cw20": {"family": "cw"}}))
    assert info["autoattack_acc"] is None
    assert info["footnote"] == ("AutoAttack not run; worst case over pgd20, cw20: 50.00% on "
                                "the full test set; not a leaderboard number")
    info = model_info(_results(accuracy={"clean": 0.9, "robust": 0.9}, attacks={}))
    assert info["footnote"] == ("AutoAttack not run; worst case over none: 90.00% on the full "
                                "test set; not a leaderboard number")


def test_model_info_footnotes_in_full():
    """Another ε, a subset, a cascade and a worse worst case: every note, in order."""
    results = _results(eps=4 / 255, eps_text="4/255", n_examples=1000,
                       subset="first 1000 test images", protocol={"name": "cascade"},
                       accuracy={"clean": 0.9, "pgd20": 0.6, "cw20": 0.58, "autoattack": 0.5,
                                 "robust": 0.45},
                       attacks={"pgd20": {"family": "pgd"}, "cw20": {"family": "cw"},
                                "autoattack": {"family": "autoattack", "version": "plus"}})
    assert model_info(results)["footnote"] == (
        "AA-plus on the first 1000 test images, eps = 4/255 instead of 8/255 (not a "
        "leaderboard number); cascade: AutoAttack ran only on the points still robust after "
        "pgd20, cw20, so autoattack_acc is the robust accuracy after pgd20, cw20 and "
        "AutoAttack together, not AutoAttack alone; worst case over all attacks run: 45.00%")
    # ε within 1e-9 of the leaderboard's is the leaderboard's
    assert "footnote" not in model_info(_results(eps=8 / 255 + 5e-10))
    assert model_info(_results(eps=0.5, eps_text="0.5"))["footnote"] == (
        "AA-standard, eps = 0.5 instead of 8/255 (not a leaderboard number)")


def test_model_info_cascade_order_comes_from_accuracy_meaning():
    """accuracy_meaning (written by build_results) says what ran before AutoAttack; without it
    (an older results.json) the order of the accuracy columns does."""
    acc = {"clean": 0.9, "autoattack": 0.5, "pgd20": 0.6, "robust": 0.5}
    meaning = {"autoattack": {"cumulative_after": ["pgd20", "autoattack"]}}
    info = model_info(_results(protocol={"name": "cascade"}, accuracy=acc,
                               accuracy_meaning=meaning))
    assert "robust accuracy after pgd20 and AutoAttack together" in info["footnote"]
    info = model_info(_results(protocol={"name": "cascade"}, accuracy=acc))
    assert "footnote" not in info  # AutoAttack's column comes first: nothing ran before it
    acc = {"clean": 0.9, "pgd20": 0.6, "cw20": 0.6, "autoattack": 0.5, "robust": 0.5}
    info = model_info(_results(protocol={"name": "cascade"}, accuracy=acc))
    assert info["footnote"] == (
        "AA-standard (not a leaderboard number); cascade: AutoAttack ran only on the points "
        "still robust after pgd20, cw20, so autoattack_acc is the robust accuracy after pgd20, "
        "cw20 and AutoAttack together, not AutoAttack alone")


@pytest.mark.parametrize("check, failed", [
    ({"severity": "fail"}, True),
    ({"severity": "warning", "passed": True}, False),
    ({"severity": "ok", "passed": False}, False),  # severity decides when present
    ({"passed": False}, True),  # older results.json: only "passed"
    ({"passed": True}, False),
    ({}, False),
])
def test_model_info_failed_checks(check, failed):
    checks = [{"name": "finite_logits", "message": "m1", **check},
              {"name": "black_box:aa/square", "message": "m2", **check}]
    info = model_info(_results(checks=checks))
    if failed:
        assert info["footnote"] == ("check finite_logits failed: m1; gradient-masking check "
                                    "failed: m2")
    else:
        assert "footnote" not in info


def test_write_model_info_path_meta_and_parts_named(tmp_path):
    path = write_model_info(tmp_path, _results(), name="entry", meta={"venue": "ICML 2019"})
    assert path == tmp_path / "model_info" / "cifar10" / "Linf" / "entry.json"
    assert json.loads(path.read_text()) == {**BASE_INFO, "name": "entry", "venue": "ICML 2019"}
    with pytest.raises(ValueError, match="^dataset must be a non-empty string"):
        write_model_info(tmp_path, _results(dataset=""), name="entry")
    with pytest.raises(ValueError, match="^threat_model must be a non-empty string"):
        write_model_info(tmp_path, _results(threat_model=""), name="entry")


def test_n_correct_is_the_count_despite_float_rounding():
    """29 of 100 correct: 0.29 * 100 = 28.999999999999996, still 29 points (rounded, not cut)."""
    n = 100
    clean = torch.arange(n) < 29
    res = EvalResult(labels=torch.zeros(n, dtype=torch.long), clean=clean,
                     correct={"pgd": clean.clone()})
    out = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=0.5, seed=0,
                        subset="s")
    assert out["n_correct"] == {"clean": 29, "pgd": 29, "robust": 29}

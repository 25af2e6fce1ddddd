"""``--attacks`` parsing at its edges and on every error path (robustkit.attacks.specs; issue 18
§2, §5): an empty list is refused, counts are held to documented maxima, and each malformed
entry is a ``ValueError`` naming it (one line, exit 2, from the CLI)."""

from __future__ import annotations

import sys

import pytest
import torch

from robustkit.attacks.specs import (
    AA_TARGETS,
    MAX_QUERIES,
    MAX_RESTARTS,
    MAX_STEPS,
    AttackSpec,
    check_aa_attacks,
    parse_attacks,
    split_list,
    strength,
    targets_needed,
)
from robustkit.cli import main


def names(text):
    return [s.name for s in parse_attacks(text)]


@pytest.mark.parametrize("text", ["", " ", ",", " , ,", [], [""], [" , "]])
def test_an_empty_list_is_refused(text):
    with pytest.raises(ValueError, match="list of attacks is empty"):
        parse_attacks(text)


def test_clean_alone_is_a_clean_only_evaluation():
    assert parse_attacks("clean") == [] and parse_attacks(["Clean", " clean "]) == []


def test_documented_maxima():
    assert (MAX_STEPS, MAX_RESTARTS, MAX_QUERIES) == (10_000, 1_000, 100_000)


@pytest.mark.parametrize("text, expected", [
    ("pgd1", ("pgd1", 1, 1)), (f"pgd{MAX_STEPS}", (f"pgd{MAX_STEPS}", MAX_STEPS, 1)),
    (f"cw20x{MAX_RESTARTS}", (f"cw20x{MAX_RESTARTS}", 20, MAX_RESTARTS)),
    ("pgd20x1", ("pgd20", 20, 1)), ("PGD020X05", ("pgd20x5", 20, 5)),
    (" pgd20 ", ("pgd20", 20, 1)), ("pgd0000000000000000000020", ("pgd20", 20, 1)),
])
def test_counts_at_the_edges_are_accepted(text, expected):
    (spec,) = parse_attacks(text)
    assert (spec.name, spec.steps, spec.restarts) == expected
    assert spec.kind == text.strip().lower()[:3].rstrip("0123456789")


@pytest.mark.parametrize("text, what", [
    ("pgd0", "steps"), (f"pgd{MAX_STEPS + 1}", "steps"), ("cw0x5", "steps"),
    ("pgd99999999999999999999999", "steps"), ("cw" + "9" * 5000, "steps"),
    ("pgd20x0", "restarts"), (f"pgd20x{MAX_RESTARTS + 1}", "restarts"),
    ("pgd20x99999999999999999999", "restarts"),
])
def test_counts_past_the_edges_are_refused(text, what):
    with pytest.raises(ValueError, match=rf"{what} must be an integer in \[1, ") as err:
        parse_attacks(text)
    assert text[:20] in str(err.value) and len(str(err.value)) < 200  # names it, one short line


def test_a_spec_built_directly_is_held_to_the_maxima_too():
    assert AttackSpec("pgd20", "pgd", steps=MAX_STEPS, restarts=MAX_RESTARTS).steps == MAX_STEPS
    for kw in ({"steps": MAX_STEPS + 1}, {"steps": 0}, {"restarts": MAX_RESTARTS + 1},
               {"restarts": 0}, {"steps": 2.0}, {"steps": True}):
        with pytest.raises(ValueError, match="must be an integer in"):
            AttackSpec("x", "pgd", **{"steps": 20, **kw})
    AttackSpec("fgsm", "fgsm")  # steps=0 is not a count for a single-step attack


@pytest.mark.parametrize("kwargs, ok", [
    (f"steps={MAX_STEPS}", True), (f"steps={MAX_STEPS + 1}", False), ("steps=0", False),
    (f"n_restarts={MAX_RESTARTS}", True), (f"n_restarts={MAX_RESTARTS + 1}", False),
    (f"n_queries={MAX_QUERIES}", True), (f"n_queries={MAX_QUERIES + 1}", False),
    ("steps=100000000000000000000", False), ("steps=1.5", False), ("steps=True", False),
])
def test_torchattacks_counts(kwargs, ok):
    pytest.importorskip("torchattacks")
    text = f"torchattacks:APGD({kwargs})"
    if ok:
        (spec,) = parse_attacks(text)
        assert spec.name == text and spec.kind == "torchattacks" and spec.cls == "APGD"
    else:
        with pytest.raises(ValueError, match="must be an integer in"):
            parse_attacks(text)


def test_accepted_forms_and_canonical_names():
    pytest.importorskip("torchattacks")
    assert names("clean,FGSM, AutoAttack ,square,cw30,torchattacks:Square,"
                 "torchattacks:Square(n_queries=10, p_init=0.8)") == [
        "fgsm", "autoattack", "square", "cw30", "torchattacks:Square",
        "torchattacks:Square(n_queries=10, p_init=0.8)"]
    assert names(["pgd20,pgd40", "cw10x2"]) == ["pgd20", "pgd40", "cw10x2"]
    (spec,) = parse_attacks("torchattacks:Square(n_queries=10, p_init=0.8, loss='ce')")
    assert spec.kwargs == {"n_queries": 10, "p_init": 0.8, "loss": "ce"}
    assert parse_attacks("torchattacks:Square()")[0].name == "torchattacks:Square"


@pytest.mark.parametrize("text, message", [
    ("pgd20,pgd20", "listed twice"), ("pgd20,PGD20", "listed twice"),
    ("pgd20x1,pgd20", "listed twice"), ("fgsm,fgsm", "listed twice"),
    ("aa", "unknown attack"), ("pgd", "unknown attack"), ("pgd-1", "unknown attack"),
    ("pgd20x", "unknown attack"), ("pgdx5", "unknown attack"), ("pgd 20", "unknown attack"),
    ("pgd20y5", "unknown attack"), ("pgd1.5", "unknown attack"), ("torchattacks:", "unknown"),
    ("torchattacks:1abc", "unknown attack"), ("torchattacks:PGD(steps=", "unknown attack"),
    ("torchattacks:Square(10)", "cannot read the arguments"),
    ("torchattacks:PGD(steps=10**20)", "cannot read the arguments"),
    ("torchattacks:PGD(steps=)", "cannot read the arguments"),
    ("torchattacks:PGD(**{'steps': 1})", "cannot read the arguments"),
    ("torchattacks:PGD(steps=int('5'))", "cannot read the arguments"),
    ("torchattacks:Nope", "no attack class 'Nope'"),
    ("torchattacks:square", "no attack class 'square'"),
    ("torchattacks:VERSION", "no attack class"),
])
def test_every_parse_error(text, message):
    if text.startswith("torchattacks:") and "class" in message:
        pytest.importorskip("torchattacks")
    with pytest.raises(ValueError, match=message) as err:
        parse_attacks(text)
    if message == "unknown attack":
        assert "valid forms" in str(err.value)


def test_torchattacks_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    with pytest.raises(ValueError, match=r"needs torchattacks \(pip install"):
        parse_attacks("torchattacks:Square")


def test_split_list_keeps_parentheses_whole():
    assert split_list("a, b,,c ,") == ["a", "b", "c"]
    assert split_list("x(a=1,b=(2,3)),y") == ["x(a=1,b=(2,3))", "y"]
    assert split_list("x(a=1,y") == ["x(a=1,y"]  # unbalanced: one entry, refused by the parser


def test_check_aa_attacks_paths():
    check_aa_attacks("standard", None)
    check_aa_attacks("custom", ["apgd-ce", "square"])
    with pytest.raises(ValueError, match="custom version needs a list"):
        check_aa_attacks("custom", [])
    with pytest.raises(ValueError, match="needs the custom version"):
        check_aa_attacks("plus", ["apgd-ce"])
    with pytest.raises(ValueError, match="unknown AutoAttack attack 'apgd'"):
        check_aa_attacks("custom", ["apgd"])


def test_targets_needed_paths():
    specs = parse_attacks("pgd20,autoattack")
    assert targets_needed(parse_attacks("pgd20,square")) == 0
    assert targets_needed(specs) == AA_TARGETS == targets_needed(specs, "plus")
    assert targets_needed(specs, "custom", ["apgd-ce"]) == 0
    assert targets_needed(specs, "custom", ["apgd-ce", "fab-t"]) == AA_TARGETS


def test_strength_keeps_steps_and_restarts():
    """Effort is (steps, restarts) per family (tests/test_masking_effort.py ranks by it);
    single-step and black-box attacks and AutoAttack are not ranked."""
    assert strength(parse_attacks("pgd20x5,pgd50,cw30x2,fgsm,autoattack,square")) == {
        "pgd20x5": ("pgd-ce", 20, 5), "pgd50": ("pgd-ce", 50, 1), "cw30x2": ("pgd-cw", 30, 2)}


def _evaluate(tmp_path, *argv):
    return main(["evaluate", "--model", "small_cnn", "--dataset", "sample-mnist",
                 "--n-examples", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "out"), *argv])


@pytest.mark.parametrize("attacks, words", [
    ("", "list of attacks is empty"), (" , ", "list of attacks is empty"),
    ("pgd99999999999999999999999", "steps must be an integer in [1, 10,000]"),
    ("clean,pgd20x1001", "restarts must be an integer in [1, 1,000]"),
])
def test_cli_refuses_in_one_line_before_writing(tmp_path, capsys, attacks, words):
    assert _evaluate(tmp_path, "--attacks", attacks) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustkit evaluate: error: --attacks")
    assert words in err[0]
    assert not (tmp_path / "out").exists()  # no results.json, no RobustBench JSON


def test_cli_refuses_an_empty_list_from_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("attacks: []\n")
    assert _evaluate(tmp_path, "-c", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "attacks" in err and "list of attacks is empty" in err
    assert not (tmp_path / "out").exists()


def test_sensitivity_attack_flag_refuses_absurd_steps(tmp_path, capsys):
    code = main(["sensitivity", "--dataset", "sample-mnist", "--model", "small_cnn",
                 "--attack", f"pgd{MAX_STEPS + 1}", "--n-examples", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "steps must be an integer" in capsys.readouterr().err


# ---- build_attacks: the attacks as built and the settings results.json records ---------------


def _pgd(family, steps, restarts, eps=0.03, norm="Linf"):
    return {"class": "PGD", "family": family, "eps": eps, "alpha": eps / 4, "steps": steps,
            "random_start": True, "norm": norm, "loss": "ce" if family == "pgd" else "cw",
            "restarts": restarts, "stop_on_success": True, "select": "best"}


def _aa(family, version, attacks, eps=0.03, norm="Linf", seed=3):
    from robustkit.attacks.specs import _version

    return {"class": "AutoAttack", "family": family, "version": version, "attacks": attacks,
            "eps": eps, "norm": norm, "seed": seed, "backend": "pyautoattack",
            "backend_version": _version("pyautoattack")}


def _built_as_recorded(attacks, settings, model, types):
    """Each attack is of its type, attacks ``model`` and has the settings results.json says."""
    for name, attack in attacks.items():
        assert type(attack) is types[name] and attack.model is model, name
        built = attack.settings()
        recorded = {k: v for k, v in settings[name].items()
                    if k not in ("class", "family", "backend", "backend_version")}
        assert {k: built[k] for k in recorded} == recorded, name


def test_build_attacks_builds_what_results_json_says():
    """Evaluation settings per form (α = ε/4, random start, early stop, best iterate), the
    norm and seed passed on, and each attack built with exactly the recorded settings."""
    from robustkit.attacks import FGSM, PGD, AutoAttack
    from robustkit.attacks.specs import build_attacks
    from robustkit.testing import LinearModel

    model = LinearModel((3, 8, 8), 10).eval()
    specs = parse_attacks("pgd20x2,cw30,fgsm,autoattack,square")
    attacks, settings = build_attacks(specs, model, eps=0.03, norm="Linf", seed=3)
    assert list(attacks) == list(settings) == ["pgd20x2", "cw30", "fgsm", "autoattack",
                                               "square"]
    assert settings == {
        "pgd20x2": _pgd("pgd", 20, 2), "cw30": _pgd("cw", 30, 1),
        "fgsm": {"class": "FGSM", "family": "fgsm", "eps": 0.03, "norm": "Linf"},
        "autoattack": _aa("autoattack", "standard", None),
        "square": _aa("square", "custom", ["square"]),
    }
    types = {"pgd20x2": PGD, "cw30": PGD, "fgsm": FGSM, "autoattack": AutoAttack,
             "square": AutoAttack}
    _built_as_recorded(attacks, settings, model, types)
    # PGD draws its random starts from its own CPU generator (reseeded per batch)
    assert isinstance(attacks["pgd20x2"].generator, torch.Generator)
    assert attacks["pgd20x2"].generator is not attacks["cw30"].generator
    # the default norm is Linf, the default seed 0; L2 and a custom AutoAttack
    attacks, settings = build_attacks(parse_attacks("autoattack,pgd5,fgsm"), model, eps=0.5,
                                      norm="L2", aa_version="custom", aa_attacks=["apgd-ce"])
    assert settings == {"autoattack": _aa("autoattack", "custom", ["apgd-ce"], 0.5, "L2", 0),
                        "pgd5": _pgd("pgd", 5, 1, 0.5, "L2"),
                        "fgsm": {"class": "FGSM", "family": "fgsm", "eps": 0.5, "norm": "L2"}}
    _built_as_recorded(attacks, settings, model, {**types, "pgd5": PGD})
    _, settings = build_attacks(parse_attacks("fgsm,square"), model, eps=0.03)
    assert settings["fgsm"]["norm"] == "Linf" and settings["square"]["seed"] == 0
    # square is AutoAttack's Square alone, whatever --aa-version says
    _, settings = build_attacks(parse_attacks("square"), model, eps=0.03, aa_version="plus")
    assert (settings["square"]["version"], settings["square"]["attacks"]) == ("custom",
                                                                             ["square"])
    with pytest.raises(ValueError, match="needs the custom version"):
        build_attacks(specs, model, eps=0.03, aa_attacks=["apgd-ce"])


def test_build_attacks_torchattacks_takes_eps_only_where_it_has_one():
    pytest.importorskip("torchattacks")
    from robustkit.attacks import TorchAttack
    from robustkit.attacks.specs import _version, build_attacks
    from robustkit.testing import LinearModel

    model = LinearModel((3, 8, 8), 10).eval()
    specs = parse_attacks("torchattacks:FGSM,torchattacks:CW(steps=5)")
    attacks, settings = build_attacks(specs, model, eps=0.03, norm="Linf")
    version = _version("torchattacks")
    assert version is not None
    assert settings == {
        "torchattacks:FGSM": {"class": "torchattacks.FGSM", "family": "torchattacks",
                              "norm": "Linf", "backend_version": version, "eps": 0.03},
        # CW is unbounded: it takes no eps (post_checks flags its perturbation instead)
        "torchattacks:CW(steps=5)": {"class": "torchattacks.CW", "family": "torchattacks",
                                     "norm": "Linf", "backend_version": version, "steps": 5},
    }
    assert all(type(a) is TorchAttack and a.model is model for a in attacks.values())
    assert attacks["torchattacks:FGSM"].settings() == {"name": "FGSM",
                                                        "kwargs": {"eps": 0.03}}
    assert attacks["torchattacks:CW(steps=5)"].settings() == {"name": "CW",
                                                               "kwargs": {"steps": 5}}
    # a keyword given in the entry wins over the evaluation's eps
    _, settings = build_attacks(parse_attacks("torchattacks:FGSM(eps=0.01)"), model, eps=0.03)
    assert settings["torchattacks:FGSM(eps=0.01)"]["eps"] == 0.01


def test_backend_version_of_a_missing_package_is_none():
    from robustkit.attacks.specs import _version

    assert _version("robustkit-no-such-package") is None
    assert _version("torch") == torch.__version__.split("+")[0]


# ---- the exact one-line messages (the CLI prints them as they are) ----------------------------


def _message(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kw)
    return str(err.value)


@pytest.mark.parametrize("kind, kw, message", [
    ("cw", {"steps": MAX_STEPS + 1}, "'x': steps must be an integer in [1, 10,000], got 10001"),
    ("pgd", {"restarts": 0}, "'x': restarts must be an integer in [1, 1,000], got 0"),
    ("pgd", {"steps": 2.0}, "'x': steps must be an integer in [1, 10,000], got 2.0"),
    ("torchattacks", {"kwargs": {"n_queries": 0}},
     "'x': n_queries must be an integer in [1, 100,000], got 0"),
    ("torchattacks", {"kwargs": {"restarts": MAX_RESTARTS + 1}},
     "'x': restarts must be an integer in [1, 1,000], got 1001"),
])
def test_a_spec_built_directly_names_the_count(kind, kw, message):
    assert _message(AttackSpec, "x", kind, **{"steps": 20, **kw}) == message


@pytest.mark.parametrize("text, message", [
    # the count as written (leading zeros kept), not as read
    ("pgd000", "'pgd000': steps must be an integer in [1, 10,000], got 000"),
    ("cw20x000", "'cw20x000': restarts must be an integer in [1, 1,000], got 000"),
    ("pgd00020000x2", "'pgd00020000x2': steps must be an integer in [1, 10,000], got 00020000"),
    # up to 40 characters shown whole, longer ones cut to 20 and counted
    ("pgd" + "1" * 40, f"'pgd{'1' * 40}': steps must be an integer in [1, 10,000], got {'1' * 40}"),
    ("pgd" + "1" * 41, f"'pgd{'1' * 41}': steps must be an integer in [1, 10,000], got "
                       f"{'1' * 20}... (41 characters)"),
    ("pgd20x" + "9" * 50, f"'pgd20x{'9' * 50}': restarts must be an integer in [1, 1,000], got "
                          f"{'9' * 20}... (50 characters)"),
    # the entry itself cut to 60 characters
    ("pgd" + "9" * 67, f"'pgd{'9' * 57}': steps must be an integer in [1, 10,000], got "
                       f"{'9' * 20}... (67 characters)"),
])
def test_count_messages_show_what_was_written(text, message):
    assert _message(parse_attacks, text) == message


def test_the_empty_list_message():
    assert _message(parse_attacks, " , ") == (
        "the list of attacks is empty; give at least one, e.g. clean,pgd20,autoattack (clean "
        "alone: clean accuracy only)")


def test_torchattacks_messages_name_the_entry(monkeypatch):
    pytest.importorskip("torchattacks")
    assert _message(parse_attacks, "pgd20, torchattacks:Square(10)") == (
        "cannot read the arguments of 'torchattacks:Square(10)'; write "
        "torchattacks:NAME(key=value, ...) with literal values")
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    assert _message(parse_attacks, "torchattacks:Square") == (
        "'torchattacks:Square' needs torchattacks (pip install 'robustkit[torchattacks]')")


def test_a_torchattacks_entry_may_span_lines():
    """A config file may fold a long entry: the arguments then hold a newline."""
    pytest.importorskip("torchattacks")
    (spec,) = parse_attacks(["torchattacks:Square(n_queries=10,\n  p_init=0.8)"])
    assert spec.kwargs == {"n_queries": 10, "p_init": 0.8}


def test_aa_attack_messages_list_the_valid_ones():
    valid = "apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t"
    assert _message(check_aa_attacks, "custom", None) == (
        f"the custom version needs a list of attacks: some of {valid}")
    assert _message(check_aa_attacks, "custom", ["apgd-ce", "apgd"]) == (
        f"unknown AutoAttack attack 'apgd'; valid: {valid}")


def test_targets_needed_for_each_targeted_sub_attack():
    specs = parse_attacks("autoattack")
    assert targets_needed(specs, "custom", ["apgd-t"]) == AA_TARGETS
    assert targets_needed(specs, "custom", ["fab-t"]) == AA_TARGETS
    assert targets_needed(specs, "custom", ["apgd-ce", "apgd-dlr", "fab", "square"]) == 0

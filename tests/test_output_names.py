"""Names and labels never write outside the output folder (issue 18 §1): ``utils.safe_name`` makes
every name one file-name component, and the CLI refuses a name that is a path.

Each test writes with malicious names into ``tmp_path/out`` and walks ``tmp_path``: every file
and folder must lie inside ``out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustkit.attacks.pgd import PGD
from robustkit.cli import main
from robustkit.evaluation import evaluate_attacks
from robustkit.testing import LinearModel, random_batch
from robustkit.utils import SAFE_NAME_MAX, safe_name

EVIL = ["../../../../X", "..", ".", "../x/../../y", "a/../../b", "/abs/path", "a\\..\\..\\b",
        ".hidden", "a\x00b", "x" * 300, "..\n..", "~/x"]


def outside(root: Path, out: Path) -> list[Path]:
    """Every path below ``root`` that is not ``out``, inside it or one of its parents."""
    out = out.resolve()
    return [p for p in root.resolve().rglob("*")
            if p != out and out not in p.parents and p not in out.parents]


@pytest.mark.parametrize("name", EVIL, ids=range(len(EVIL)))
def test_safe_name_is_one_component_inside_its_folder(tmp_path, name):
    safe = safe_name(name)
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert not safe.startswith(".") and len(safe) <= SAFE_NAME_MAX + 9
    target = (tmp_path / safe).resolve()
    assert target.parent == tmp_path.resolve()
    target.write_text("x")  # a valid file name on this file system (no ENAMETOOLONG)


def test_safe_name_keeps_safe_names_and_never_merges_two():
    for name in ("resnet18", "Carmon2019Unlabeled", "small_cnn@run1", "a-b.c+d", "x" * 100):
        assert safe_name(name) == name
    names = ["a/b", "a:b", "a b", "a_b", "a\\b", "..", ".", "_", "x" * 101, "x" * 102]
    assert len({safe_name(n) for n in names}) == len(names)
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="label must be a non-empty string"):
            safe_name(bad, "label")


def test_write_model_info_stays_inside_out(tmp_path):
    """The library writer itself, with the entry name, dataset and threat model all hostile."""
    from robustkit.evaluation.results import write_model_info

    out = tmp_path / "out"
    results = {"accuracy": {"clean": 1.0, "robust": 1.0}, "n_examples": 1, "dataset": "../..",
               "threat_model": "/etc", "attacks": {}, "subset": "first 1 test images",
               "eps": 0.1, "eps_text": "0.1"}
    paths = [write_model_info(out, results, name=n) for n in EVIL]
    assert outside(tmp_path, out) == []
    assert len(set(paths)) == len(EVIL)
    for p, n in zip(paths, EVIL, strict=True):
        assert json.loads(p.read_text())["name"] == n  # the entry keeps the name as given


def _evaluate(out, *argv):
    return main(["evaluate", "--model", "small_cnn", "--dataset", "sample-mnist",
                 "--n-examples", "2", "--batch-size", "2", "--attacks", "clean,pgd1",
                 "--device", "cpu", "--no-progress", "--out", str(out), *argv])


@pytest.mark.parametrize("name", ["../../../../X", "..", ".", "a/b", "a\\b", "abs", "a\x01b",
                                  ""])
def test_evaluate_refuses_a_path_as_name(tmp_path, capsys, name):
    name = str(tmp_path / "abs" / "X") if name == "abs" else name
    out = tmp_path / "out"
    assert _evaluate(out, "--name", name) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustkit evaluate: error: --name")
    assert outside(tmp_path, out) == [] and not out.exists()  # refused before anything


def test_evaluate_refuses_a_path_as_name_from_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "out" / "eval.yaml"
    cfg.parent.mkdir()
    cfg.write_text("name: ../../../../X\n")
    assert _evaluate(tmp_path / "out", "-c", str(cfg)) == 2
    assert "--name" in capsys.readouterr().err
    assert outside(tmp_path, tmp_path / "out") == []


def test_evaluate_makes_an_odd_name_safe(tmp_path, capsys):
    out = tmp_path / "out"
    assert _evaluate(out, "--name", "my model: v2 <b>") == 0
    assert outside(tmp_path, out) == []
    (path,) = (out / "model_info" / "sample-mnist" / "Linf").iterdir()
    assert path.name == f"{safe_name('my model: v2 <b>')}.json"
    assert json.loads(path.read_text())["name"] == "my model: v2 <b>"
    assert str(path) in capsys.readouterr().out  # the path printed is the path written


def test_attack_names_are_safe_and_distinct_state_files(tmp_path):
    """Attack names become ``state/flags_<name>.json``: hostile names stay inside the state
    folder, and two names that the old sanitiser merged (``a/b``, ``a:b``) keep their own
    files instead of the second restoring the first's flags."""
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).eval()
    x, _ = random_batch(16, (3, 8, 8), 10, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    attacks = {"a/b": PGD(model, eps=1e-4, alpha=1e-4, steps=1),  # breaks nothing
               "a:b": PGD(model, eps=0.5, alpha=0.2, steps=5),  # breaks most points
               "../../../../X": PGD(model, eps=1e-4, alpha=1e-4, steps=1),
               str(tmp_path / "abs"): PGD(model, eps=1e-4, alpha=1e-4, steps=1)}
    out = tmp_path / "out"
    res = evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=out / "state")
    assert outside(tmp_path, out) == []
    assert len(list((out / "state").glob("flags_*.json"))) == len(attacks) + 1  # + clean
    fresh = evaluate_attacks(model, (x, y), {"a:b": attacks["a:b"]}, batch_size=8)
    assert torch.equal(res.correct["a:b"], fresh.correct["a:b"])
    assert res.accuracy()["a/b"] == 1.0 and res.accuracy()["a:b"] < 0.5
    again = evaluate_attacks(model, (x, y), attacks, batch_size=8, state_dir=out / "state")
    assert all(torch.equal(again.correct[k], res.correct[k]) for k in attacks)  # resumed


def test_sensitivity_tensorboard_folders_stay_inside(tmp_path):
    """``reports.sensitivity.write_tensorboard``: one folder per label directly below
    ``log_dir``; ``..`` used to put a model's events into ``log_dir``'s parent (``--out``)."""
    from robustkit.reports.sensitivity import write_tensorboard

    labels = ["..", ".", "../../../../X", str(tmp_path / "abs"), "a b", "a_b", "ok"]
    sigmas = {lb: {"fc": [0.1 * i, 0.2]} for i, lb in enumerate(labels)}
    log_dir = tmp_path / "out" / "tb"
    folders = write_tensorboard(sigmas, sigmas, log_dir)
    assert outside(tmp_path, log_dir) == []
    assert len(set(folders)) == len(labels)
    assert all(f.parent == log_dir and list(f.glob("events.out.tfevents.*")) for f in folders)
    assert folders[-1].name == "ok"


def test_inspect_grid_file_names_are_one_component():
    from robustkit.reports.inspect import grid_filename

    assert grid_filename("gradient") == "grid_gradient.png"
    assert grid_filename("ig-adaptgrad") == "grid_ig-adaptgrad.png"
    for bad in ("../../x", "/abs", ".."):
        name = grid_filename(bad)
        assert "/" not in name and name.startswith("grid_") and name.endswith(".png")


@pytest.mark.parametrize("command", ["sensitivity", "inspect"])
@pytest.mark.parametrize("name", ["../../../../X", "..", "abs"])
def test_model_labels_refuse_a_path(tmp_path, capsys, command, name):
    name = str(tmp_path / "abs") if name == "abs" else name
    out = tmp_path / "out"
    code = main([command, "--dataset", "sample-mnist", "--model", "small_cnn", "--name", name,
                 "--n-examples", "2", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--name {name!r}" in err[0]
    assert outside(tmp_path, out) == [] and not out.exists()


def test_sensitivity_with_odd_labels_writes_only_inside_out(tmp_path):
    """End to end: two models labelled ``a b`` and ``a_b`` (the old sanitiser merged their
    TensorBoard folders) on two images; nothing lands outside ``--out``."""
    out = tmp_path / "out"
    code = main(["sensitivity", "--dataset", "sample-mnist", "--model", "small_cnn",
                 "--name", "a b", "--model", "small_cnn", "--name", "a_b", "--n-examples", "2",
                 "--attack", "pgd1", "--layers", "model.classifier.fc3", "--draws", "1", "--device",
                 "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    assert outside(tmp_path, out) == []
    runs = sorted(p.name for p in (out / "tb").iterdir())
    assert runs == sorted([safe_name("a b"), "a_b"])


@pytest.mark.parametrize("name", ["../../../../X", "..", ".", "a/b", "abs", "a\x01b", " "])
def test_train_refuses_a_path_as_run_name(tmp_path, capsys, monkeypatch, name):
    """``name`` becomes ``runs/<name>``: ``name=..`` was the current folder, ``name=/abs`` an
    absolute one. Refused at load (config and override alike), nothing written."""
    from robustkit.config import build_config
    from robustkit.errors import ConfigError

    name = str(tmp_path / "abs") if name == "abs" else name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="name"):
        build_config({"name": name})
    smoke = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
    if name.strip():  # an empty override means "not given" (the file's stem)
        code = main(["train", "-c", smoke, f"name={name}", "trainer.device=cpu", "--dry-run"])
        assert code == 2  # a control character in an override was a yaml traceback
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "name" in err[0], err
    assert list(tmp_path.iterdir()) == []
    # an explicit trainer.out_dir is the way to choose the folder; the name stays a name
    cfg = build_config({"name": "ok"}, [f"trainer.out_dir={tmp_path / 'elsewhere'}"])
    assert cfg.trainer.out_dir == str(tmp_path / "elsewhere")

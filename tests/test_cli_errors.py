"""The CLI's error contract (robustkit.cli): a ``UserError`` is one line on stderr and exit code 2;
anything else is a bug that propagates out of ``main`` with its traceback (exit code 1 from a
shell). The library's ``ValueError`` becomes a user error only where user input enters it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustkit.cli import main, user_input
from robustkit.errors import ConfigError, ModelError, UserError
from robustkit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false", "trainer.device=cpu"]


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"robustkit {command}: error: ")
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("overrides, named", [
    (["trainer.epoch=2"], "'trainer.epochs'"),  # unknown key: the nearest one
    (["objective.params.k_max=0"], "k_max"),  # a bad hyper-parameter value (constructor)
    (["objective.params.bata=3"], "beta"),  # a misspelt hyper-parameter
    (["objective.name=tradez"], "trades"),
    (["attack.name=pgd", "attack.params.steps=-1"], "steps"),
    (["model.params.width=3"], "width"),
    (["data.name=mnistt"], "'mnist'"),
    (["data.holdout=100000"], "holdout"),
    (["trainer.eval_steps=5", "trainer.eval_alpha=0.01"], "eval_alpha"),  # cannot reach eps
    (["trainer.device=gpu7"], "trainer.device"),
    (["optim.lr=fast"], "optim.lr"),
    # refused when the config is loaded (#18): non-finite and out-of-range numbers, out_dir
    (["optim.lr=.inf"], "'optim.lr' must be a finite number > 0, got inf"),
    (["optim.lr=nan"], "'optim.lr' must be a finite number, got 'nan'"),
    (["optim.momentum=1.5"], "'optim.momentum' must be a finite number in [0, 1)"),
    (["trainer.eval_every=-1"], "'trainer.eval_every' must be >= 1"),
    (["trainer.eval_every=0"], "'trainer.eval_every' must be >= 1 (null switches the held-out "
                               "evaluation off), got 0"),
    (["trainer.epochs=-3"], "'trainer.epochs' must be >= 1"),
    (["data.batch_size=-64"], "'data.batch_size' must be >= 1"),
    (["trainer.out_dir=/proc/x"], "'trainer.out_dir': /proc/x is under /proc"),
    (["trainer.out_dir=/dev/null"], "'trainer.out_dir': /dev/null is under /dev"),
])
def test_train_user_mistakes_are_one_line(tmp_path, capsys, overrides, named):
    rc = main(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET, *overrides,
               "--dry-run"])
    assert rc == 2
    assert named in _one_line(capsys, "train")


def test_train_missing_files_are_named(tmp_path, capsys):
    assert main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_line(capsys, "train")
    resume = tmp_path / "gone.pt"
    assert main(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET,
                 f"trainer.resume={resume}", "--dry-run"]) == 2
    assert "gone.pt" in _one_line(capsys, "train")


def test_resume_from_another_model_is_a_user_error(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    # A plain-data checkpoint of another architecture: loadable, but not this run's.
    torch.save({"model": create_model("cifar_cnn", 10).state_dict(), "optimizer": {}},
               ckpt)
    assert main(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET,
                 f"trainer.resume={ckpt}", "--dry-run"]) == 2
    line = _one_line(capsys, "train")
    assert "trainer.resume" in line and "other.pt" in line and "does not match" in line


@pytest.mark.parametrize("argv, named", [
    (["--attacks", "clean,pgdx"], "unknown attack 'pgdx'"),
    (["--eps", "abc"], "--eps"),
    (["--eps", "2"], "--eps"),
    (["--batch-size", "1.5"], "--batch-size"),
    (["--dataset", "cifar11"], "'cifar10'"),
    (["--checkpoint", "missing.pt"], "missing.pt"),
    (["--device", "gpu7"], "--device"),
    (["-c", "missing.yaml"], "missing.yaml"),
    (["--model", "no_such_net"], "no_such_net"),
])
def test_evaluate_user_mistakes_are_one_line(tmp_path, capsys, argv, named):
    flags = {"--model": "small_cnn", "--dataset": "sample-mnist", "--n-examples": "4",
             "--attacks": "clean", "--out": str(tmp_path / "o")}
    flags.update(zip(argv[::2], argv[1::2], strict=True))
    assert main(["evaluate", "--no-progress", *(x for kv in flags.items() for x in kv)]) == 2
    assert named in _one_line(capsys, "evaluate")


def test_evaluate_unknown_config_key_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("dataset: sample-mnist\nepsilon: 0.1\n")
    assert main(["evaluate", "-c", str(cfg), "--model", "small_cnn"]) == 2
    line = _one_line(capsys, "evaluate")
    assert "'epsilon'" in line and "'eps'" in line and "e.yaml" in line


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("# café\ndata: {name: sample-mnist}\ndataset: sample-mnist\n".encode("latin-1"))
    assert main(["train", "-c", str(cfg), "--dry-run"]) == 2
    assert f"{cfg}: not UTF-8 text (byte 0xe9" in _one_line(capsys, "train")
    assert main(["evaluate", "-c", str(cfg), "--model", "small_cnn", "--dataset",
                 "sample-mnist"]) == 2
    assert f"{cfg}: not UTF-8 text (byte 0xe9" in _one_line(capsys, "evaluate")


def test_out_dir_inside_a_file_is_refused_by_the_dry_run_too(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert main(["train", "-c", SMOKE, f"trainer.out_dir={out}", *QUIET, "--dry-run"]) == 2
    assert "'trainer.out_dir'" in _one_line(capsys, "train")


def test_verbose_shows_the_user_error_itself(tmp_path):
    with pytest.raises(ConfigError, match="trainer.epochs"):
        main(["-v", "train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", "trainer.epoch=2"])


# ----------------------------------------------------------------------------- bugs


def _bug(exc: type[Exception]):
    def boom(*args, **kwargs):
        raise exc("an internal bug")

    return boom


@pytest.mark.parametrize("exc", [ValueError, KeyError, FileNotFoundError])
def test_train_bug_propagates_with_its_type(tmp_path, monkeypatch, exc):
    # Run.describe is reached only after every user value was accepted: not a boundary.
    monkeypatch.setattr("robustkit.cli.train.Run.describe", _bug(exc))
    with pytest.raises(exc, match="an internal bug"):
        main(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET, "--dry-run"])


def test_boundary_converts_only_value_error(tmp_path, monkeypatch):
    # create_objective receives user values: its ValueError is the user's; a KeyError is a bug.
    monkeypatch.setattr("robustkit.objectives.create_objective", _bug(KeyError))
    with pytest.raises(KeyError):
        main(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET, "--dry-run"])


@pytest.mark.parametrize("exc", [ValueError, KeyError])
def test_evaluate_bug_propagates(tmp_path, monkeypatch, exc):
    monkeypatch.setattr("robustkit.data.first_n", _bug(exc))  # after the inputs were accepted
    with pytest.raises(exc, match="an internal bug"):
        main(["evaluate", "--model", "small_cnn", "--dataset", "sample-mnist", "--n-examples",
              "4", "--attacks", "clean", "--no-progress", "--out", str(tmp_path / "o")])


def test_user_input_converts_value_errors_and_keeps_the_cause():
    with pytest.raises(ConfigError, match=r"^objective: bad beta$") as err:
        with user_input(ConfigError, "objective"):
            raise ValueError("bad\n   beta")
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(ModelError, match="^original$"):  # a UserError passes unchanged
        with user_input(ConfigError, "model"):
            raise ModelError("original")
    with pytest.raises(RuntimeError):
        with user_input(ConfigError, "x"):
            raise RuntimeError("not converted")
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_shell_exit_codes(tmp_path):
    """From a shell: a bug exits 1 with a traceback, a user error 2 with one line."""
    bug = (
        "import sys, robustkit.cli.train as t\n"
        "def boom(self): raise ValueError('an internal bug')\n"
        "t.Run.describe = boom\n"
        "from robustkit.cli import main\n"
        f"sys.exit(main(['train', '--dry-run', '-c', {SMOKE!r}, 'trainer.out_dir={tmp_path}', "
        "'trainer.device=cpu', 'log.progress=false'] + sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: an internal bug" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", bug, "trainer.epoch=1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# Where each reader looks under --data-root (robustkit/data/*.py), in its order: the oracle of
# the "data not found" message, written out here rather than read from the library.
SEARCHED = {
    "mnist": ["MNIST/raw", "", "mnist/MNIST/raw", "mnist"],
    "cifar10": ["cifar-10-batches-py", "", "cifar10/cifar-10-batches-py"],
    "tinyimagenet": ["tiny-imagenet-200", "", "tinyimagenet/tiny-imagenet-200"],
}


@pytest.mark.parametrize("command, name", [("evaluate", "mnist"), ("evaluate", "cifar10"),
                                           ("sensitivity", "tinyimagenet"),
                                           ("inspect", "cifar10")])
def test_data_not_found_lists_each_searched_path_on_its_own_line(tmp_path, capsys, command,
                                                                   name):
    """Issue #19 §3: not one 700-character line; the paths one per line, then the hint."""
    root = tmp_path / "no data"
    argv = [command, "--model", "robustkit:mnist_smallcnn_robust", "--dataset", name,
            "--data-root", str(root), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.rstrip("\n").splitlines()
    assert lines[0].startswith(f"robustkit {command}: error: ") and str(root) in lines[0]
    assert not any("Traceback" in ln for ln in lines)
    short = [ln.replace(str(root), "R") for ln in lines]  # pytest's tmp folders are long
    assert all(len(ln) <= 120 for ln in short), max(short, key=len)
    start = lines.index("Looked at:") + 1
    expected = [str(root / s) if s else str(root) for s in SEARCHED[name]]
    assert [ln.strip() for ln in lines[start:start + len(expected)]] == expected
    assert lines[start + len(expected)].startswith("Expected layout")
    hint = "\n".join(lines[lines.index(next(ln for ln in lines if ln.startswith("Fix:"))):])
    assert "--data-root" in hint and "--dataset sample-mnist or sample-cifar10" in hint
    assert ("add --download" in hint) == (name != "tinyimagenet")
    assert not (tmp_path / "out" / "results.json").exists()


def test_other_user_errors_stay_one_line_even_with_line_breaks(tmp_path, monkeypatch, capsys):
    """Only a DataError keeps its lines; any other user error is folded into one."""
    import robustkit.cli.evaluate as cli_evaluate

    def settings(args):
        raise ConfigError("first\nsecond   third")

    monkeypatch.setattr(cli_evaluate, "_settings", settings)
    assert main(["evaluate", "--model", "x", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "robustkit evaluate: error: first second third\n"


ARCHS = """
from robustkit.testing import TinyCNN

def seven_classes():
    return TinyCNN(1, 7, 28)

def rgb_input():
    return TinyCNN(3, 10, 28)
"""


@pytest.mark.parametrize("command", ["sensitivity", "inspect"])
@pytest.mark.parametrize("case, words", [
    ("empty", ["empty.pt", "empty"]), ("text", ["text.pt", "not a torch checkpoint"]),
    ("seven_classes", ["7 classes", "10"]), ("rgb_input", ["(1, 1, 28, 28)"])])
def test_bad_model_inputs_of_the_comparing_commands_are_one_line(tmp_path, capsys, command,
                                                                 case, words):
    """An empty or non-torch checkpoint, a model for another input shape or class count."""
    (tmp_path / "archs.py").write_text(ARCHS)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("garbage")
    model = (["--model", "small_cnn", "--checkpoint", str(tmp_path / f"{case}.pt")]
             if case in ("empty", "text") else ["--model", f"{tmp_path / 'archs.py'}:{case}"])
    rc = main([command, *model, "--dataset", "sample-mnist", "--n-examples", "4",
               "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 2
    line = _one_line(capsys, command)
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("command", ["evaluate", "sensitivity", "inspect"])
def test_help_lists_every_model_form(capsys, command):
    """Issue #19 §3: evaluate --help omitted robustkit:NAME; every command that takes --model
    lists all four forms, with the shipped models as examples."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    forms = text[text.index("model forms"):]
    for form in ("NAME ", "--checkpoint", "FILE.py:FN", "robustbench:NAME", "robustkit:NAME",
                 "robustkit:mnist_smallcnn_robust", "robustkit:mnist_smallcnn_standard"):
        assert form in forms, form
    flag = text[text.index("\n  --model"):text.index("\n  --checkpoint")]  # its help
    assert all(f in " ".join(flag.split()) for f in ("FILE.py:FN", "robustbench:NAME",
                                                     "robustkit:NAME"))


def test_train_data_not_found_lists_the_paths_too(tmp_path, capsys):
    root = tmp_path / "no data"
    assert main(["train", "-c", SMOKE, "data.name=mnist", f"data.root={root}",
                 f"trainer.out_dir={tmp_path / 'run'}", *QUIET]) == 2
    lines = capsys.readouterr().err.rstrip("\n").splitlines()
    assert lines[0].startswith("robustkit train: error: MNIST (mnist): ")
    start = lines.index("Looked at:") + 1
    assert [ln.strip() for ln in lines[start:start + 4]] == [
        str(root / s) if s else str(root) for s in SEARCHED["mnist"]]
    assert "data.name=" in lines[-1] and "sample-mnist" in lines[-1]

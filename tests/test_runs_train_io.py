"""Every I/O failure of ``robustkit train`` is one line (issue 10, section 3, training half).

Bad checkpoints to resume from, unusable output folders (checked before the model and the data
are loaded), a full disk while writing each file of the run directory, and Ctrl-C at start-up,
while loading and while training. Faults are injected at the system-call level
(``os.replace``, ``os.fsync``, ``os.write``), where a full disk or a read-only mount surfaces.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustkit.training.callbacks as callbacks
from robustkit.cli import main
from robustkit.training.checkpoint import load_checkpoint
from robustkit.training.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
FAST = ["log.progress=false", "trainer.device=cpu", "data.limit=128", "log.tensorboard=false"]


def _train(out: Path, *overrides: str) -> int:
    return main(["train", "-c", SMOKE, f"trainer.out_dir={out}", *FAST, *overrides])


def _resume(out: Path) -> str:
    return f"trainer.resume={out / 'last.pt'}"


def _one_line(capsys, start: str = "robustkit train: error: ") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(start) and "Traceback" not in err[0], err
    return err[0]


def _scores(monkeypatch, scores: dict[int, float]) -> None:
    def on_epoch_end(self, trainer):
        value = scores[trainer.state.epoch]
        trainer.state.metrics.update({"eval/clean": value, "eval/pgd3": value})

    monkeypatch.setattr(callbacks.EvalCallback, "on_epoch_end", on_epoch_end)


def _no_loading(monkeypatch) -> None:
    def loaded(*args, **kwargs):
        raise AssertionError("model or data loaded before the output folder was checked")

    monkeypatch.setattr("robustkit.data.build_loaders", loaded)
    monkeypatch.setattr("robustkit.models.create_model", loaded)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# ------------------------------------------------------------ checkpoints to resume from


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch smoke run (small_cnn) and one of another architecture."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("finished")
    assert _train(base / "small") == 0
    assert _train(base / "other", "model.name=cifar_cnn", "trainer.eval_every=null") == 0
    return base


def _bad_checkpoint(kind: str, finished: Path, where: Path) -> Path:
    data = (finished / "small" / "last.pt").read_bytes()
    path = where / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "other-architecture":
        path.write_bytes((finished / "other" / "last.pt").read_bytes())
    elif kind == "bare-state-dict":
        torch.save(load_checkpoint(finished / "small" / "last.pt")["model"], path)
    return path


@pytest.mark.parametrize("kind, says", [
    ("truncated", "corrupt"), ("empty", "corrupt"), ("text", "corrupt"),
    ("other-architecture", "does not match"), ("bare-state-dict", "does not match"),
])
def test_resuming_from_a_bad_checkpoint_is_one_line_naming_it(tmp_path, finished, capsys,
                                                              kind, says):
    path = _bad_checkpoint(kind, finished, tmp_path)
    capsys.readouterr()
    assert _train(tmp_path / "run", f"trainer.resume={path}") == 2
    line = _one_line(capsys)
    assert str(path) in line and says in line and "refused" not in line
    assert "trainer.resume" in line and len(line) < 600, line  # what to do, and short
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------ unusable output folders


def _denied(monkeypatch, folder: Path, code: int) -> None:
    """Writes into ``folder`` fail with ``code`` (root ignores permission bits: simulate)."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if Path(self).parent == folder:
            raise OSError(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("case, says", [
    ("existing file", "existing file"),
    ("inside a file", "Not a directory"),
    ("read-only", "Read-only file system"),
    ("unwritable", "Permission denied"),
])
def test_an_unusable_out_dir_is_one_line_before_loading_anything(tmp_path, monkeypatch, capsys,
                                                                 case, says):
    out = tmp_path / "out"
    if case == "existing file":
        out.write_text("x")
    elif case == "inside a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    else:
        out.mkdir()
        _denied(monkeypatch, out, errno.EROFS if case == "read-only" else errno.EACCES)
    _no_loading(monkeypatch)
    assert _train(out) == 2
    line = _one_line(capsys)
    assert str(out) in line and says in line


# ----------------------------------------------------------------------------- full disk


def _fail_replace(monkeypatch, name: str, code: int) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise OSError(code, os.strerror(code), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_fsync(monkeypatch, name: str, code: int) -> None:
    real = os.fsync

    def fsync(fd):
        if Path(_fd_path(fd)).name.startswith(f".{name}."):  # atomic_write's temporary file
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_append(monkeypatch, name: str, code: int) -> None:
    """The disk fills half-way through an append (os.write writes part, then fails)."""
    real = os.write

    def write(fd, data):
        if Path(_fd_path(fd)).name == name:
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("name, code, fail", [
    ("last.pt", errno.ENOSPC, _fail_replace),
    ("last.pt", errno.EDQUOT, _fail_fsync),
    ("last.pt", errno.EROFS, _fail_replace),
    ("best.pt", errno.ENOSPC, _fail_fsync),
    ("config.yaml", errno.ENOSPC, _fail_replace),
    ("metrics.jsonl", errno.ENOSPC, _fail_append),
])
def test_a_full_disk_is_one_line_and_corrupts_nothing(tmp_path, monkeypatch, capsys, name, code,
                                                      fail):
    _scores(monkeypatch, {1: 0.3, 2: 0.5})  # epoch 2 improves: best.pt is written
    assert _train(tmp_path, "trainer.epochs=1") == 0
    before = (tmp_path / "last.pt").read_bytes()
    capsys.readouterr()
    fail(monkeypatch, name, code)
    assert _train(tmp_path, "trainer.epochs=2", _resume(tmp_path)) == 2
    line = _one_line(capsys)
    assert f"{tmp_path / name}" in line and os.strerror(code) in line
    assert f"trainer.resume={tmp_path / 'last.pt'}" in line  # how to go on
    assert (tmp_path / "last.pt").read_bytes() == before  # the previous epoch, intact
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] in (1, 2)  # readable either way
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line
    monkeypatch.undo()  # space freed: the same command resumes and finishes
    _scores(monkeypatch, {2: 0.5})
    assert _train(tmp_path, "trainer.epochs=2", _resume(tmp_path)) == 0
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


# -------------------------------------------------------------------------------- Ctrl-C


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _main_interrupted(argv: list[str]) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:  # escaping, it would also stop this pytest session
        pytest.fail("KeyboardInterrupt escaped main()")


def test_ctrl_c_at_start_up_is_one_line_exit_130(monkeypatch, capsys):
    monkeypatch.setattr("robustkit.cli._build_parser", _interrupt)  # imports torch: the slow part
    assert _main_interrupted(["train", "-c", SMOKE]) == 130
    assert _one_line(capsys, "interrupted") == "interrupted"


def test_ctrl_c_while_loading_data_releases_the_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("robustkit.data.build_loaders", _interrupt)
    assert _main_interrupted(["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *FAST]) == 130
    assert _one_line(capsys, "interrupted").startswith("interrupted")
    RunDirectory(tmp_path).acquire()  # the lock went with the run


def test_ctrl_c_while_training_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from robustkit.training.trainer import Trainer

    real = Trainer._train_step

    def train_step(self, batch, epoch):
        if self.state.step == 3:  # in epoch 2: last.pt holds epoch 1
            raise KeyboardInterrupt
        return real(self, batch, epoch)

    monkeypatch.setattr(Trainer, "_train_step", train_step)
    argv = ["train", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *FAST, "trainer.epochs=2"]
    assert _main_interrupted(argv) == 130
    line = _one_line(capsys, "interrupted")
    assert f"trainer.resume={tmp_path / 'last.pt'}" in line
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_ctrl_c_during_imports_from_a_shell_is_one_line(tmp_path):
    """A real interpreter, interrupted while importing torch (what the first seconds of every
    command do): no traceback, exit code 130."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from robustkit.cli import main\n"
        f"sys.exit(main(['train', '-c', {SMOKE!r}, 'trainer.out_dir={tmp_path}']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted"


def test_a_diverged_run_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A NaN loss is the user's to fix (learning rate, clipping): one line, exit 2."""
    from robustkit.objectives.standard import Natural

    real_loss = Natural.loss

    def nan_loss(self, x, y, adv, ctx):
        out = real_loss(self, x, y, adv, ctx)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Natural, "loss", nan_loss)
    config = Path(__file__).resolve().parents[1] / "configs/train/mnist_natural.yaml"
    code = main(["train", "-c", str(config), f"trainer.out_dir={tmp_path / 'run'}",
                 "data.name=sample-mnist", "data.holdout=64", "trainer.epochs=1",
                 "data.limit=128", "log.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "non-finite loss" in err[-1] and "Traceback" not in "\n".join(err)

"""Run directories that keep what they hold (issue 10, section 2), through ``robustkit train``.

Kills are injected, not real: ``Killed`` (a ``BaseException``, so nothing on the way catches it)
is raised at a chosen point (inside or right after a checkpoint write, or mid-epoch) and
propagates out of ``main`` as a real kill would end the process; the lock is then released by the
CLI's ``finally``, as the kernel releases a dead process's flock. Held-out scores are scripted
(``EvalCallback.on_epoch_end`` patched) where a test needs ``best.pt`` to move at given epochs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import robustkit.training.callbacks as callbacks
import robustkit.training.callbacks.checkpoint as checkpoint_callback
import robustkit.training.callbacks.jsonl as jsonl_callback
from robustkit.cli import main
from robustkit.errors import OutputError
from robustkit.training.checkpoint import load_checkpoint, save_checkpoint
from robustkit.training.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# 128 images / batch 64: 2 steps per epoch; no TensorBoard unless a test asks for it
FAST = ["log.progress=false", "trainer.device=cpu", "data.limit=128", "log.tensorboard=false"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, the process (here: main) ends."""


def _train(out: Path, *overrides: str) -> int:
    return main(["train", "-c", SMOKE, f"trainer.out_dir={out}", *FAST, *overrides])


def _resume(out: Path) -> str:
    return f"trainer.resume={out / 'last.pt'}"


def _scores(monkeypatch, scores: dict[int, float]) -> None:
    """The held-out evaluation reports ``scores[epoch]`` as eval/pgd3 (and eval/clean)."""

    def on_epoch_end(self, trainer):
        value = scores[trainer.state.epoch]
        trainer.state.metrics.update({"eval/clean": value, "eval/pgd3": value})

    monkeypatch.setattr(callbacks.EvalCallback, "on_epoch_end", on_epoch_end)


def _kill_at_save(monkeypatch, name: str, epoch: int, after: bool = False) -> None:
    """Kill the run inside (before ``os.replace``) or right after the write of ``name``."""
    real = checkpoint_callback.save_checkpoint

    def save(path, state):
        if Path(path).name == name and state["epoch"] == epoch:
            if after:
                real(path, state)
            raise Killed(f"{name} epoch {epoch}")
        real(path, state)

    monkeypatch.setattr(checkpoint_callback, "save_checkpoint", save)


def _kill_at_step(monkeypatch, step: int) -> None:
    from robustkit.training.trainer import Trainer

    real = Trainer._train_step

    def train_step(self, batch, epoch):
        result = real(self, batch, epoch)
        if self.state.step == step:
            raise Killed(f"step {step}")
        return result

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def _epoch(path: Path) -> int:
    return load_checkpoint(path)["epoch"]


# ----------------------------------------------------------------------- 1. stale best.pt


def test_a_kill_between_the_two_writes_leaves_best_pt_ahead_not_behind(tmp_path, monkeypatch):
    """best.pt is written first: killed before last.pt, the new best epoch is still on disk."""
    _scores(monkeypatch, {1: 0.3, 2: 0.5})
    _kill_at_save(monkeypatch, "last.pt", epoch=2)
    with pytest.raises(Killed):
        _train(tmp_path, "trainer.epochs=2")
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["epoch"], last["best_epoch"], last["best"]) == (1, 1, 0.3)
    assert (best["epoch"], best["best_epoch"], best["best"]) == (2, 2, 0.5)


def test_resume_adopts_the_newer_best_pt_and_the_summary_names_it(tmp_path, monkeypatch,
                                                                  capsys, caplog):
    _scores(monkeypatch, {1: 0.3, 2: 0.5})
    _kill_at_save(monkeypatch, "last.pt", epoch=2)
    with pytest.raises(Killed):
        _train(tmp_path, "trainer.epochs=3")
    monkeypatch.undo()
    # The re-run epoch 2 scores lower than before (GPU non-determinism, say), and so does 3:
    # without reconciling, the state would call epoch 1 best while best.pt holds epoch 2.
    _scores(monkeypatch, {2: 0.2, 3: 0.25})
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        assert _train(tmp_path, "trainer.epochs=3", _resume(tmp_path)) == 0
    assert "adopted" in caplog.text
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == 3 and (last["best_epoch"], last["best"]) == (2, 0.5)
    assert best["epoch"] == last["best_epoch"]
    assert "best.pt [eval/pgd3=0.5000, epoch 2]" in capsys.readouterr().out


@pytest.mark.parametrize("old_format", [False, True])
def test_a_stale_best_pt_is_rewritten_from_the_resumed_best_epoch(tmp_path, monkeypatch,
                                                                  old_format):
    """The old write order (last.pt, then best.pt) killed in between: last.pt is the best
    epoch and best.pt an older one. Checkpoints of that era lack best_epoch (old_format):
    it is found in the history."""
    _scores(monkeypatch, {1: 0.3, 2: 0.5, 3: 0.4})
    assert _train(tmp_path, "trainer.epochs=1") == 0
    (tmp_path / "best1.pt").write_bytes((tmp_path / "best.pt").read_bytes())
    assert _train(tmp_path, "trainer.epochs=2", _resume(tmp_path)) == 0
    (tmp_path / "best.pt").write_bytes((tmp_path / "best1.pt").read_bytes())  # stale: epoch 1
    if old_format:
        state = load_checkpoint(tmp_path / "last.pt")
        del state["best_epoch"]
        save_checkpoint(tmp_path / "last.pt", state)
    assert _train(tmp_path, "trainer.epochs=3", _resume(tmp_path)) == 0
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["best_epoch"], last["best"]) == (2, 0.5)
    assert best["epoch"] == 2 and best["best"] == 0.5


def test_a_missing_best_pt_restarts_best_tracking(tmp_path, monkeypatch, capsys):
    _scores(monkeypatch, {1: 0.5, 2: 0.3, 3: 0.4})
    assert _train(tmp_path, "trainer.epochs=2") == 0
    (tmp_path / "best.pt").unlink()
    capsys.readouterr()
    assert _train(tmp_path, "trainer.epochs=3", _resume(tmp_path)) == 0
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["best_epoch"], last["best"]) == (3, 0.4) and best["epoch"] == 3
    assert "best.pt [eval/pgd3=0.4000, epoch 3]" in capsys.readouterr().out


def test_the_summary_names_only_files_that_were_written(tmp_path, capsys):
    assert _train(tmp_path, "log.jsonl=false", "trainer.eval_every=null") == 0
    summary = capsys.readouterr().out
    assert "(config.yaml, last.pt)" in summary
    for absent in ("best.pt", "metrics.jsonl", "tensorboard"):
        assert absent not in summary, absent
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------------- 2. unguarded run directory


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustkit train: error: "), err
    return err[0]


def _no_loading(monkeypatch) -> None:
    """Fail the test if the model or the data are loaded (the refusal must come first)."""

    def loaded(*args, **kwargs):
        raise AssertionError("model or data loaded before the run directory was checked")

    monkeypatch.setattr("robustkit.data.build_loaders", loaded)
    monkeypatch.setattr("robustkit.models.create_model", loaded)


def test_rerunning_without_resume_is_refused_with_the_hint(tmp_path, monkeypatch, capsys):
    assert _train(tmp_path) == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("last.pt", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    _no_loading(monkeypatch)
    assert _train(tmp_path, "trainer.epochs=2") == 2
    line = _one_line(capsys)
    assert f"trainer.resume={tmp_path / 'last.pt'}" in line and "trainer.resume=auto" in line
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # nothing touched


def test_resuming_another_runs_checkpoint_into_a_used_folder_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a) == 0 and _train(b) == 0
    capsys.readouterr()
    assert _train(b, "trainer.epochs=2", f"trainer.resume={a / 'last.pt'}") == 2
    assert f"trainer.resume={b / 'last.pt'}" in _one_line(capsys)
    assert _epoch(b / "last.pt") == 1


def test_resume_auto_starts_fresh_then_resumes_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "robustkit.config.build"):
        assert _train(tmp_path, "trainer.resume=auto") == 0
    assert "no last.pt" in caplog.text and "starting fresh" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "robustkit.config.build"):
        assert _train(tmp_path, "trainer.resume=auto", "trainer.epochs=2") == 0
    assert f"resuming from {tmp_path / 'last.pt'}" in caplog.text
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["epoch"], state["step"]) == (2, 4)


def test_a_second_live_run_is_refused_before_loading_anything(tmp_path, monkeypatch, capsys):
    holder = RunDirectory(tmp_path)
    holder.acquire()  # another live run (flock: a second open file description conflicts)
    try:
        _no_loading(monkeypatch)
        assert _train(tmp_path) == 2
        assert "in use by another live run" in _one_line(capsys)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.release()


def test_the_lock_is_held_over_config_checkpoints_and_logs(tmp_path, monkeypatch):
    import importlib

    # the module: robustkit.config.build, the attribute, is the function of that name
    build_module = importlib.import_module("robustkit.config.build")
    held = []

    def probe(what):
        try:
            RunDirectory(tmp_path).acquire()
        except OutputError:
            held.append((what, True))
        else:
            held.append((what, False))

    def spy(name, real):
        def wrapper(*args, **kwargs):
            probe(name)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(build_module, "save_config", spy("config.yaml", build_module.save_config))
    monkeypatch.setattr(checkpoint_callback, "save_checkpoint",
                        spy("checkpoint", checkpoint_callback.save_checkpoint))
    monkeypatch.setattr(jsonl_callback, "_append", spy("metrics.jsonl", jsonl_callback._append))
    assert _train(tmp_path) == 0
    assert {w for w, _ in held} == {"config.yaml", "checkpoint", "metrics.jsonl"}
    assert all(ok for _, ok in held), held
    RunDirectory(tmp_path).acquire()  # released at the end


def test_a_fresh_run_moves_old_logs_aside_and_cleans_temporary_files(tmp_path):
    old = '{"type": "epoch", "epoch": 7, "step": 70}\n'
    (tmp_path / "metrics.jsonl").write_text(old)
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.old").write_bytes(b"x")
    (tmp_path / "best.pt").write_bytes(b"a best.pt without its last.pt")
    stale = [tmp_path / ".last.pt.k1ll3d.tmp", tmp_path / ".config.yaml.x.tmp"]
    for f in stale:
        f.write_bytes(b"\0" * 100)
    assert _train(tmp_path, "log.tensorboard=true") == 0
    assert (tmp_path / "metrics.jsonl.old").read_text() == old
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [1]
    assert (tmp_path / "tb.old" / "events.out.tfevents.old").is_file()
    assert [p.name for p in (tmp_path / "tb").iterdir()] != ["events.out.tfevents.old"]
    assert (tmp_path / "best.pt.old").is_file() and _epoch(tmp_path / "best.pt") == 1
    assert not any(f.exists() for f in stale)


# ------------------------------------------------ logs of a resumed run: no duplicate, no gap


def _lines(path: Path) -> list[dict]:
    """metrics.jsonl without its timing fields (every line must parse)."""
    drop = {"time", "train/throughput"}
    return [{k: v for k, v in json.loads(s).items() if k not in drop}
            for s in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run: what every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    assert _train(out, "trainer.epochs=2") == 0
    return out


@pytest.mark.parametrize("kill", ["mid-epoch", "inside last.pt", "after last.pt"])
def test_resumed_metrics_jsonl_equals_an_uninterrupted_run(tmp_path, monkeypatch, straight,
                                                           kill):
    if kill == "mid-epoch":
        _kill_at_step(monkeypatch, 4)  # in epoch 2, after its first step was logged
    else:
        _kill_at_save(monkeypatch, "last.pt", epoch=2, after=kill == "after last.pt")
    with pytest.raises(Killed):
        _train(tmp_path, "trainer.epochs=2")
    monkeypatch.undo()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "epoch": 1, "st')  # and a line torn by the kill
    assert _train(tmp_path, "trainer.epochs=2", _resume(tmp_path)) == 0
    assert _lines(tmp_path / "metrics.jsonl") == _lines(straight / "metrics.jsonl")


def test_tensorboard_resumes_with_purge_step_after_the_checkpoint(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    _kill_at_step(monkeypatch, 4)  # in the last step of epoch 2: step 3 logged, then killed
    with pytest.raises(Killed):
        _train(tmp_path, "trainer.epochs=2", "log.tensorboard=true")
    monkeypatch.undo()
    assert _train(tmp_path, "trainer.epochs=2", _resume(tmp_path),
                  "log.tensorboard=true") == 0
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[-1])).Load()
              if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [3]  # checkpoint at step 2: its own epoch events stay, step 3 on is purged
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/pgd3")] == [2, 4]


# ------------------------------------------------------------- the lock on every exit (#18 i)


def _no_lock(out: Path) -> None:
    assert not (out / RunDirectory.LOCK).exists()
    RunDirectory(out).acquire()  # and nobody holds it


@pytest.mark.parametrize("failure", ["config", "model", "data", "diverged", "bug"])
def test_a_failed_run_leaves_no_lock_behind(tmp_path, monkeypatch, failure):
    """Every failure, before anything is written or after (sample-mnist smoke run)."""
    from robustkit.config import Run
    from robustkit.training.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "run"
    extra = []
    if failure == "config":  # refused at load: the folder is never made
        extra = ["optim.lr=.inf"]
    elif failure == "model":  # after the lock, before anything is written
        extra = ["model.params.width=3"]
    elif failure == "data":
        extra = ["data.name=mnist", f"data.root={tmp_path / 'no-data'}"]
    elif failure == "diverged":  # a NaN loss in epoch 2: after config.yaml and last.pt
        real = Trainer._train_step

        def train_step(self, batch, epoch):
            if epoch == 1:
                raise NonFiniteLossError("non-finite loss nan")
            return real(self, batch, epoch)

        monkeypatch.setattr(Trainer, "_train_step", train_step)
        extra = ["trainer.epochs=2"]
    else:  # a bug: a traceback, not exit 2, but the lock goes all the same
        monkeypatch.setattr(Run, "describe", lambda self: {}["boom"])
    if failure == "bug":
        with pytest.raises(KeyError):
            _train(out, *extra)
    else:
        assert _train(out, *extra) == 2
    kept = {"diverged": ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"],
            "bug": ["config.yaml"]}.get(failure)  # describe() runs after config.yaml
    if kept is None:
        assert not out.exists()  # nothing was written: the folder the run made is gone too
    else:
        assert sorted(p.name for p in out.iterdir()) == kept  # what the run wrote stays
    _no_lock(out)


def test_a_dry_run_and_a_finished_run_leave_no_lock(tmp_path):
    fresh = tmp_path / "fresh"
    assert _train(fresh, "--dry-run") == 0
    assert not fresh.exists()  # a dry run writes nothing, not even the folder
    used = tmp_path / "used"
    used.mkdir()
    assert _train(used, "--dry-run") == 0
    assert list(used.iterdir()) == []
    assert _train(used) == 0
    _no_lock(used)
    assert (used / "last.pt").is_file()


def test_release_removes_the_lock_and_only_its_own(tmp_path):
    out = tmp_path / "new"
    first = RunDirectory(out)
    first.acquire()
    assert (out / RunDirectory.LOCK).read_text() == str(os.getpid())
    second = RunDirectory(out)
    with pytest.raises(OutputError, match="in use"):
        second.acquire()
    second.release()  # never acquired: must not remove the holder's lock
    assert (out / RunDirectory.LOCK).is_file()
    with pytest.raises(OutputError, match="in use"):
        RunDirectory(out).acquire()
    first.release()
    first.release()  # idempotent
    assert not out.exists()  # made by acquire, left empty
    with RunDirectory(tmp_path) as run:  # a folder that existed stays
        assert run.path == tmp_path
    assert tmp_path.is_dir() and not (tmp_path / RunDirectory.LOCK).exists()


def test_acquire_retries_when_the_holder_releases_between_open_and_flock(tmp_path, monkeypatch):
    """The holder unlinks .lock while a newcomer has it open: a lock on that dead file would
    let a third run in beside the newcomer."""
    import fcntl

    holder = RunDirectory(tmp_path)
    holder.acquire()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            holder.release()  # right after the newcomer opened the old .lock
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    newcomer = RunDirectory(tmp_path)
    newcomer.acquire()
    assert len(calls) == 2  # took the lock again, on the live file
    monkeypatch.setattr(fcntl, "flock", real)
    with pytest.raises(OutputError, match="in use"):
        RunDirectory(tmp_path).acquire()
    newcomer.release()

"""Heartbeats (robustkit.heartbeat): a log line every ~30 s while a long step runs without a
progress bar, naming the step (the AutoAttack sub-attack), what is left, the time elapsed and an
ETA; used by the evaluation passes, AutoAttack's sub-attacks, training epochs and the CLI where
stderr is no terminal (issue 19 §3: ``make demo > log`` printed nothing for 25 minutes)."""

from __future__ import annotations

import logging
import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustkit.heartbeat import LOGGER, Heartbeat, default_interval, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def beats(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def test_line_names_what_left_elapsed_and_eta_once_per_interval(beats):
    clock = FakeClock()
    hb = Heartbeat("pgd40", 200, interval=30, ticker=False, clock=clock)
    clock.t += 10
    hb.update(50)  # 10 s: not due
    clock.t += 29.5
    hb.update(10)  # 39.5 s since the start: due (the first line comes after one interval)
    # 60 points in 39.5 s -> 140 left take 92.2 s
    assert lines(beats) == ["pgd40: 140 of 200 points left, 40 s elapsed, ETA 1 min 32 s"]
    clock.t += 29.0
    hb.update(20)  # 29 s after the last line: not due
    assert len(lines(beats)) == 1
    clock.t += 1.0
    hb.update(20)  # 30 s after it
    assert lines(beats)[-1] == "pgd40: 100 of 200 points left, 1 min 10 s elapsed, ETA 1 min 10 s"
    hb.close()


def test_a_step_shorter_than_the_interval_logs_nothing(beats):
    clock = FakeClock()
    with Heartbeat("clean", 10, interval=30, ticker=False, clock=clock) as hb:
        clock.t += 29.9
        hb.update(10)
    assert lines(beats) == []


def test_eta_before_anything_finished(beats):
    clock = FakeClock()
    hb = Heartbeat("AutoAttack apgd-t (sub-attack 2 of 2)", 37, interval=30, ticker=False,
                   clock=clock, expected_s=100.0)
    clock.t += 30
    assert hb.beat() == ("AutoAttack apgd-t (sub-attack 2 of 2): 37 of 37 points left, 30 s "
                         "elapsed, ETA ~1 min 10 s (estimate)")
    hb = Heartbeat("apgd-ce", 5, interval=30, ticker=False, clock=clock)
    clock.t += 31
    assert hb.beat().endswith("5 of 5 points left, 31 s elapsed, ETA unknown until the first "
                              "finish")
    hb = Heartbeat("epoch 1/3", None, unit="batches", interval=30, ticker=False, clock=clock)
    hb.update(7)
    assert hb.message(clock.t + 60) == "epoch 1/3: 7 batches done, 1 min 00 s elapsed"


def test_interval_zero_is_off_and_a_negative_one_is_refused(beats, monkeypatch):
    clock = FakeClock()
    hb = Heartbeat("x", 4, interval=0, ticker=True, clock=clock)
    assert hb._thread is None
    clock.t += 1e6
    hb.update(1)
    assert lines(beats) == []
    with pytest.raises(ValueError, match="interval must be >= 0"):
        Heartbeat("x", 4, interval=-1)
    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "2.5")
    assert default_interval() == 2.5 and Heartbeat("x", 1, ticker=False).interval == 2.5
    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "0")
    assert default_interval() == 0.0  # off
    for bad in ("soon", "-5", "nan", "inf"):
        monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", bad)
        assert default_interval() == 30.0
        assert f"ROBUSTKIT_HEARTBEAT_S={bad!r} is not a number" in lines(beats)[-1]
    monkeypatch.delenv("ROBUSTKIT_HEARTBEAT_S")
    assert default_interval() == 30.0


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.4, "59 s"), (59.6, "1 min 00 s"),
                                           (185.4, "3 min 05 s"), (3600, "1 h 00 min"),
                                           (7440, "2 h 04 min"), (-3, "0 s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_thread_beats_while_one_long_call_gives_no_update(beats):
    with Heartbeat("one long call", 8, interval=0.05) as hb:
        time.sleep(0.4)
        assert hb._thread is not None and hb._thread.is_alive()
    during = len(lines(beats))
    assert during >= 2, lines(beats)
    assert all(re.fullmatch(r"one long call: 8 of 8 points left, \d+ s elapsed, ETA unknown "
                            r"until the first finish", m) for m in lines(beats))
    time.sleep(0.2)
    assert len(lines(beats)) == during  # closed: the thread is gone
    assert hb._thread is None


# -- where the library beats ----------------------------------------------------------------
class Slow(nn.Module):
    """A linear classifier whose every forward takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.01, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, classes)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.fc(x.flatten(1))


def test_evaluation_passes_beat_without_a_bar(beats, monkeypatch):
    from robustkit.attacks.pgd import PGD
    from robustkit.evaluation.protocol import evaluate_attacks

    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "0.05")
    model = Slow(0.01)
    x = torch.rand(24, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct: PGD attacks every point
    pgd = PGD(model, eps=0.1, alpha=0.025, steps=5)
    evaluate_attacks(model, (x, y), {"pgd5": pgd}, batch_size=4)
    pgd_lines = [m for m in lines(beats) if m.startswith("pgd5: ")]
    assert pgd_lines, lines(beats)
    assert any(re.fullmatch(r"pgd5: \d+ of 24 points left, \d+ s elapsed, ETA \d+ s", m)
               for m in pgd_lines), pgd_lines  # a rate after the first batch: a real ETA
    # with a bar given, the bar reports and no heartbeat is made
    beats.clear()

    class Bar:
        def __init__(self, name, total):
            self.n = 0

        def update(self, k):
            self.n += k

        def close(self):
            pass

    evaluate_attacks(model, (x, y), {"pgd5": pgd}, batch_size=4, progress=Bar)
    assert lines(beats) == []


def test_autoattack_beats_per_sub_attack_with_an_estimate_after_the_first(beats, monkeypatch):
    from robustkit.attacks import AutoAttack
    from robustkit.testing import shrink_autoattack

    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "0.05")
    build = AutoAttack.build  # 5 iterations, 2 target classes: the protocol, smaller
    monkeypatch.setattr(AutoAttack, "build", lambda s, d: shrink_autoattack(build(s, d)))
    model = Slow(0.01, classes=10).eval()
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct: every point is attacked
    aa = AutoAttack(model, eps=1e-4, version="custom", attacks=["apgd-ce", "apgd-t"])
    assert not aa.perturb(x, y).info["success"].any()  # eps too small: all 6 stay robust
    ce = [m for m in lines(beats) if m.startswith("AutoAttack apgd-ce (sub-attack 1 of 2): ")]
    t = [m for m in lines(beats) if m.startswith("AutoAttack apgd-t (sub-attack 2 of 2): ")]
    assert ce and t, lines(beats)
    assert re.search(r": 6 of 6 points left, \d+ s elapsed, ETA unknown until", ce[0]), ce[0]
    # the second sub-attack's ETA comes from the first one's seconds per gradient step
    assert re.search(r": 6 of 6 points left, \d+ s elapsed, ETA ~\d+ s \(estimate\)", t[0]), t[0]


def test_grad_steps_follow_pyautoattack_settings():
    from pyautoattack import AutoAttack as Official

    from robustkit.attacks.autoattack import _grad_steps, _Rate

    m = nn.Linear(2, 2)
    std = Official(m, version="standard")
    assert [_grad_steps(std, n) for n in ("apgd-ce", "apgd-t", "fab-t")] == [100, 900, 900]
    assert _grad_steps(std, "square") == pytest.approx(5000 / 3)
    custom = Official(m, version="custom", attacks=["apgd-ce", "fab"])
    assert _grad_steps(custom, "apgd-ce") == 500 and _grad_steps(custom, "fab") == 500
    assert _grad_steps(object(), "apgd-ce") is None and _grad_steps(std, "nope") is None
    rate = _Rate()
    assert rate.expect(100) is None
    with rate.timing(0):  # a sub-attack of unknown cost says nothing about the rate
        time.sleep(0.01)
    assert rate.seconds == 0 and rate.work == 0 and rate.expect(100) is None
    with rate.timing(100):
        time.sleep(0.01)
    assert rate.work == 100 and rate.seconds >= 0.01
    assert rate.expect(300) == pytest.approx(3 * rate.seconds) and rate.expect(0) is None


def _trainer(callbacks=(), delay=0.01):
    from robustkit.objectives.base import Objective, ObjectiveOutput
    from robustkit.training.trainer import Trainer

    class CE(Objective):
        def loss(self, x, y, adv, ctx):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            return ObjectiveOutput(loss, logits, {"loss/ce": loss.detach()})

    model = Slow(delay)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.long),
                         torch.arange(40))
    return Trainer(model, CE(model), opt, epochs=2, callbacks=list(callbacks)), \
        DataLoader(data, batch_size=4)


def test_training_epochs_beat_unless_a_bar_is_shown(beats, monkeypatch):
    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "0.05")
    trainer, loader = _trainer()
    trainer.fit(loader)
    first = [m for m in lines(beats) if m.startswith("epoch 1/2: ")]
    second = [m for m in lines(beats) if m.startswith("epoch 2/2: ")]
    assert first and second, lines(beats)
    assert all(re.fullmatch(r"epoch [12]/2: \d+ of 10 batches left, \d+ s elapsed, ETA .+", m)
               for m in first + second)
    # batches are counted as they finish: fewer left, and an ETA from the rate
    assert any(re.fullmatch(r"epoch [12]/2: [0-9] of 10 batches left, \d+ s elapsed, ETA \d+ s",
                            m) for m in first + second), first + second
    beats.clear()

    class Bar:
        shows_bar = True

    trainer, loader = _trainer([Bar()])
    trainer.fit(loader)
    assert lines(beats) == []


def test_cli_progress_gives_heartbeats_where_no_bar_is_drawn(monkeypatch, tmp_path):
    import io
    import sys

    from robustkit.cli.progress import ProgressCallback, tqdm_factory

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    bar = tqdm_factory()("pgd20", 10)
    assert isinstance(bar, Heartbeat) and bar.what == "pgd20" and bar.total == 10
    bar.close()
    off = tqdm_factory(False)("pgd20", 10)  # --no-progress: neither bars nor heartbeats
    assert not isinstance(off, Heartbeat) and off.disable
    on = tqdm_factory(True)("pgd20", 10)
    assert not isinstance(on, Heartbeat) and not on.disable
    on.close()
    assert ProgressCallback().shows_bar is False
    assert ProgressCallback(file=io.StringIO()).shows_bar is True


def test_the_training_bar_is_drawn_only_on_a_terminal(beats, monkeypatch):
    """Off a terminal the trainer's bar is not drawn (its frames would fill a log file): the
    heartbeat and the callback's one summary line per epoch remain."""
    import io
    import sys

    from robustkit.cli.progress import ProgressCallback

    monkeypatch.setenv("ROBUSTKIT_HEARTBEAT_S", "0.05")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)  # not a terminal
    trainer, loader = _trainer([ProgressCallback()])
    trainer.fit(loader)
    text = err.getvalue()
    assert re.findall(r"^epoch (\d)/2: train/", text, flags=re.M) == ["1", "2"], text
    assert "batch/s" not in text and "it/s" not in text and "|" not in text, text
    assert any(m.startswith("epoch 1/2: ") for m in lines(beats))
    drawn = io.StringIO()  # a file given: drawn, and then no heartbeat
    beats.clear()
    trainer, loader = _trainer([ProgressCallback(file=drawn)])
    trainer.fit(loader)
    assert "batch/s" in drawn.getvalue() and "epoch 2/2:" in drawn.getvalue()
    assert lines(beats) == []


def test_only_the_innermost_heartbeat_beats_from_its_thread(beats):
    """A pass whose one batch is an AutoAttack run: the sub-attack's heartbeat talks, the
    pass's thread waits (its updates still beat), and takes over when the inner one closes."""
    outer = Heartbeat("autoattack", 10, interval=0.05)
    with Heartbeat("AutoAttack apgd-ce (sub-attack 1 of 2)", 10, interval=0.05):
        time.sleep(0.3)
    inner_lines = lines(beats)
    assert inner_lines and all(m.startswith("AutoAttack apgd-ce") for m in inner_lines)
    time.sleep(0.3)
    outer.close()
    after = lines(beats)[len(inner_lines):]
    assert after and all(m.startswith("autoattack: 10 of 10 points left") for m in after)

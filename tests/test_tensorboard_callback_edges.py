"""TensorBoardCallback at the call level (#18's mutation round of callbacks/tensorboard.py): the
writer's purge step on a fresh and a resumed run, the config text verbatim, and the per-step
scalars (which steps, which tags, values, throughput over the images since the last log, the lr
of that step), against a recording logger instead of event files."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from robustkit.training.callbacks import tensorboard as tb_module
from robustkit.training.callbacks.tensorboard import TensorBoardCallback


class Recorder:
    made: list[Recorder] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.calls = log_dir, purge_step, []
        Recorder.made.append(self)

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, *a))


@pytest.fixture
def recorder(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(tb_module, "TensorBoardLogger", Recorder)
    return Recorder


def _trainer(step=0, lr=0.1, batch=None):
    state = SimpleNamespace(step=step, lr=lr, batch=batch or {}, metrics={}, histograms={},
                            epoch=1)
    return SimpleNamespace(state=state, epochs=3, model=torch.nn.Identity())


@pytest.mark.parametrize("step, purge", [(0, None), (1, 2), (7, 8)])
def test_the_writer_purges_after_the_checkpoint_step_only_on_resume(recorder, tmp_path, step,
                                                                     purge):
    cb = TensorBoardCallback(tmp_path / "tb")
    cb.on_fit_start(_trainer(step=step))
    (made,) = recorder.made
    assert made.log_dir == tmp_path / "tb" and made.purge_step == purge
    assert made.calls == []  # no config text given: nothing logged


def test_the_config_text_is_logged_verbatim_as_an_indented_block(recorder, tmp_path):
    text = "name: x\nobjective:\n  name: trades\n"
    cb = TensorBoardCallback(tmp_path, config_text=text)
    cb.on_fit_start(_trainer(step=5))
    (made,) = recorder.made
    assert made.calls == [("add_text", "config",
                           "    name: x\n    objective:\n      name: trades", 5)]


def test_scalars_at_steps_1_and_every_log_every_with_throughput_and_lr(recorder, tmp_path,
                                                                       monkeypatch):
    clock = itertools.count(100.0, 2.0)  # every perf_counter call: 2 s later
    monkeypatch.setattr(tb_module.time, "perf_counter", lambda: next(clock))
    cb = TensorBoardCallback(tmp_path, log_every=3)
    trainer = _trainer()
    cb.on_fit_start(trainer)  # t0 = 100
    (made,) = recorder.made
    out = SimpleNamespace(logits=torch.zeros(4, 10))
    logged = {}
    for step in range(1, 8):
        trainer.state.step, trainer.state.lr = step, 0.1 * step
        trainer.state.batch = {"loss": torch.tensor(1.0 + step), "acc": 0.5}
        before = len(made.calls)
        cb.on_batch_end(trainer, out, None)
        logged[step] = made.calls[before:]
    assert [s for s, c in logged.items() if c] == [1, 4, 7]
    assert logged[1] == [("add_scalar", "train/loss", 2.0, 1), ("add_scalar", "train/acc", 0.5, 1),
                         ("add_scalar", "train/throughput", 4 / 2.0, 1),
                         ("add_scalar", "lr", 0.1, 1)]
    assert all(isinstance(c[2], float) for c in logged[1])
    # steps 2, 3, 4: 12 images since the log at step 1 (t = 102), now t = 104
    assert ("add_scalar", "train/throughput", 12 / 2.0, 4) in logged[4]
    assert ("add_scalar", "lr", pytest.approx(0.4), 4) in logged[4]
    assert ("add_scalar", "train/loss", 5.0, 4) in logged[4]


def test_throughput_counts_every_rank_images(recorder, tmp_path, monkeypatch):
    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(tb_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(tb_module.dist, "world_size", lambda: 3)
    cb = TensorBoardCallback(tmp_path, log_every=1)
    trainer = _trainer()
    cb.on_fit_start(trainer)
    trainer.state.step = 1
    cb.on_batch_end(trainer, SimpleNamespace(logits=torch.zeros(5, 10)), None)
    (made,) = recorder.made
    assert ("add_scalar", "train/throughput", 15 / 1.0, 1) in made.calls


def test_other_ranks_write_nothing(recorder, tmp_path, monkeypatch):
    monkeypatch.setattr(tb_module.dist, "is_main", lambda: False)
    cb = TensorBoardCallback(tmp_path, config_text="a: 1")
    trainer = _trainer()
    cb.on_fit_start(trainer)
    trainer.state.step = 1
    trainer.state.batch = {"loss": 1.0}
    cb.on_batch_end(trainer, SimpleNamespace(logits=torch.zeros(2, 10)), None)
    assert recorder.made == []


def _epoch_trainer(epochs=5):
    trainer = _trainer(step=40)
    trainer.epochs = epochs
    trainer.model = torch.nn.DataParallel(torch.nn.Linear(2, 2))  # image_fn gets the bare one
    return trainer


def test_epoch_end_logs_epoch_means_eval_and_histograms_at_the_step_not_the_lr(recorder,
                                                                              tmp_path):
    """train/<k> -> epoch/<k>, every other metric under its own tag, never lr (a per-step
    curve already), hist/<k> for the (N,) metrics; all at state.step, then a flush."""
    cb = TensorBoardCallback(tmp_path)
    trainer = _epoch_trainer()
    cb.on_fit_start(trainer)
    trainer.state.metrics = {"train/loss": 0.5, "eval/clean_acc": 0.9, "lr": 0.01,
                             "train/lr_like": 3.0, "sensitivity/conv1": 0.2}
    hist = torch.arange(4.0)
    trainer.state.histograms = {"sensitivity/conv1": hist}
    cb.on_epoch_end(trainer)
    (made,) = recorder.made
    assert made.calls == [("add_scalar", "epoch/loss", 0.5, 40),
                          ("add_scalar", "eval/clean_acc", 0.9, 40),
                          ("add_scalar", "epoch/lr_like", 3.0, 40),
                          ("add_scalar", "sensitivity/conv1", 0.2, 40),
                          ("add_histogram", "hist/sensitivity/conv1", hist, 40),
                          ("flush",)]


def test_images_every_image_every_epochs_and_after_the_last_on_the_bare_model(recorder,
                                                                             tmp_path):
    seen = []

    def image_fn(model):
        seen.append(model)
        return {"saliency/x": torch.zeros(3, 4, 4)}

    cb = TensorBoardCallback(tmp_path, image_fn=image_fn, image_every=2)
    trainer = _epoch_trainer(epochs=5)
    cb.on_fit_start(trainer)
    (made,) = recorder.made
    logged = []
    for epoch in range(1, 6):  # state.epoch at on_epoch_end: the epochs finished
        trainer.state.epoch, trainer.state.step = epoch, 10 * epoch
        before = len(made.calls)
        cb.on_epoch_end(trainer)
        logged += [(epoch, c[1], c[3]) for c in made.calls[before:] if c[0] == "add_image"]
    assert logged == [(2, "saliency/x", 20), (4, "saliency/x", 40), (5, "saliency/x", 50)]
    assert len(seen) == 3 and all(m is trainer.model.module for m in seen)


def test_other_ranks_neither_log_nor_compute_images_at_epoch_end(recorder, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(tb_module.dist, "is_main", lambda: False)
    calls = []
    cb = TensorBoardCallback(tmp_path, image_fn=lambda m: calls.append(m) or {})
    trainer = _epoch_trainer(epochs=1)
    cb.on_fit_start(trainer)
    trainer.state.epoch, trainer.state.metrics = 1, {"eval/clean_acc": 1.0}
    cb.on_epoch_end(trainer)
    assert calls == [] and recorder.made == []


def test_fit_end_logs_hparams_with_the_final_metrics_then_closes(recorder, tmp_path):
    cb = TensorBoardCallback(tmp_path, hparams={"lr": 0.1})
    trainer = _epoch_trainer()
    cb.on_fit_start(trainer)
    trainer.state.metrics = {"eval/clean_acc": 0.9, "train/loss": 0.3}
    cb.on_fit_end(trainer)
    (made,) = recorder.made
    assert made.calls == [("add_hparams", {"lr": 0.1},
                           {"hparam/eval/clean_acc": 0.9, "hparam/train/loss": 0.3}),
                          ("close",)]
    bare = TensorBoardCallback(tmp_path / "b")
    bare.on_fit_start(trainer)
    bare.on_fit_end(trainer)
    assert recorder.made[-1].calls[0][1] == {}  # no hparams given: an empty dict, not None


def test_an_exception_closes_the_writer_keeping_what_was_logged(recorder, tmp_path):
    cb = TensorBoardCallback(tmp_path)
    cb.on_fit_start(_trainer())
    cb.on_exception(_trainer(), RuntimeError("x"))
    assert recorder.made[0].calls == [("close",)]


def test_defaults_and_bad_intervals_named():
    cb = TensorBoardCallback("unused")
    assert (cb.log_every, cb.image_every, cb.hparams, cb.image_fn) == (50, 1, None, None)
    for kw, name in ((dict(log_every=0), "log_every"), (dict(image_every=0), "image_every")):
        with pytest.raises(ValueError, match=rf"^{name} must be >= 1, got 0$"):
            TensorBoardCallback("unused", **kw)


def test_an_exception_before_the_writer_exists_closes_nothing_and_raises_nothing(recorder):
    """An earlier callback's on_fit_start failed: the trainer still calls on_exception on
    every callback, and this one must not hide the real error behind its own."""
    cb = TensorBoardCallback("unused")
    cb.on_exception(_trainer(), RuntimeError("the real error"))
    assert recorder.made == []

"""Checkpoints: plain data only, weights_only loads, refusal of pickled objects, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from robustkit.objectives.base import Objective, ObjectiveOutput
from robustkit.testing import TinyCNN, separable_toy_data
from robustkit.training.callbacks import CheckpointCallback
from robustkit.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from robustkit.training.trainer import Trainer


class CE(Objective):
    def loss(self, x, y, adv, ctx):
        logits = self.model(x)
        return ObjectiveOutput(F.cross_entropy(logits, y), logits)


def _trainer(epochs=2, callbacks=(), adam=False):
    torch.manual_seed(0)
    model = TinyCNN(1, 2, 8)
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], gamma=0.1)
    return Trainer(model, CE(model), opt, sched, epochs=epochs, callbacks=callbacks,
                   scheduler_interval="epoch" if not adam else "step")


def _loader():
    x, y = separable_toy_data(32)
    return DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=16)


def test_round_trip_plain_data(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "n": 3, "f": 0.5, "s": "x", "none": None,
             "nested": {0: [1, 2, (3, "a")], "t": torch.tensor([True, False])}}
    save_checkpoint(tmp_path / "sub" / "c.pt", state)
    back = load_checkpoint(tmp_path / "sub" / "c.pt")
    assert torch.equal(back["w"], state["w"]) and back["nested"][0] == [1, 2, (3, "a")]
    assert back["n"] == 3 and back["s"] == "x" and back["none"] is None


@pytest.mark.parametrize("trainer_kw", [dict(adam=False), dict(adam=True)])
def test_trainer_state_dict_loads_with_weights_only(tmp_path, trainer_kw):
    trainer = _trainer(**trainer_kw)
    trainer.fit(_loader())
    save_checkpoint(tmp_path / "c.pt", trainer.state_dict())
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # what every reader uses
    assert set(raw) >= {"model", "optimizer", "scheduler", "scaler", "objective", "epoch", "step",
                        "best", "rng"}
    assert isinstance(raw["rng"][0]["torch"], torch.Tensor) and raw["epoch"] == 2


@pytest.mark.parametrize("bad", [np.float64(1.0), object(), {"k": np.arange(3)}, {(1, 2): 3}])
def test_save_refuses_non_plain_data_and_writes_nothing(tmp_path, bad):
    with pytest.raises(CheckpointError, match=r"state\['bad'\]"):
        save_checkpoint(tmp_path / "c.pt", {"ok": 1, "bad": bad})
    assert list(tmp_path.iterdir()) == []


class _Evil:
    """Unpickling this would run code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_load_refuses_a_pickled_object_and_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.zeros(2)}, "evil": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("cut", ["empty", "half", "text", "yaml"])
def test_a_torn_checkpoint_is_called_corrupt_not_refused(tmp_path, cut):
    """A file cut mid-write (or not a checkpoint at all) is corrupt: calling it a security
    refusal sent users looking for pickled code that is not there."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "half": data[: len(data) // 2], "text": b"hello" * 9,
                      "yaml": b"name: smoke\nseed: 0\n"}[cut])  # config.yaml as trainer.resume
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(path)
    assert "refused" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("fail", ["os.replace", "os.fsync"])
def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def boom(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(fail, boom)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    back = load_checkpoint(path)
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind


def test_run_killed_during_checkpoint_resumes_from_last_good(tmp_path, monkeypatch):
    real_replace = os.replace

    class KillOnSecondSave:
        def on_epoch_end(self, trainer):
            if trainer.state.epoch == 1:  # the next save (epoch 2) dies inside os.replace
                def boom(*args, **kwargs):
                    raise OSError("killed mid-write")

                monkeypatch.setattr("os.replace", boom)

    trainer = _trainer(epochs=3, callbacks=[CheckpointCallback(tmp_path), KillOnSecondSave()])
    with pytest.raises(OSError, match="killed"):
        trainer.fit(_loader())
    monkeypatch.setattr("os.replace", real_replace)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1
    fresh = _trainer(epochs=3)
    fresh.load_state_dict(last)
    state = fresh.fit(_loader())
    assert state.epoch == 3 and state.step == 3 * 2

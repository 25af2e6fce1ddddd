"""The small callback pieces on their own (issue 18, mutation round of
robustkit.training.callbacks.base and .jsonl): the probe callbacks' argument checks and probe
set, and metrics.jsonl's lines, with a stand-in trainer (no training loop)."""

from __future__ import annotations

import json
import math
import os
import stat
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustkit.errors import OutputError
from robustkit.training.callbacks import base, jsonl
from robustkit.training.callbacks.base import (
    Callback,
    check_probe_args,
    cuda_indices,
    first_items,
    probe_due,
    probe_mode,
)
from robustkit.training.callbacks.jsonl import JSONLCallback, MetricsLogger


def _perturb(model, x, y, generator):
    return x


# ---- base ------------------------------------------------------------------------------------


def test_probe_due_every_k_epochs_and_after_the_last_on_rank_0_only(monkeypatch):
    def due(every, epochs):
        return [e for e in range(1, epochs + 1)
                if probe_due(SimpleNamespace(state=SimpleNamespace(epoch=e), epochs=epochs),
                             every)]

    assert due(1, 3) == [1, 2, 3]
    assert due(3, 7) == [3, 6, 7]
    assert due(4, 4) == [4]
    monkeypatch.setattr("robustkit.distributed.is_main", lambda: False)
    assert due(1, 3) == []


def test_cuda_indices_name_the_device_whose_rng_is_forked(monkeypatch):
    """Pure device arithmetic (no GPU needed): an indexed CUDA device, an unindexed one (the
    current device), anything else none."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert cuda_indices(torch.device("cuda", 2)) == [2]
    assert cuda_indices(torch.device("cuda")) == [5]
    assert cuda_indices(torch.device("cuda", 0)) == [0]
    assert cuda_indices(torch.device("cpu")) == [] and cuda_indices(torch.device("meta")) == []


class _NoParams(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_probe_mode_yields_the_bare_model_and_its_device_in_eval_mode_with_rng_forked(
        monkeypatch):
    forked = []
    real_fork = torch.random.fork_rng

    def spy(devices=None, **kw):
        forked.append(devices)
        return real_fork(devices=devices, **kw)

    monkeypatch.setattr(torch.random, "fork_rng", spy)
    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
    wrapped = torch.nn.DataParallel(inner)
    before = torch.get_rng_state()
    with probe_mode(wrapped) as (bare, device):
        assert bare is inner and device == torch.device("cpu")
        assert not any(m.training for m in inner.modules())
        assert not torch.is_autocast_enabled("cpu")
        torch.rand(3)  # a draw inside does not move training's stream
    assert all(m.training for m in inner.modules()) and torch.equal(torch.get_rng_state(), before)
    assert forked == [[]]
    with probe_mode(_NoParams()) as (bare, device):  # nothing to read a device from: the CPU
        assert device == torch.device("cpu")
    with probe_mode(inner, "cpu") as (_, device):  # a given device wins, as a torch.device
        assert device == torch.device("cpu")
    monkeypatch.setattr(base, "cuda_indices", lambda d: [9] if d.type == "cpu" else [])
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None, **kw: (
        forked.append(devices), real_fork(devices=[], **kw))[1])
    with probe_mode(inner):
        pass
    assert forked[-1] == [9]  # the device's own CUDA index list reaches fork_rng


def test_callback_events_are_no_ops():
    cb = Callback()
    assert cb.on_fit_start(None) is None and cb.on_epoch_end(None) is None
    assert cb.on_batch_end(None, None, None) is None and cb.on_fit_end(None) is None
    assert cb.on_exception(None, RuntimeError("x")) is None


def test_first_items_stacks_the_first_n_with_long_labels():
    x = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    ds = [(x[i].numpy(), int(i) % 2) for i in range(5)]  # arrays and Python ints, as datasets give
    xs, ys = first_items(ds, 3)
    assert torch.equal(xs, x[:3]) and xs.shape == (3, 3, 2, 2)
    assert ys.dtype == torch.long and ys.tolist() == [0, 1, 0]
    xs, ys = first_items(TensorDataset(x, torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32)), 2)
    assert torch.equal(xs, x[:2]) and ys.dtype == torch.long and ys.tolist() == [1, 2]


def test_check_probe_args_returns_the_dataset_and_names_each_bad_argument():
    ds = TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    assert check_probe_args(ds, _perturb, n=1, every=1) is ds
    assert check_probe_args(DataLoader(ds, batch_size=2), _perturb, n=4) is ds
    msg = "^data must be a non-empty Dataset or a DataLoader over one$"
    for bad in (None, TensorDataset(torch.zeros(0, 1)), object(),
                DataLoader(TensorDataset(torch.zeros(0, 1)))):
        with pytest.raises(ValueError, match=msg):
            check_probe_args(bad, _perturb)
    with pytest.raises(ValueError, match=r"^perturb must be a function \(model, x, y, generator\) "
                                         r"-> x_adv, got int$"):
        check_probe_args(ds, 3)
    for bad in (0, -1, True, 1.0, "2", None):
        with pytest.raises(ValueError, match=rf"^every must be an int >= 1, got {bad!r}$"):
            check_probe_args(ds, _perturb, n=2, every=bad)
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):  # the first bad one
        check_probe_args(ds, _perturb, n=0, every=0)


# ---- jsonl -----------------------------------------------------------------------------------


def _trainer(**state):
    base = {"epoch": 1, "step": 4, "batch": {}, "lr": 0.1, "metrics": {}}
    return SimpleNamespace(state=SimpleNamespace(**{**base, **state}))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_log_every_bounds():
    assert MetricsLogger is JSONLCallback
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"^log_every must be >= 1 or None, got {bad}$"):
            JSONLCallback("m.jsonl", log_every=bad)
    assert JSONLCallback("m.jsonl", log_every=1).log_every == 1
    assert JSONLCallback("m.jsonl").log_every is None


def test_jsonl_file_mode_is_0644_less_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "metrics.jsonl"
    JSONLCallback(path).on_epoch_end(_trainer())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask


def test_jsonl_epoch_and_step_lines(tmp_path, monkeypatch):
    path = tmp_path / "a" / "b" / "metrics.jsonl"  # parent folders are created
    monkeypatch.setattr(jsonl.time, "time", lambda: 1234.5)
    cb = JSONLCallback(path, log_every=2)
    for step in (1, 2, 3, 4):
        cb.on_batch_end(_trainer(step=step, batch={"loss": torch.tensor(0.5 * step)}, lr=0.01),
                        None, None)
    cb.on_epoch_end(_trainer(metrics={"train/loss": 1.5, "eval/clean": float("nan"),
                                      "eval/pgd": float("inf"), "n": 7}))
    assert _lines(path) == [
        {"type": "step", "epoch": 1, "step": 2, "train/loss": 1.0, "lr": 0.01},
        {"type": "step", "epoch": 1, "step": 4, "train/loss": 2.0, "lr": 0.01},
        {"type": "epoch", "epoch": 1, "step": 4, "time": 1234.5, "train/loss": 1.5,
         "eval/clean": None, "eval/pgd": None, "n": 7}]
    JSONLCallback(path).on_batch_end(_trainer(), None, None)  # epochs only: no step line
    assert len(_lines(path)) == 3


def test_jsonl_a_failed_append_leaves_no_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    cb = JSONLCallback(path)
    cb.on_epoch_end(_trainer(metrics={"a": 1.0}))
    before = path.read_bytes()
    real = os.write

    def full_disk(fd, data):  # writes a few bytes, then the disk is full
        if len(data) > 5:
            return real(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonl.os, "write", full_disk)
    with pytest.raises(OutputError) as err:
        cb.on_epoch_end(_trainer(epoch=2, metrics={"a": 2.0}))
    assert str(err.value) == (f"cannot write {path}: No space left on device (ENOSPC); its "
                              "earlier lines are intact")
    assert path.read_bytes() == before
    real_truncate = os.ftruncate

    def no_truncate(fd, size):  # the cut-back fails too: the write's own error is reported
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jsonl.os, "ftruncate", no_truncate)
    with pytest.raises(OutputError, match="No space left on device"):
        cb.on_epoch_end(_trainer(epoch=2, metrics={"a": 2.0}))
    monkeypatch.setattr(jsonl.os, "ftruncate", real_truncate)
    path.write_bytes(before)
    monkeypatch.setattr(jsonl.os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    cb.on_epoch_end(_trainer(epoch=3, metrics={"a": math.pi}))  # short writes are completed
    assert _lines(path)[-1]["a"] == math.pi and len(_lines(path)) == 2

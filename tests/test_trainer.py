"""The one Trainer: learning, callback order, checkpoints, clipping, schedules, NaN stop, resume."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    TensorDataset,
)

from robustkit import distributed as dist
from robustkit.attacks.base import AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.cli.progress import ProgressCallback
from robustkit.objectives import AWP, OBJECTIVES, accepted_hparams, create_objective
from robustkit.objectives.base import Objective, ObjectiveOutput
from robustkit.testing import LinearModel, TinyCNN, separable_toy_data
from robustkit.training.callbacks import (
    CheckpointCallback,
    EvalCallback,
    JSONLCallback,
    TensorBoardCallback,
)
from robustkit.training.checkpoint import load_checkpoint, save_checkpoint
from robustkit.training.trainer import NonFiniteLossError, Trainer


# -- helpers (tests/ is not a package: they live here) ---------------------------------------
class CE(Objective):
    """Natural training; a 0-dim and an (N,) metric like real objectives report."""

    def loss(self, x, y, adv, ctx):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        margin = logits.detach().gather(1, y[:, None]).squeeze(1)
        return ObjectiveOutput(loss, logits, {"loss/ce": loss.detach(), "margin": margin})


class FGSMRS(Objective):
    """PGD-AT-like (one random-start FGSM step, Wong et al.): its noise uses the global RNG."""

    def __init__(self, model, eps=0.1):
        super().__init__(model)
        self.eps = eps

    def perturb(self, x, y, ctx):
        was = self.model.training
        self.model.eval()
        delta = (torch.rand_like(x) * 2 - 1) * self.eps
        x0 = (x + delta).clamp(0, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(self.model(x0), y), x0)
        self.model.train(was)
        x_adv = torch.min(torch.max(x0 + 1.25 * self.eps * g.sign(), x - self.eps), x + self.eps)
        eps_i = torch.full((x.shape[0],), self.eps)
        return AttackResult(x_adv.clamp(0, 1).detach(), {"eps": eps_i})

    def loss(self, x, y, adv, ctx):
        logits = self.model(adv.x_adv)
        loss = F.cross_entropy(logits, y)
        return ObjectiveOutput(loss, logits, {"acc_adv": (logits.argmax(1) == y).float().mean(),
                                              "eps_i": adv.info["eps"]})


class Augmented(Dataset):
    """(x, y, idx) with augmentation drawing from torch, Python and NumPy global RNGs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = x + random.uniform(-0.02, 0.02) + float(np.random.uniform(-0.02, 0.02))
        return x.clamp(0, 1), self.y[i], torch.tensor(i)


class Recorder:
    def __init__(self):
        self.events, self.lrs = [], []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_batch_end(self, trainer, out, batch):
        assert isinstance(out, ObjectiveOutput)
        self.events.append("batch")
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, trainer):
        self.events.append("epoch")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


class OnlyEpochs:  # a callback with one method is enough
    def __init__(self):
        self.n = 0

    def on_epoch_end(self, trainer):
        self.n += 1


def toy_loader(n=64, batch_size=16, shuffle=False, with_idx=True):
    x, y = separable_toy_data(n)
    tensors = (x, y, torch.arange(n)) if with_idx else (x, y)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyCNN(in_channels=1, num_classes=2, size=8)


def trainer_for(model, objective=None, epochs=1, lr=0.05, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trainer(model, objective or CE(model), opt, epochs=epochs, **kw)


# -- tests ---------------------------------------------------------------------------------
def test_loss_falls_on_separable_toy_data():
    model = tiny()
    state = trainer_for(model, epochs=3).fit(toy_loader(128, 32, shuffle=True))
    first, last = state.history[0], state.history[-1]
    assert last["train/loss"] < 0.5 * first["train/loss"]
    assert last["train/acc"] > 0.95
    assert state.epoch == 3 and state.step == 3 * 4
    assert state.metrics["train/loss/ce"] == pytest.approx(last["train/loss"])  # objective metric
    assert state.metrics["train/throughput"] > 0 and state.metrics["lr"] == 0.05
    assert state.histograms["margin"].shape == (128,)  # (N,) metrics collected over the epoch


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_epoch_per_objective_and_resume_state(tmp_path, name):
    accepted = accepted_hparams(name)
    hp = {k: v for k, v in {"steps": 2, "k_max": 2}.items() if k in accepted}
    if name == "awp":
        hp["steps"] = 2  # forwarded to its inner PGD-AT
    model = tiny()
    trainer = trainer_for(model, create_objective(name, model, **hp), epochs=1)
    state = trainer.fit(toy_loader(32, 16))
    assert state.epoch == 1 and np.isfinite(state.metrics["train/loss"])
    save_checkpoint(tmp_path / "c.pt", trainer.state_dict())  # objective state is plain data
    fresh = tiny(seed=1)
    again = trainer_for(fresh, create_objective(name, fresh, **hp), epochs=2)
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert again.fit(toy_loader(32, 16)).epoch == 2


def test_the_objectives_per_sample_memory_comes_back_with_the_checkpoint(tmp_path):
    """SRD-DAT with score_ema keeps a per-sample score: the resumed objective holds the saved
    one, not a fresh (empty) memory."""
    model = tiny()
    trainer = trainer_for(model, create_objective("srd_dat", model, k_max=2, score_ema=0.5))
    trainer.fit(toy_loader(32, 16))
    save_checkpoint(tmp_path / "c.pt", trainer.state_dict())
    saved = load_checkpoint(tmp_path / "c.pt")["objective"]
    assert saved and all(v.numel() == 32 for v in saved.values())
    fresh = tiny(seed=1)
    again = trainer_for(fresh, create_objective("srd_dat", fresh, k_max=2, score_ema=0.5))
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    restored = again.objective.state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], v) for k, v in saved.items())


def test_callbacks_fire_in_order_and_any_object_works():
    rec, only = Recorder(), OnlyEpochs()
    trainer_for(tiny(), epochs=2, callbacks=[rec, only]).fit(toy_loader(48, 16))
    epoch = ["batch"] * 3 + ["epoch"]
    assert rec.events == ["fit_start", *epoch, *epoch, "fit_end"]
    assert only.n == 2


def test_a_failing_run_hands_the_error_to_on_exception_and_raises_it():
    """An error inside fit reaches every callback's on_exception (TensorBoard closes its writer
    there), as the error itself, and then propagates."""

    class Boom(CE):
        def loss(self, x, y, adv, ctx):
            if ctx.step == 1:
                raise RuntimeError("boom at step 1")
            return super().loss(x, y, adv, ctx)

    seen = []

    class Watch:
        def on_exception(self, trainer, error):
            seen.append((trainer.state.step, error))

    model = tiny()
    with pytest.raises(RuntimeError, match="boom at step 1") as err:
        trainer_for(model, Boom(model), callbacks=[Watch(), Watch()]).fit(toy_loader(32, 16))
    assert seen == [(1, err.value), (1, err.value)]


class EpochsSeen(DistributedSampler):
    """A DistributedSampler that records the epochs it was set to."""

    def __init__(self, dataset):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        super().set_epoch(epoch)


class Prefetcher:
    """A loader wrapper that is not a DataLoader but exposes its sampler (a CUDA prefetcher)."""

    def __init__(self, loader):
        self.loader, self.sampler = loader, loader.sampler

    def __iter__(self):
        return iter(self.loader)


@pytest.mark.parametrize("shape", ["sampler", "batch_sampler", "wrapper"])
def test_the_distributed_sampler_gets_every_epoch_however_it_is_held(shape):
    """set_epoch(e) before epoch e (a new, reproducible order per epoch) whether the sampler is
    the DataLoader's sampler, inside its batch_sampler, or exposed by a wrapper."""
    x, y = separable_toy_data(32)
    ds = TensorDataset(x, y)
    sampler = EpochsSeen(ds)
    if shape == "batch_sampler":
        loader = DataLoader(ds, batch_sampler=BatchSampler(sampler, 16, drop_last=False))
    else:
        loader = DataLoader(ds, batch_size=16, sampler=sampler)
        loader = Prefetcher(loader) if shape == "wrapper" else loader
    assert trainer_for(tiny(), epochs=3).fit(loader).step == 6
    assert sampler.epochs == [0, 1, 2]


def test_any_iterable_of_batches_is_a_loader():
    """A plain list of (x, y) batches (no sampler, no batch_sampler) trains; on_batch_end gets
    each batch as the loader gave it."""
    x, y = separable_toy_data(32)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    seen = []

    class Batches:
        def on_batch_end(self, trainer, out, batch):
            seen.append(batch)

    assert trainer_for(tiny(), epochs=2, callbacks=[Batches()]).fit(batches).step == 4
    assert len(seen) == 4 and all(a is b for a, b in zip(seen, batches * 2, strict=True))


def test_an_epoch_without_batches_reports_the_lr_it_would_use():
    state = trainer_for(tiny(), lr=0.05).fit([])
    assert state.epoch == 1 and state.step == 0 and state.metrics["lr"] == 0.05


def test_throughput_is_images_per_second_of_the_epoch():
    """train/throughput x the epoch's wall time = its 32 images (the time measured inside fit is
    at most the time around it)."""
    import time

    trainer = trainer_for(tiny())
    start = time.perf_counter()
    state = trainer.fit(toy_loader(32, 16))
    wall = time.perf_counter() - start
    assert 0 < 32 / state.metrics["train/throughput"] <= wall


def test_xy_batches_without_idx_and_ctx():
    seen = []

    class Spy(CE):
        def loss(self, x, y, adv, ctx):
            seen.append((ctx.epoch, ctx.epochs, ctx.step, ctx.idx))
            return super().loss(x, y, adv, ctx)

    model = tiny()
    trainer_for(model, Spy(model), epochs=2).fit(toy_loader(32, 16, with_idx=False))
    assert [(e, s) for e, _, s, _ in seen] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert all(t == 2 and idx is None for _, t, _, idx in seen)
    seen.clear()  # (x, y, idx) batches: ctx.idx is the batch's dataset indices
    trainer_for(model, Spy(model), epochs=1).fit(toy_loader(32, 16))
    assert [idx.tolist() for *_, idx in seen] == [list(range(16)), list(range(16, 32))]


def test_a_parameter_without_a_gradient_in_a_step_is_not_moved_by_it():
    """Gradients are cleared to None before each step, so SGD's momentum does not carry a
    parameter that the step's loss does not reach (a head used by the first step only)."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 2), nn.Linear(64, 2)

        def forward(self, x):
            return self.a(x.flatten(1))

    class FirstStepUsesB(CE):
        def loss(self, x, y, adv, ctx):
            out = super().loss(x, y, adv, ctx)
            if ctx.step == 0:
                extra = self.model.b(x.flatten(1)).square().mean()
                return ObjectiveOutput(out.loss + extra, out.logits, out.metrics)
            return out

    torch.manual_seed(0)
    model = TwoHeads()
    moved = []

    class WatchB:
        def on_batch_end(self, trainer, out, batch):
            moved.append(model.b.weight.detach().clone())

    initial = model.b.weight.detach().clone()
    trainer_for(model, FirstStepUsesB(model), epochs=1, callbacks=[WatchB()]).fit(
        toy_loader(48, 16))
    assert not torch.equal(initial, moved[0])  # the first step moved it, no other did
    assert torch.equal(moved[0], moved[1]) and torch.equal(moved[1], moved[2])


class Scores:
    """A fake held-out evaluation: ``eval/pgd20`` of each epoch in turn."""

    def __init__(self, *values):
        self.values = iter(values)

    def on_epoch_end(self, trainer):
        trainer.state.metrics["eval/pgd20"] = next(self.values)


def test_a_resumed_run_keeps_the_best_so_far(tmp_path, caplog):
    """best and best_epoch come back with last.pt: after the resume, an epoch scoring below the
    interrupted run's best does not replace best.pt."""
    first = trainer_for(tiny(), epochs=1, callbacks=[Scores(0.5), CheckpointCallback(tmp_path)])
    first.fit(toy_loader(32, 16))
    again = trainer_for(tiny(seed=1), epochs=2,
                        callbacks=[Scores(0.3), CheckpointCallback(tmp_path)])
    again.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    assert (again.state.best, again.state.best_epoch) == (0.5, 1)
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks"):
        state = again.fit(toy_loader(32, 16))
    assert (state.best, state.best_epoch) == (0.5, 1)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert _said(caplog) == []  # best.pt holds the epoch last.pt calls best: nothing to say


def test_a_resume_of_a_run_that_never_reported_the_monitor_has_no_best_epoch(tmp_path, caplog):
    """No eval/pgd20 in any epoch (no held-out evaluation): the run says so, and after the
    resume there is still no best (no best.pt, best and best_epoch None in last.pt)."""
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        trainer_for(tiny(), epochs=1, callbacks=[CheckpointCallback(tmp_path)]).fit(
            toy_loader(32, 16))
    assert caplog.messages == ["monitor 'eval/pgd20' was never reported: best.pt not written"]
    again = trainer_for(tiny(seed=1), epochs=2, callbacks=[CheckpointCallback(tmp_path)])
    again.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    state = again.fit(toy_loader(32, 16))
    assert (state.best, state.best_epoch) == (None, None)
    last = load_checkpoint(tmp_path / "last.pt")
    assert (last["epoch"], last["best"], last["best_epoch"]) == (2, None, None)
    assert not (tmp_path / "best.pt").exists()


def test_an_old_checkpoint_whose_history_lacks_the_best_adopts_best_pt(tmp_path, caplog):
    """A last.pt written before best_epoch existed, whose history does not hold the best value
    (trimmed): the best epoch is taken from best.pt, which holds that value."""
    trainer_for(tiny(), epochs=1, callbacks=[Scores(0.5), CheckpointCallback(tmp_path)]).fit(
        toy_loader(32, 16))
    state = load_checkpoint(tmp_path / "last.pt")
    del state["best_epoch"]
    state["history"][0].pop("eval/pgd20")
    save_checkpoint(tmp_path / "last.pt", state)
    again = trainer_for(tiny(seed=1), epochs=2,
                        callbacks=[Scores(0.3), CheckpointCallback(tmp_path)])
    again.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        done = again.fit(toy_loader(32, 16))
    assert (done.best, done.best_epoch) == (0.5, 1)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert _said(caplog) == []  # best.pt holds the best value: adopted, nothing lost
    (tmp_path / "best.pt").unlink()  # and without best.pt that best is forgotten
    again = trainer_for(tiny(seed=1), epochs=2, callbacks=[CheckpointCallback(tmp_path)])
    again.load_state_dict(state)
    assert again.fit(toy_loader(32, 16)).best is None


@pytest.mark.parametrize("kw, match", [
    ({"every": 0}, r"^every must be an int >= 1, got 0$"),
    ({"every": 2.5}, r"^every must be an int >= 1, got 2\.5$"),
    ({"mode": "maximum"}, r"^mode must be 'max' or 'min', got 'maximum'$"),
    ({"config": {"seed": 0, "data": {"root": object()}}},
     r"^config\['data'\]\['root'\] is a object: checkpoints hold only"),
])
def test_checkpoint_callback_refuses_bad_arguments_naming_them(tmp_path, kw, match):
    """Refused when built, not after the first epoch's training (a config that cannot be
    saved would otherwise fail at the first checkpoint)."""
    with pytest.raises(ValueError, match=match):
        CheckpointCallback(tmp_path, **kw)


class ByEpoch:
    """A fake held-out evaluation: ``eval/pgd20`` = ``scores[epoch]`` where given."""

    def __init__(self, scores):
        self.scores = scores

    def on_epoch_end(self, trainer):
        if trainer.state.epoch in self.scores:
            trainer.state.metrics["eval/pgd20"] = self.scores[trainer.state.epoch]


def _run_to(tmp_path, epochs, scores, resume=True):
    """Train to ``epochs`` in ``tmp_path`` (resumed from its last.pt when ``resume``)."""
    trainer = trainer_for(tiny(), epochs=epochs, callbacks=[ByEpoch(scores),
                                                            CheckpointCallback(tmp_path)])
    if resume:
        trainer.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    return trainer.fit(toy_loader(32, 16))


def _held(tmp_path):
    best = load_checkpoint(tmp_path / "best.pt")
    return best["epoch"], best["best"]


def _said(caplog):
    """What CheckpointCallback logged (its reconciling of best.pt on resume, in full)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "robustkit.training.callbacks.checkpoint"]


def test_resume_adopts_a_newer_best_pt(tmp_path, caplog):
    """Killed between best.pt (epoch 2) and last.pt (still epoch 1): the resume adopts best.pt,
    says so, and later epochs that score lower leave it."""
    _run_to(tmp_path, 1, {1: 0.3}, resume=False)
    epoch1 = (tmp_path / "last.pt").read_bytes()
    _run_to(tmp_path, 2, {2: 0.5})
    (tmp_path / "last.pt").write_bytes(epoch1)
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 3, {2: 0.4, 3: 0.45})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 2 (eval/pgd20 = 0.5000), written by the "
        "interrupted run after the resumed checkpoint (epoch 1): adopted as the best so far"]
    assert (state.best, state.best_epoch) == (0.5, 2) and _held(tmp_path) == (2, 0.5)


@pytest.mark.parametrize("old_format", [False, True])
def test_resume_rewrites_a_stale_or_missing_best_pt_from_the_resumed_best_epoch(
        tmp_path, caplog, old_format):
    """last.pt is the best epoch (2) but best.pt holds epoch 1 (the old write order killed
    between the writes), or is gone: it is rewritten from the resumed state. A checkpoint of
    that era has no best_epoch (old_format): it is found in the history."""
    _run_to(tmp_path, 1, {1: 0.3}, resume=False)
    best1 = (tmp_path / "best.pt").read_bytes()
    _run_to(tmp_path, 2, {2: 0.5})
    (tmp_path / "best.pt").write_bytes(best1)
    if old_format:
        state = load_checkpoint(tmp_path / "last.pt")
        del state["best_epoch"]
        save_checkpoint(tmp_path / "last.pt", state)
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 2, {})  # nothing left to train: only the reconciling
    # (and no "monitor never reported": epochs 1 and 2 reported it, before the resume)
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 1, not epoch 2 which the resumed checkpoint calls "
        "best (eval/pgd20 = 0.5000): rewritten from it"]
    assert (state.best, state.best_epoch) == (0.5, 2) and _held(tmp_path) == (2, 0.5)
    assert _same_weights(tmp_path / "best.pt", _weights_of(tmp_path / "last.pt"))
    (tmp_path / "best.pt").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks"):
        _run_to(tmp_path, 2, {})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} written from the resumed checkpoint, the best epoch so far "
        "(2, eval/pgd20 = 0.5000)"]
    assert _held(tmp_path) == (2, 0.5)


def test_resume_keeps_a_best_pt_of_another_epoch_when_the_best_weights_are_lost(tmp_path,
                                                                                caplog):
    """The state calls epoch 1 best, best.pt holds epoch 2 (same score) and epoch 1's weights
    are nowhere: best.pt is kept as the best so far, with a warning."""
    _run_to(tmp_path, 2, {1: 0.5, 2: 0.5}, resume=False)
    assert _held(tmp_path) == (1, 0.5)
    (tmp_path / "best.pt").write_bytes((tmp_path / "last.pt").read_bytes())  # epoch 2
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 3, {3: 0.4})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 2 (eval/pgd20 = 0.5000), not epoch 1 which the "
        "resumed checkpoint calls best (0.5000): those weights are lost; best.pt is kept as the "
        "best so far"]
    assert (state.best, state.best_epoch) == (0.5, 2) and _held(tmp_path) == (2, 0.5)


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_resume_without_a_usable_best_pt_restarts_best_tracking(tmp_path, caplog, damage):
    """best.pt of the best epoch (1, not the resumed 2) is gone or unreadable: the best so far
    is forgotten and the next evaluated epoch writes a new best.pt."""
    _run_to(tmp_path, 2, {1: 0.5, 2: 0.3}, resume=False)
    best = tmp_path / "best.pt"
    if damage == "missing":
        best.unlink()
    else:
        best.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 3, {3: 0.4})
    unreadable = [f"{best} is unreadable (checkpoint {best} is corrupt: not a torch checkpoint "
                  "(it starts with b'not '))"] if damage == "unreadable" else []
    assert _said(caplog) == [*unreadable, (
        f"{best} is missing or unreadable: the best so far (eval/pgd20 = 0.5000 at epoch 1) is "
        "forgotten and the next evaluated epoch writes a new best.pt")]
    assert (state.best, state.best_epoch) == (0.4, 3) and _held(tmp_path) == (3, 0.4)


@pytest.mark.parametrize("score", [None, float("nan")])
def test_resume_rewrites_a_best_pt_without_a_finite_score(tmp_path, caplog, score):
    """best.pt holds the best epoch (2) but no finite score (None, NaN): it is not trusted as
    the best, and is rewritten from the resumed state, which is that epoch."""
    _run_to(tmp_path, 2, {1: 0.3, 2: 0.5}, resume=False)
    best = load_checkpoint(tmp_path / "best.pt")
    best["best"] = score
    save_checkpoint(tmp_path / "best.pt", best)
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 2, {})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 2, not epoch 2 which the resumed checkpoint calls "
        "best (eval/pgd20 = 0.5000): rewritten from it"]
    assert (state.best, state.best_epoch) == (0.5, 2) and _held(tmp_path) == (2, 0.5)


def test_other_ranks_take_rank_0s_decision_on_best_pt_without_reading_it(tmp_path,
                                                                         monkeypatch):
    """On resume only rank 0 reads best.pt (other nodes may not see the folder); every rank
    applies the action rank 0 gathered to them."""
    _run_to(tmp_path, 2, {1: 0.3, 2: 0.5}, resume=False)
    cb = CheckpointCallback(tmp_path)
    trainer = trainer_for(tiny(), epochs=3, callbacks=[cb])
    trainer.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [("adopt", 0.7, 3), obj])
    monkeypatch.setattr(CheckpointCallback, "_best_action",
                        lambda self, s: pytest.fail("a rank other than 0 read best.pt"))
    cb.on_fit_start(trainer)
    assert (trainer.state.best, trainer.state.best_epoch) == (0.7, 3)


def test_resume_keeps_its_own_best_over_a_newer_but_worse_best_pt(tmp_path, caplog):
    """best.pt holds a later epoch (2) than the resumed one (1) but scores lower (0.3 < 0.5): not
    adopted; the resumed state is the best epoch, and best.pt is rewritten from it."""
    _run_to(tmp_path, 1, {1: 0.5}, resume=False)
    epoch1 = (tmp_path / "last.pt").read_bytes()
    _run_to(tmp_path, 2, {2: 0.3})
    later = load_checkpoint(tmp_path / "last.pt")
    later["best"] = 0.3
    save_checkpoint(tmp_path / "best.pt", later)
    (tmp_path / "last.pt").write_bytes(epoch1)
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 1, {})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 2, not epoch 1 which the resumed checkpoint calls "
        "best (eval/pgd20 = 0.5000): rewritten from it"]
    assert (state.best, state.best_epoch) == (0.5, 1) and _held(tmp_path) == (1, 0.5)


def test_a_better_best_pt_of_the_resumed_epoch_is_not_called_newer(tmp_path, caplog):
    """best.pt holds the resumed epoch itself (2) with a better score than the state's best
    (epoch 1): it is not "written after the resumed checkpoint"; the state's best epoch is
    lost and best.pt is kept, with that warning."""
    _run_to(tmp_path, 2, {1: 0.5, 2: 0.3}, resume=False)
    same = load_checkpoint(tmp_path / "last.pt")
    same["best"] = 0.6
    save_checkpoint(tmp_path / "best.pt", same)
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        state = _run_to(tmp_path, 2, {})
    assert _said(caplog) == [
        f"{tmp_path / 'best.pt'} holds epoch 2 (eval/pgd20 = 0.6000), not epoch 1 which the "
        "resumed checkpoint calls best (0.5000): those weights are lost; best.pt is kept as the "
        "best so far"]
    assert (state.best, state.best_epoch) == (0.6, 2)


def test_an_unreadable_best_pt_is_named_with_its_reason_cut_to_200_characters(tmp_path,
                                                                               caplog):
    out = tmp_path / ("d" * 150)  # the reason names the path: well over 200 characters
    _run_to(out, 2, {1: 0.5, 2: 0.3}, resume=False)
    (out / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        load_checkpoint(out / "best.pt")
    reason = " ".join(str(err.value).split())
    assert len(reason) > 200
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        _run_to(out, 2, {})
    assert _said(caplog)[0] == f"{out / 'best.pt'} is unreadable ({reason[:200]})"


def _weights_of(path):
    model = tiny()
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def test_a_resume_with_no_epoch_left_reports_the_checkpoints_final_metrics(tmp_path):
    """Resumed from the last.pt of a finished run, fit trains nothing and its state holds the
    final epoch's metrics (what the CLI's summary and TensorBoard's hparams read); a checkpoint
    of an untrained run resumes with none."""
    t = trainer_for(tiny(), epochs=2, callbacks=[Scores(0.3, 0.4)])
    t.fit(toy_loader(32, 16))
    save_checkpoint(tmp_path / "c.pt", t.state_dict())
    again = trainer_for(tiny(seed=1), epochs=2)
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    state = again.fit(toy_loader(32, 16))
    assert state.epoch == 2 and state.step == 4
    assert state.metrics == t.state.history[-1] and state.metrics["eval/pgd20"] == 0.4
    save_checkpoint(tmp_path / "untrained.pt", trainer_for(tiny()).state_dict())
    fresh = trainer_for(tiny(seed=1))
    fresh.load_state_dict(load_checkpoint(tmp_path / "untrained.pt"))
    assert (fresh.state.epoch, fresh.state.metrics, fresh.state.history) == (0, {}, [])


def test_the_trainer_runs_where_the_model_is_unless_told():
    """device=None takes the model's device (a model on the meta device stands in for a GPU);
    a model without parameters trains on the CPU; an explicit device moves the model."""
    model = tiny().to("meta")
    assert trainer_for(model).device == torch.device("meta")
    model = tiny()  # an explicit device wins, and the model is moved there
    assert trainer_for(model, device="meta").device == torch.device("meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    bare = nn.Flatten()
    t = Trainer(bare, CE(bare), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                epochs=1)
    assert t.device == torch.device("cpu")


def test_best_and_last_written(tmp_path):
    scores = iter([0.3, 0.5, 0.4])

    class FakeEval:
        def on_epoch_end(self, trainer):
            trainer.state.metrics["eval/pgd20"] = next(scores)

    cbs = [FakeEval(), CheckpointCallback(tmp_path, config={"lr": 0.05, "name": "toy"}),
           JSONLCallback(tmp_path / "metrics.jsonl")]
    state = trainer_for(tiny(), epochs=3, callbacks=cbs).fit(toy_loader(32, 16))
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert (last["epoch"], best["epoch"]) == (3, 2)
    assert best["metrics"]["eval/pgd20"] == 0.5 and state.best == 0.5 == last["best"]
    assert state.best_epoch == 2 == last["best_epoch"] == best["best_epoch"]  # where best.pt is
    assert last["config"] == {"lr": 0.05, "name": "toy"} and "torch" in last["versions"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [r["eval/pgd20"] for r in lines] == [0.3, 0.5, 0.4]


@pytest.mark.parametrize("scores, warned", [([0.30, 0.45, 0.05, 0.04], True),
                                             ([0.30, 0.45, 0.40, 0.38], False),
                                             ([0.10, 0.15, 0.06, 0.07], False)])
def test_a_collapse_of_held_out_robustness_is_warned_and_best_pt_keeps_the_good_epoch(
        tmp_path, caplog, scores, warned):
    """Catastrophic overfitting (Wong et al. 2020): the held-out PGD accuracy falls below half
    its best and by >= 10 points -> a warning; best.pt stays at the good epoch. Noise (a few
    points) and small absolute drops on a weak model are not collapses."""
    it = iter(scores)

    class FakeEval:
        def on_epoch_end(self, trainer):
            trainer.state.metrics["eval/pgd20"] = next(it)

    cbs = [FakeEval(), CheckpointCallback(tmp_path)]
    with caplog.at_level("WARNING", logger="robustkit.training.callbacks"):
        trainer_for(tiny(), epochs=4, callbacks=cbs).fit(toy_loader(32, 16))
    assert ("catastrophic overfitting" in caplog.text) == warned
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2


@pytest.mark.parametrize("mode, scores, warned", [
    ("max", [0.6, 0.3], False),  # exactly half the best: not below it
    ("max", [0.6, 0.29], True),  # just below half, 31 points down
    ("max", [0.6, 0.4], False),  # 20 points down but above half (0.3)
    ("max", [0.14, 0.04], True),  # exactly 10 points down (0.14 - 0.04 == 0.1), below half
    ("max", [0.6, float("nan")], False),  # no number: not a fall
    ("max", [0.6, float("-inf")], False),
    ("min", [0.2, 0.9], False),  # the watch is for accuracies (mode max) only
])
def test_the_collapse_watch_edges(tmp_path, caplog, mode, scores, warned):
    cbs = [Scores(*scores), CheckpointCallback(tmp_path, mode=mode)]
    with caplog.at_level("WARNING", logger="robustkit.training.callbacks"):
        trainer_for(tiny(), epochs=2, callbacks=cbs).fit(toy_loader(32, 16))
    assert ("catastrophic overfitting" in caplog.text) == warned
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_checkpoint_callback_logs_in_full(tmp_path, caplog):
    """The best.pt line of each improvement and the collapse warning, every field in place."""
    cbs = [Scores(0.6, 0.7, 0.2), CheckpointCallback(tmp_path)]
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks"):
        trainer_for(tiny(), epochs=3, callbacks=cbs).fit(toy_loader(32, 16))
    assert _said(caplog) == [
        "best.pt: eval/pgd20 = 0.6000 at epoch 1",
        "best.pt: eval/pgd20 = 0.7000 at epoch 2",
        "eval/pgd20 fell from 0.7000 (epoch 2) to 0.2000 at epoch 3: catastrophic overfitting? "
        "(Wong et al. 2020, https://arxiv.org/abs/2001.03994) best.pt keeps epoch 2"]


def test_a_monitor_reported_once_is_not_called_never_reported(tmp_path, caplog):
    """Reported at epoch 1 only (a held-out evaluation every few epochs): no 'never reported'."""
    cbs = [ByEpoch({1: 0.5}), CheckpointCallback(tmp_path)]
    with caplog.at_level(logging.WARNING, "robustkit.training.callbacks"):
        trainer_for(tiny(), epochs=2, callbacks=cbs).fit(toy_loader(32, 16))
    assert _said(caplog) == [] and _held(tmp_path) == (1, 0.5)


def test_a_fresh_run_ignores_an_old_best_pt_in_its_folder(tmp_path):
    """Not a resume (epoch 0): an old run's best.pt (0.9) is no best of this run; this run's
    first evaluated epoch writes its own (0.3)."""
    _run_to(tmp_path, 1, {1: 0.9}, resume=False)
    state = _run_to(tmp_path, 1, {1: 0.3}, resume=False)
    assert (state.best, state.best_epoch) == (0.3, 1) and _held(tmp_path) == (1, 0.3)


def test_checkpoints_record_the_versions(tmp_path):
    import platform

    from robustkit import __version__

    _run_to(tmp_path, 1, {1: 0.5}, resume=False)
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / name)["versions"] == {
            "robustkit": __version__, "torch": str(torch.__version__),
            "python": platform.python_version()}


def test_a_checkpoint_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    from robustkit.errors import OutputError
    from robustkit.training.callbacks import checkpoint as ckpt

    def full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", full)
    with pytest.raises(OutputError) as err:
        _run_to(tmp_path, 1, {1: 0.5}, resume=False)
    assert str(err.value) == (f"cannot write {tmp_path / 'best.pt'}: No space left on device "
                              "(ENOSPC); the previous best.pt is intact")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_step_in_which_no_parameter_gets_a_gradient_is_not_a_non_finite_stop(device):
    """A frozen model (the loss reaches only the input): no gradient to check or clip; the
    step runs, changes nothing and is counted."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    class InputOnly(CE):
        def loss(self, x, y, adv, ctx):
            return super().loss(x.clone().requires_grad_(True), y, adv, ctx)

    model = tiny().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in model.parameters()]
    state = trainer_for(model, InputOnly(model)).fit(toy_loader(32, 16))
    assert state.step == 2 and np.isfinite(state.metrics["train/loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_the_gradient_norm_of_a_half_precision_model_is_taken_in_float32():
    """A float16 model whose gradients are finite (3000 each) but whose global norm (3000 x
    sqrt(2000) = 1.3e5) is above float16's largest number (65504) is not stopped as non-finite:
    the norm is accumulated in float32."""

    class Large(Objective):
        def loss(self, x, y, adv, ctx):
            logits = self.model(x.flatten(1).half()).float()
            return ObjectiveOutput((self.model.weight.float() * 3000).sum(), logits, {})

    model = nn.Linear(1000, 2).half()
    x = torch.rand(8, 1000)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    state = trainer_for(model, Large(model), lr=1e-6).fit(loader)
    assert state.step == 2


def test_grad_clip_bounds_the_update():
    x, y = separable_toy_data(16, (3, 8, 8), num_classes=10)
    loader = DataLoader(TensorDataset(x * 50, y), batch_size=16)  # large inputs: large gradients
    deltas = {}
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        model = LinearModel((3, 8, 8), 10)
        before = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: update = -lr * grad
        Trainer(model, CE(model), opt, epochs=1, grad_clip=clip).fit(loader)
        after = nn.utils.parameters_to_vector(model.parameters()).detach()
        deltas[clip] = float((after - before).norm())
    assert deltas[None] > 1.0
    assert deltas[1e-3] == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_scheduler_interval(interval):
    rec, model = Recorder(), tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    Trainer(model, CE(model), opt, sched, epochs=2, scheduler_interval=interval,
            callbacks=[rec]).fit(toy_loader(48, 16))
    if interval == "step":  # after the k-th optimizer step: 0.5**k
        assert rec.lrs == [0.5**k for k in range(1, 7)]
    else:
        assert rec.lrs == [1.0] * 3 + [0.5] * 3


def test_non_finite_loss_stops_before_the_step(tmp_path):
    class NaNAtEpoch1(CE):
        def loss(self, x, y, adv, ctx):
            out = super().loss(x, y, adv, ctx)
            if ctx.epoch == 1:
                out.loss = out.loss * float("nan")
                out.metrics["marker"] = torch.tensor(0.1234567)
            return out

    model = tiny()
    trainer = trainer_for(model, NaNAtEpoch1(model), epochs=3,
                          callbacks=[CheckpointCallback(tmp_path)])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 2 .*loss/ce") as err:
        trainer.fit(toy_loader(32, 16))
    # the batch's metrics (6 decimals) and what to do, in the one line the CLI prints
    assert str(err.value).startswith("non-finite loss nan at epoch 1 step 2 (metrics {")
    assert "'marker': 0.123457}" in str(err.value)
    assert str(err.value).endswith(
        "); stopped before the optimizer step: weights and the last checkpoint are intact; "
        "lower optim.lr, set trainer.grad_clip, or resume from last.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 2
    for k, v in model.named_parameters():  # no optimizer step after the NaN
        assert torch.equal(v, last["model"][k]), k


class Hooks(CE):
    """CE that counts the trainer's after_step and abort_step calls."""

    def __init__(self, model):
        super().__init__(model)
        self.after = self.abort = 0

    def after_step(self):
        self.after += 1

    def abort_step(self):
        self.abort += 1


def test_after_step_follows_every_applied_step_and_abort_step_none():
    model = tiny()
    hooks = Hooks(model)
    trainer_for(model, hooks, epochs=2).fit(toy_loader(32, 16))
    assert (hooks.after, hooks.abort) == (4, 0)


class NaNGrad(torch.autograd.Function):
    """Identity forward, a non-finite backward: a finite loss whose gradients are NaN or inf."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.value), None


class BadAtCall(CE):
    """CE that turns bad at chosen calls of ``loss()`` (counted from 0): its value NaN
    (``bad="loss"``) or its gradients ``value`` with a finite value (``bad="grad"``)."""

    def __init__(self, model, calls, bad, value=float("nan")):
        super().__init__(model)
        self.calls, self.bad, self.value, self.n = set(calls), bad, value, 0

    def loss(self, x, y, adv, ctx):
        call, self.n = self.n, self.n + 1
        logits = self.model(x)
        if call in self.calls and self.bad == "grad":
            logits = NaNGrad.apply(logits, self.value)
        loss = F.cross_entropy(logits, y)
        if call in self.calls and self.bad == "loss":
            loss = loss * float("nan")
        return ObjectiveOutput(loss, logits, {"loss/ce": loss.detach()})


class Snapshot:
    """Keeps the parameters after every batch: those the failing step must leave intact."""

    def on_batch_end(self, trainer, out, batch):
        self.params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _assert_intact(model, snap):
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), snap.params[k]), k  # bitwise
        assert v.grad is None, k


# AWP calls its inner loss twice a step (the ascent at w, then the loss at w + v): calls 2 and 3
# are step 1. Bad at call 3 only: v is finite and the weights sit at w + v when the trainer sees
# the failure; bad at 2 and 3: the ascent gradient is non-finite, so w + v is NaN.
@pytest.mark.parametrize("calls", [(3,), (2, 3)], ids=["at-w+v", "ascent-too"])
def test_awp_non_finite_loss_leaves_the_weights_bitwise_intact(calls):
    model = tiny()
    awp = AWP(model, inner=BadAtCall(model, calls, "loss"), gamma=1e-2)
    snap = Snapshot()
    trainer = trainer_for(model, awp, epochs=1, callbacks=[snap])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* epoch 0 step 1 .*intact"):
        trainer.fit(toy_loader(48, 16))
    _assert_intact(model, snap)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("awp", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_finite_loss_with_non_finite_gradients_stops_before_the_step(value, awp, clip):
    model = tiny()
    # AWP: bad gradients only in the pass at w + v (call 3), so the ascent and v are finite
    inner = BadAtCall(model, (3,) if awp else (1,), "grad", value)
    objective = AWP(model, inner=inner, gamma=1e-2) if awp else inner
    snap = Snapshot()
    trainer = trainer_for(model, objective, epochs=1, callbacks=[snap], grad_clip=clip)
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite gradient norm .* epoch 0 step 1 .*intact"):
        trainer.fit(toy_loader(48, 16))
    assert trainer.state.step == 1
    _assert_intact(model, snap)


def test_fp16_overflow_is_skipped_until_the_loss_scale_reaches_one():
    """fp16: an inf gradient is GradScaler's overflow (step skipped, scale halved) while the scale
    is above 1; at scale 1 it is the model's, and the trainer stops. Exercised on the CPU with a
    CPU GradScaler (the trainer's fp16 logic is device-independent)."""
    model = tiny()
    objective = BadAtCall(model, (1, 2, 3), "grad", float("inf"))
    snap = Snapshot()
    trainer = trainer_for(model, objective, epochs=1, callbacks=[snap])
    trainer.amp, trainer.scaler = "fp16", torch.amp.GradScaler("cpu", init_scale=4.0)
    trainer._autocast = contextlib.nullcontext  # float32 forward: only the scaler is under test
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm .* step 3 "):
        trainer.fit(toy_loader(80, 16))
    assert trainer.scaler.get_scale() == 1.0  # 4 -> 2 -> 1 over the two skipped steps
    _assert_intact(model, snap)  # steps 1 and 2 were skipped: still the weights after step 0


class DtypeSpy(CE):
    """CE that records each forward's logits dtype and whether autocast was on."""

    def __init__(self, model):
        super().__init__(model)
        self.seen = set()

    def loss(self, x, y, adv, ctx):
        out = super().loss(x, y, adv, ctx)
        self.seen.add((out.logits.dtype, torch.is_autocast_enabled(x.device.type)))
        return out


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_ignored_on_cpu_with_warning(caplog, amp):
    """amp on the CPU is accepted and ignored: the forward runs in float32, outside any
    autocast."""
    model = tiny()
    spy = DtypeSpy(model)
    with caplog.at_level(logging.WARNING, logger="robustkit.training.trainer"):
        trainer = trainer_for(model, spy, amp=amp, device="cpu")
    assert trainer.amp == "off"
    assert caplog.messages == [f"amp={amp!r} ignored on cpu: training stays float32"]
    trainer.fit(toy_loader(32, 16))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert spy.seen == {(torch.float32, False)}
    # channels_last is a CUDA speed-up: on the CPU the conv weights keep their layout
    assert not trainer.channels_last and model.features[0].weight.is_contiguous()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustkit.training.trainer"):
        trainer_for(tiny(), amp="off", device="cpu")
    assert caplog.messages == []  # nothing was asked for, nothing is ignored


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(amp="fp32"), dict(grad_clip=0.0),
                                dict(scheduler_interval="batch")])
def test_bad_arguments_raise(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        trainer_for(tiny(), **{"epochs": 1, **kw})


def _resume_run(tmp_path, kill_after_first: bool):
    """Train 2 epochs of FGSM-RS on an augmented, (seed, epoch)-shuffled loader."""
    x, y = separable_toy_data(96, (1, 8, 8))
    ds = Augmented(x, y)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=7)
    loader = DataLoader(ds, batch_size=16, sampler=sampler)

    def build(seed):
        torch.manual_seed(seed)
        model = TinyCNN(1, 2, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)
        return model, opt, sched

    class Kill:
        def on_epoch_end(self, trainer):
            if kill_after_first:
                raise KeyboardInterrupt  # after CheckpointCallback wrote last.pt

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, opt, sched = build(0)
    ckpt = CheckpointCallback(tmp_path)
    trainer = Trainer(model, FGSMRS(model), opt, sched, epochs=2, callbacks=[ckpt, Kill()])
    if not kill_after_first:
        trainer.fit(loader)
        return model, trainer
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(loader)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # the restore must undo this
    model, opt, sched = build(123)  # different initial weights: the load must replace them
    trainer = Trainer(model, FGSMRS(model), opt, sched, epochs=2, callbacks=[ckpt])
    trainer.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    assert trainer.state.epoch == 1
    trainer.fit(loader)
    return model, trainer


def test_kill_and_resume_is_exact(tmp_path):
    straight, t1 = _resume_run(tmp_path / "a", kill_after_first=False)
    resumed, t2 = _resume_run(tmp_path / "b", kill_after_first=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert t1.state.step == t2.state.step == 12
    assert t1.optimizer.param_groups[0]["lr"] == t2.optimizer.param_groups[0]["lr"]
    # Same epoch means (the first epoch's came back from the checkpoint); throughput is timing.
    drop = "train/throughput"
    assert [{k: v for k, v in h.items() if k != drop} for h in t1.state.history] == [
        {k: v for k, v in h.items() if k != drop} for h in t2.state.history
    ]


def test_tensorboard_event_tags(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea  # a core dependency
    model = tiny()
    holdout = toy_loader(16, 8)
    cbs = [EvalCallback(holdout, lambda m: {"pgd20": PGD(m, eps=0.05, alpha=0.0125, steps=20)}),
           TensorBoardCallback(tmp_path / "tb", config_text="epochs: 2\nlr: 0.05", log_every=2,
                               hparams={"optim": {"lr": 0.05}, "objective": "fgsm_rs"})]
    trainer_for(model, FGSMRS(model), epochs=2, callbacks=cbs).fit(toy_loader(48, 16))
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["train/loss", "train/acc", "train/acc_adv", "lr", "train/throughput",
                "eval/clean", "eval/pgd20", "epoch/loss", "hparam/eval/pgd20"]:
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert "hist/eps_i" in tags["histograms"]
    assert "config/text_summary" in tags["tensors"]
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3, 5]  # log_every=2 from step 1
    assert [e.step for e in acc.Scalars("eval/pgd20")] == [3, 6]


def test_progress_callback_writes_epoch_lines():
    buf = io.StringIO()
    trainer_for(tiny(), epochs=2, callbacks=[ProgressCallback(file=buf)]).fit(toy_loader(32, 16))
    text = buf.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "train/loss=" in text


def test_resume_refuses_scheduler_mismatch(tmp_path):
    model = tiny()
    t = trainer_for(model)
    save_checkpoint(tmp_path / "c.pt", t.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    t2 = Trainer(model, CE(model), opt, sched, epochs=1)
    with pytest.raises(ValueError, match="^scheduler: the checkpoint and this trainer disagree "
                                         "on having one$"):
        t2.load_state_dict(load_checkpoint(tmp_path / "c.pt"))


def test_a_cpu_trainer_is_built_without_a_warning_and_holds_no_loader_yet():
    """On the CPU nothing of CUDA is switched on: no channels_last, amp off, a disabled loss
    scaler (GradScaler warns when asked to scale without CUDA), and no warning at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = trainer_for(TinyCNN(in_channels=3, num_classes=2, size=8))
    assert (trainer.channels_last, trainer.amp, trainer.scaler.is_enabled()) == (False, "off",
                                                                                False)
    assert trainer.loader is None  # set by fit()


class _Beats:
    """Stands in for robustkit.heartbeat.Heartbeat in the trainer: records what each epoch's
    heartbeat was told."""

    made: list = []

    def __init__(self, what, total=None, *, unit="points"):
        self.row = [what, total, unit, 0]
        _Beats.made.append(self.row)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k=1):
        self.row[3] += k


def test_each_epoch_beats_once_per_batch_unless_a_bar_is_shown(monkeypatch):
    """A heartbeat per epoch on rank 0 ("epoch e/E", the loader's batch count, one beat per
    batch); none when a callback shows a progress bar, or on another rank; no total for a
    loader without a length."""
    from robustkit.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Heartbeat", _Beats)
    monkeypatch.setattr(_Beats, "made", [])
    trainer_for(tiny(), epochs=2, callbacks=[ByEpoch({})]).fit(toy_loader(48, 16))
    assert _Beats.made == [["epoch 1/2", 3, "batches", 3], ["epoch 2/2", 3, "batches", 3]]

    class Bar:
        shows_bar = True

    _Beats.made.clear()
    trainer_for(tiny(), epochs=1, callbacks=[Bar()]).fit(toy_loader(48, 16))
    assert _Beats.made == []

    def unsized():
        yield from toy_loader(32, 16)

    trainer_for(tiny(), epochs=1).fit(unsized())
    assert _Beats.made == [["epoch 1/1", None, "batches", 2]]
    _Beats.made.clear()
    monkeypatch.setattr(dist, "is_main", lambda: False)
    trainer_for(tiny(), epochs=1).fit(toy_loader(48, 16))
    assert _Beats.made == []


def test_cpu_batches_keep_their_memory_format():
    """channels_last is for CUDA conv nets only: on the CPU a 4-D batch of a conv model reaches
    the objective as it came (contiguous), with its labels and indices."""
    seen = set()

    class Layout(CE):
        def loss(self, x, y, adv, ctx):
            seen.add((x.device.type, x.is_contiguous(),
                      x.is_contiguous(memory_format=torch.channels_last),
                      tuple(ctx.idx.tolist()[:2])))
            return super().loss(x, y, adv, ctx)

    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=2, size=8)
    x, y = separable_toy_data(16, (3, 8, 8))
    loader = DataLoader(TensorDataset(x, y, torch.arange(16)), batch_size=16)
    trainer = trainer_for(model, Layout(model))
    assert trainer.channels_last is False
    trainer.fit(loader)
    assert seen == {("cpu", True, False, (0, 1))}


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_amp_channels_last_and_clip(amp):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny().cuda()
    spy = DtypeSpy(model)
    trainer = trainer_for(model, spy, epochs=3, amp=amp, grad_clip=1.0)
    assert trainer.amp == amp and trainer.channels_last
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    state = trainer.fit(toy_loader(128, 32, shuffle=True))
    half = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert spy.seen == {(half, amp != "off")}  # the forward ran under autocast in that dtype
    assert state.history[-1]["train/loss"] < 0.5 * state.history[0]["train/loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not .half()
    if amp == "fp16":  # GradScaler in use: its scale is part of the resume state
        assert trainer.state_dict()["scaler"]["scale"] > 0
    else:  # no loss scaling without fp16: nothing to resume
        assert trainer.state_dict()["scaler"] == {}


@pytest.mark.gpu
def test_cuda_conv_batches_arrive_on_the_device_in_channels_last():
    """On CUDA a conv model trains in channels_last and its 4-D batches are moved there in
    that layout (3 channels: a 1-channel batch is both layouts at once); labels and indices
    are moved too."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seen = set()

    class Layout(CE):
        def loss(self, x, y, adv, ctx):
            seen.add((x.device.type, x.is_contiguous(memory_format=torch.channels_last),
                      x.is_contiguous(), y.device.type, ctx.idx.device.type))
            return super().loss(x, y, adv, ctx)

    torch.manual_seed(0)
    model = TinyCNN(in_channels=3, num_classes=2, size=8).cuda()
    x, y = separable_toy_data(32, (3, 8, 8))
    loader = DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=16)
    trainer_for(model, Layout(model)).fit(loader)
    assert seen == {("cuda", True, False, "cuda", "cuda")}


@pytest.mark.gpu
def test_cuda_fp16_resume_takes_back_the_loss_scale(tmp_path):
    """fp16: GradScaler's scale is part of the checkpoint and a resume restores it (a fresh
    scaler would restart at 2**16 and skip steps recalibrating)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    trainer = trainer_for(tiny().cuda(), amp="fp16")
    trainer.fit(toy_loader(32, 16))
    trainer.scaler.update(1024.0)
    save_checkpoint(tmp_path / "c.pt", trainer.state_dict())
    again = trainer_for(tiny(seed=1).cuda(), amp="fp16", epochs=2)
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    assert again.scaler.get_scale() == 1024.0


@pytest.mark.gpu
def test_cuda_fp16_skipped_steps_call_abort_step_not_after_step():
    """A step GradScaler skips (inf scaled gradients, scale > 1) is abandoned: the objective
    gets abort_step (AWP puts w back), never after_step (which keeps an update there was not)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    class InfHooks(Hooks):
        calls = 0

        def loss(self, x, y, adv, ctx):
            self.calls += 1
            out = super().loss(x, y, adv, ctx)
            if ctx.step >= 1:
                logits = NaNGrad.apply(out.logits, float("inf"))
                return ObjectiveOutput(F.cross_entropy(logits, y), logits, {})
            return out

    model = tiny().cuda()
    hooks = InfHooks(model)
    with pytest.raises(NonFiniteLossError):
        trainer_for(model, hooks, epochs=1, amp="fp16").fit(toy_loader(16 * 24, 16))
    # step 0 applied (or skipped by a real overflow at 2**16), then 16 skipped steps halve the
    # scale to 1 and the next one raises (abort_step on the way out): one hook per step
    assert hooks.after <= 1 and hooks.abort >= 17
    assert hooks.after + hooks.abort == hooks.calls


@pytest.mark.gpu
def test_cuda_fp16_persistent_inf_gradients_stop_at_scale_one():
    """Real fp16 autocast and GradScaler (init scale 2**16): skipped steps halve the scale to 1,
    then the trainer stops, with the weights of the last real step (step 0, unless a real
    overflow at 2**16 skipped that one too: the step number is not pinned)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny().cuda()
    objective = BadAtCall(model, range(1, 1000), "grad", float("inf"))
    snap = Snapshot()
    trainer = trainer_for(model, objective, epochs=1, amp="fp16", callbacks=[snap])
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm .* step 1[67] "):
        trainer.fit(toy_loader(16 * 24, 16))
    assert trainer.scaler.get_scale() == 1.0
    _assert_intact(model, snap)


@pytest.mark.slow
def test_sample_mnist_pgd_at_beats_natural_under_attack(tmp_path):
    """Real data through the real stack: 2 epochs each on the shipped MNIST sample (CPU minutes)."""
    from robustkit.data import build_loaders
    from robustkit.models import create_model
    from robustkit.objectives import create_objective

    loaders = build_loaders("sample-mnist", batch_size=128, holdout=500)
    info, results = loaders.info, {}
    for name, hp in [("natural", {}), ("pgd_at", dict(eps=0.3, alpha=0.1, steps=5))]:
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10, mean=info.mean, std=info.std,
                             in_channels=1, input_size=28)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cbs = [EvalCallback(loaders.holdout,
                            lambda m: {"pgd10": PGD(m, eps=0.3, alpha=0.1, steps=10)},
                            max_batches=2),
               CheckpointCallback(tmp_path / name, monitor="eval/pgd10")]
        state = Trainer(model, create_objective(name, model, **hp), opt, epochs=2,
                        callbacks=cbs).fit(loaders.train)
        assert state.history[-1]["train/loss"] < state.history[0]["train/loss"]
        assert (tmp_path / name / "best.pt").exists()
        results[name] = state.metrics
    assert results["natural"]["eval/clean"] > 0.85
    assert results["pgd_at"]["eval/pgd10"] > results["natural"]["eval/pgd10"] + 0.1


@pytest.mark.gpu
def test_cuda_fp16_clips_the_true_gradients():
    """fp16: the gradients are unscaled before they are checked and clipped, so each applied
    step moves the weights by grad_clip (not grad_clip / loss scale); steps GradScaler skips
    (an overflow of the scaled gradients) move nothing."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, y = separable_toy_data(64, (3, 8, 8), num_classes=10)
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).cuda()
    before = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: update = -lr * grad
    steps = []

    class Moves:
        def on_batch_end(self, trainer, out, batch):
            steps.append(nn.utils.parameters_to_vector(model.parameters()).detach().clone())

    Trainer(model, CE(model), opt, epochs=1, amp="fp16", grad_clip=1e-3,
            callbacks=[Moves()]).fit(DataLoader(TensorDataset(x, y), batch_size=16))
    moves = [float((b - a).norm()) for a, b in zip([before, *steps], steps, strict=False)]
    applied = [m for m in moves if m > 0]
    assert applied and all(m == pytest.approx(1e-3, rel=1e-2) for m in applied), moves


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_the_logged_lr_is_the_one_each_step_and_epoch_used(tmp_path, interval):
    """A schedule that changes the lr every epoch: the jsonl step and epoch lines, TensorBoard's
    lr curve and state.history all show the lr the optimizer stepped with (read before the
    scheduler steps), never the next one (#18 c)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if interval == "step":  # per-step scheduler, constant within an epoch of 2 steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** (k // 2))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    used = []  # the lr of every optimizer.step(), as it ran
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    cbs = [JSONLCallback(tmp_path / "metrics.jsonl", log_every=1),
           TensorBoardCallback(tmp_path / "tb", log_every=1)]
    state = Trainer(model, CE(model), opt, sched, epochs=3, scheduler_interval=interval,
                    callbacks=cbs).fit(toy_loader(32, 16))
    assert used == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert [h["lr"] for h in state.history] == [1.0, 0.5, 0.25]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in lines if r["type"] == "step"] == used
    assert [r["lr"] for r in lines if r["type"] == "epoch"] == [1.0, 0.5, 0.25]
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == list(enumerate(used, start=1))


class ScriptedEval(EvalCallback):
    """The real ``EvalCallback.on_epoch_end`` (its ``every`` rule) with scripted scores: epoch e
    scores ``scores[e]`` (default e / 100: each epoch better than the last)."""

    def __init__(self, every, scores=None):
        x, y = separable_toy_data(4)
        super().__init__(DataLoader(TensorDataset(x, y), batch_size=4), {}, every=every)
        self.scores, self.epochs = scores or {}, []

    def on_fit_start(self, trainer):
        self.trainer = trainer

    def evaluate(self, model, device=None):
        epoch = self.trainer.state.epoch
        self.epochs.append(epoch)
        return {"eval/pgd20": self.scores.get(epoch, epoch / 100)}


def _same_weights(path, model):
    saved = load_checkpoint(path)["model"]
    current = model.state_dict()
    return saved.keys() == current.keys() and all(torch.equal(saved[k], v)
                                                  for k, v in current.items())


@pytest.mark.parametrize("epochs, checkpoint_every, eval_every", [
    (5, 2, 3),  # neither interval divides the run length
    (3, 5, 7),  # both beyond the run
    (4, 4, 1),
    (5, 1, 5),
    (1, 3, 2),
])
def test_the_final_epoch_is_saved_evaluated_and_can_become_best(tmp_path, epochs,
                                                               checkpoint_every, eval_every):
    """#18 a: last.pt holds the weights training ended with, the final epoch is scored and,
    when it is the best, best.pt holds it too (tensors compared with the trained model)."""
    model = tiny()
    ev = ScriptedEval(eval_every)
    cbs = [ev, CheckpointCallback(tmp_path, every=checkpoint_every)]
    state = trainer_for(model, epochs=epochs, callbacks=cbs).fit(toy_loader(32, 16))
    due = {e for e in range(1, epochs + 1) if e % eval_every == 0} | {epochs}
    assert ev.epochs == sorted(due)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == epochs
    assert _same_weights(tmp_path / "last.pt", model)
    assert state.best_epoch == epochs and load_checkpoint(tmp_path / "best.pt")["epoch"] == epochs
    assert _same_weights(tmp_path / "best.pt", model)


def test_a_run_stopped_by_a_callback_saves_and_scores_its_final_epoch(tmp_path):
    """A callback that ends training early (state.stop) makes that epoch the final one."""

    class StopAt:
        def on_batch_end(self, trainer, out, batch):
            if trainer.state.step == 5:  # in epoch 3 (2 steps per epoch)
                trainer.state.stop = True

    model = tiny()
    ev = ScriptedEval(4)
    cbs = [StopAt(), ev, CheckpointCallback(tmp_path, every=4)]
    state = trainer_for(model, epochs=10, callbacks=cbs).fit(toy_loader(32, 16))
    assert state.epoch == 3 and ev.epochs == [3]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert _same_weights(tmp_path / "last.pt", model)


@pytest.mark.parametrize("mode, scores, best_epoch", [
    ("max", [0.5, 0.5, 0.4], 1),  # a tie keeps the earlier epoch
    ("max", [0.3, 0.5, 0.5, 0.5], 2),
    ("min", [0.7, 0.2, 0.2], 2),
    ("max", [0.3, 0.5, 0.6], 3),  # strictly better moves it
])
def test_best_pt_ties_keep_the_earlier_epoch(tmp_path, mode, scores, best_epoch):
    """#18 b: the documented tie rule of best.pt (CheckpointCallback's docstring)."""
    ev = ScriptedEval(1, {e + 1: s for e, s in enumerate(scores)})
    cbs = [ev, CheckpointCallback(tmp_path, monitor="eval/pgd20", mode=mode)]
    state = trainer_for(tiny(), epochs=len(scores), callbacks=cbs).fit(toy_loader(32, 16))
    best = load_checkpoint(tmp_path / "best.pt")
    assert state.best_epoch == best["epoch"] == best_epoch
    assert best["metrics"]["eval/pgd20"] == state.best == scores[best_epoch - 1]
    assert "Ties keep the earlier epoch" in CheckpointCallback.__doc__


@pytest.mark.parametrize("n, max_batches, expected", [
    (5, None, 2 / 5),  # the first 5 points, the second batch cut short
    (None, 2, 5 / 8),  # whole batches
    (5, 1, 2 / 4),  # the smaller count
    (100, None, 7 / 16),  # more than there are: all 16
    (1, None, 1.0),  # the least n: the first point only
])
def test_eval_callback_scores_exactly_n_points(n, max_batches, expected, caplog):
    """#18 h: a constant classifier (always class 0) on known labels: the clean accuracy tells
    exactly which points were scored."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))
    y = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    loader = DataLoader(TensorDataset(torch.rand(16, 1, 2, 2), y), batch_size=4)
    cb = EvalCallback(loader, {}, n=n, max_batches=max_batches)
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks.evaluation"):
        assert cb.evaluate(model) == {"eval/clean": pytest.approx(expected)}
    scored = min(16, n or 16, 4 * (max_batches or 4))
    assert f"n={scored} images: clean {round(expected * scored)}/{scored}" in caplog.text


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_eval_callback_refuses_a_bad_n(n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        EvalCallback(toy_loader(8, 4), {}, n=n)


def _held_out(n=16, batch_size=4):
    y = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])[:n]
    return DataLoader(TensorDataset(torch.rand(n, 1, 2, 2), y), batch_size=batch_size)


class Class0(nn.Module):
    """A parameter-free classifier that always says class 0 (and records whether autocast was
    on in its forward)."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], dim=1) + 0 * x.sum()


def test_eval_callback_scores_a_model_without_parameters_outside_any_autocast():
    """A model with no parameter or buffer is evaluated on the CPU; an enclosing autocast does
    not reach the evaluation (float32, for the attacks' gradients)."""
    model = Class0()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = EvalCallback(_held_out(), {}).evaluate(model)
    assert got == {"eval/clean": pytest.approx(7 / 16)} and model.autocast
    assert not any(model.autocast)


def test_eval_callback_seeds_its_batches_from_0_by_default(monkeypatch):
    """seed=0 unless given: the same random starts every epoch and in every run."""
    from robustkit.training.callbacks import evaluation

    calls = []
    real = evaluation.evaluate_attacks

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_attacks", spy)
    EvalCallback(_held_out(), {}).evaluate(Class0())
    EvalCallback(_held_out(), {}, seed=7).evaluate(Class0())
    assert [(c["seed"], c["shard"], c["batch_size"]) for c in calls] == [(0, True, 4), (7, True, 4)]


@pytest.mark.parametrize("loader", [
    [(torch.rand(2, 1, 2, 2), torch.zeros(2))],  # a list of batches: no dataset
    DataLoader(TensorDataset(torch.rand(4, 1), torch.zeros(4)), batch_size=None),
    SimpleNamespace(dataset=TensorDataset(torch.rand(4, 1), torch.zeros(4))),
], ids=["list", "batch_size-None", "no-batch_size"])
def test_eval_callback_needs_a_loader_with_a_dataset_and_a_batch_size(loader):
    with pytest.raises(ValueError, match=r"^loader must be a DataLoader with a dataset and a "
                                         r"batch_size$"):
        EvalCallback(loader, {})


def test_eval_callback_refuses_bad_attacks_and_an_empty_held_out_set():
    with pytest.raises(ValueError, match=r"^attacks must be a mapping name -> attack or a "
                                         r"function of the model returning one, got int$"):
        EvalCallback(_held_out(), 3)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match=r"^EvalCallback: the held-out loader is empty$"):
        EvalCallback(empty, {}).evaluate(Class0())
    assert EvalCallback(_held_out(1), {}).evaluate(Class0()) == {"eval/clean": 1.0}

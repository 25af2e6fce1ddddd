"""The one Trainer: learning, callback order, checkpoints, clipping, schedules, NaN stop, resume."""

from __future__ import annotations

import io
import json
import logging
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from robustkit.attacks.base import AttackResult
from robustkit.cli.progress import ProgressCallback
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


def _objective_names():
    objectives = pytest.importorskip("robustkit.objectives")
    return sorted(objectives.OBJECTIVES)


@pytest.mark.parametrize("name", _objective_names())
def test_one_epoch_per_objective_and_resume_state(tmp_path, name):
    from robustkit.objectives import accepted_hparams, create_objective

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


def test_callbacks_fire_in_order_and_any_object_works():
    rec, only = Recorder(), OnlyEpochs()
    trainer_for(tiny(), epochs=2, callbacks=[rec, only]).fit(toy_loader(48, 16))
    epoch = ["batch"] * 3 + ["epoch"]
    assert rec.events == ["fit_start", *epoch, *epoch, "fit_end"]
    assert only.n == 2


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
    assert last["config"] == {"lr": 0.05, "name": "toy"} and "torch" in last["versions"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [r["eval/pgd20"] for r in lines] == [0.3, 0.5, 0.4]


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
            return out

    model = tiny()
    trainer = trainer_for(model, NaNAtEpoch1(model), epochs=3,
                          callbacks=[CheckpointCallback(tmp_path)])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 2 .*loss/ce"):
        trainer.fit(toy_loader(32, 16))
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 2
    for k, v in model.named_parameters():  # no optimizer step after the NaN
        assert torch.equal(v, last["model"][k]), k


def test_amp_ignored_on_cpu_with_warning(caplog):
    model = tiny()
    with caplog.at_level(logging.WARNING, logger="robustkit.training.trainer"):
        trainer = trainer_for(model, amp="bf16", device="cpu")
    assert trainer.amp == "off" and "ignored" in caplog.text
    trainer.fit(toy_loader(32, 16))
    assert all(p.dtype == torch.float32 for p in model.parameters())


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
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = tiny()
    holdout = toy_loader(16, 8)
    cbs = [EvalCallback(holdout, eps=0.05, steps=20),
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
    with pytest.raises(ValueError, match="scheduler"):
        t2.load_state_dict(load_checkpoint(tmp_path / "c.pt"))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_amp_channels_last_and_clip(amp):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny().cuda()
    trainer = trainer_for(model, epochs=3, amp=amp, grad_clip=1.0)
    assert trainer.amp == amp and trainer.channels_last
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    state = trainer.fit(toy_loader(128, 32, shuffle=True))
    assert state.history[-1]["train/loss"] < 0.5 * state.history[0]["train/loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not .half()
    if amp == "fp16":  # GradScaler in use: its scale is part of the resume state
        assert trainer.state_dict()["scaler"]["scale"] > 0


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
        cbs = [EvalCallback(loaders.holdout, eps=0.3, steps=10, alpha=0.1, max_batches=2),
               CheckpointCallback(tmp_path / name, monitor="eval/pgd10")]
        state = Trainer(model, create_objective(name, model, **hp), opt, epochs=2,
                        callbacks=cbs).fit(loaders.train)
        assert state.history[-1]["train/loss"] < state.history[0]["train/loss"]
        assert (tmp_path / name / "best.pt").exists()
        results[name] = state.metrics
    assert results["natural"]["eval/clean"] > 0.85
    assert results["pgd_at"]["eval/pgd10"] > results["natural"]["eval/pgd10"] + 0.1

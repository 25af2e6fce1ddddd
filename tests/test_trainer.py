"""The one Trainer: learning, callback order, checkpoints, clipping, schedules, NaN stop, resume."""

from __future__ import annotations

import contextlib
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

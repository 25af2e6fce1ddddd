"""SensitivityCallback: σ of a fixed probe set during training (methods.md §4, §7.3). Its keys
reach the state, metrics.jsonl and TensorBoard; the values equal ``neuron_sensitivity`` on the
same pairs; training is bitwise the same with or without it; no hook, mode, gradient, BN
statistic or RNG state changes; the schedule; and the CLI wiring."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import robustkit.attacks
from robustkit import distributed as dist
from robustkit.attacks import PGD
from robustkit.config import build, load_config
from robustkit.errors import ConfigError
from robustkit.objectives import PGDAT
from robustkit.sensitivity import neuron_sensitivity
from robustkit.testing import TinyCNN, random_batch
from robustkit.training import JSONLCallback, TensorBoardCallback, Trainer, TrainerState
from robustkit.training.callbacks import EvalCallback, SensitivityCallback

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SHAPE, K, LAYERS = (3, 8, 8), 10, ["features.0", "fc"]


def _data(n: int, seed: int) -> TensorDataset:
    x, y = random_batch(n, SHAPE, K, seed=seed)
    return TensorDataset(x, y, torch.arange(n))


def _perturb(model, x, y, generator):
    return PGD(model, eps=0.1, alpha=0.025, steps=4, select="last", generator=generator)(x, y)


def _rogue_perturb(model, x, y, generator):
    """Ignores its generator: the random start comes from the global RNG."""
    return PGD(model, eps=0.1, alpha=0.025, steps=4, select="last")(x, y)


def _callback(perturb=_perturb, **kw) -> SensitivityCallback:
    kw = {"layers": "auto", "n": 20, "every": 1, "batch_size": 8, **kw}
    return SensitivityCallback(_data(24, seed=3), perturb, **kw)


def _fit(callbacks, epochs: int = 2):
    """PGD-AT whose random starts and shuffling both draw from the global RNG."""
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).train()
    objective = PGDAT(model, eps=0.1, alpha=0.05, steps=2)
    loader = DataLoader(_data(32, seed=1), batch_size=8, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(model, objective, opt, epochs=epochs, callbacks=callbacks, device="cpu")
    trainer.fit(loader)
    return model, trainer


def _fake_trainer(model, epoch: int, epochs: int = 3):
    return SimpleNamespace(model=model, device=torch.device("cpu"), epochs=epochs,
                           state=TrainerState(epoch=epoch))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _keys(prefix: str) -> set[str]:
    return {f"{prefix}/{name}" for name in LAYERS}


def test_logs_keys_to_state_jsonl_and_tensorboard_and_equals_direct_measurement(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = _callback()
    model, trainer = _fit([cb, JSONLCallback(tmp_path / "m.jsonl"),
                           TensorBoardCallback(tmp_path / "tb", log_every=1)])
    s = trainer.state
    assert _keys("sensitivity") | _keys("sensitivity_rel") <= set(s.metrics)
    assert _keys("sensitivity") <= set(s.histograms)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(_keys("sensitivity") <= set(r) for r in epochs)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    assert _keys("sensitivity") | _keys("sensitivity_rel") <= set(events.Tags()["scalars"])
    assert _keys("hist/sensitivity") <= set(events.Tags()["histograms"])
    # the same pairs by hand: the first 20 held-out images, batches of 8 seeded 0, 1, 2
    x, y, _ = _data(24, seed=3)[:20]
    x_adv = torch.cat([_perturb(model, x[i:i + 8], y[i:i + 8],
                                torch.Generator().manual_seed(b))
                       for b, i in enumerate(range(0, 20, 8))])
    # batch_size 8 as the callback's: float32 convolutions round differently per batch shape
    sigma = neuron_sensitivity(model, x, x_adv, LAYERS, batch_size=8)
    rel = neuron_sensitivity(model, x, x_adv, LAYERS, relative=True, batch_size=8)
    for name in LAYERS:
        assert s.metrics[f"sensitivity/{name}"] == sigma[name].mean().item()
        assert s.metrics[f"sensitivity_rel/{name}"] == rel[name].mean().item()
        assert torch.equal(s.histograms[f"sensitivity/{name}"], sigma[name].float())
    assert sigma["fc"].mean() > 0


@pytest.mark.parametrize("perturb", [_perturb, _rogue_perturb], ids=["generator", "rogue"])
def test_training_is_bitwise_the_same_with_and_without_it(perturb):
    with_cb, trainer = _fit([_callback(perturb)])
    assert _keys("sensitivity") <= set(trainer.state.metrics)  # it did measure, twice
    without, _ = _fit([])
    for key, value in without.state_dict().items():
        assert torch.equal(with_cb.state_dict()[key], value), key


def test_no_side_effects_on_the_model_or_the_rng():
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).train()
    model.features[1].eval()  # a frozen BN must stay frozen
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    trainer = _fake_trainer(model, epoch=1)
    _callback(_rogue_perturb).on_epoch_end(trainer)
    assert _keys("sensitivity") <= set(trainer.state.metrics)
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_diverged_adversarial_images_are_left_out_with_a_warning(caplog):
    """A NaN x' must not end the training run: those pairs are dropped (σ over the rest, equal to
    a direct measurement on them) and a warning says how many; all broken: nothing logged."""
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).eval()

    def half_broken(model, x, y, generator):  # every 4th pair: 2 + 2 + 1 of batches 8, 8, 4
        x_adv = _perturb(model, x, y, generator).clone()
        x_adv[::4] = float("nan")
        return x_adv

    cb = _callback(half_broken)
    with caplog.at_level(logging.WARNING):
        sigma, _ = cb.measure(model)
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msg == ("sensitivity probe: 5 of 20 adversarial images were NaN or infinite (the "
                   "attack diverged); sigma is over the other 15")
    x, y = cb.probe()
    x_adv = torch.cat([half_broken(model, x[i:i + 8], y[i:i + 8],
                                   torch.Generator().manual_seed(cb.seed + b))
                       for b, i in enumerate(range(0, 20, 8))])
    ok = torch.isfinite(x_adv).flatten(1).all(1)
    direct = neuron_sensitivity(model, x[ok], x_adv[ok], layers=LAYERS)
    for name in LAYERS:
        torch.testing.assert_close(sigma[name], direct[name])
    all_broken = _callback(lambda m, x, y, g: torch.full_like(x, float("nan")))
    trainer = _fake_trainer(model, epoch=1)
    all_broken.on_epoch_end(trainer)
    assert not any(k.startswith("sensitivity") for k in trainer.state.metrics)


class _NoEmptyBatch(torch.nn.Module):
    """A model that refuses an empty batch (as some do: a reshape by the batch size, a check)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] == 0:
            raise RuntimeError("empty batch")
        return self.inner(x)


def test_a_batch_whose_pairs_all_diverged_is_not_forwarded():
    torch.manual_seed(0)
    model = _NoEmptyBatch(TinyCNN(3, K, size=8)).eval()

    def first_batch_broken(model, x, y, generator):
        x_adv = _perturb(model, x, y, generator)
        return torch.full_like(x, float("nan")) if generator.initial_seed() == 0 else x_adv

    cb = SensitivityCallback(_data(24, seed=3), first_batch_broken, layers=["inner.fc"], n=16,
                             batch_size=8)
    sigma, _ = cb.measure(model)
    assert set(sigma) == {"inner.fc"} and torch.isfinite(sigma["inner.fc"]).all()


def test_epoch_end_measures_on_the_trainers_device_and_logs_the_time(caplog):
    cb = _callback()
    seen = []
    cb.measure = lambda model, device=None: seen.append(device) or (
        {"fc": torch.tensor([1.0, 3.0])}, None)
    trainer = _fake_trainer(TinyCNN(3, K, size=8), epoch=1)
    trainer.device = torch.device("cpu", 0)  # not what the model's parameters say
    with caplog.at_level(logging.INFO, logger="robustkit.training.callbacks.sensitivity"):
        cb.on_epoch_end(trainer)
    assert seen == [torch.device("cpu", 0)]
    assert trainer.state.metrics == {"sensitivity/fc": 2.0}  # relative=None: no rel key
    (msg,) = [r.getMessage() for r in caplog.records]
    took = re.fullmatch(r"sensitivity probe \(20 pairs, 1 layers\) took (\d+\.\d\d) s", msg)
    assert took and float(took[1]) < 30  # the elapsed time, not a clock reading


@pytest.mark.parametrize("reduction", ["elementwise", "spatial_mean"])
def test_each_reduction_equals_the_direct_measurement(reduction):
    """The callback's σ (absolute and relative) under either convention equals
    neuron_sensitivity on the same pairs: the reduction reaches the meter."""
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).eval()
    cb = _callback(reduction=reduction)
    sigma, rel = cb.measure(model)
    x, y = cb.probe()
    x_adv = torch.cat([_perturb(model, x[i:i + 8], y[i:i + 8],
                                torch.Generator().manual_seed(cb.seed + b))
                       for b, i in enumerate(range(0, 20, 8))])
    for relative, got in ((False, sigma), (True, rel)):
        direct = neuron_sensitivity(model, x, x_adv, layers=LAYERS, reduction=reduction,
                                    relative=relative)
        for name in LAYERS:
            torch.testing.assert_close(got[name], direct[name])


def test_library_defaults_and_a_copy_of_the_layer_list():
    cb = SensitivityCallback(_data(300, seed=0), _perturb)
    assert (cb.layers, cb.n, cb.every, cb.batch_size, cb.seed, cb.relative, cb.reduction) == (
        "auto", 256, 1, 256, 0, True, "elementwise")
    layers = ["fc"]
    cb = SensitivityCallback(_data(4, seed=0), _perturb, layers=layers,
                             reduction="spatial_mean")
    layers.append("features.0")  # the caller's list changes later: the callback's does not
    assert cb.layers == ["fc"] and cb.reduction == "spatial_mean"


def test_a_probe_larger_than_the_held_out_set_says_so_once(caplog):
    name = "robustkit.training.callbacks.sensitivity"
    with caplog.at_level(logging.INFO, logger=name):
        SensitivityCallback(_data(24, seed=0), _perturb, n=24)
        SensitivityCallback(_data(24, seed=0), _perturb, n=23)
    assert caplog.records == []  # enough images: nothing to say
    with caplog.at_level(logging.INFO, logger=name):
        cb = SensitivityCallback(_data(24, seed=0), _perturb, n=100)
    assert cb.n == 24
    assert [r.getMessage() for r in caplog.records] == [
        "sensitivity probe: 100 images requested, the held-out set has 24"]


def test_fixed_probe_gives_the_same_numbers_in_a_fresh_callback():
    """Nothing to checkpoint: a resumed run's new callback measures exactly the same pairs."""
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).eval()
    a, rel_a = _callback().measure(model)
    torch.manual_seed(123)  # whatever the global RNG holds
    b, rel_b = _callback().measure(model)
    for name in LAYERS:
        assert torch.equal(a[name], b[name]) and torch.equal(rel_a[name], rel_b[name])
    cb = _callback(n=1000, relative=False)  # more than the held-out set: all 24 images
    assert cb.n == 24 and cb.measure(model)[1] is None


def test_schedule_every_and_after_the_last_epoch():
    model = TinyCNN(3, K, size=8)
    cb = _callback(every=2)
    measured = []
    for epoch in range(1, 6):
        trainer = _fake_trainer(model, epoch, epochs=5)
        cb.on_epoch_end(trainer)
        if "sensitivity/fc" in trainer.state.metrics:
            measured.append(epoch)
    assert measured == [2, 4, 5]


def test_only_rank_0_measures(monkeypatch):
    monkeypatch.setattr(dist, "is_main", lambda: False)
    trainer = _fake_trainer(TinyCNN(3, K, size=8), epoch=3, epochs=3)
    _callback().on_epoch_end(trainer)
    assert not trainer.state.metrics and not trainer.state.histograms


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, "n must"), ({"every": 0}, "every must"), ({"batch_size": 1.5}, "batch_size"),
    ({"layers": "fc"}, "'auto' or a list"), ({"reduction": "sum"}, "reduction"),
])
def test_bad_arguments_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kw)
    with pytest.raises(ValueError, match="perturb"):
        SensitivityCallback(_data(4, 0), perturb="pgd")


def test_unknown_layer_lists_the_valid_ones():
    cb = _callback(layers=["features.7"])
    with pytest.raises(ValueError, match=r"unknown layer.*features\.0, fc"):
        cb.measure(TinyCNN(3, K, size=8))


# ---------------------------------------------------------------------------- CLI wiring
def _build(tmp_path, *overrides):
    return build(load_config(SMOKE, [f"trainer.out_dir={tmp_path}", "trainer.device=cpu",
                                     "log.progress=false", *overrides]))


def test_cli_wires_the_probe_pgd_before_the_loggers(tmp_path, monkeypatch):
    seen = []

    class Recorder(PGD):  # the real PGD, its settings recorded
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            seen.append((model, kwargs))

    monkeypatch.setattr(robustkit.attacks, "PGD", Recorder)
    r = _build(tmp_path)
    cbs = r.trainer.callbacks
    kinds = [type(cb) for cb in cbs]
    i = kinds.index(SensitivityCallback)
    assert kinds.index(EvalCallback) < i < min(kinds.index(JSONLCallback),
                                               kinds.index(TensorBoardCallback))
    cb = cbs[i]
    assert cb.n == 64 and cb.every == 1 and cb.batch_size == 64  # holdout 64, eval_every 1
    assert cb.layers == [f"model.feature_extractor.conv{i}" for i in (1, 2, 3, 4)] + [
        f"model.classifier.fc{i}" for i in (1, 2, 3)]
    seen.clear()
    x, y = cb.probe()
    g = torch.Generator().manual_seed(0)
    x_adv = cb.perturb(r.model, x[:4], y[:4], g)
    (model, s), = seen
    assert model is r.model and s["generator"] is g
    assert (s["eps"], s["alpha"], s["steps"], s["norm"]) == (pytest.approx(0.3),
                                                             pytest.approx(0.075), 10, "Linf")
    assert (s["random_start"], s["loss"], s["select"], s["stop_on_success"]) == (True, "ce",
                                                                               "last", False)
    assert (x_adv - x[:4]).abs().max() <= 0.3 + 1e-6


@pytest.mark.parametrize("overrides, every", [
    (["trainer.epochs=3", "trainer.eval_every=null"], 3),  # no evaluation: after the last epoch
    (["trainer.eval_every=2"], 2),
    (["trainer.eval_every=2", "sensitivity.every=5"], 5),
])
def test_cli_interval_defaults_to_eval_every(tmp_path, overrides, every):
    r = _build(tmp_path, *overrides)
    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, SensitivityCallback)]
    assert cb.every == every


@pytest.mark.parametrize("overrides, match", [
    (["sensitivity.layers=[model.nope]"], r"sensitivity\.layers.*model\.feature_extractor"),
    (["sensitivity.steps=3"], r"sensitivity\.steps.*>= 4"),
    (["sensitivity.n=0"], r"sensitivity\.n"),
])
def test_cli_rejects_bad_settings(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _build(tmp_path, *overrides)


def test_cli_can_switch_it_off(tmp_path):
    r = _build(tmp_path, "sensitivity.enabled=false")
    assert not any(isinstance(c, SensitivityCallback) for c in r.trainer.callbacks)
    r = _build(tmp_path, "data.holdout=0", "trainer.eval_every=null")
    assert not any(isinstance(c, SensitivityCallback) for c in r.trainer.callbacks)

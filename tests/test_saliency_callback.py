"""SaliencyCallback: a fixed panel's saliency maps during training (methods.md §7.3, §8.2). Its
scalars reach the state, metrics.jsonl and TensorBoard, its grids TensorBoard's images; the
values equal the explainers run by hand on the same pairs; training is bitwise the same with or
without it; no hook, mode, gradient, BN statistic or RNG state changes; the schedule; the config
section and the CLI wiring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import robustkit.attacks
from robustkit import distributed as dist
from robustkit.attacks import PGD
from robustkit.config import build, load_config
from robustkit.errors import ConfigError
from robustkit.objectives import PGDAT
from robustkit.saliency import AdaptGrad, Gradient, SmoothGrad
from robustkit.saliency.metrics import sparseness, total_variation
from robustkit.testing import TinyCNN, random_batch
from robustkit.training import (
    JSONLCallback,
    SaliencyCallback,
    TensorBoardCallback,
    Trainer,
    TrainerState,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SHAPE, K, N = (3, 8, 8), 10, 4
NAMES = ("gradient", "smoothgrad", "adaptgrad")


def _data(n: int, seed: int) -> TensorDataset:
    x, y = random_batch(n, SHAPE, K, seed=seed)
    return TensorDataset(x, y, torch.arange(n))


def _perturb(model, x, y, generator):
    return PGD(model, eps=0.1, alpha=0.025, steps=4, select="last", generator=generator)(x, y)


def _rogue_perturb(model, x, y, generator):
    """Ignores its generator: the random start comes from the global RNG."""
    return PGD(model, eps=0.1, alpha=0.025, steps=4, select="last")(x, y)


def _callback(perturb=_perturb, **kw) -> SaliencyCallback:
    kw = {"n": N, "every": 1, "n_samples": 3, **kw}
    return SaliencyCallback(_data(6, seed=3), perturb, **kw)


def _fit(callbacks, epochs: int = 2):
    """PGD-AT whose random starts and shuffling both draw from the global RNG."""
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).train()
    objective = PGDAT(model, eps=0.1, alpha=0.05, steps=2)
    loader = DataLoader(_data(16, seed=1), batch_size=8, shuffle=True)
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


def _keys(names=NAMES) -> set[str]:
    return {f"saliency/{e}/{kind}/{m}" for e in names for kind in ("clean", "adv")
            for m in ("sparseness", "total_variation")}


def test_logs_scalars_and_grids_and_equals_the_explainers_run_by_hand(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = _callback()
    model, trainer = _fit([cb, JSONLCallback(tmp_path / "m.jsonl"),
                           TensorBoardCallback(tmp_path / "tb", log_every=1, image_fn=cb.images)])
    s = trainer.state
    assert _keys() <= set(s.metrics)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(_keys() <= set(r) for r in epochs)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert _keys() <= set(events.Tags()["scalars"])
    assert {f"saliency/{e}" for e in NAMES} <= set(events.Tags()["images"])
    shots = events.Images("saliency/adaptgrad")
    assert len(shots) == 2  # both epochs
    # the logged image is the labelled matplotlib panel, pixel for pixel in size
    _, grids = cb.measure(model)
    assert (shots[-1].height, shots[-1].width) == tuple(grids["saliency/adaptgrad"].shape[1:])
    # the same pairs by hand: the first 4 held-out images, one attack seeded 0, true labels
    x, y, _ = _data(6, seed=3)[:N]
    x_adv = _perturb(model.eval(), x, y, torch.Generator().manual_seed(0))
    explainers = {"gradient": Gradient(model, internal_batch_size=256),
                  "smoothgrad": SmoothGrad(Gradient(model), n_samples=3, seed=0,
                                           internal_batch_size=256),
                  "adaptgrad": AdaptGrad(Gradient(model), n_samples=3, seed=0,
                                         internal_batch_size=256)}
    for name, explainer in explainers.items():
        for kind, inputs in (("clean", x), ("adv", x_adv)):
            a = explainer.attribute(inputs, target=y)
            assert s.metrics[f"saliency/{name}/{kind}/sparseness"] == \
                sparseness(a).double().mean().item()
            assert s.metrics[f"saliency/{name}/{kind}/total_variation"] == \
                total_variation(a).double().mean().item()
    # the adversarial maps differ from the clean ones; Gini in [0, 1), TV > 0
    m = s.metrics
    assert m["saliency/gradient/adv/sparseness"] != m["saliency/gradient/clean/sparseness"]
    assert all(0 < m[k] < (1 if k.endswith("sparseness") else 10) for k in _keys())


def _panels(monkeypatch, cb, model):
    """``(grids, figures)`` of ``cb.measure(model)``: the figures the images were drawn from."""
    import robustkit.reports.tensorboard as tb

    figures, draw = [], tb.figure_image

    def figure_image(fig):
        figures.append(fig)
        return draw(fig)

    monkeypatch.setattr(tb, "figure_image", figure_image)
    _, grids = cb.measure(model)
    return grids, figures


def test_panel_has_column_titles_labels_predictions_and_a_colour_bar(monkeypatch):
    """Issue #19 §3: columns x, map, x', map'; per row the true label and the predictions on x
    and x' (the model's, recomputed here; red when wrong); the cells are x, x' and the maps on
    the colour bar's fixed [-1, 1] bwr scale (scaled here by numpy)."""
    from matplotlib import colormaps

    torch.manual_seed(12)  # a linear model right on 3 of the 4 images, wrong on all 4 x'
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, K)).eval()
    cb = _callback(explainers=["gradient", "adaptgrad"])
    grids, figures = _panels(monkeypatch, cb, model)
    assert list(grids) == ["saliency/gradient", "saliency/adaptgrad"] and len(figures) == 2
    x, y = cb.probe()
    x_adv = _perturb(model, x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
    assert (pred == y).sum() == 3 and (pred_adv == y).sum() == 0  # black and red labels
    for (tag, grid), fig in zip(grids.items(), figures, strict=True):
        assert fig._suptitle.get_text() == tag.split("/")[1]
        texts = {t.get_text(): t for t in fig.axes[0].texts}
        assert [t.get_text() for t in fig.axes[0].texts[:4]] == ["x", "map", "x'", "map'"]
        for i in range(N):
            assert f"label {int(y[i])}" in texts
        preds = [t for t in fig.axes[0].texts if t.get_text().startswith("pred ")]
        assert len(preds) == 2 * N  # under x and under x', row by row
        for i in range(N):
            for t, p in zip(preds[2 * i:2 * i + 2], (pred[i], pred_adv[i]), strict=True):
                assert t.get_text() == f"pred {int(p)}"
                assert t.get_color() == ("black" if p == y[i] else "red")
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1 and "99th percentile" in bars[0].get_ylabel()
        mappable = bars[0]._colorbar.mappable
        assert mappable.get_clim() == (-1, 1) and mappable.get_cmap().name == "bwr"
        assert grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
        assert grid.shape[1] > 8 * N * 4 and grid.shape[2] > 8 * 4 * 4  # drawn larger
    # the cells: x and x' themselves, the gradient maps through bwr on [-1, 1]
    shown = torch.as_tensor(figures[0].axes[0].get_images()[0].get_array())  # (H', W', 3)
    gradient = Gradient(model)
    cmap = colormaps["bwr"]
    step_x, step_y = 8 + 1, 8 + 2  # cell + gap (8 px images: gaps 1 and 2)
    for i in range(N):
        top = i * step_y
        assert torch.allclose(shown[top:top + 8, 0:8], x[i].permute(1, 2, 0))
        assert torch.allclose(shown[top:top + 8, 2 * step_x:2 * step_x + 8],
                              x_adv[i].permute(1, 2, 0))
        for col, inputs in ((1, x), (3, x_adv)):
            s = gradient.attribute(inputs[i:i + 1], target=y[i:i + 1])[0].sum(0).numpy()
            v = np.clip(s / np.percentile(np.abs(s), 99), -1, 1)
            expected = torch.from_numpy(cmap((v + 1) / 2)[..., :3]).float()
            cell = shown[top:top + 8, col * step_x:col * step_x + 8]
            assert torch.allclose(cell, expected, atol=1e-6)
    assert cb.images() == {}  # measure() alone leaves nothing pending


def test_panel_names_the_classes_of_an_image_dataset(monkeypatch):
    """A held-out Subset of an ImageDataset: the rows say the class names beside the labels."""
    from torch.utils.data import Subset

    from robustkit.data import ImageDataset

    x, y = random_batch(6, SHAPE, K, seed=3)
    names = [f"class{k}" for k in range(K)]
    data = Subset(ImageDataset((x * 255).to(torch.uint8), y, class_names=names), range(6))
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).eval()
    cb = SaliencyCallback(data, _perturb, explainers=["gradient"], n=N, n_samples=3)
    _, (fig,) = _panels(monkeypatch, cb, model)
    _, y_probe = cb.probe()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for i in range(N):
        assert f"label {int(y_probe[i])} class{int(y_probe[i])}" in texts


@pytest.mark.parametrize("perturb", [_perturb, _rogue_perturb], ids=["generator", "rogue"])
def test_training_is_bitwise_the_same_with_and_without_it(perturb):
    with_cb, trainer = _fit([_callback(perturb)])
    assert _keys() <= set(trainer.state.metrics)  # it did explain
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
    _callback(_rogue_perturb, explainers=["smoothgrad"]).on_epoch_end(trainer)
    assert _keys(["smoothgrad"]) <= set(trainer.state.metrics)
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_perturb_sees_an_eval_mode_model_and_modes_come_back():
    """Any perturb, not only PGD (which sets eval mode itself): BN statistics stay frozen."""
    seen = []

    def recorder(model, x, y, generator):
        seen.append(any(m.training for m in model.modules()))
        return (x + 0.01).clamp(0, 1)

    model = TinyCNN(3, K, size=8).train()
    _callback(recorder, explainers=["gradient"]).on_epoch_end(_fake_trainer(model, 3, 3))
    assert seen == [False] and all(m.training for m in model.modules())


def test_fixed_panel_gives_the_same_numbers_in_a_fresh_callback():
    torch.manual_seed(0)
    model = TinyCNN(3, K, size=8).eval()
    a, grids_a = _callback().measure(model)
    torch.manual_seed(123)  # whatever the global RNG holds
    b, grids_b = _callback().measure(model)
    assert a == b and all(torch.equal(grids_a[k], grids_b[k]) for k in grids_a)
    assert _callback(n=1000).n == 6  # more than the held-out set: all of it


def test_schedule_every_and_after_the_last_epoch():
    model = TinyCNN(3, K, size=8)
    cb = _callback(every=2, explainers=["gradient"])
    measured, imaged = [], []
    for epoch in range(1, 6):
        trainer = _fake_trainer(model, epoch, epochs=5)
        cb.on_epoch_end(trainer)
        if "saliency/gradient/clean/sparseness" in trainer.state.metrics:
            measured.append(epoch)
        if cb.images(model):
            imaged.append(epoch)
    assert measured == imaged == [2, 4, 5]


def test_only_rank_0_explains(monkeypatch):
    monkeypatch.setattr(dist, "is_main", lambda: False)
    trainer = _fake_trainer(TinyCNN(3, K, size=8), epoch=3, epochs=3)
    cb = _callback()
    cb.on_epoch_end(trainer)
    assert not trainer.state.metrics and cb.images() == {}


@pytest.mark.parametrize("kw, match", [
    ({"n": 0}, "n must"), ({"every": 0}, "every must"), ({"n_samples": 1.5}, "n_samples"),
    ({"explainers": ["gradient", "smoothgrad2"]}, r"unknown \['smoothgrad2'\]; known: .*adaptgrad"),
    ({"explainers": "gradient"}, "non-empty list"), ({"explainers": []}, "non-empty list"),
    ({"internal_batch_size": 0}, "internal_batch_size must be an int >= 1, got 0"),
])
def test_bad_arguments_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kw)
    with pytest.raises(ValueError, match="perturb"):
        SaliencyCallback(_data(4, 0), perturb="pgd")


def test_library_defaults():
    cb = SaliencyCallback(_data(10, 0), _perturb)
    assert (cb.explainers, cb.n, cb.every, cb.n_samples, cb.seed, cb.internal_batch_size) == (
        list(NAMES), 8, 1, 16, 0, 256)


@pytest.mark.parametrize("name", ["gradient", "smoothgrad", "adaptgrad", "ig-adaptgrad"])
def test_each_explainer_gets_the_callbacks_settings_it_takes(name):
    """n_samples, seed and internal_batch_size reach every explainer that takes them, the
    ig-adaptgrad function's AdaptGrad included (a function, not a class)."""
    cb = _callback(n_samples=5, seed=7, internal_batch_size=3)
    e = cb.explainer(name, TinyCNN(3, K, size=8))
    inner = getattr(e, "inner", None)
    adapt = inner if name == "ig-adaptgrad" else e
    assert e.internal_batch_size == 3
    if name != "gradient":
        assert (adapt.n_samples, adapt.seed) == (5, 7)


def test_epoch_end_measures_on_the_trainers_device_and_logs_the_time(caplog):
    cb = _callback(explainers=["gradient"])
    seen = []
    cb.measure = lambda model, device=None: seen.append(device) or ({"m": 1.0}, {})
    trainer = _fake_trainer(TinyCNN(3, K, size=8), epoch=1)
    trainer.device = torch.device("cpu", 0)  # not what the model's parameters say
    with caplog.at_level("INFO", logger="robustkit.training.callbacks.saliency"):
        cb.on_epoch_end(trainer)
    assert seen == [torch.device("cpu", 0)] and trainer.state.metrics["m"] == 1.0
    (msg,) = [r.getMessage() for r in caplog.records]
    took = re.fullmatch(rf"saliency panel \({N} images, 1 explainers\) took (\d+\.\d\d) s", msg)
    assert took and float(took[1]) < 30  # the elapsed time, not a clock reading


def test_class_names_of_the_dataset_itself_or_of_the_one_under_a_subset():
    from torch.utils.data import Subset

    from robustkit.training.callbacks.saliency import _class_names

    names = [f"c{k}" for k in range(K)]
    own = SimpleNamespace(class_names=names, dataset=SimpleNamespace(class_names=["other"]))
    assert _class_names(own) == names  # its own names first
    assert _class_names(Subset(SimpleNamespace(class_names=names), [0])) == names
    assert _class_names(_data(2, 0)) is None


# ---------------------------------------------------------------------------- config and CLI
def _build(tmp_path, *overrides):
    return build(load_config(SMOKE, [f"trainer.out_dir={tmp_path}", "trainer.device=cpu",
                                     "log.progress=false", *overrides]))


def test_config_defaults():
    cfg = load_config(SMOKE, [])
    s = cfg.saliency
    assert (s.enabled, s.every, s.n, list(s.explainers), s.n_samples, s.steps) == (
        True, None, 8, list(NAMES), 16, 10)


def test_cli_wires_it_before_the_loggers_and_into_tensorboard(tmp_path, monkeypatch):
    seen = []

    class Recorder(PGD):  # the real PGD, its settings recorded
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            seen.append(kwargs)

    monkeypatch.setattr(robustkit.attacks, "PGD", Recorder)
    r = _build(tmp_path, "saliency.n_samples=4", "saliency.explainers=[gradient,adaptgrad]")
    cbs = r.trainer.callbacks
    kinds = [type(cb) for cb in cbs]
    i = kinds.index(SaliencyCallback)
    assert i < min(kinds.index(JSONLCallback), kinds.index(TensorBoardCallback))
    cb = cbs[i]
    assert (cb.n, cb.every, cb.n_samples, cb.seed) == (8, 1, 4, 0)
    assert cb.explainers == ["gradient", "adaptgrad"]
    assert cbs[kinds.index(TensorBoardCallback)].image_fn == cb.images
    seen.clear()
    x, y = cb.probe()
    cb.perturb(r.model, x[:2], y[:2], torch.Generator().manual_seed(0))
    (s,) = seen
    assert (s["eps"], s["alpha"], s["steps"], s["select"], s["stop_on_success"]) == (
        pytest.approx(0.3), pytest.approx(0.075), 10, "last", False)


@pytest.mark.parametrize("overrides, every", [
    (["trainer.epochs=3", "trainer.eval_every=null"], 3),
    (["trainer.eval_every=2"], 2),
    (["trainer.eval_every=2", "saliency.every=5"], 5),
])
def test_cli_interval_defaults_to_eval_every(tmp_path, overrides, every):
    r = _build(tmp_path, *overrides)
    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, SaliencyCallback)]
    assert cb.every == every


@pytest.mark.parametrize("overrides, match", [
    (["saliency.explainers=[gradient,gradcam]"],
     r"saliency\.explainers.*'adaptgrad'.*'smoothgrad'.*unknown \['gradcam'\]"),
    (["saliency.explainers=[]"], r"saliency\.explainers.*non-empty"),
    (["saliency.steps=3"], r"saliency\.steps.*>= 4"),
    (["saliency.n=0"], r"saliency\.n"),
    (["saliency.n_samples=0"], r"saliency\.n_samples"),
    (["saliency.colour=red"], r"saliency"),
])
def test_cli_rejects_bad_settings(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _build(tmp_path, *overrides)


def test_cli_can_switch_it_off(tmp_path):
    r = _build(tmp_path, "saliency.enabled=false")
    assert not any(isinstance(c, SaliencyCallback) for c in r.trainer.callbacks)
    assert all(c.image_fn is None for c in r.trainer.callbacks
               if isinstance(c, TensorBoardCallback))
    r = _build(tmp_path, "data.holdout=0", "trainer.eval_every=null")
    assert not any(isinstance(c, SaliencyCallback) for c in r.trainer.callbacks)

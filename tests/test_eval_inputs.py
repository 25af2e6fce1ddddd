"""Bad tensors through evaluate_attacks (issue 10 §4): images that are not finite floats in
[0, 1] and non-integer labels are refused naming ``data``; non-finite logits never count as
correct and fail the ``finite_logits`` check (robustkit.evaluation.runner, checks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks.base import Attack, AttackResult
from robustkit.evaluation import evaluate_attacks, post_checks
from robustkit.evaluation.results import build_results, model_info
from robustkit.testing import LinearModel, random_batch


def _data(n=12):
    torch.manual_seed(0)
    model = LinearModel((3, 4, 4), 10).eval()
    x, _ = random_batch(n, (3, 4, 4), 10, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("bad, match", [
    (float("nan"), "point 7 has NaN or inf"), (float("inf"), "point 7 has NaN or inf"),
    (-float("inf"), "point 7 has NaN or inf"), (1.5, r"point 7 has pixels in \[.*1\.5\]"),
    (-0.25, r"point 7 has pixels in \[-0\.25"),
])
@pytest.mark.parametrize("as_dataset", [False, True])
def test_bad_images_are_refused_naming_data(bad, match, as_dataset):
    model, x, y = _data()
    x[7, 1, 2, 3] = bad
    data = torch.utils.data.TensorDataset(x, y) if as_dataset else (x, y)
    with pytest.raises(ValueError, match=rf"^data: {match}"):
        evaluate_attacks(model, data, {}, batch_size=4)


def test_integer_images_are_refused():
    model, x, y = _data()
    with pytest.raises(ValueError, match="data: images must be floating point"):
        evaluate_attacks(model, ((x * 255).to(torch.uint8), y), {})


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_labels_of_any_dtype_are_cast(dtype):
    model, x, y = _data()
    ref = evaluate_attacks(model, (x, y), {}, batch_size=5)
    got = evaluate_attacks(model, (x, y.to(dtype)), {}, batch_size=5)
    ds = evaluate_attacks(model, torch.utils.data.TensorDataset(x, y.to(dtype)), {}, batch_size=5)
    assert torch.equal(got.clean, ref.clean) and torch.equal(ds.clean, ref.clean)
    assert got.labels.dtype == ds.labels.dtype == torch.int64 and ref.clean.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
@pytest.mark.parametrize("as_dataset", [False, True])
def test_non_integer_labels_are_refused(dtype, as_dataset):
    model, x, y = _data()
    data = (x, y.to(dtype))
    if as_dataset:
        data = torch.utils.data.TensorDataset(*data)
    with pytest.raises(ValueError, match=f"data: labels must be integers, got {dtype}"):
        evaluate_attacks(model, data, {})


@pytest.mark.parametrize("label", [10, -1])
def test_labels_outside_the_model_classes_are_refused(label):
    model, x, y = _data()
    y[5] = label
    with pytest.raises(ValueError, match=f"data: point 5 has label {label}, outside the "
                                         "model's 10 classes"):
        evaluate_attacks(model, (x, y), {}, batch_size=4)


class NaNWhere(nn.Module):
    """Class 0 always wins, except that rows whose pixel (0, 0, 0) exceeds 0.9 are all NaN: such
    a row argmaxes to class 0 too, so label-0 points looked clean-correct."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        logits[:, 0] = 1.0 + x.flatten(1).mean(1)
        bad = x[:, 0, 0, 0] > 0.9
        return torch.where(bad[:, None], torch.full_like(logits, float("nan")), logits)


class Poke(Attack):
    """Sets pixel (0, 0, 0) of the points in ``ids`` to 1 (NaN logits there), others unchanged."""

    def __init__(self, model, ids):
        super().__init__(model, eps=1.0)
        self.ids = set(ids)

    def _perturb(self, x, y):
        ids = (x[:, 0, 0, 1] * 100).round().long()
        x_adv = x.clone()
        hit = torch.tensor([int(i) in self.ids for i in ids])
        x_adv[hit, 0, 0, 0] = 1.0
        return AttackResult(x_adv)


def test_nan_logits_never_count_as_correct():
    n = 12
    x = torch.full((n, 1, 2, 2), 0.5)
    x[:, 0, 0, 1] = torch.arange(n) / 100  # point ids
    x[[2, 5], 0, 0, 0] = 1.0  # NaN logits on x itself
    y = torch.zeros(n, dtype=torch.long)  # label 0: what a NaN row argmaxes to
    y[9] = 3  # a plain mistake
    model = NaNWhere()
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).all()  # the trap: argmax says "correct"
    res = evaluate_attacks(model, (x, y), {"poke": Poke(model, {4, 7}), "none": Poke(model, ())},
                           batch_size=5)
    expected_clean = torch.ones(n, dtype=torch.bool)
    expected_clean[[2, 5, 9]] = False
    assert torch.equal(res.clean, expected_clean)
    poked = expected_clean.clone()
    poked[[4, 7]] = False  # finite on x, NaN on x_adv: broken
    assert torch.equal(res.correct["poke"], poked)
    assert torch.equal(res.correct["none"], expected_clean)  # incorrect under every attack
    assert res.nonfinite["clean"].nonzero().flatten().tolist() == [2, 5]
    assert res.nonfinite["poke"].nonzero().flatten().tolist() == [4, 7]
    assert not res.nonfinite["none"].any()
    assert res.accuracy()["clean"] == 9 / 12 and res.accuracy()["robust"] == 7 / 12

    checks = post_checks(res, eps=1.0)
    finite = next(c for c in checks if c.name == "finite_logits")
    assert finite.severity == "fail" and not finite.passed
    assert "4 of 12 points" in finite.message and "2 under clean" in finite.message
    assert finite.details["per_pass"] == {"clean": 2, "poke": 2, "none": 0}
    results = build_results(res, model="m", dataset="cifar10", threat_model="Linf", eps=1.0,
                            seed=0, subset="first 12 test images", checks=checks)
    assert "check finite_logits failed" in model_info(results)["footnote"]


def test_finite_logits_check_passes_on_a_sound_model():
    model, x, y = _data()
    res = evaluate_attacks(model, (x, y), {"none": Poke(model, ())})
    finite = next(c for c in post_checks(res, eps=1.0) if c.name == "finite_logits")
    assert finite.severity == "ok" and finite.details["nonfinite_points"] == 0


def test_nonfinite_points_are_logged_per_pass(caplog):
    """One warning per pass with NaN or inf logits: how many points and the first five."""
    import logging

    n = 12
    x = torch.full((n, 1, 2, 2), 0.5)
    x[:, 0, 0, 1] = torch.arange(n) / 100
    x[[1, 2, 4, 6, 8, 10, 11], 0, 0, 0] = 1.0  # NaN logits on x itself
    model = NaNWhere()
    with caplog.at_level(logging.WARNING, logger="robustkit.evaluation.protocol"):
        evaluate_attacks(model, (x, torch.zeros(n, dtype=torch.long)),
                         {"poke": Poke(model, {3}), "none": Poke(model, ())})
    assert [r.getMessage() for r in caplog.records
            if r.name == "robustkit.evaluation.protocol"] == [
        "clean: the model's logits are NaN or inf on 7 point(s) (first: [1, 2, 4, 6, 8]); they "
        "count as incorrect",
        "poke: the model's logits are NaN or inf on 1 point(s) (first: [3]); they count as "
        "incorrect"]

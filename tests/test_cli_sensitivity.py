"""``robustkit sensitivity`` end to end on the shipped MNIST sample (robustkit.cli.sensitivity).

Every number in sensitivity.json is recomputed here by an independent route: x' by a PGD built
with the paper's settings written out (L∞, α = ε/4, random start, no early stop, last iterate),
σ by ``neuron_sensitivity``, the per-image means behind the bootstrap CI by forward hooks written
in this file, the intervention in one unbatched call.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap

from robustkit.attacks import PGD
from robustkit.cli import main
from robustkit.data import first_n, load_dataset
from robustkit.evaluation.api import model_labels
from robustkit.sensitivity import intervention_test, jaccard, neuron_sensitivity, top_k_neurons
from robustkit.sensitivity.measure import per_sample_sensitivity
from robustkit.testing import TinyCNN

EPS, STEPS, N, BATCH, SEED = 0.3, 5, 12, 5, 3  # batches of 5, 5, 2: batching is exercised
LAYERS = ["features.0", "fc"]
ARCHS = """
import torch
from torch import nn
from robustkit.testing import TinyCNN

def tiny_a():
    torch.manual_seed(0)
    return TinyCNN(1, 10, 28)

def tiny_b():
    torch.manual_seed(1)
    return TinyCNN(1, 10, 28)

class Extra(TinyCNN):
    def __init__(self):
        super().__init__(1, 10, 28)
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(super().forward(x))

def tiny_extra():
    torch.manual_seed(2)
    return Extra()

def seven_classes():
    return TinyCNN(1, 7, 28)

def rgb_input():
    return TinyCNN(3, 10, 28)
"""


def _model(seed):
    torch.manual_seed(seed)
    return TinyCNN(1, 10, 28).eval()


def _data(n=N):
    data = first_n(load_dataset("sample-mnist", "test"), n)
    return (torch.stack([data[i][0] for i in range(n)]),
            torch.stack([torch.as_tensor(data[i][1]) for i in range(n)]).long())


def _pgd_last_iterate(model, x, y, seed=SEED):
    """The paper's pairs, written out: every image, all steps, the last iterate, same seeding."""
    attack = PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True, norm="Linf",
                 loss="ce", stop_on_success=False, select="last",
                 generator=torch.Generator().manual_seed(seed))
    return torch.cat([attack(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def _per_image_means(model, x, x_adv, layer):
    """Each image's mean over the layer's neurons of 1/(HW)·‖F(x) − F(x')‖₁, by a plain hook."""
    feats = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(x)
        model(x_adv)
    h.remove()
    diff = (feats[0].double() - feats[1].double()).abs()
    return diff.flatten(1).mean(1).numpy() if diff.dim() == 2 else \
        diff.flatten(2).mean(2).mean(1).numpy()


def _ci(values):
    res = bootstrap((values,), np.mean, n_resamples=9999, confidence_level=0.95, method="BCa",
                    rng=np.random.default_rng(SEED))
    return [res.confidence_interval.low, res.confidence_interval.high]


def _run(out, *argv):
    """The CLI on the sample images; ``--attack pgd{STEPS}`` unless x' is given (--x-adv)."""
    buf = io.StringIO()
    attack = [] if "--x-adv" in argv else ["--attack", f"pgd{STEPS}"]
    with contextlib.redirect_stdout(buf):
        rc = main(["sensitivity", "--dataset", "sample-mnist", "--n-examples", str(N),
                   *attack, "--batch-size", str(BATCH), "--seed", str(SEED),
                   "--draws", "3", "--no-progress", "--out", str(out), *argv])
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    path = tmp_path_factory.mktemp("archs") / "archs.py"
    path.write_text(ARCHS)
    return lambda fn: f"{path}:{fn}"


@pytest.fixture(scope="module")
def white_box(tmp_path_factory, archs):
    """One white-box run of two models, shared by the tests that read its outputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("white") / "out"
    rc, printed = _run(out, "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                       "--save-adv")
    torch.set_num_threads(threads)
    assert rc == 0
    return out, json.loads((out / "sensitivity.json").read_text()), printed


def test_json_shape_and_every_number(white_box):
    out, rep, printed = white_box
    x, y = _data()
    adv = torch.load(out / "adv.pt", weights_only=True)
    assert list(rep["models"]) == ["tiny_a", "tiny_b"]  # labelled as robustkit evaluate does
    assert rep["common_layers"] == LAYERS
    for label, seed in (("tiny_a", 0), ("tiny_b", 1)):
        m = rep["models"][label]
        assert {"attack", "eps", "n", "adv_accuracy", "layers"} <= set(m)
        assert (m["attack"], m["eps"], m["n"], m["skipped_layers"]) == (f"pgd{STEPS}", EPS, N, [])
        model = _model(seed)
        # x' is white-box PGD on THIS model, every image, all steps, last iterate.
        x_adv = _pgd_last_iterate(model, x, y)
        assert torch.equal(adv["x_adv"][label], x_adv)
        with torch.no_grad():
            assert m["clean_accuracy"] == (model(x).argmax(1) == y).sum().item() / N
            assert m["adv_accuracy"] == (model(x_adv).argmax(1) == y).sum().item() / N
        sigma = neuron_sensitivity(model, x, x_adv, LAYERS)
        rel = neuron_sensitivity(model, x, x_adv, LAYERS, relative=True)
        assert list(m["layers"]) == LAYERS
        for layer in LAYERS:
            e, s = m["layers"][layer], sigma[layer]
            assert set(e) >= {"mean", "median", "relative_mean", "topk_mean", "ci95",
                              "intervention"}
            assert set(e["intervention"]) == {"topk", "random"}
            top = top_k_neurons(s, 0.1)
            assert e["mean"] == pytest.approx(s.mean().item(), rel=1e-6)
            assert e["median"] == pytest.approx(float(np.median(s.numpy())), rel=1e-6)
            assert e["relative_mean"] == pytest.approx(rel[layer].mean().item(), rel=1e-6)
            assert e["topk_mean"] == pytest.approx(s[top].mean().item(), rel=1e-6)
            assert e["topk_neurons"] == top.tolist() and e["k"] == 1 == len(top)
            per_image = _per_image_means(model, x, x_adv, layer)  # bootstrap over IMAGES
            assert per_image.mean() == pytest.approx(e["mean"], rel=1e-6)
            assert e["ci95"] == pytest.approx(_ci(per_image), rel=1e-6)
            assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
            iv = intervention_test(model, x, x_adv, y, layer, s, ratio=0.1, draws=3,
                                   generator=torch.Generator().manual_seed(SEED))
            assert e["intervention"]["topk"] == pytest.approx(iv["topk"], abs=1e-6)
            assert e["intervention"]["random"] == pytest.approx(iv["random"], abs=1e-6)
    a, b = (neuron_sensitivity(_model(s), x, adv["x_adv"][lb], LAYERS)
            for s, lb in ((0, "tiny_a"), (1, "tiny_b")))
    assert rep["pairs"] == [{"a": "tiny_a", "b": "tiny_b", "jaccard": {
        ly: jaccard(top_k_neurons(a[ly], 0.1), top_k_neurons(b[ly], 0.1)) for ly in LAYERS}}]
    st = rep["settings"]
    assert st["attack_settings"] | {"generator_seed": None} == {
        "name": f"pgd{STEPS}", "class": "PGD", "family": "pgd", "eps": EPS, "alpha": EPS / 4,
        "steps": STEPS, "random_start": True, "norm": "Linf", "loss": "ce", "restarts": 1,
        "stop_on_success": False, "select": "last", "generator_seed": None}
    assert (st["source_model"], st["reduction"], st["ci"]["over"]) == (None, "elementwise",
                                                                       "images")
    for word in ("tiny_a", "tiny_b", "features.0", "fc", "Jaccard", "white-box", "0.3"):
        assert word in printed


def test_figures_are_readable_pngs_and_tensorboard_has_histograms(white_box):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rep, _ = white_box
    assert rep["figures"] == ["sigma_mean.png", "sigma_hist.png", "intervention.png"]
    for name in rep["figures"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            w, h = img.size
            assert 600 <= w <= 4000 and 300 <= h <= 6000, (name, img.size)
            pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 10  # something is drawn, not a blank canvas
    for label in ("tiny_a", "tiny_b"):
        events = list((out / "tb" / label).glob("events.out.tfevents.*"))
        assert len(events) == 1
        acc = EventAccumulator(str(events[0])).Reload()
        assert set(acc.Tags()["histograms"]) == {f"{k}/{ly}" for k in ("sigma", "relative_sigma")
                                                 for ly in LAYERS}
    if "matplotlib.pyplot" in sys.modules:  # figures never go through pyplot's registry
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_source_model_measures_every_model_on_identical_pairs(tmp_path, archs):
    out = tmp_path / "out"
    rc, printed = _run(out, "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                       "--source-model", "tiny_b", "--reduction", "spatial_mean", "--save-adv")
    assert rc == 0
    rep = json.loads((out / "sensitivity.json").read_text())
    adv = torch.load(out / "adv.pt", weights_only=True)["x_adv"]
    x, y = _data()
    expected = _pgd_last_iterate(_model(1), x, y)  # made once, on the source model
    assert torch.equal(adv["tiny_a"], expected) and torch.equal(adv["tiny_b"], expected)
    assert rep["settings"]["source_model"] == "tiny_b" and "x' from tiny_b" in printed
    for label, seed in (("tiny_a", 0), ("tiny_b", 1)):
        m = rep["models"][label]
        assert m["source_model"] == "tiny_b" and m["reduction"] == "spatial_mean"
        sigma = neuron_sensitivity(_model(seed), x, expected, LAYERS, reduction="spatial_mean")
        for layer in LAYERS:
            e = m["layers"][layer]
            assert e["mean"] == pytest.approx(sigma[layer].mean().item(), rel=1e-6)
            # MindArmour's σ sums over images: its CI is n x the CI of the per-image mean
            assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
            assert e["ci95"][1] - e["ci95"][0] < 0.5 * e["mean"]


def test_models_with_different_layers_compare_the_common_ones(tmp_path, archs, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="robustkit.sensitivity.compare"):
        rc, _ = _run(out, "--model", archs("tiny_a"), "--model", archs("tiny_extra"),
                     "--n-examples", "4")
    assert rc == 0
    rep = json.loads((out / "sensitivity.json").read_text())
    assert rep["common_layers"] == LAYERS
    assert rep["models"]["tiny_extra"]["skipped_layers"] == ["head"]
    assert rep["models"]["tiny_a"]["skipped_layers"] == []
    assert list(rep["models"]["tiny_extra"]["layers"]) == LAYERS
    assert list(rep["pairs"][0]["jaccard"]) == LAYERS
    assert "only the 2 common layers" in caplog.text and "head" in caplog.text


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("robustkit sensitivity: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("argv, named", [
    (["--layers", "features.0,nope"], "nope"),
    (["--layers", "head"], "head"),  # a layer of one model, unknown to the other
    (["--attack", "autoattack"], "pgdK"),
    (["--attack", "pgd5x2"], "restarts"),
    (["--eps", "0"], "--eps"),
    (["--n-examples", "1"], "--n-examples"),
    (["--ratio", "1.5"], "--ratio"),
    (["--source-model", "nope.py:f"], "nope.py"),
])
def test_user_mistakes_are_one_line(tmp_path, archs, capsys, argv, named):
    rc, _ = _run(tmp_path / "o", "--model", archs("tiny_a"), "--model", archs("tiny_extra"),
                 *argv)
    assert rc == 2
    line = _one_line(capsys)
    assert named in line
    if named in ("nope", "head"):  # the valid names are listed
        assert "features.0, fc" in line


@pytest.mark.parametrize("fn, named", [("seven_classes", "7 classes"),
                                       ("rgb_input", "(1, 1, 28, 28)")])
def test_model_that_does_not_fit_the_dataset_is_one_line(tmp_path, archs, capsys, fn, named):
    rc, _ = _run(tmp_path / "o", "--model", archs(fn))
    assert rc == 2 and named in _one_line(capsys)


def test_checkpoint_and_name_bind_to_the_model_before_them(tmp_path, capsys):
    assert _run(tmp_path / "o", "--checkpoint", "a.pt", "--model", "small_cnn")[0] == 2
    assert "before any --model" in _one_line(capsys)
    assert model_labels([{"spec": "small_cnn", "checkpoint": "runs/nat/best.pt", "name": None},
                    {"spec": "small_cnn", "checkpoint": "runs/at/best.pt", "name": None},
                    {"spec": "x.py:lenet", "checkpoint": None, "name": "mine"}]) == [
        "small_cnn@nat", "small_cnn@at", "mine"]
    assert model_labels([{"spec": "small_cnn", "checkpoint": "a/last.pt", "name": None},
                    {"spec": "small_cnn", "checkpoint": "a/best.pt", "name": None}]) == [
        "small_cnn@last", "small_cnn@best"]


def test_same_seed_same_results_other_seed_other_pairs(tmp_path, archs, white_box):
    _, first, _ = white_box
    rc, _ = _run(tmp_path / "again", "--model", archs("tiny_a"), "--model", archs("tiny_b"))
    assert rc == 0
    assert json.loads((tmp_path / "again" / "sensitivity.json").read_text()) == first
    rc, _ = _run(tmp_path / "other", "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                 "--seed", "4")
    other = json.loads((tmp_path / "other" / "sensitivity.json").read_text())
    assert other["models"]["tiny_a"]["layers"]["fc"]["mean"] != \
        first["models"]["tiny_a"]["layers"]["fc"]["mean"]


def test_per_sample_sensitivity_sums_to_sigma():
    model = _model(0).double()
    x, _ = _data(7)
    x = x.double()
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=x.dtype)).clamp(0, 1)
    for reduction, combine in (("elementwise", "mean"), ("spatial_mean", "sum")):
        rows = per_sample_sensitivity(model, x, x_adv, LAYERS, reduction, batch_size=3)
        sigma = neuron_sensitivity(model, x, x_adv, LAYERS, reduction)
        for layer in LAYERS:
            assert rows[layer].shape == (7, sigma[layer].numel())
            torch.testing.assert_close(getattr(rows[layer], combine)(0), sigma[layer])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sensitivity", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--model", "--checkpoint", "--name", "--dataset", "--data-root", "--eps",
                 "--attack", "--layers", "--reduction", "--n-examples", "--source-model",
                 "--source-checkpoint", "--ratio", "--draws", "--batch-size", "--device",
                 "--seed", "--out", "--save-adv", "--no-progress", "LAST", "no early stop",
                 "alpha = eps/4", "sensitivity.json", '"ci95"', '"intervention"', '"pairs"',
                 "sigma_hist.png", "tb/LABEL"):
        assert word in text, word


def test_x_adv_file_reproduces_the_white_box_run(tmp_path, archs, white_box):
    """--x-adv with the adv.pt of --save-adv measures the same pairs: the same σ, CIs,
    interventions and overlaps; the settings say the pairs were given."""
    out, rep, _ = white_box
    rc, printed = _run(tmp_path / "o", "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                       "--x-adv", str(out / "adv.pt"))
    assert rc == 0 and "given x'" in printed
    again = json.loads((tmp_path / "o" / "sensitivity.json").read_text())
    for label, m in rep["models"].items():
        assert again["models"][label]["layers"] == m["layers"]
        assert again["models"][label]["adv_accuracy"] == m["adv_accuracy"]
        assert again["models"][label]["attack"] is None
    assert again["pairs"] == rep["pairs"] and again["settings"]["attack"] is None


def _bad_adv_files(folder, x, y):
    """name -> (file, words of the one-line error)."""
    good = torch.rand_like(x)
    nan, big = good.clone(), good.clone()
    nan[3, 0, 5, 5] = float("nan")
    big[1, 0, 0, 0] = 1.5
    other = y.clone()
    other[0] = (other[0] + 1) % 10
    cases = {
        "nan": ({"x_adv": {"tiny_a": nan, "tiny_b": good}, "y": y}, ["NaN", "[3]", "tiny_a"]),
        "inf": (good.clone().index_fill_(0, torch.tensor([2]), float("inf")), ["infinite"]),
        "range": (big, ["outside [0, 1]", "[1]"]),
        "shape": (good[:, :, :20], ["shaped like x", "(12, 1, 28, 28)", "(12, 1, 20, 28)"]),
        "few": (good[:5], ["5 images", "fewer than the 12"]),
        "labels": ({"x_adv": good, "y": other}, ["labels", "first 12 images"]),
        "missing": ({"x_adv": {"tiny_a": good}}, ["not for tiny_b"]),
        "layout": ({"pairs": good}, ["expected a tensor"]),
        "ints": ((good * 255).to(torch.uint8), ["float (N, C, H, W)", "uint8"]),
    }
    files = {}
    for name, (obj, words) in cases.items():
        torch.save(obj, folder / f"{name}.pt")
        files[name] = (folder / f"{name}.pt", words)
    (folder / "empty.pt").write_bytes(b"")
    files["empty"] = (folder / "empty.pt", ["cannot be read as a torch file"])
    (folder / "text.pt").write_text("not a tensor")
    files["text"] = (folder / "text.pt", ["cannot be read as a torch file"])
    torch.save({"x_adv": good, "code": __import__("os").getcwd}, folder / "code.pt")  # a global
    files["code"] = (folder / "code.pt", ["cannot be read as a torch file", "weights-only"])
    return files


BAD_ADV = ["nan", "inf", "range", "shape", "few", "labels", "missing", "layout", "ints", "empty",
           "text", "code"]


@pytest.mark.parametrize("case", BAD_ADV)
def test_bad_x_adv_files_are_one_line(tmp_path, archs, capsys, case):
    """Issue #19: a NaN in the x' file was a traceback; every bad file is one line, exit 2."""
    x, y = _data()
    path, words = _bad_adv_files(tmp_path, x, y)[case]
    rc, _ = _run(tmp_path / "o", "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                 "--x-adv", str(path))
    assert rc == 2
    line = _one_line(capsys)
    assert f"--x-adv {path}:" in line
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "o" / "sensitivity.json").exists()


def test_x_adv_flag_mistakes_are_one_line(tmp_path, archs, capsys):
    rc, _ = _run(tmp_path / "o", "--model", archs("tiny_a"), "--x-adv", str(tmp_path / "no.pt"))
    assert rc == 2 and "--x-adv" in (line := _one_line(capsys)) and "file not found" in line
    torch.save(torch.rand(N, 1, 28, 28), tmp_path / "ok.pt")
    rc, _ = _run(tmp_path / "o", "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                 "--x-adv", str(tmp_path / "ok.pt"), "--source-model", "tiny_a")
    assert rc == 2 and "--source-model" in _one_line(capsys)
    # --attack makes x', --x-adv gives it: both at once is refused, not silently half-applied
    rc, _ = _run(tmp_path / "o", "--model", archs("tiny_a"), "--model", archs("tiny_b"),
                 "--x-adv", str(tmp_path / "ok.pt"), "--attack", "pgd5")
    assert rc == 2 and "--attack pgd5" in (line := _one_line(capsys)) and "give one" in line
    assert not (tmp_path / "o" / "sensitivity.json").exists()

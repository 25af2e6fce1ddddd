"""``robustkit.sensitivity.compare`` and ``SensitivityReport`` (issue #19): the CLI writes exactly
what ``compare(...).save()`` writes for the same inputs (every file byte for byte, TensorBoard
by its tags), and ``to_frame`` / ``plot`` / ``table`` / ``_repr_html_`` show the measured values
themselves, checked against the JSON and against ``neuron_sensitivity`` and ``jaccard`` called
directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from robustkit.attacks import PGD
from robustkit.cli import main
from robustkit.data import first_n, load_dataset
from robustkit.sensitivity import (
    SensitivityReport,
    compare,
    jaccard,
    neuron_sensitivity,
    top_k_neurons,
)

N, STEPS, EPS, BATCH, SEED = 6, 3, 0.3, 4, 2
LAYERS = ["features.0", "fc"]
ARCHS = """
import torch
from robustkit.testing import TinyCNN

def tiny_a():
    torch.manual_seed(0)
    return TinyCNN(1, 10, 28)

def tiny_b():
    torch.manual_seed(1)
    return TinyCNN(1, 10, 28)
"""


def _data():
    data = first_n(load_dataset("sample-mnist", "test"), N)
    return (torch.stack([data[i][0] for i in range(N)]),
            torch.stack([torch.as_tensor(data[i][1]) for i in range(N)]).long())


def _models():
    out = {}
    for label, seed in (("tiny_a", 0), ("tiny_b", 1)):
        torch.manual_seed(seed)
        from robustkit.testing import TinyCNN

        out[label] = TinyCNN(1, 10, 28).eval()
    return out


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and "tfevents" not in p.name)


def _histogram_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event,) = folder.glob("events.out.tfevents.*")
    return set(EventAccumulator(str(event)).Reload().Tags()["histograms"])


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    path = tmp_path_factory.mktemp("archs") / "archs.py"
    path.write_text(ARCHS)
    return path


CASES = {
    # white-box on each model, paper's sigma, the adversarial images saved
    "white_box": (["--save-adv"], dict(save_adv=True)),
    # one x' set made on the second model, MindArmour's sigma, two layers by their aliases
    "source": (["--source-model", "tiny_b", "--reduction", "spatial_mean", "--layers",
                "0,fc", "--attack", f"cw{STEPS}", "--ratio", "0.3"],
               dict(source="tiny_b", reduction="spatial_mean", layers=["0", "fc"],
                    attack=f"cw{STEPS}", ratio=0.3)),
}


@pytest.fixture(scope="module", params=list(CASES))
def both(request, archs, tmp_path_factory):
    """The same comparison through the CLI and through ``compare(...).save()``."""
    argv, kw = CASES[request.param]
    save_adv = kw.pop("save_adv", False)
    root = tmp_path_factory.mktemp(request.param)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["sensitivity", "--dataset", "sample-mnist", "--model", f"{archs}:tiny_a",
                     "--model", f"{archs}:tiny_b", "--n-examples", str(N), "--attack",
                     f"pgd{STEPS}", "--batch-size", str(BATCH), "--seed", str(SEED), "--draws",
                     "2", "--device", "cpu", "--no-progress", "--out", str(root / "cli"),
                     *argv]) == 0
    x, y = _data()
    report = compare(
        _models(), x, y, **{"attack": f"pgd{STEPS}", **kw}, eps=EPS, batch_size=BATCH,
        seed=SEED, draws=2,
        model_info={lb: {"model": f"{archs}:{lb}", "checkpoint": None}
                    for lb in ("tiny_a", "tiny_b")},
        about={"dataset": "sample-mnist", "split": "test", "device": "cpu"})
    report.save(root / "lib", save_adv=save_adv)
    return root / "cli", root / "lib", report, printed.getvalue()


def test_cli_and_library_write_the_same_files(both):
    cli, lib, report, printed = both
    assert _files(cli) == _files(lib)
    assert (cli / "sensitivity.json").read_bytes() == (lib / "sensitivity.json").read_bytes()
    assert json.loads((lib / "sensitivity.json").read_text()) == report.to_dict()
    for name in _files(cli):
        if name.endswith(".png"):
            assert (cli / name).read_bytes() == (lib / name).read_bytes(), name
    if (cli / "adv.pt").exists():
        a, b = (torch.load(d / "adv.pt", weights_only=True) for d in (cli, lib))
        assert a["x_adv"].keys() == b["x_adv"].keys()
        assert all(torch.equal(a["x_adv"][k], b["x_adv"][k]) for k in a["x_adv"])
        assert torch.equal(a["y"], b["y"])
    for label in report.models:
        assert _histogram_tags(cli / "tb" / label) == _histogram_tags(lib / "tb" / label) == {
            f"{k}/{ly}" for k in ("sigma", "relative_sigma") for ly in report.common_layers}
    assert report.table() in printed  # the CLI prints the report's table


def test_layers_are_named_in_full_everywhere(both):
    """Aliases ("0", "fc") go in; the full module names come out in every output."""
    _, lib, report, printed = both
    rep = json.loads((lib / "sensitivity.json").read_text())
    assert rep["common_layers"] == LAYERS == report.common_layers
    for m in rep["models"].values():
        assert list(m["layers"]) == LAYERS
    assert list(rep["pairs"][0]["jaccard"]) == LAYERS
    assert all(list(s) == LAYERS for s in report.sigma.values())
    assert set(report.to_frame()["layer"]) == set(LAYERS)
    for ly in LAYERS:
        assert f"  {ly} " in printed


def test_values_are_the_measured_ones(both):
    """σ by ``neuron_sensitivity`` on the report's own pairs; each model on ITS x' (or, with a
    source, every model on the source's x'); Jaccard of the first model and the second."""
    _, _, report, _ = both
    x, y = _data()
    models = _models()
    s = report.settings
    for label, model in models.items():
        # x' by the paper's PGD written out (L∞, α = ε/4, random start, all steps, last
        # iterate, CPU generator seeded once per attacked model), on the source or on the model
        made_on = models[s["source_model"] or label]
        pgd = PGD(made_on, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True, norm="Linf",
                  loss="ce" if s["attack"].startswith("pgd") else "cw", stop_on_success=False,
                  select="last", generator=torch.Generator().manual_seed(SEED))
        expected = torch.cat([pgd(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)])
        assert torch.equal(report.x_adv[label], expected)
        sigma = neuron_sensitivity(model, x, report.x_adv[label], LAYERS,
                                   reduction=s["reduction"])
        with torch.no_grad():
            adv = float((model(report.x_adv[label]).argmax(1) == y).float().mean())
        assert report.models[label]["adv_accuracy"] == pytest.approx(adv)
        for ly in LAYERS:
            # float32 features of batches of 4 + 2 against one batch of 6: equal to ~1e-7
            torch.testing.assert_close(report.sigma[label][ly], sigma[ly], rtol=1e-5, atol=1e-6)
            assert report.models[label]["layers"][ly]["mean"] == pytest.approx(
                float(sigma[ly].mean()), rel=1e-5)
    (pair,) = report.pairs
    assert (pair["a"], pair["b"]) == ("tiny_a", "tiny_b")
    for ly in LAYERS:
        assert pair["jaccard"][ly] == jaccard(top_k_neurons(report.sigma["tiny_a"][ly],
                                                            s["ratio"]),
                                              top_k_neurons(report.sigma["tiny_b"][ly],
                                                            s["ratio"]))


def test_to_frame_holds_the_json_values(both):
    _, lib, report, _ = both
    rep = json.loads((lib / "sensitivity.json").read_text())
    frame = report.to_frame()
    assert len(frame) == 2 * len(LAYERS)
    for row in frame.itertuples():
        e = rep["models"][row.model]["layers"][row.layer]
        assert (row.mean, row.median, row.relative_mean, row.topk_mean) == (
            e["mean"], e["median"], e["relative_mean"], e["topk_mean"])
        assert [row.ci_low, row.ci_high] == e["ci95"]
        assert (row.restore_topk, row.restore_random) == (e["intervention"]["topk"],
                                                           e["intervention"]["random"])
        assert (row.k, row.channels) == (e["k"], e["channels"])
        assert row.adv_accuracy == rep["models"][row.model]["adv_accuracy"]
    wide = frame.pivot(index="layer", columns="model", values="mean")
    assert wide.loc["fc", "tiny_b"] == rep["models"]["tiny_b"]["layers"]["fc"]["mean"]
    pairs = report.to_frame("pairs")
    assert pairs.to_dict("records") == [{"a": "tiny_a", "b": "tiny_b", "layer": ly, "jaccard": j}
                                        for ly, j in rep["pairs"][0]["jaccard"].items()]
    neurons = report.to_frame("neurons")
    for (model, layer), group in neurons.groupby(["model", "layer"]):
        assert list(group["neuron"]) == list(range(len(group)))
        assert group["sigma"].mean() == pytest.approx(rep["models"][model]["layers"][layer]["mean"])
        np.testing.assert_allclose(group["relative"], report.relative[model][layer].numpy())
    with pytest.raises(ValueError, match="what"):
        report.to_frame("nope")


def test_plot_returns_the_three_figures_without_pyplot(both):
    _, _, report, _ = both
    figs = report.plot()
    assert list(figs) == ["sigma_mean", "sigma_hist", "intervention"]
    assert all(isinstance(f, Figure) for f in figs.values())
    ticks = [t.get_text() for t in figs["sigma_mean"].axes[0].get_xticklabels()]
    assert ticks == LAYERS  # full names, as in the JSON
    bars = [p.get_height() for p in figs["sigma_mean"].axes[0].patches]
    assert bars == pytest.approx([report.models[m]["layers"][ly]["mean"]
                                  for m in report.models for ly in LAYERS])
    assert [ax.get_title() for ax in figs["sigma_hist"].axes] == LAYERS  # a panel per layer
    assert [ax.get_title() for ax in figs["intervention"].axes] == list(report.models)
    restored = [p.get_height() for p in figs["intervention"].axes[0].patches]
    e = report.models["tiny_a"]
    assert restored == pytest.approx(  # x', k random restored, top-k restored, x; per layer
        [e["adv_accuracy"]] * 2 + [e["layers"][ly]["intervention"]["random"] for ly in LAYERS]
        + [e["layers"][ly]["intervention"]["topk"] for ly in LAYERS] + [e["clean_accuracy"]] * 2)
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_repr_html_shows_every_model_and_layer(both):
    _, _, report, _ = both
    page = report._repr_html_()
    assert page.startswith("<p><b>Neuron sensitivity</b>")
    for label in report.models:
        for ly in LAYERS:
            e = report.models[label]["layers"][ly]
            assert f"<td>{ly}</td><td>{label}</td><td class=n>{e['mean']:.4g}</td>" in page
    assert "top-k overlap (Jaccard) tiny_a vs tiny_b" in page


def test_given_pairs_equal_the_attack_made_ones(both):
    """x_adv= with the pairs the attack made gives the same σ and statistics; the settings say
    the pairs were given."""
    _, _, report, _ = both
    x, y = _data()
    s = report.settings
    given = compare(_models(), x, y, x_adv=report.x_adv, layers=s["layers"],
                    reduction=s["reduction"], ratio=s["ratio"], draws=2, batch_size=BATCH,
                    seed=SEED)
    assert isinstance(given, SensitivityReport)
    assert given.settings["attack"] is None and given.settings["attack_settings"] is None
    assert "given x'" in given.table() and "given x&#x27;" in given._repr_html_()
    for label, m in report.models.items():
        assert given.models[label]["layers"] == m["layers"]
        assert given.models[label]["model"] == "TinyCNN"  # no model_info: the class name
    assert given.pairs == report.pairs


@pytest.mark.parametrize("kw, match", [
    (dict(), "exactly one of attack= .* and x_adv="),
    (dict(attack="pgd2", x_adv=torch.zeros(1)), "exactly one"),
    (dict(attack="pgd2"), "eps must be a positive"),
    (dict(attack="autoattack", eps=0.3), "pgdK or cwK"),
    (dict(attack="pgd2x3", eps=0.3), "restarts"),
    (dict(attack="pgd2", eps=0.3, source="nope"), "source 'nope' is not one of the models"),
    (dict(attack="pgd2", eps=0.3, layers=["nope"]), r"model tiny_a: unknown layer\(s\) "
                                                    r"\['nope'\]"),
    (dict(attack="pgd2", eps=0.3, ratio=1.5), "ratio"),
    (dict(x_adv={"tiny_a": torch.zeros(N, 1, 28, 28)}), "one entry per model"),
    (dict(x_adv=torch.zeros(N, 1, 28, 27)), r"shaped like x, \(\d+, 1, 28, 28\)"),
    (dict(x_adv={"tiny_a": torch.zeros(N, 1, 28, 28),
                 "tiny_b": torch.zeros(N, 1, 28, 28).index_fill_(0, torch.tensor([4]),
                                                                 float("nan"))}),
     r"x_adv\['tiny_b'\] holds NaN or infinite values in 1 image\(s\) \(first: \[4\]\)"),
    (dict(x_adv=torch.full((N, 1, 28, 28), 1.01)), r"values outside \[0, 1\]"),
    (dict(attack="pgd2", eps=0.3, y=lambda y: y.float()), "integer labels"),
    (dict(attack="pgd2", eps=0.3, y=lambda y: y - 20), "negative labels"),
    (dict(attack="pgd2", eps=0.3, y=lambda y: y.index_fill(0, torch.tensor([1]), 10)),
     "label 10, outside the 10 classes of model tiny_a"),
    (dict(attack="pgd2", eps=0.3, x=lambda x: x * float("nan")), "x holds NaN"),
])
def test_bad_arguments_are_refused_naming_them(kw, match):
    x, y = _data()
    kw = dict(kw)  # the parameter itself stays as collected
    x, y = kw.pop("x", lambda t: t)(x), kw.pop("y", lambda t: t)(y)
    with pytest.raises(ValueError, match=match):
        compare(_models(), x, y, **kw)

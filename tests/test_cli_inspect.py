"""``robustkit inspect`` end to end on the shipped MNIST sample and models (robustkit.cli.inspect).

summary.json is checked against the per-image CSV (means, bootstrap CIs, paired differences,
Wilcoxon p-values by scipy directly), one CSV column is recomputed from scratch (PGD written out,
the true label's gradient, the metric), and index.html must reference only files inside --out.
"""

from __future__ import annotations

import csv
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from robustkit.attacks import PGD
from robustkit.cli import main
from robustkit.data import first_n, load_dataset
from robustkit.models import load_pretrained
from robustkit.reports.stats import bootstrap_ci, wilcoxon_p
from robustkit.saliency import Gradient
from robustkit.saliency import metrics as M

N, STEPS, EPS, SEED = 8, 5, 0.3, 0
STD, ROB = "std<&>", "mnist_smallcnn_robust"  # the first label tests HTML escaping
EXPLAINERS = ["gradient", "smoothgrad"]
MAP_METRICS = ["sparseness", "complexity", "total_variation", "hfer", "alignment_cos",
               "edge_spearman"]
PAIR_METRICS = ["stability_spearman", "topk_intersection", "stability_cos"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    code = main(["inspect", "--dataset", "sample-mnist",
                 "--model", "robustkit:mnist_smallcnn_standard", "--name", STD,
                 "--model", "robustkit:mnist_smallcnn_robust",
                 "--n-examples", str(N), "--n-samples", "4", "--attack", f"pgd{STEPS}",
                 "--explainers", ",".join(EXPLAINERS), "--seed", str(SEED),
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def table(run_dir):
    """``{(explainer, metric, input, model): (N,) values by image index}`` from the CSV."""
    out: dict[tuple, np.ndarray] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["index", "model", "explainer", "input", "metric", "value"]
    for r in rows:
        key = (r["explainer"], r["metric"], r["input"], r["model"])
        out.setdefault(key, np.full(N, np.nan))[int(r["index"])] = float(r["value"])
    return out


def test_summary_shape(summary):
    assert summary["n"] == N
    assert list(summary["models"]) == [STD, ROB]
    for m in summary["models"].values():
        assert {"clean_accuracy", "adv_accuracy", "kind"} <= set(m)
    assert summary["models"][STD]["kind"] == "standard"  # from the shipped model cards
    assert summary["models"][ROB]["kind"] == "robust"
    per_input = len(MAP_METRICS) * 2 + len(PAIR_METRICS) * 2  # pair and the noise control
    assert len(summary["metrics"]) == len(EXPLAINERS) * per_input * 2
    assert len(summary["pairs"]) == len(EXPLAINERS) * per_input
    for r in summary["metrics"]:
        assert set(r) >= {"explainer", "metric", "input", "model", "mean", "ci95"}
        assert r["input"] in ("clean", "adv", "pair", "noise")
        assert (r["metric"] in PAIR_METRICS) == (r["input"] in ("pair", "noise"))
    for p in summary["pairs"]:
        assert set(p) >= {"explainer", "metric", "input", "a", "b", "diff_mean", "ci95",
                          "wilcoxon_p"}
        assert (p["a"], p["b"]) == (STD, ROB)  # the first model is the reference


def test_means_and_cis_equal_the_csv(summary, table):
    for r in summary["metrics"]:
        v = table[(r["explainer"], r["metric"], r["input"], r["model"])]
        v = v[np.isfinite(v)]
        assert r["n"] == v.size
        assert r["mean"] == pytest.approx(v.mean(), rel=1e-12, abs=1e-12)
        assert r["ci95"] == pytest.approx(list(bootstrap_ci(v, SEED)), rel=1e-12, abs=1e-12)


def test_pairs_equal_scipy_on_the_csv(summary, table):
    checked = 0
    for p in summary["pairs"]:
        a = table[(p["explainer"], p["metric"], p["input"], p["a"])]
        b = table[(p["explainer"], p["metric"], p["input"], p["b"])]
        ok = np.isfinite(a) & np.isfinite(b)
        d = b[ok] - a[ok]
        assert p["diff_mean"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
        assert p["ci95"] == pytest.approx(list(bootstrap_ci(d, SEED)), rel=1e-12, abs=1e-12)
        sd = np.std(d, ddof=1)
        assert (p["d_z"] is None) if sd == 0 else p["d_z"] == pytest.approx(d.mean() / sd)
        if np.all(d == 0):
            assert p["wilcoxon_p"] is None
        else:
            assert p["wilcoxon_p"] == pytest.approx(wilcoxon(b[ok], a[ok]).pvalue, rel=1e-12)
            checked += 1
    assert checked > 0
    # the robust model's maps are sparser than the standard one's (methods.md §8 hypothesis)
    sp = next(p for p in summary["pairs"] if (p["explainer"], p["metric"], p["input"])
              == ("gradient", "sparseness", "clean"))
    assert sp["diff_mean"] > 0


def test_wilcoxon_p():
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1.5, 1.0, 3.7, 2.0, 9.0])
    assert wilcoxon_p(a, b) == pytest.approx(wilcoxon(a, b).pvalue)
    assert wilcoxon_p(a, a.copy()) is None
    with pytest.raises(ValueError, match="paired"):
        wilcoxon_p(a, b[:3])


def test_csv_recomputed_independently(summary, table):
    """x' by a PGD written out (L∞, α = ε/4, uniform start, last iterate, seeded CPU
    generator), the map = the true label's gradient, scored by the metric functions."""
    data = first_n(load_dataset("sample-mnist", "test"), N)
    x = torch.stack([data[i][0] for i in range(N)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(N)]).long()
    model = load_pretrained("mnist_smallcnn_standard")
    pgd = PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True, norm="Linf",
              loss="ce", restarts=1, stop_on_success=False, select="last",
              generator=torch.Generator().manual_seed(SEED))
    x_adv = pgd(x, y)
    with torch.no_grad():
        assert summary["models"][STD]["adv_accuracy"] == pytest.approx(
            float((model(x_adv).argmax(1) == y).float().mean()))
        assert summary["models"][STD]["clean_accuracy"] == pytest.approx(
            float((model(x).argmax(1) == y).float().mean()))
    g_clean = Gradient(model).attribute(x, target=y).double()
    g_adv = Gradient(model).attribute(x_adv, target=y).double()
    for xi, g, key in ((x, g_clean, "clean"), (x_adv, g_adv, "adv")):
        np.testing.assert_allclose(table[("gradient", "sparseness", key, STD)],
                                   M.sparseness(g).numpy(), rtol=1e-6)
        np.testing.assert_allclose(table[("gradient", "alignment_cos", key, STD)],
                                   M.alignment_cos(g, xi.double()).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(table[("gradient", "stability_cos", "pair", STD)],
                               M.stability_cos(g_clean, g_adv).numpy(), rtol=1e-6, atol=1e-9)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_files_and_index_html(run_dir, summary):
    for ex in EXPLAINERS:
        png = run_dir / summary["grids"][ex]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    page = (run_dir / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.src) == len(EXPLAINERS)
    root = run_dir.resolve()
    for src in parser.src:
        assert not src.startswith("/") and ":" not in src, src  # relative: DIR is portable
        target = (run_dir / src).resolve()
        assert target.is_file() and root in target.parents, src
    assert STD not in page and "std&lt;&amp;&gt;" in page  # labels are escaped
    for name in re.findall(r'href="([^"]+)"', page):
        assert (run_dir / name).is_file(), name


ARCHS = """
from robustkit.testing import TinyCNN

def five_classes():
    return TinyCNN(1, 5, 28)

def rgb32():
    return TinyCNN(3, 10, 32)
"""


@pytest.mark.parametrize("extra, words", [
    (["--explainers", "gradient,lime"], ["unknown explainer 'lime'", "valid:", "smoothgrad"]),
    (["--model", "{archs}:five_classes"], ["five_classes", "5 classes", "10"]),
    (["--model", "{archs}:rgb32"], ["rgb32", "(1, 1, 28, 28)", "channels"]),
    (["--n-examples", "1"], ["--n-examples"]),
])
def test_errors_exit_2_with_one_line(tmp_path, capsys, extra, words):
    archs = tmp_path / "archs.py"
    archs.write_text(ARCHS)
    extra = [e.replace("{archs}", str(archs)) for e in extra]
    code = main(["inspect", "--dataset", "sample-mnist", "--model",
                 "robustkit:mnist_smallcnn_standard", "--n-examples", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("robustkit inspect: error:"), err
    for w in words:
        assert w in err, err


@pytest.mark.slow
def test_index_html_renders_in_chromium(run_dir, chromium_images):
    loaded, total = chromium_images(run_dir / "index.html")
    assert total == len(EXPLAINERS)
    assert loaded == total


def test_statistics_pair_only_images_finite_for_both():
    """A NaN (a constant map's Spearman ρ) drops that image from the mean of its model and from
    the pair for both models, so the differences stay paired image by image."""
    from robustkit.saliency.compare import _statistics

    a = [0.1, 0.5, math.nan, 0.2, 0.9, 0.4]
    b = [0.3, math.nan, 0.8, 0.6, 1.0, 0.1]
    rows = [(i, lb, "gradient", "pair", m, v if m == "stability_spearman" else 0.5)
            for lb, vals in (("A", a), ("B", b)) for i, v in enumerate(vals)
            for m in PAIR_METRICS]
    rows += [(i, lb, "gradient", key, m, float(i)) for lb in ("A", "B") for i in range(6)
             for key in ("clean", "adv") for m in MAP_METRICS]
    metrics, pairs = _statistics(rows, ["A", "B"], {"seed": 0, "n": 6,
                                                    "explainers": ["gradient"]})
    mean_a = next(r for r in metrics if (r["metric"], r["model"]) == ("stability_spearman", "A"))
    assert mean_a["n"] == 5 and mean_a["mean"] == pytest.approx(np.nanmean(a))
    p = next(r for r in pairs if r["metric"] == "stability_spearman")
    ok = [0, 3, 4, 5]
    d = np.array(b)[ok] - np.array(a)[ok]
    assert p["n"] == 4 and p["diff_mean"] == pytest.approx(d.mean())
    assert p["wilcoxon_p"] == pytest.approx(wilcoxon(np.array(b)[ok], np.array(a)[ok]).pvalue)
    same = next(r for r in pairs if r["metric"] == "topk_intersection")
    assert same["wilcoxon_p"] is None and same["diff_mean"] == 0 and same["ci95"] == [0, 0]


@pytest.fixture(scope="module")
def boxed_run(tmp_path_factory):
    """sample-mnist with made-up boxes (as Tiny-ImageNet's val split carries them), with
    --faithfulness and gradient + adaptgrad (so adaptgrad_residual is written)."""
    import robustkit.data as data_module

    real = data_module.load_dataset
    boxes = torch.stack([torch.tensor([i % 5, 2 * (i % 4), 14 + i % 7, 20 + i % 6])
                         for i in range(N)])

    def with_boxes(name, split, root=None, **kw):
        ds = real(name, split, root, **kw)
        ds = first_n(ds, N)
        return type(ds)(ds.x, ds.y, None, boxes, ds.class_names)

    mp = pytest.MonkeyPatch()
    mp.setattr(data_module, "load_dataset", with_boxes)
    out = tmp_path_factory.mktemp("inspect_boxes")
    try:
        code = main(["inspect", "--dataset", "sample-mnist",
                     "--model", "robustkit:mnist_smallcnn_standard", "--name", STD,
                     "--n-examples", str(N), "--n-samples", "4", "--attack", f"pgd{STEPS}",
                     "--explainers", "gradient,adaptgrad", "--faithfulness", "--seed", str(SEED),
                     "--grid-rows", "3",
                     "--device", "cpu", "--no-progress", "--no-tensorboard", "--out", str(out)])
    finally:
        mp.undo()
    assert code == 0
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    values: dict[tuple, np.ndarray] = {}
    for r in rows:
        key = (r["explainer"], r["metric"], r["input"])
        values.setdefault(key, np.full(N, np.nan))[int(r["index"])] = float(r["value"])
    return json.loads((out / "summary.json").read_text()), values, boxes, out


def test_grid_rows_limit_the_picture_not_the_metrics(boxed_run, run_dir):
    from PIL import Image

    summary, values, _, out = boxed_run
    assert summary["settings"]["grid_rows"] == 3
    assert all(np.isfinite(v).all() for k, v in values.items() if k[1] == "sparseness")  # all N
    three = Image.open(out / "grid_gradient.png").size[1]
    eight = Image.open(run_dir / "grid_gradient.png").size[1]
    assert three < 0.6 * eight  # 3 rows against the default run's N = 8


def test_boxes_faithfulness_and_residual_recomputed(boxed_run):
    summary, values, boxes, _ = boxed_run
    data = first_n(load_dataset("sample-mnist", "test"), N)
    x = torch.stack([data[i][0] for i in range(N)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(N)]).long()
    model = load_pretrained("mnist_smallcnn_standard")
    g = Gradient(model).attribute(x, target=y).double()
    np.testing.assert_allclose(values[("gradient", "mass_in_box", "clean")],
                               M.mass_in_box(g, boxes).numpy(), rtol=1e-6)
    np.testing.assert_allclose(values[("gradient", "pointing_game", "clean")],
                               M.pointing_game(g, boxes).numpy())
    assert summary["box_chance"] == pytest.approx(
        float(M.box_area_fraction(boxes, 28, 28).mean()))
    np.testing.assert_allclose(values[("gradient", "deletion_auc", "clean")],
                               M.deletion_auc(model, x, g.float(), y, steps=32).numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(values[("gradient", "insertion_auc", "clean")],
                               M.insertion_auc(model, x, g.float(), y, steps=32).numpy(),
                               rtol=1e-5, atol=1e-7)
    # faithfulness only on x; boxes on x and x'; the residual under adaptgrad, on x and x'
    assert ("gradient", "deletion_auc", "adv") not in values
    assert ("adaptgrad", "mass_in_box", "adv") in values
    assert ("gradient", "adaptgrad_residual", "clean") not in values
    from robustkit.saliency import create_explainer

    ag = create_explainer("adaptgrad", model, n_samples=4, seed=SEED).attribute(x, target=y)
    np.testing.assert_allclose(values[("adaptgrad", "adaptgrad_residual", "clean")],
                               M.adaptgrad_residual(g, ag.double()).numpy(), rtol=1e-5)
    seen = {(r["explainer"], r["metric"], r["input"]) for r in summary["metrics"]}
    assert seen == set(values)
    assert summary["settings"]["faithfulness_steps"] == 32


@pytest.mark.slow
def test_tinyimagenet_boxes_from_the_real_val_split(shared_data, tmp_path):
    """The real Tiny-ImageNet val boxes reach mass_in_box and pointing_game with the right
    orientation: the CSV equals the metrics of the same model's gradient and val.boxes."""
    from robustkit.data import DATASETS
    from robustkit.models import load_model

    info = DATASETS["tinyimagenet"]
    n = 6
    torch.manual_seed(0)
    model = load_model("cifar_cnn", num_classes=200, in_channels=3, input_size=64,
                       mean=info.mean, std=info.std)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    assert main(["inspect", "--dataset", "tinyimagenet", "--data-root", str(shared_data),
                 "--model", "cifar_cnn", "--checkpoint", str(ckpt), "--model", "cifar_cnn",
                 "--checkpoint", str(ckpt), "--name", "copy", "--n-examples", str(n),
                 "--explainers", "gradient", "--attack", "pgd4", "--device", "cpu",
                 "--no-progress", "--no-tensorboard", "--out", str(out)]) == 0
    val = first_n(load_dataset("tinyimagenet", "test", shared_data), n)
    x = torch.stack([val[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(val[i][1]) for i in range(n)]).long()
    g = Gradient(model.eval()).attribute(x, target=y).double()
    rows = [r for r in csv.DictReader(open(out / "metrics.csv", newline=""))
            if r["input"] == "clean" and r["model"] == "copy"]
    for metric, fn in (("mass_in_box", M.mass_in_box), ("pointing_game", M.pointing_game)):
        got = np.array([float(r["value"]) for r in sorted(
            (r for r in rows if r["metric"] == metric), key=lambda r: int(r["index"]))])
        np.testing.assert_allclose(got, fn(g, val.boxes).numpy(), rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["box_chance"] == pytest.approx(
        float(M.box_area_fraction(val.boxes, 64, 64).mean()))
    # the boxes are not all the full image, so the metric is informative here
    assert summary["box_chance"] < 0.9


def test_the_text_table_keeps_d_z_and_p_apart_in_exponent_form():
    """A p of 3.05e-05 ran into d_z ("4.613.05e-05"): every column stays separated."""
    from robustkit.reports.inspect import text_table

    summary = {
        "settings": {"attack": "pgd10", "eps_text": "0.3", "n": 16, "dataset": "sample-mnist"},
        "models": {lb: {"clean_accuracy": 1.0, "adv_accuracy": 0.5, "kind": lb,
                                 "kind_source": "given"} for lb in ("standard", "robust")},
        "metrics": [{"explainer": "adaptgrad", "metric": "sparseness", "input": "x", "model": lb,
                     "mean": 0.5, "ci95": [0.4, 0.6]} for lb in ("standard", "robust")],
        "pairs": [{"explainer": "adaptgrad", "metric": "sparseness", "input": "x",
                   "diff_mean": 0.1, "ci95": [0.05, 0.15], "d_z": -14.61,
                   "wilcoxon_p": 3.05e-05}],
    }
    row = text_table(summary).splitlines()[-1]
    assert "-14.61" in row.split() and "3.05e-05" in row.split()

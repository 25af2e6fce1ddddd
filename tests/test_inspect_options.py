"""``saliency.compare``'s issue-#20 options on constructed models whose answers are known in
closed form: the target class (predicted | true), the correct-by-all subset, the x-vs-x'
stability split by flipped / unchanged predictions, the shared-perturbation control, the
multiple-comparison correction, the wide table and the explainer differences.

The models read 8 x 8 images by quadrant (0 top-left, 1 top-right, 2 bottom-left, 3
bottom-right): ``Squares`` scores class k by the sum of x² over quadrant k, so the gradient of
class c is 2x on quadrant c and 0 elsewhere; ``Linear`` scores it by the sum of x plus a bias
toward class 0, so its gradient is the constant indicator of quadrant c (a map no input
changes).
"""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from robustkit.reports.stats import adjust_p, dz_difference_ci
from robustkit.saliency import compare
from robustkit.saliency.compare import DIRECTIONS

QUADRANTS = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
             (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]
BIAS = 3.0  # Linear's pull toward class 0: it misreads the faint images


def _mask(c: int) -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[QUADRANTS[c]] = 1
    return m


class Squares(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("masks", torch.stack([_mask(c) for c in range(4)]))

    def forward(self, x):
        return torch.einsum("nhw,khw->nk", x[:, 0] ** 2, self.masks)


class Linear(Squares):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([BIAS, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return torch.einsum("nhw,khw->nk", x[:, 0], self.masks) + self.bias


# image i: bright quadrant c, brightness v (0.2 faint: Linear reads class 0), true label y
C = [1, 2, 3, 0, 1, 2]
V = [0.8, 0.2, 0.8, 0.2, 0.8, 0.8]
Y = [1, 2, 3, 0, 2, 2]  # image 4 is labelled 2: both models are wrong on it
# both right: 0, 2, 3 (faint, but class 0 is Linear's pull), 5; Linear wrong on 1, both on 4
CORRECT_BY_ALL = [0, 2, 3, 5]
# x' per image: None = x' is x (prediction unchanged); d = quadrant d lit up to 1 and
# quadrant c redrawn, which flips the prediction of both models to d. Image 4 flips from 1 to
# its true label 2; image 1 keeps Squares' (right) and Linear's (wrong) prediction.
FLIP_TO = [None, None, 0, 2, 2, 3]


def _images(seed=0, reps=1):
    """The six designed images (``reps`` times, each with its own random patterns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((6 * reps, 1, 8, 8), 0.1)
    x_adv = x.clone()
    for i, (c, v) in enumerate(zip(C * reps, V * reps, strict=True)):
        x[i, 0][QUADRANTS[c]] = v * (0.6 + 0.4 * torch.rand(4, 4, generator=g))
        x_adv[i] = x[i]
        if FLIP_TO[i % 6] is not None:
            x_adv[i, 0][QUADRANTS[FLIP_TO[i % 6]]] = 1.0
            x_adv[i, 0][QUADRANTS[c]] = v * (0.6 + 0.4 * torch.rand(4, 4, generator=g))
    return x, torch.tensor(Y * reps), x_adv


def _models():
    return {"squares": Squares().eval(), "linear": Linear().eval()}


def _cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def _run(reps=1, models=None, **kw):
    x, y, x_adv = _images(reps=reps)
    kw = {"explainers": ["gradient"], "x_adv": x_adv, "seed": 3, "grid_rows": 2, **kw}
    return compare(models or _models(), x, y, **kw)


@pytest.fixture(scope="module")
def report():
    return _run()


def test_the_constructed_models_read_as_designed():
    x, y, x_adv = _images()
    sq, lin = _models().values()
    with torch.no_grad():
        assert sq(x).argmax(1).tolist() == C
        assert lin(x).argmax(1).tolist() == [1, 0, 3, 0, 1, 2]
        flipped = [c if d is None else d for c, d in zip(C, FLIP_TO, strict=True)]
        assert sq(x_adv).argmax(1).tolist() == flipped
        assert lin(x_adv).argmax(1).tolist() == [1, 0, 0, 2, 2, 3]


@pytest.mark.parametrize("target", ["predicted", "true"])
def test_maps_explain_the_chosen_class(target):
    """Squares' gradient of class c is 2x on quadrant c: the maps of x, x' and x + δ all
    explain the class predicted on x (default) or the true label."""
    r = _run(target=target) if target != "predicted" else _run()
    x, y, x_adv = _images()
    classes = C if target == "predicted" else Y
    maps = r.attributions["gradient"]["squares"]
    for i, c in enumerate(classes):
        torch.testing.assert_close(maps["clean"][i, 0], 2 * x[i, 0] * _mask(c))
        torch.testing.assert_close(maps["adv"][i, 0], 2 * x_adv[i, 0] * _mask(c))
    assert r.settings["target"] == target
    assert r.settings["target_text"] == ("the class each model predicts on x"
                                         if target == "predicted" else "the true label")
    assert f"target = {target}" in r.table()
    assert html.escape(r.settings["target_text"]) in r._repr_html_()
    # Linear's map is the indicator of the explained class whatever the input
    lin = r.attributions["gradient"]["linear"]["clean"][:, 0]
    expected = [1, 0, 3, 0, 1, 2] if target == "predicted" else Y
    for i, c in enumerate(expected):
        torch.testing.assert_close(lin[i], _mask(c))


def test_correct_by_all_keeps_the_images_every_model_gets_right():
    r = _run(subset="correct-by-all")
    x, y, x_adv = _images()
    s = r.settings
    assert (s["subset"], s["n_given"], s["subset_indices"]) == ("correct-by-all", 6,
                                                                CORRECT_BY_ALL)
    assert r.n == s["n"] == len(CORRECT_BY_ALL)
    assert torch.equal(r.x, x[CORRECT_BY_ALL]) and torch.equal(r.y, y[CORRECT_BY_ALL])
    assert torch.equal(r.x_adv["linear"], x_adv[CORRECT_BY_ALL])
    assert all(m["clean_accuracy"] == 1.0 for m in r.models.values())
    assert {row[0] for row in r.rows} == set(range(len(CORRECT_BY_ALL)))
    assert all(m["n"] == len(CORRECT_BY_ALL) for m in r.metrics if m["input"] == "clean")
    assert "4 of the first 6 images (subset correct-by-all" in r.table()
    assert "subset correct-by-all: the 4 of the first 6" in r._repr_html_()
    # every model right: the predicted class is the label, so the targets agree
    t = _run(subset="correct-by-all", target="true")
    assert t.metrics == r.metrics and t.pairs == r.pairs


def test_a_subset_under_two_images_is_refused():
    from robustkit.errors import ConfigError

    x, y, x_adv = _images()
    with pytest.raises(ConfigError, match="keeps 1 of the 2 images"):
        compare(_models(), x[[1, 0]], y[[1, 0]], explainers=["gradient"], x_adv=x_adv[[1, 0]],
                subset="correct-by-all")


@pytest.mark.parametrize("kw, match", [
    (dict(target="label"), "target must be one of predicted, true, got 'label'"),
    (dict(subset="correct"), "subset must be one of all, correct-by-all"),
    (dict(correction="bonferroni"), "correction must be one of holm, bh, none"),
])
def test_bad_options_are_refused_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        _run(**kw)


def test_stability_is_split_by_flipped_and_unchanged_predictions(report):
    """Unchanged (x' = x): identical maps, every stability metric 1. Flipped: Squares' maps of
    class c on x and x' are 2x and 2x' on quadrant c, so the cosine is that of the two
    quadrants; Linear's maps never change (1). The flip is against the prediction on x, not
    the label: image 4 flips onto its true label, image 1 (Linear wrong) does not flip."""
    x, _, x_adv = _images()
    flipped = [i for i, d in enumerate(FLIP_TO) if d is not None]
    unchanged = [i for i, d in enumerate(FLIP_TO) if d is None]
    split = {(r["model"], r["metric"], r["prediction"]): r for r in report.stability}
    assert len(report.stability) == 2 * 3 * 2  # models x metrics x groups
    cos = [_cos(x[i, 0] * _mask(C[i]), x_adv[i, 0] * _mask(C[i])) for i in flipped]
    assert max(cos) < 0.999  # the case is informative
    got = split[("squares", "stability_cos", "flipped")]
    assert got["n"] == len(flipped) and got["mean"] == pytest.approx(np.mean(cos))
    for metric in ("stability_cos", "stability_spearman", "topk_intersection"):
        r = split[("squares", metric, "unchanged")]
        assert r["n"] == len(unchanged) and r["mean"] == pytest.approx(1.0)
        r = split[("linear", metric, "flipped")]
        assert r["n"] == len(flipped) and r["mean"] == pytest.approx(1.0)
    assert report.models["squares"]["flipped"] == len(flipped)
    frame = report.to_frame("stability")
    assert {"ci_low", "ci_high", "prediction"} <= set(frame.columns)
    assert "by whether x' flips the prediction" in report._repr_html_()


def test_the_shared_perturbation_control(report):
    """One δ for every model: random signs of the largest |x' − x| (given x'), clipped, drawn
    from the seed as documented; Squares' maps of x + δ are 2(x + δ) on quadrant c, Linear's
    never change, so its control stability is exactly 1 while Squares' is the cosine."""
    x, _, x_adv = _images()
    size = float((x_adv - x).abs().max())
    g = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 2, (6, 1, 8, 8), generator=g).float() * 2 - 1
    x_noise = (x + size * signs).clamp(0, 1)
    assert report.settings["noise_control"]["linf"] == pytest.approx(size)
    assert report.settings["noise_control"]["mean_l2"] == pytest.approx(
        float((x_noise - x).flatten(1).norm(dim=1).mean()))
    with torch.no_grad():  # both models saw this x + δ (Linear's map alone would not show it)
        for lb, model in _models().items():
            p = model(x_noise).softmax(1)
            assert torch.equal(report.predicted[lb]["noise"], p.argmax(1))
            torch.testing.assert_close(report.confidence[lb]["noise"], p.amax(1))
    noise = {lb: report.attributions["gradient"][lb]["noise"] for lb in report.models}
    for i, c in enumerate(C):
        torch.testing.assert_close(noise["squares"][i, 0], 2 * x_noise[i, 0] * _mask(c))
    images = report.to_frame("images")
    rows = images[(images.input == "noise") & (images.metric == "stability_cos")]
    sq = rows[rows.model == "squares"].sort_values("index")["value"].to_numpy()
    np.testing.assert_allclose(sq, [_cos(x[i, 0] * _mask(c), x_noise[i, 0] * _mask(c))
                                    for i, c in enumerate(C)], rtol=1e-6)
    np.testing.assert_allclose(rows[rows.model == "linear"]["value"], 1.0, rtol=1e-6)
    # the control is paired across models (the same inputs), so it has paired tests too
    assert any(p["input"] == "noise" for p in report.pairs)
    off = _run(noise_control=False)
    assert off.settings["noise_control"] is None
    assert not any(r["input"] == "noise" for r in off.metrics)


def test_the_control_takes_the_largest_given_perturbation():
    """Given x' per model, δ has the largest |x' − x| of any model (Linear's x' is x here);
    with an attack, ε."""
    x, y, x_adv = _images()
    r = compare(_models(), x, y, explainers=["gradient"], x_adv={"squares": x_adv, "linear": x})
    assert r.settings["noise_control"]["linf"] == pytest.approx(float((x_adv - x).abs().max()))
    assert r.settings["noise_control"]["linf"] > 0.5
    r = compare(_models(), x, y, explainers=["gradient"], attack="pgd1", eps=0.05)
    assert r.settings["noise_control"]["linf"] == 0.05


@pytest.mark.parametrize("method", ["holm", "bh", "none"])
def test_p_values_are_adjusted_over_the_stated_family(method):
    """A third model, a copy of the reference, has every difference 0: its tests are undefined
    and stay out of the family (m counts the defined ones)."""
    models = {**_models(), "copy": Squares().eval()}
    r = _run(correction=method, explainers=["gradient", "smoothgrad"], n_samples=2,
             models=models)
    raw = [p["wilcoxon_p"] for p in r.pairs]
    defined = [p for p in raw if p is not None]
    c = r.settings["correction"]
    assert (c["method"], c["m"]) == (method, len(defined)) and len(defined) > 10
    assert all(p["wilcoxon_p"] is None for p in r.pairs if p["b"] == "copy")
    assert len(defined) < len(raw)
    assert "every paired Wilcoxon test" in c["family"]
    expected = adjust_p(raw, method)
    assert [p["p_adjusted"] for p in r.pairs] == expected
    if method == "none":
        assert expected == raw
    else:  # by the loop of test_stats_corrections, on this family
        assert all(a >= p for a, p in zip(expected, raw, strict=True) if p is not None)
        assert any(a > p for a, p in zip(expected, raw, strict=True) if p is not None)
    assert f"family of m = {len(defined)} tests" in r.table()
    d = json.loads(json.dumps(r.to_dict()))
    assert [p["p_adjusted"] for p in d["pairs"]] == expected


def test_the_wide_table_shape_content_and_link(report, tmp_path):
    wide = report.to_frame("wide")
    labels = list(report.models)
    per_key = {(m["explainer"], m["metric"], m["input"]) for m in report.metrics}
    assert len(wide) == len(per_key) == len(report.metrics) // len(labels)
    assert list(wide.columns) == ["metric", "input", "explainer", "mean squares", "mean linear",
                                  "d_z linear", "d_z ci95 linear", "p_adjusted linear",
                                  "better", "meaning"]
    means = {(m["explainer"], m["metric"], m["input"], m["model"]): m["mean"]
             for m in report.metrics}
    pairs = {(p["explainer"], p["metric"], p["input"]): p for p in report.pairs}
    for row in wide.to_dict("records"):
        key = (row["explainer"], row["metric"], row["input"])
        for lb in labels:
            assert row[f"mean {lb}"] == pytest.approx(means[(*key, lb)], nan_ok=True)
        p = pairs[key]
        assert row["d_z ci95 linear"] == p["d_z_ci95"]
        assert row["p_adjusted linear"] == p["p_adjusted"]
        assert (row["better"], row["meaning"]) == DIRECTIONS[row["metric"]]
    assert DIRECTIONS["total_variation"][0] == "lower" and DIRECTIONS["sparseness"][0] == "higher"
    # metrics grouped: each metric's rows are consecutive
    order = list(dict.fromkeys(zip(wide["metric"], wide["input"], strict=True)))
    assert len(order) == len({(m, k) for m, k in order})
    # index.html leads with the wide table; the long format is on its own page, linked
    report.save(tmp_path, tensorboard=False)
    page = (tmp_path / "index.html").read_text()
    assert 'href="metrics_long.html"' in page
    tables = page.split("<table>")
    assert "more interpretable" in tables[2] and page.index("more interpretable") < page.index(
        "<img")  # the table after the models' one, before the grids
    assert report.explainer_differences == []  # one explainer: that table is left out
    assert page.count("<tr>") == (1 + len(labels)) + (1 + len(wide)) + (
        1 + len(report.stability))
    long_page = (tmp_path / "metrics_long.html").read_text()
    assert long_page.count("<tr>") == (1 + len(report.metrics)) + (1 + len(report.pairs))
    assert 'href="index.html"' in long_page
    fragment = report._repr_html_()  # a notebook: the long format collapsed, linked in-page
    assert '<details id="long-format">' in fragment and 'href="#long-format"' in fragment
    assert fragment.index("more interpretable") < fragment.index("<details")


def test_explainer_differences_are_the_paired_bootstrap():
    """On 24 images (4 draws of the design): with 6, resamples of one repeated image have
    sd = 0 often enough to leave some intervals undefined."""
    r = _run(reps=4, explainers=["gradient", "smoothgrad"], n_samples=2)
    frame = r.to_frame("images")
    wide = frame.pivot_table(index=["explainer", "metric", "input", "index"], columns="model",
                             values="value")
    checked = 0
    for e in r.explainer_differences:
        d = {ex: (wide.loc[(ex, e["metric"], e["input"])]["linear"]
                  - wide.loc[(ex, e["metric"], e["input"])]["squares"]).to_numpy()
             for ex in (e["first"], e["second"])}
        ok = np.isfinite(d[e["first"]]) & np.isfinite(d[e["second"]])
        ci = dz_difference_ci(d[e["first"]][ok], d[e["second"]][ok], 3)
        assert e["ci95"] == (list(ci) if ci else None)
        assert e == r.compare_explainers(e["first"], e["second"], e["metric"], e["input"])
        if ci:
            covers = ci[0] <= 0 <= ci[1]
            assert (e["verdict"] == "could not decide (the CI covers 0)") == covers
            if not covers:  # the explainer whose |d_z| is larger, by the CI's side of 0
                better = e["second"] if ci[0] > 0 else e["first"]
                assert e["verdict"] == f"{better} separates the models more"
                assert (abs(e["d_z_second"]) > abs(e["d_z_first"])) == (ci[0] > 0)
            checked += 1
    assert checked > 10
    # the other order: the verdict names the second explainer when its |d_z| leads
    swapped = _run(reps=4, explainers=["smoothgrad", "gradient"], n_samples=2)
    for e in swapped.explainer_differences:
        if e["ci95"] and e["ci95"][0] > 0:
            assert e["verdict"] == f"{e['second']} separates the models more"
            break
    else:
        raise AssertionError("no decided lead of the second explainer")
    ranking = r.rank_explainers("total_variation")
    assert [x["rank"] for x in ranking] == [1, 2]
    assert abs(ranking[0]["d_z"]) >= abs(ranking[1]["d_z"])
    lead = r.compare_explainers(ranking[1]["explainer"], ranking[0]["explainer"],
                                "total_variation")
    assert ranking[0]["ci95"] == lead["ci95"]
    assert ranking[0]["decided"] == (lead["ci95"][0] > 0)
    undecided = 0
    for metric, key in {(p["metric"], p["input"]) for p in r.pairs}:
        top = r.rank_explainers(metric, key)[0]
        if top["ci95"] is not None:
            assert top["decided"] == (top["ci95"][0] > 0)
            undecided += not top["decided"]
    assert undecided > 0
    # the wide table groups each metric's explainers together, in the given order
    wide = r.to_frame("wide")
    assert list(wide["explainer"]) == ["gradient", "smoothgrad"] * (len(wide) // 2)
    assert all(wide["metric"][::2].to_numpy() == wide["metric"][1::2].to_numpy())
    with pytest.raises(ValueError, match="no values of 'nope'"):
        r.compare_explainers("gradient", "smoothgrad", "nope")
    with pytest.raises(ValueError, match="compared models"):
        r.compare_explainers("gradient", "smoothgrad", "sparseness", model="squares")
    page = r._repr_html_()
    assert "Which explainer separates the models more?" in page
    assert re.search(r"could not decide|separates the models more", page)


def test_explainer_difference_pairs_only_images_finite_for_both_explainers():
    """A NaN (a constant map's Spearman) in either explainer drops that image from both."""
    from robustkit.saliency.ranking import explainer_difference

    rng = np.random.default_rng(1)
    values = {("e1", "a"): rng.normal(0, 1, 30), ("e1", "b"): rng.normal(1, 1, 30),
              ("e2", "a"): rng.normal(0, 1, 30), ("e2", "b"): rng.normal(0.5, 1, 30)}
    values[("e2", "b")][[3, 17]] = np.nan
    values[("e1", "a")][5] = np.nan
    rows = [(i, lb, ex, "pair", "stability_spearman", float(v))
            for (ex, lb), vs in values.items() for i, v in enumerate(vs)]
    got = explainer_difference(rows, "e1", "e2", "stability_spearman", "pair", "a", "b", n=30,
                               seed=4)
    ok = np.ones(30, bool)
    ok[[3, 5, 17]] = False
    d1 = values[("e1", "b")][ok] - values[("e1", "a")][ok]
    d2 = values[("e2", "b")][ok] - values[("e2", "a")][ok]
    assert got["n"] == 27
    assert got["ci95"] == list(dz_difference_ci(d1, d2, 4))
    assert got["d_z_second"] == pytest.approx(d2.mean() / d2.std(ddof=1))

"""What the demo page says about its models (issue 19 §3): a model's kind comes from its strongest
evaluation, not from PGD alone nor the saliency step's own attack; warnings of the sanity checks
show with their messages (a warning once read "all passed"); the header names the command and
the sizes; the held-out accuracy curves of the live training are an embedded figure."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from robustkit.demo import ROBUST_THRESHOLD, model_kind
from robustkit.reports.demo import write_demo_page


def _results(acc, checks=()):
    return {"dataset": "sample-mnist", "n_examples": 200, "eps_text": "0.3",
            "checks": list(checks), "accuracy": acc}


# PGD-40 leaves 60 %: robust by PGD; AutoAttack (cascaded after it) brings it to 5 %: standard.
FOOLED_BY_PGD = {"clean": 0.97, "pgd40": 0.6, "autoattack": 0.05, "robust": 0.05}
ROBUST = {"clean": 0.99, "pgd40": 0.93, "autoattack": 0.9, "robust": 0.9}


def test_kind_comes_from_the_strongest_attack_not_pgd():
    k = model_kind(_results(FOOLED_BY_PGD))
    assert k["kind"] == "standard" and k["accuracy"] == 0.05 and k["attack"] == "autoattack"
    assert k["rule"] == ("standard: 5.0 % of the n = 200 images stay correct under every attack "
                         "run (pgd40, autoattack; lowest: autoattack), below the 20 % threshold")
    # PGD alone would have called it robust: the same numbers without the AutoAttack column
    assert model_kind(_results({"clean": 0.97, "pgd40": 0.6, "robust": 0.6}))["kind"] == "robust"
    k = model_kind(_results(ROBUST))
    assert k["kind"] == "robust" and k["rule"].endswith("at least the 20 % threshold")


def test_kind_uses_the_worst_case_column_and_the_threshold_edge():
    # standalone protocol: neither attack alone is below 20 %, their per-image AND is
    acc = {"clean": 0.9, "pgd40": 0.3, "autoattack": 0.25, "robust": 0.15}
    assert model_kind(_results(acc))["kind"] == "standard"
    at = {"clean": 0.9, "pgd40": 0.5, "autoattack": ROBUST_THRESHOLD,
          "robust": ROBUST_THRESHOLD}
    assert model_kind(_results(at))["kind"] == "robust"  # "at least" the threshold
    below = dict(at, robust=ROBUST_THRESHOLD - 0.005)
    assert model_kind(_results(below))["kind"] == "standard"
    assert model_kind(_results(below), threshold=0.1)["kind"] == "robust"
    # no "robust" column (an older file): the lowest attack column decides
    assert model_kind(_results({"clean": 0.9, "pgd40": 0.5, "autoattack": 0.1}))["kind"] == \
        "standard"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _epochs(tmp_path, run, points):
    (tmp_path / run).mkdir()
    lines = [{"type": "step", "epoch": 0, "step": 10, "train/loss": 2.0}]
    lines += [{"type": "epoch", "epoch": e, "eval/clean": c, "eval/pgd10": p}
              for e, c, p in points]
    (tmp_path / run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


@pytest.fixture
def page(tmp_path):
    _epochs(tmp_path, "srd_dat", [(2, 0.93, 0.31), (4, 0.96, 0.44)])
    gap = {"name": "gradient_gap:pgd40", "passed": True, "severity": "warning",
           "message": "pgd40 left 9 more points correct than autoattack"}
    fail = {"name": "perturbation:pgd40", "passed": False, "severity": "fail",
            "message": "max perturbation 0.31 > eps 0.3"}
    ok = {"name": "eval_mode", "passed": True, "severity": "ok", "message": "eval mode"}
    evaluations = {"live": _results(FOOLED_BY_PGD, [ok, gap]),
                   "robust": _results(ROBUST, [ok, fail]), "clean": _results(ROBUST, [ok])}
    kinds = {lb: model_kind(r) for lb, r in evaluations.items()}
    path = write_demo_page(
        tmp_path / "index.html", evaluations=evaluations,
        evaluation_links={lb: f"eval_{lb}/results.json" for lb in evaluations},
        runs=["srd_dat"], seconds=61.0, kinds=kinds, command="robustkit demo --quick",
        sizes="cifar_n=0, mnist_n=32, epochs=1", quick=True)
    parsed = _Page()
    parsed.feed(path.read_text())
    return path.read_text(), " ".join("".join(parsed.text).split()), parsed.src


def test_warnings_and_failures_show_with_their_messages(page):
    html, text, _ = page
    assert "live <" not in html
    rows = re.findall(r"<tr><td>(\w+)</td>.*?</tr>", html)
    assert rows == ["live", "robust", "clean"]
    cells = {lb: re.search(rf"<tr><td>{lb}</td>(.*?)</tr>", html).group(1) for lb in rows}
    assert "<td>warnings: gradient_gap:pgd40</td>" in cells["live"]
    assert "all passed" not in cells["live"]
    assert "<td>failed: perturbation:pgd40</td>" in cells["robust"]
    assert "<td>all passed</td>" in cells["clean"]
    assert ("live: warning gradient_gap:pgd40: pgd40 left 9 more points correct than "
            "autoattack") in text
    assert "robust: failed perturbation:pgd40: max perturbation 0.31 > eps 0.3" in text
    assert "clean: warning" not in text and "eval_mode" not in text  # ok checks stay quiet


def test_the_kind_column_and_how_it_was_decided(page):
    html, text, _ = page
    live = re.search(r"<tr><td>live</td>(.*?)</tr>", html).group(1)
    assert "<td>standard</td>" in live  # PGD said 60 %; AutoAttack 5 %
    assert "<td>robust</td>" in re.search(r"<tr><td>robust</td>(.*?)</tr>", html).group(1)
    assert ("live: standard: 5.0 % of the n = 200 images stay correct under every attack run "
            "(pgd40, autoattack; lowest: autoattack), below the 20 % threshold") in text
    assert "per-image worst case over every attack run" in text


def test_header_names_the_command_the_sizes_and_a_quick_run(page, tmp_path):
    html, text, _ = page
    assert "robustkit demo (quick run)" in text
    assert ("computed by robustkit demo --quick in 61 s on this machine, with cifar_n=0, "
            "mnist_n=32, epochs=1.") in text
    assert "A quick run" in text
    full = write_demo_page(tmp_path / "full.html", evaluations={}, evaluation_links={},
                           command="make demo", sizes="cifar_n=100")
    assert "quick" not in full.read_text().lower()
    assert "computed by <code>make demo</code> on this machine, with cifar_n=100." in \
        full.read_text()


def test_training_curves_are_an_embedded_figure(page, tmp_path):
    html, text, src = page
    data = [s for s in src if s.startswith("data:image/png;base64,")]
    assert len(data) == 1, src
    image = Image.open(io.BytesIO(base64.b64decode(data[0].split(",", 1)[1])))
    assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
    assert "Held-out accuracy during training" in text
    # a run without held-out evaluations says so instead of an empty figure
    _epochs(tmp_path, "none", [])
    bare = write_demo_page(tmp_path / "bare.html", evaluations={}, evaluation_links={},
                           runs=["none"])
    assert "data:image/png" not in bare.read_text()
    assert "No held-out evaluation was logged" in bare.read_text()


def test_the_figure_plots_the_logged_values(tmp_path, monkeypatch):
    """The curves are the metrics.jsonl values (in %), per key, in epoch order."""
    import matplotlib.axes

    plotted = []
    real = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *a, **kw):
        plotted.append((kw.get("label"), list(xs), list(ys)))
        return real(self, xs, ys, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    _epochs(tmp_path, "srd_dat", [(4, 0.96, 0.44), (2, 0.93, 0.31)])
    write_demo_page(tmp_path / "index.html", evaluations={}, evaluation_links={},
                    runs=["srd_dat"])
    assert plotted == [("srd_dat: eval/clean", [2, 4], [93.0, 96.0]),
                       ("srd_dat: eval/pgd10", [2, 4], [31.0, 44.0])]


def test_columns_clean_first_then_pgd_autoattack_and_the_worst_case(tmp_path):
    """CIFAR (pgd20) before MNIST (pgd40) must not put AutoAttack between the PGD columns."""
    cifar = {"dataset": "sample-cifar10", "n_examples": 100, "eps_text": "8/255",
             "accuracy": {"clean": 0.94, "pgd20": 0.0, "autoattack": 0.0, "robust": 0.0}}
    path = write_demo_page(tmp_path / "index.html", evaluation_links={"c": "c", "m": "m"},
                           evaluations={"c": cifar, "m": _results(ROBUST)})
    header = re.search(r"<tr><th>model</th>(.*?)</tr>", path.read_text()).group(1)
    cols = re.findall(r"<th>([^<]*)</th>", header)
    assert cols[3:] == ["clean", "pgd20", "pgd40", "autoattack", "robust", "kind", "checks",
                        "file"]


def test_the_saliency_section_names_the_class_the_maps_explain():
    """The maps explain what saliency.compare says they explain (the predicted class by default
    since #20), not a fixed "true label"; an old summary without the setting keeps the old text."""
    from robustkit.reports.demo import _saliency

    summary = {"n": 4, "metrics": [], "models": {"a": {"kind": "standard"}},
               "grids": {"gradient": "grid.png"},
               "settings": {"target_text": "the class each model predicts on x"}}
    assert "maps of the class each model predicts on x" in _saliency(summary, "saliency")[0]
    del summary["settings"]
    assert "maps of the true label" in _saliency(summary, "saliency")[0]

"""The demo's ``index.html`` (robustkit.reports.demo): every link and image resolves inside its
folder, labels are escaped, the numbers are the inputs', and a real browser loads every image."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from robustkit.reports.demo import SALIENCY_METRICS, write_demo_page

LABELS = ("std<&>", "robust")


def _results(clean, pgd, robust, failed=()):
    checks = [{"name": "eval_mode", "passed": True}]
    checks += [{"name": name, "passed": False} for name in failed]
    return {"dataset": "sample-mnist", "n_examples": 16, "eps_text": "0.3", "checks": checks,
            # in an order the page must fix: clean first, the worst case last
            "accuracy": {"robust": robust, "pgd40": pgd, "clean": clean, "autoattack": robust}}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []
        self.href: list[str] = []
        self.cells: list[str] = []
        self.headers: list[list[str]] = []
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.src.append(a["src"])
        if tag == "a":
            self.href.append(a["href"])
        if tag == "tr":
            self.headers.append([])
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "td":
            self.cells.append(data)
        if self._in == "th":
            self.headers[-1].append(data)


@pytest.fixture
def page(tmp_path):
    for rel in ("sensitivity/sigma_mean.png", "sensitivity/intervention.png",
                "inspect/grid_adaptgrad.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / rel)
    for rel in ("sensitivity/sensitivity.json", "inspect/index.html", "srd_dat/config.yaml",
                "srd_dat/metrics.jsonl", "eval_a/results.json", "eval_b/results.json"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("{}")
    sensitivity = {"models": {lb: {"attack": "pgd20", "n": 16, "layers": {
        "conv1": {"mean": 1.5 * (i + 1)}, "fc": {"mean": 0.25 * (i + 1)}}}
        for i, lb in enumerate(LABELS)}}
    metrics = [{"explainer": "adaptgrad", "metric": m, "model": lb,
                "input": "pair" if m.startswith("stability") else "clean",
                "mean": 0.125 + i, "ci95": [0.0625, 0.25 + i]}
               for m in SALIENCY_METRICS for i, lb in enumerate(LABELS)]
    inspect = {"n": 4, "grids": {"gradient": "grid_gradient.png",
                                 "adaptgrad": "grid_adaptgrad.png"},
               "models": {lb: {"kind": k}
                          for lb, k in zip(LABELS, ("standard", "robust"), strict=True)},
               "metrics": metrics}
    path = write_demo_page(
        tmp_path / "index.html",
        evaluations={LABELS[0]: _results(1.0, 0.0, 0.0),
                     LABELS[1]: _results(0.75, 0.5, 0.4375, failed=["gradient_gap:pgd40"])},
        evaluation_links={LABELS[0]: "eval_a/results.json", LABELS[1]: "eval_b/results.json"},
        sensitivity=sensitivity, inspect=inspect, runs=["srd_dat"], seconds=123.4)
    return path


def test_links_resolve_and_numbers_are_the_inputs(page):
    text = page.read_text()
    parsed = _Page()
    parsed.feed(text)
    assert len(parsed.src) == 3  # two sensitivity figures, the AdaptGrad grid (not gradient's)
    assert "inspect/grid_adaptgrad.png" in parsed.src
    for rel in parsed.src + parsed.href:
        assert not rel.startswith(("/", "file:", "http")), rel
        assert (page.parent / rel).is_file(), rel
    assert "std&lt;&amp;&gt;" in text and "std<&>" not in text
    header = next(h for h in parsed.headers if "checks" in h)
    assert header.index("clean") < header.index("pgd40") < header.index("robust")
    assert header[-4:] == ["robust", "kind", "checks", "file"]  # worst case: last accuracy
    cells = parsed.cells
    for value in ("100.0%", "75.0%", "50.0%", "43.8%", "failed: gradient_gap:pgd40",
                  "all passed", "1.5", "3", "0.25", "0.5", "0.125 [0.0625, 0.25]",
                  "1.125 [0.0625, 1.25]"):
        assert value in cells, value
    assert "123 s" in text


@pytest.mark.slow
def test_demo_page_renders_in_chromium(page, chromium_images):
    assert chromium_images(page) == (3, 3)

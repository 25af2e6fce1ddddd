"""``SaliencyReport``: what ``saliency.compare`` computed, shown (``table``, ``to_frame``,
``plot``, ``_repr_html_``) and saved (``save``) exactly as ``robustkit inspect`` writes it; the
drawing is ``reports.inspect``'s.

Example:
    >>> report = robustkit.saliency.compare(models, x, y, attack="pgd20", eps=0.3)
    >>> report.to_frame(); report.save("runs/inspect")
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

__all__ = ["SaliencyReport", "Row", "CSV_NAME", "JSON_NAME"]

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
JSON_NAME = "summary.json"

Row = tuple[int, str, str, str, str, float]  # index, model, explainer, input, metric, value


@dataclass
class SaliencyReport:
    """What ``compare`` computed; ``to_dict()`` is ``summary.json``, ``rows`` ``metrics.csv``.

    Attributes:
        n: number of images.
        models: ``{label: {"model", "checkpoint", "clean_accuracy", "adv_accuracy", "kind",
            "kind_source"}}``.
        metrics: ``[{"explainer", "metric", "input", "model", "n", "mean", "ci95"}]``; input
            ``clean`` (map of x), ``adv`` (of x'), ``pair`` (x vs x'), ``noise`` (x vs x + δ,
            the shared-perturbation control).
        pairs: ``[{"explainer", "metric", "input", "a", "b", "n", "diff_mean", "ci95", "d_z",
            "d_z_ci95", "wilcoxon_p", "p_adjusted"}]``, b − a with a = the first model;
            ``p_adjusted`` by ``settings["correction"]`` (``method``, ``family``, ``m``).
        settings: the run's settings (``explainers``, ``eps``, ``attack_settings``, ``ci``,
            ``target``, ``subset``, ``n_given``, ``subset_indices``, ``correction``,
            ``noise_control``, ``explainer_ci``, ...).
        box_chance: mean box area fraction (chance level of the box metrics), or ``None``.
        rows: per-image values ``(index, model, explainer, input, metric, value)``.
        x, y: the images ``(N, C, H, W)`` and labels ``(N,)``.
        x_adv: ``{label: (N, C, H, W)}``, each model's x'.
        attributions: ``{explainer: {label: {"clean": map of x, "adv": map of x'}}}``, raw maps
            shaped like x.
        predicted, confidence: ``{label: {"clean" | "adv" | "noise": (N,)}}``: predicted class
            and its softmax probability.
        stability: ``[{"explainer", "metric", "model", "prediction", "n", "mean", "ci95"}]``,
            the x-vs-x' stability over the images whose prediction x' leaves ``"unchanged"``
            and those it ``"flipped"``.
        explainer_differences: ``[{"metric", "input", "a", "b", "first", "second", "n",
            "d_z_first", "d_z_second", "abs_d_z_difference", "ci95", "verdict"}]``: for every
            two explainers, the paired bootstrap CI of ``|d_z(second)| − |d_z(first)|``.
        directions: ``{metric: {"better": "higher" | "lower", "meaning"}}``: which direction
            means a more interpretable map.

    Example:
        >>> report = compare(models, x, y, explainers=["gradient"], attack="pgd20", eps=0.3)
        >>> print(report.table()); grids = report.plot(); report.save("runs/inspect")
    """

    n: int
    models: dict[str, dict[str, Any]]
    metrics: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    settings: dict[str, Any]
    box_chance: float | None
    # per-image rows and tensors stay out of repr(): a console shows the summary, not pixels
    rows: list[Row] = field(repr=False)
    x: Tensor = field(repr=False)
    y: Tensor = field(repr=False)
    x_adv: dict[str, Tensor] = field(repr=False)
    attributions: dict[str, dict[str, dict[str, Tensor]]] = field(repr=False)
    predicted: dict[str, dict[str, Tensor]] = field(repr=False)
    confidence: dict[str, dict[str, Tensor]] = field(repr=False)
    stability: list[dict[str, Any]] = field(default_factory=list)
    explainer_differences: list[dict[str, Any]] = field(default_factory=list)
    directions: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self, tensorboard: bool = True) -> dict[str, Any]:
        """The ``summary.json`` content (a copy) that ``save(tensorboard=...)`` writes.

        Example:
            >>> d = report.to_dict()
            >>> [p for p in d["pairs"] if p["metric"] == "sparseness"]
        """
        from robustkit.reports.inspect import grid_filename

        out: dict[str, Any] = {"n": self.n, "models": self.models}
        if self.box_chance is not None:
            out["box_chance"] = self.box_chance
        out.update(metrics=self.metrics, pairs=self.pairs,
                   stability_by_prediction=self.stability,
                   explainer_differences=self.explainer_differences,
                   directions=self.directions, settings=self.settings,
                   grids={ex: grid_filename(ex) for ex in self.settings["explainers"]})
        if tensorboard:
            out["tensorboard"] = "tb"
        return copy.deepcopy(out)

    def to_frame(self, what: Literal["metrics", "pairs", "wide", "stability", "explainers",
                                     "images"] = "metrics"):
        """A ``pandas.DataFrame``: the means and CIs (``"metrics"``: one row per explainer,
        metric, input and model), the paired differences (``"pairs"``), the wide table the page
        leads with (``"wide"``: one row per metric, input and explainer, each model's mean, d_z
        with its CI and the adjusted p per compared model, and which direction is more
        interpretable), the stability split by flipped / unchanged predictions
        (``"stability"``), the explainer differences (``"explainers"``) or the per-image values
        (``"images"``, ``metrics.csv``'s rows).

        Example:
            >>> report.to_frame("wide")[["metric", "explainer", "better"]]
        """
        import pandas as pd

        if what == "images":
            return pd.DataFrame(self.rows, columns=["index", "model", "explainer", "input",
                                                    "metric", "value"])
        if what == "wide":
            from robustkit.reports.inspect import wide_rows

            return pd.DataFrame(wide_rows(self.to_dict()))
        tables = {"metrics": self.metrics, "pairs": self.pairs, "stability": self.stability,
                  "explainers": self.explainer_differences}
        if what not in tables:
            raise ValueError(f"what must be one of {', '.join([*tables, 'wide', 'images'])}, "
                             f"got {what!r}")
        rows = []
        for r in tables[what]:
            r = dict(r)
            for key, low, high in (("ci95", "ci_low", "ci_high"),
                                   ("d_z_ci95", "d_z_ci_low", "d_z_ci_high")):
                if key in r:
                    ci = r.pop(key)
                    r.update({low: ci[0] if ci else None, high: ci[1] if ci else None})
            rows.append(r)
        return pd.DataFrame(rows)

    def compare_explainers(self, first: str, second: str, metric: str, input: str = "clean",
                           model: str | None = None) -> dict[str, Any]:
        """Does ``second`` separate the reference model from ``model`` (default: the second
        model) more than ``first`` on ``metric``? The paired bootstrap CI (same images, BCa,
        the report's seed) of ``|d_z(second)| − |d_z(first)|``; ``verdict`` names the explainer
        that separates more, or says "could not decide" where the CI covers 0.

        Raises:
            ValueError: an explainer, metric, input or model the report does not hold.

        Example:
            >>> report.compare_explainers("gradient", "adaptgrad", "stability_cos", "pair")
            {..., 'ci95': [-0.12, 0.31], 'verdict': 'could not decide (the CI covers 0)'}
        """
        from robustkit.saliency.ranking import explainer_difference

        labels = list(self.models)
        b = model if model is not None else (labels[1] if len(labels) > 1 else None)
        if b is None or b not in labels[1:]:
            raise ValueError(f"model must be one of the compared models {labels[1:]}, "
                             f"got {model!r}")
        return explainer_difference(self.rows, first, second, metric, input, labels[0], b,
                                    n=self.n, seed=self.settings["seed"])

    def rank_explainers(self, metric: str, input: str = "clean",
                        model: str | None = None) -> list[dict[str, Any]]:
        """The explainers ordered by how strongly they separate the reference model from
        ``model`` (default: the second) on ``metric``: ``|d_z|`` largest first, each with the
        CI of its lead over the next one (``compare_explainers``). A rank whose CI covers 0 is
        not decided: the data cannot order those two explainers.

        Returns:
            ``[{"rank", "explainer", "d_z", "n", "next", "lead", "ci95", "decided"}]``
            (``next`` etc. ``None`` for the last).

        Example:
            >>> for r in report.rank_explainers("total_variation"):
            ...     print(r["rank"], r["explainer"], r["d_z"], r["ci95"], r["decided"])
        """
        labels = list(self.models)
        b = model if model is not None else (labels[1] if len(labels) > 1 else None)
        dz = {p["explainer"]: p["d_z"] for p in self.pairs
              if (p["metric"], p["input"], p["b"]) == (metric, input, b)}
        if not dz:
            raise ValueError(f"no paired differences of {metric!r} ({input}) against {b!r}")
        order = sorted(dz, key=lambda e: -abs(dz[e]) if dz[e] is not None else 0.0)
        out = []
        for i, ex in enumerate(order):
            nxt = order[i + 1] if i + 1 < len(order) else None
            c = self.compare_explainers(nxt, ex, metric, input, b) if nxt else None
            out.append({"rank": i + 1, "explainer": ex, "d_z": dz[ex],
                        "n": c["n"] if c else None, "next": nxt,
                        "lead": c["abs_d_z_difference"] if c else None,
                        "ci95": c["ci95"] if c else None,
                        "decided": bool(c and c["ci95"] and c["ci95"][0] > 0)})
        return out

    def plot(self) -> dict[str, Any]:
        """One grid per explainer, ``{explainer: matplotlib Figure}`` (no pyplot): rows = the
        first ``grid_rows`` images, columns = the image, then per model its map of x and of x'
        (signed, scaled by the 99th percentile of |map|), captioned with the prediction.

        Example:
            >>> report.plot()["gradient"]            # shown inline in a notebook
        """
        from robustkit.reports.inspect import grid_figure, grid_title
        from robustkit.saliency.display import percentile_scale, signed_map

        s = self.settings
        r = min(s["grid_rows"], self.n)  # the grids show the first r images; metrics cover all
        captions = {lb: {key: [f"{'x' if key == 'clean' else 'x′'}: {int(p)} "
                               f"({100 * float(c):.0f}%){'' if p == t else ' ✗'}"
                               for p, c, t in zip(self.predicted[lb][key][:r],
                                                  self.confidence[lb][key][:r], self.y[:r],
                                                  strict=True)]
                         for key in ("clean", "adv")} for lb in self.models}
        return {ex: grid_figure(
            self.x[:r].numpy(),
            {lb: {key: percentile_scale(signed_map(v[key][:r].float()))
                  for key in ("clean", "adv")}
             for lb, v in self.attributions[ex].items()},
            captions, grid_title(ex, s, r),
            row_labels=[f"#{i}  y = {int(t)}" for i, t in enumerate(self.y[:r])])
            for ex in s["explainers"]}

    def table(self) -> str:
        """The text table ``robustkit inspect`` prints.

        Example:
            >>> print(report.table())
            saliency on the first 16 sample-mnist test images: pgd20 white-box, ...
        """
        from robustkit.reports.inspect import text_table

        return text_table(self.to_dict())

    def _repr_html_(self) -> str:
        from robustkit.reports.inspect import html_tables

        return html_tables(self.to_dict())

    def save(self, folder: str | os.PathLike, *, tensorboard: bool = True) -> Path:
        """Write what ``robustkit inspect --out folder`` writes: ``grid_<explainer>.png``,
        ``metrics.csv``, ``tb/`` (TensorBoard images of the grids, unless ``tensorboard`` is
        false), ``summary.json`` and ``index.html``. Returns the JSON's path.

        Raises:
            OutputError: the folder cannot be created or written.

        Example:
            >>> report.save("runs/inspect", tensorboard=False)
            PosixPath('runs/inspect/summary.json')
        """
        from robustkit.reports.inspect import (
            grid_filename,
            save_png,
            write_csv,
            write_html,
            write_tensorboard,
        )
        from robustkit.utils import atomic_write_json, check_writable, output_errors

        out = check_writable(Path(folder), "folder")
        summary = self.to_dict(tensorboard)
        figures = self.plot()
        for ex, fig in figures.items():
            save_png(fig, out / grid_filename(ex))
        write_csv(self.rows, out / CSV_NAME)
        if tensorboard:
            write_tensorboard(figures, out / "tb")
        path = out / JSON_NAME
        with output_errors(path):
            atomic_write_json(path, summary)
        write_html(summary, summary["grids"], out / "index.html", CSV_NAME)
        logger.info("wrote %s", path)
        return path

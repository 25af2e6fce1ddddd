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
        metrics: ``[{"explainer", "metric", "input", "model", "n", "mean", "ci95"}]``.
        pairs: ``[{"explainer", "metric", "input", "a", "b", "n", "diff_mean", "ci95", "d_z",
            "wilcoxon_p"}]``, b − a with a = the first model.
        settings: the run's settings (``explainers``, ``eps``, ``attack_settings``, ``ci``, ...).
        box_chance: mean box area fraction (chance level of the box metrics), or ``None``.
        rows: per-image values ``(index, model, explainer, input, metric, value)``.
        x, y: the images ``(N, C, H, W)`` and labels ``(N,)``.
        x_adv: ``{label: (N, C, H, W)}``, each model's x'.
        attributions: ``{explainer: {label: {"clean": map of x, "adv": map of x'}}}``, raw maps
            shaped like x.
        predicted, confidence: ``{label: {"clean" | "adv": (N,)}}``: predicted class and its
            softmax probability.

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
        out.update(metrics=self.metrics, pairs=self.pairs, settings=self.settings,
                   grids={ex: grid_filename(ex) for ex in self.settings["explainers"]})
        if tensorboard:
            out["tensorboard"] = "tb"
        return copy.deepcopy(out)

    def to_frame(self, what: Literal["metrics", "pairs", "images"] = "metrics"):
        """A ``pandas.DataFrame``: the means and CIs (``"metrics"``: one row per explainer,
        metric, input and model), the paired differences (``"pairs"``) or the per-image values
        (``"images"``, ``metrics.csv``'s rows).

        Example:
            >>> report.to_frame().pivot_table(index=["explainer", "metric", "input"],
            ...                               columns="model", values="mean")
        """
        import pandas as pd

        if what == "images":
            return pd.DataFrame(self.rows, columns=["index", "model", "explainer", "input",
                                                    "metric", "value"])
        if what not in ("metrics", "pairs"):
            raise ValueError(f"what must be 'metrics', 'pairs' or 'images', got {what!r}")
        rows = []
        for r in self.metrics if what == "metrics" else self.pairs:
            r = dict(r)
            ci = r.pop("ci95")
            rows.append({**r, "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None})
        return pd.DataFrame(rows)

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
            {lb: {key: percentile_scale(signed_map(a[:r].float())) for key, a in v.items()}
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

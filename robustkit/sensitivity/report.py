"""``SensitivityReport``: what ``sensitivity.compare`` measured, shown (``table``, ``to_frame``,
``plot``, ``_repr_html_``) and saved (``save``) exactly as ``robustkit sensitivity`` writes it;
the drawing is ``reports.sensitivity``'s.

Example:
    >>> report = robustkit.sensitivity.compare(models, x, y, attack="pgd20", eps=0.3)
    >>> report.to_frame(); report.save("runs/sens")
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["SensitivityReport", "JSON_NAME"]

logger = logging.getLogger(__name__)

JSON_NAME = "sensitivity.json"


@dataclass
class SensitivityReport:
    """What ``compare`` measured; ``to_dict()`` is ``sensitivity.json``.

    Attributes:
        models: ``{label: {"model", "checkpoint", "attack", "eps", "n", "clean_accuracy",
            "adv_accuracy", "reduction", "source_model", "skipped_layers", "layers": {layer:
            {"mean", "median", "relative_mean", "topk_mean", "ci95", "intervention": {"topk",
            "random"}, "channels", "k", "topk_neurons"}}}}``; layers by their full module names.
        common_layers: the layers every model has, compared.
        pairs: ``[{"a", "b", "jaccard": {layer: J or None}}]``, a = the first model.
        settings: the measurement's settings (``n``, ``eps``, ``attack_settings``, ``ci``, ...).
        sigma: ``{label: {layer: (C,) float64}}`` σ per neuron.
        relative: the same, relative σ.
        x_adv: ``{label: (N, C, H, W)}`` the x' each model was measured on.
        y: ``(N,)`` labels.

    Example:
        >>> report = compare(models, x, y, attack="pgd20", eps=0.3)
        >>> print(report.table()); figs = report.plot(); report.save("runs/sens")
    """

    models: dict[str, dict[str, Any]]
    common_layers: list[str]
    pairs: list[dict[str, Any]]
    settings: dict[str, Any]
    # tensors stay out of repr(): a console shows the numbers, not pages of pixels
    sigma: dict[str, dict[str, Tensor]] = field(repr=False)
    relative: dict[str, dict[str, Tensor]] = field(repr=False)
    x_adv: dict[str, Tensor] = field(repr=False)
    y: Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The ``sensitivity.json`` content (a copy), as ``save`` writes it.

        Example:
            >>> d = report.to_dict()
            >>> d["models"]["robust"]["layers"]["model.classifier.fc1"]["ci95"]
        """
        from robustkit.reports.sensitivity import FIGURES

        return copy.deepcopy({"models": self.models, "common_layers": self.common_layers,
                              "pairs": self.pairs, "settings": self.settings,
                              "figures": list(FIGURES), "tensorboard": "tb"})

    def to_frame(self, what: Literal["layers", "pairs", "neurons"] = "layers"):
        """A ``pandas.DataFrame``: one row per (model, layer) (``"layers"``: mean σ, its CI,
        median, relative and top-k means, intervention accuracies, k, channels, accuracies),
        per (pair, layer) (``"pairs"``: Jaccard) or per (model, layer, neuron) (``"neurons"``:
        σ and relative σ).

        Example:
            >>> report.to_frame().pivot(index="layer", columns="model", values="mean")
        """
        import pandas as pd

        if what == "pairs":
            return pd.DataFrame([{"a": p["a"], "b": p["b"], "layer": ly, "jaccard": j}
                                 for p in self.pairs for ly, j in p["jaccard"].items()],
                                columns=["a", "b", "layer", "jaccard"])
        if what == "neurons":
            return pd.DataFrame([{"model": lb, "layer": ly, "neuron": i, "sigma": float(s),
                                  "relative": float(self.relative[lb][ly][i])}
                                 for lb, layers in self.sigma.items()
                                 for ly, sig in layers.items() for i, s in enumerate(sig)],
                                columns=["model", "layer", "neuron", "sigma", "relative"])
        if what != "layers":
            raise ValueError(f"what must be 'layers', 'pairs' or 'neurons', got {what!r}")
        rows = []
        for lb, m in self.models.items():
            for ly in self.common_layers:
                e = m["layers"][ly]
                rows.append({"model": lb, "layer": ly, "channels": e["channels"], "k": e["k"],
                             "mean": e["mean"], "ci_low": e["ci95"][0], "ci_high": e["ci95"][1],
                             "median": e["median"], "relative_mean": e["relative_mean"],
                             "topk_mean": e["topk_mean"],
                             "restore_topk": e["intervention"]["topk"],
                             "restore_random": e["intervention"]["random"],
                             "clean_accuracy": m["clean_accuracy"],
                             "adv_accuracy": m["adv_accuracy"]})
        return pd.DataFrame(rows)

    def plot(self) -> dict[str, Any]:
        """The three figures ``save`` writes, as matplotlib ``Figure`` objects (no pyplot):
        ``{"sigma_mean", "sigma_hist", "intervention"}``.

        Example:
            >>> report.plot()["sigma_mean"]          # shown inline in a notebook
        """
        from robustkit.reports.sensitivity import figures

        return figures(self.to_dict(), self.sigma)

    def table(self) -> str:
        """The text table ``robustkit sensitivity`` prints.

        Example:
            >>> print(report.table())
            neuron sensitivity on the first 200 sample-mnist test images: pgd20 (white-box), ...
        """
        from robustkit.reports.sensitivity import text_table

        return text_table(self.to_dict())

    def _repr_html_(self) -> str:
        from robustkit.reports.sensitivity import html_tables

        return html_tables(self.to_dict())

    def save(self, folder: str | os.PathLike, *, save_adv: bool = False) -> Path:
        """Write what ``robustkit sensitivity --out folder`` writes: ``sensitivity.json``, the
        three PNG figures, ``tb/<label>/`` TensorBoard histograms and, with ``save_adv``,
        ``adv.pt`` (``{"x_adv": {label: x'}, "y": y}``). Returns the JSON's path.

        Raises:
            OutputError: the folder cannot be created or written.

        Example:
            >>> report.save("runs/sens", save_adv=True)
            PosixPath('runs/sens/sensitivity.json')
        """
        import io

        from robustkit.reports.sensitivity import write_figures, write_tensorboard
        from robustkit.utils import atomic_write, atomic_write_json, check_writable, output_errors

        out = check_writable(Path(folder), "folder")
        report = self.to_dict()
        path = out / JSON_NAME
        with output_errors(path):
            atomic_write_json(path, report)
        write_figures(report, self.sigma, out)
        write_tensorboard(self.sigma, self.relative, out / "tb")
        if save_adv:
            buf = io.BytesIO()
            torch.save({"x_adv": self.x_adv, "y": self.y}, buf)
            with output_errors(out / "adv.pt"):
                atomic_write(out / "adv.pt", buf.getvalue())
        logger.info("wrote %s", path)
        return path

"""TensorBoard output: a report's folder written afresh on each run of a command, and the
labelled saliency panel that ``SaliencyCallback`` logs during training (rendered with
matplotlib into the image TensorBoard shows).

Example:
    >>> fig = saliency_panel_figure(x, a, x_adv, a_adv, y, pred, pred_adv, title="gradient")
    >>> image = figure_image(fig)          # (3, H, W) in [0, 1], for SummaryWriter.add_image
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["fresh_tensorboard", "saliency_panel_figure", "figure_image", "COLUMNS"]

#: The panel's column titles: the image, its map, the adversarial image x', its map.
COLUMNS = ("x", "map", "x'", "map'")
#: What the colour bar measures (saliency.display.percentile_scale of the signed map).
SCALE_LABEL = "map / its 99th percentile of |map| (clipped)"


@contextmanager
def fresh_tensorboard(folder: Path) -> Iterator:
    """A ``TensorBoardLogger`` on ``folder`` after removing the event files of an earlier run.

    A failed write inside the block is an ``OutputError`` naming the folder; the logger is
    closed on exit.
    """
    from robustkit.training.loggers import TensorBoardLogger
    from robustkit.utils import output_errors

    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        tb = TensorBoardLogger(folder)
        try:
            yield tb
        finally:
            tb.close()


def saliency_panel_figure(x: Tensor, a: Tensor, x_adv: Tensor, a_adv: Tensor, y: Tensor,
                          pred: Tensor, pred_adv: Tensor, *, title: str = "",
                          class_names: Sequence[str] | None = None) -> Any:
    """A matplotlib ``Figure``: one row per image, columns x, map, x', map' (:data:`COLUMNS`).

    Each row is labelled with the true label, and the x and x' cells with the model's
    prediction on them (red when wrong). Maps are the signed sums over channels divided by
    their 99th percentile of |map| (``saliency.display``), drawn red (positive) / white (0) /
    blue (negative) on the colour bar's fixed [-1, 1] scale.

    Args:
        x, x_adv: ``(N, C, H, W)`` images in [0, 1].
        a, a_adv: ``(N, C, H, W)`` attributions of x and x'.
        y, pred, pred_adv: ``(N,)`` true labels, predictions on x and on x'.
        title: the figure's title (the explainer's name).
        class_names: label names, shown beside the numbers.
    """
    from matplotlib.figure import Figure

    from robustkit.saliency import percentile_scale, signed_map

    n = x.shape[0]
    maps = [percentile_scale(signed_map(m.detach().float().cpu())) for m in (a, a_adv)]
    images = [_hwc(x), _hwc(x_adv)]

    def name(k: int) -> str:
        return f"{k} {class_names[k]}" if class_names is not None and 0 <= k < len(
            class_names) else str(k)

    fig = Figure(figsize=(1.45 * 4 + 1.0, 1.45 * n + 0.7), dpi=72, layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    shown = None
    for i in range(n):
        cells = (images[0][i], maps[0][i], images[1][i], maps[1][i])
        for j, (ax, cell) in enumerate(zip(axes[i], cells, strict=True)):
            if j % 2 == 0:
                ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=1,
                          interpolation="nearest")
            else:
                shown = ax.imshow(cell.numpy(), cmap="bwr", vmin=-1, vmax=1,
                                  interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(COLUMNS[j])
        for j, p in ((0, pred), (2, pred_adv)):
            k = int(p[i])
            axes[i][j].set_xlabel(f"pred {name(k)}", fontsize=8,
                                  color="black" if k == int(y[i]) else "red")
        axes[i][0].set_ylabel(f"label {name(int(y[i]))}", fontsize=8)
    bar = fig.colorbar(shown, ax=axes[:, 3].tolist(), shrink=0.6, ticks=[-1, 0, 1])
    bar.set_label(SCALE_LABEL, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def figure_image(fig: Any) -> Tensor:
    """The figure drawn by Agg as a ``(3, H, W)`` float tensor in [0, 1] (no window, no
    pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def _hwc(x: Tensor) -> Any:
    """``(N, C, H, W)`` in [0, 1] -> numpy ``(N, H, W, 3)``, or grey ``(N, H, W)`` (the mean
    over channels) for any channel count but 3."""
    x = x.detach().float().cpu().clamp(0, 1)
    return (x.permute(0, 2, 3, 1) if x.shape[1] == 3 else x.mean(1)).numpy()

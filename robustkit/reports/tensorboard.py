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

__all__ = ["fresh_tensorboard", "saliency_panel_figure", "panel_pixels", "figure_image",
           "COLUMNS"]

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
    blue (negative) on the colour bar's fixed [-1, 1] scale. The cells are one image (one axes:
    cheap to draw every epoch), :func:`panel_pixels`.

    Args:
        x, x_adv: ``(N, C, H, W)`` images in [0, 1].
        a, a_adv: ``(N, C, H, W)`` attributions of x and x'.
        y, pred, pred_adv: ``(N,)`` true labels, predictions on x and on x'.
        title: the figure's title (the explainer's name).
        class_names: label names, shown beside the numbers.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n, _, h, w = x.shape
    grid, (gx, gy) = panel_pixels(x, a, x_adv, a_adv)

    def name(k: int) -> str:
        return f"{k} {class_names[k]}" if class_names is not None and 0 <= k < len(
            class_names) else str(k)

    cell = 1.2  # inches per cell; margins: 0.6 left, 1.3 right (colour bar), 0.75 top
    grid_w, grid_h = 4 * cell * (w + gx) / w, n * cell * (h + gy) / h
    width, height = 0.6 + grid_w + 1.3, grid_h + 0.9
    fig = Figure(figsize=(width, height), dpi=72)
    ax = fig.add_axes((0.6 / width, 0.15 / height, grid_w / width, grid_h / height))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for j, column in enumerate(COLUMNS):
        ax.text(j * (w + gx) + w / 2, -0.5, column, ha="center", va="bottom", fontsize=11)
    for i in range(n):
        top = i * (h + gy)
        ax.text(-0.06 * w, top + h / 2, f"label {name(int(y[i]))}", ha="right", va="center",
                fontsize=8, rotation=90)
        for j, p in ((0, pred), (2, pred_adv)):
            k = int(p[i])
            ax.text(j * (w + gx) + w / 2, top + h + 0.04 * h, f"pred {name(k)}", ha="center",
                    va="top", fontsize=8, color="black" if k == int(y[i]) else "red")
    cax = fig.add_axes(((0.6 + grid_w + 0.1) / width, 0.25, 0.15 / width, 0.5),
                       label="<colorbar>")  # matplotlib's own label for a colour bar's axes
    bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), colormaps["bwr"]), cax=cax,
                       ticks=[-1, 0, 1])
    bar.set_label(SCALE_LABEL, fontsize=8)
    if title:
        fig.suptitle(title, y=1 - 0.05 / height, va="top")
    return fig


def panel_pixels(x: Tensor, a: Tensor, x_adv: Tensor, a_adv: Tensor
                 ) -> tuple[Tensor, tuple[int, int]]:
    """``(grid, (gap_x, gap_y))``: the panel's cells as one ``(3, H', W')`` RGB image in [0, 1]
    on light grey, rows images and columns x, map, x', map' (maps through the ``bwr`` colour map on
    [-1, 1]: the colour bar's), and the gaps in pixels after each cell (the row gap leaves room
    for the predictions)."""
    from matplotlib import colormaps

    from robustkit.saliency.display import percentile_scale, signed_map

    n, _, h, w = x.shape
    bwr = colormaps["bwr"]
    maps = [torch.from_numpy(bwr((percentile_scale(signed_map(m.detach().float().cpu()))
                                  .numpy() + 1) / 2)[..., :3]).permute(0, 3, 1, 2).float()
            for m in (a, a_adv)]
    cells = torch.stack([_rgb(x), maps[0], _rgb(x_adv), maps[1]], dim=1)
    gx, gy = max(1, w // 8), max(2, (h * 3) // 10)
    grid = torch.full((3, n * (h + gy), 4 * (w + gx)), 0.85)  # light grey: white map pixels show
    for i in range(n):
        for j in range(4):
            grid[:, i * (h + gy):i * (h + gy) + h, j * (w + gx):j * (w + gx) + w] = cells[i, j]
    return grid, (gx, gy)


def figure_image(fig: Any) -> Tensor:
    """The figure drawn by Agg as a ``(3, H, W)`` float tensor in [0, 1] (no window, no
    pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def _rgb(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` in [0, 1] as RGB: grey (the mean over channels) for any count but 3."""
    x = x.detach().float().cpu().clamp(0, 1)
    return x if x.shape[1] == 3 else x.mean(1, keepdim=True).expand(-1, 3, -1, -1)

"""Saliency maps of a fixed probe panel during training: TensorBoard image grids and
``saliency/<explainer>/<clean|adv>/<metric>`` scalars (methods.md §7.3, §8.2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from robustkit.saliency import EXPLAINERS, create_explainer, explainer_params
from robustkit.saliency.base import Explainer
from robustkit.saliency.metrics import sparseness, total_variation
from robustkit.training.callbacks.base import (
    Callback,
    check_probe_args,
    first_items,
    probe_due,
    probe_mode,
)
from robustkit.training.callbacks.sensitivity import Perturb

__all__ = ["SaliencyCallback"]

log = logging.getLogger(__name__)

#: The panel's metrics: name -> ``(N, C, H, W)`` map -> ``(N,)`` score (methods.md §8.2).
METRICS = {"sparseness": sparseness, "total_variation": total_variation}


class SaliencyCallback(Callback):
    """Saliency maps of a fixed probe panel, clean and adversarial, during training.

    Every ``every`` epochs and after the last, rank 0 takes the first ``n`` images of ``data``
    (the same panel in every run), builds their adversarial versions x' with ``perturb`` and
    explains the **true label**'s logit at x and at x' with each of ``explainers`` (names of
    :data:`robustkit.saliency.EXPLAINERS`; the noise explainers get ``n_samples`` and the fixed
    ``seed``, so x and x' see the same noise draws). It adds to ``trainer.state.metrics``, for
    every explainer ``e`` and input ``clean`` / ``adv``:

    - ``saliency/<e>/<input>/sparseness``: the panel's mean Gini index (higher: sparser);
    - ``saliency/<e>/<input>/total_variation``: the panel's mean normalised TV (lower: smoother;
      an all-zero map's NaN is left out of the mean);

    (``metrics.jsonl``; TensorBoard scalars under the same tags) and keeps one image per
    explainer, ``saliency/<e>`` (``reports.tensorboard.saliency_panel_figure`` drawn by
    matplotlib): one row per image labelled with its true label, columns titled x, map, x',
    map', the model's prediction under x and x' (red when wrong), each map summed over
    channels with signs, divided by its 99th percentile of |map| (clipped to [-1, 1]) and drawn
    red (positive) / white (0) / blue (negative) beside a colour bar of that scale.
    :meth:`images` hands the images over once: pass it as
    ``TensorBoardCallback(image_fn=cb.images)``.

    Put it before the loggers (they read the state at ``on_epoch_end``), like ``EvalCallback``.
    Training is exactly the same with or without it: x' comes from a CPU generator seeded
    ``seed``, the explainers' noise from fresh generators seeded ``seed``, the global RNGs are
    forked around it all, every submodule's mode is restored, autocast is off, no hook
    outlives it and no parameter's ``.grad`` or BatchNorm statistic changes (eval mode; input
    gradients only). Nothing is added to checkpoints. Under DDP only rank 0 explains, on the
    bare module.

    Args:
        data: the held-out set (a ``Dataset`` of ``(x, y[, idx])`` with x in [0, 1], or a
            ``DataLoader`` whose ``dataset`` is used); its first ``n`` items are the panel.
        perturb: ``perturb(bare_model, x, y, generator) -> x_adv`` built by the caller
            (``robustkit.training`` imports no attack), as for ``SensitivityCallback``.
        explainers: explainer names (default gradient, smoothgrad, adaptgrad).
        n: panel images (default 8; fewer when ``data`` is smaller).
        every: explain every ``every`` epochs and after the last one (default 1).
        n_samples: noisy samples of SmoothGrad / AdaptGrad (default 16: a cheap, noisier map
            than methods.md §8's 50).
        seed: seed of the attack's generator and of the explainers' noise (default 0).
        internal_batch_size: most rows per explainer forward-backward (default 256).

    Example:
        >>> cb = SaliencyCallback(loaders.holdout, pgd, n=8, every=1)
        >>> tb = TensorBoardCallback("runs/x/tb", image_fn=cb.images)
    """

    def __init__(
        self,
        data: Dataset | DataLoader,
        perturb: Perturb,
        *,
        explainers: Sequence[str] = ("gradient", "smoothgrad", "adaptgrad"),
        n: int = 8,
        every: int = 1,
        n_samples: int = 16,
        seed: int = 0,
        internal_batch_size: int = 256,
    ) -> None:
        dataset = check_probe_args(data, perturb, n=n, every=every, n_samples=n_samples,
                                   internal_batch_size=internal_batch_size)
        if isinstance(explainers, str) or not explainers:
            raise ValueError(f"explainers must be a non-empty list of names, got {explainers!r}")
        bad = [e for e in explainers if e not in EXPLAINERS]
        if bad:
            raise ValueError(f"explainers: unknown {bad}; known: {sorted(EXPLAINERS)}")
        self.dataset, self.perturb = dataset, perturb
        self.explainers = list(dict.fromkeys(explainers))  # order kept, duplicates dropped
        self.n, self.every, self.n_samples = min(n, len(dataset)), every, n_samples
        self.seed, self.internal_batch_size = int(seed), internal_batch_size
        self._probe: tuple[Tensor, Tensor] | None = None
        self._pending: dict[str, Tensor] = {}

    def on_epoch_end(self, trainer) -> None:
        if not probe_due(trainer, self.every):
            return
        start = time.perf_counter()
        metrics, self._pending = self.measure(trainer.model, trainer.device)
        trainer.state.metrics.update(metrics)
        log.info("saliency panel (%d images, %d explainers) took %.2f s", self.n,
                 len(self.explainers), time.perf_counter() - start)

    def images(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """The grids of the last measurement, ``{"saliency/<e>": (3, H, W) in [0, 1]}``, once.

        ``TensorBoardCallback``'s ``image_fn`` (its ``model`` argument is not needed): an epoch
        without a measurement returns ``{}``, so the grids follow this callback's schedule.
        """
        pending, self._pending = self._pending, {}
        return pending

    def probe(self) -> tuple[Tensor, Tensor]:
        """The panel's images ``(n, C, H, W)`` and labels ``(n,)`` (CPU; built once)."""
        if self._probe is None:
            self._probe = first_items(self.dataset, self.n)
        return self._probe

    def explainer(self, name: str, model: nn.Module) -> Explainer:
        """Explainer ``name`` on ``model`` with this callback's settings."""
        accepted = explainer_params(name)
        settings = {"n_samples": self.n_samples, "seed": self.seed,
                    "internal_batch_size": self.internal_batch_size}
        return create_explainer(name, model, **{k: v for k, v in settings.items()
                                                if k in accepted})

    def measure(
        self, model: nn.Module, device: torch.device | str | None = None
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """``(metrics, grids)``: the scalars and the image grid of every explainer."""
        from robustkit.reports.tensorboard import figure_image, saliency_panel_figure

        x_cpu, y_cpu = self.probe()
        metrics: dict[str, float] = {}
        grids: dict[str, Tensor] = {}
        with probe_mode(model, device) as (bare, device):
            x, y = x_cpu.to(device), y_cpu.to(device)
            x_adv = self.perturb(bare, x, y, torch.Generator().manual_seed(self.seed)).detach()
            with torch.no_grad():
                pred, pred_adv = bare(x).argmax(1).cpu(), bare(x_adv).argmax(1).cpu()
            for name in self.explainers:
                explainer = self.explainer(name, bare)
                maps = {"clean": explainer.attribute(x, target=y),
                        "adv": explainer.attribute(x_adv, target=y)}
                for kind, a in maps.items():
                    for metric, fn in METRICS.items():
                        metrics[f"saliency/{name}/{kind}/{metric}"] = \
                            float(torch.nanmean(fn(a).double()))
                grids[f"saliency/{name}"] = figure_image(saliency_panel_figure(
                    x, maps["clean"], x_adv, maps["adv"], y_cpu, pred, pred_adv, title=name,
                    class_names=_class_names(self.dataset)))
        return metrics, grids



def _class_names(dataset: Dataset) -> list[str] | None:
    """The label names of an ``ImageDataset`` (or of the one under a ``Subset``), else None."""
    return getattr(dataset, "class_names", None) or getattr(
        getattr(dataset, "dataset", None), "class_names", None)

"""Neuron sensitivity of a fixed probe set during training: ``sensitivity/<layer>`` (methods.md
§4.1-4.2, §7.3)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from robustkit.sensitivity import SensitivityMeter, resolve_layers
from robustkit.training.callbacks.base import (
    Callback,
    check_probe_args,
    first_items,
    probe_due,
    probe_mode,
)

__all__ = ["SensitivityCallback", "Perturb"]

log = logging.getLogger(__name__)

# perturb(bare_model, x, y, generator) -> x_adv: the caller's attack (training imports none)
Perturb = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]


class SensitivityCallback(Callback):
    """Per-layer neuron sensitivity σ on a fixed probe set, for any objective.

    Every ``every`` epochs and after the last, rank 0 attacks the first ``n`` images of
    ``data`` with ``perturb`` and measures σ of every neuron of ``layers`` over the ``(x, x')``
    pairs with :class:`~robustkit.sensitivity.SensitivityMeter` (eval mode, no gradient,
    paper-style per-element L1 by default). It adds to ``trainer.state``:

    - ``metrics["sensitivity/<layer>"]``: the layer's mean σ (``metrics.jsonl``; TensorBoard
      scalar ``sensitivity/<layer>``);
    - ``metrics["sensitivity_rel/<layer>"]`` (``relative=True``): the mean relative σ, σ over the
      clean features' size, which compares across models and epochs whose activation scales
      differ (methods.md §4.1);
    - ``histograms["sensitivity/<layer>"]``: the ``(C,)`` σ (TensorBoard histogram
      ``hist/sensitivity/<layer>``).

    Put it before the loggers (they read the state at ``on_epoch_end``), like ``EvalCallback``.

    The measurement leaves training exactly as it was: batch ``b`` of the probe set gets its
    own CPU generator seeded ``seed + b`` (so every measurement, in every run and after a
    resume, uses the same random starts), the global RNGs are forked around it (an attack that
    draws from them anyway changes nothing), every submodule's mode is restored, no hook
    outlives it, autocast is off, and no parameter's ``.grad`` or BatchNorm statistic changes
    (eval mode; the attack takes input gradients only). Nothing is added to checkpoints: the
    probe set and its seeds are fixed. Under DDP only rank 0 measures, on the bare module; the
    other ranks skip it and wait at the next collective.

    Args:
        data: the held-out set (a ``Dataset`` of ``(x, y[, idx])``, or a ``DataLoader`` whose
            ``dataset`` is used); its first ``n`` items are the probe set.
        perturb: ``perturb(bare_model, x, y, generator) -> x_adv`` (the caller builds the
            attack: ``robustkit.training`` imports none); ``generator`` is a CPU
            ``torch.Generator`` for its random start.
        layers: module names of the bare model or ``"auto"`` (every conv and linear module).
        n: probe images (default 256; fewer when ``data`` is smaller).
        every: measure every ``every`` epochs and after the last one (default 1).
        batch_size: probe pairs per attack call and forward pass (default 256).
        seed: base of the per-batch generator seeds (default 0).
        relative: also log ``sensitivity_rel/<layer>`` (default True).
        reduction: ``"elementwise"`` (paper style, default) or ``"spatial_mean"`` (MindArmour).

    Example:
        >>> pgd = lambda m, x, y, g: PGD(m, eps=0.3, alpha=0.075, select="last", generator=g)(x, y)
        >>> cb = SensitivityCallback(loaders.holdout, pgd, layers="auto", n=256, every=1)
    """

    def __init__(
        self,
        data: Dataset | DataLoader,
        perturb: Perturb,
        *,
        layers: Sequence[str] | Literal["auto"] = "auto",
        n: int = 256,
        every: int = 1,
        batch_size: int = 256,
        seed: int = 0,
        relative: bool = True,
        reduction: Literal["elementwise", "spatial_mean"] = "elementwise",
    ) -> None:
        dataset = check_probe_args(data, perturb, n=n, every=every, batch_size=batch_size)
        if reduction not in ("elementwise", "spatial_mean"):
            raise ValueError(f"reduction must be 'elementwise' or 'spatial_mean', "
                             f"got {reduction!r}")
        if isinstance(layers, str) and layers != "auto":
            raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
        self.dataset, self.perturb = dataset, perturb
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.n, self.every, self.batch_size = min(n, len(dataset)), every, batch_size
        self.seed, self.relative, self.reduction = int(seed), bool(relative), reduction
        if self.n < n:
            log.info("sensitivity probe: %d images requested, the held-out set has %d", n,
                     self.n)
        self._probe: tuple[Tensor, Tensor] | None = None

    def on_epoch_end(self, trainer) -> None:
        if not probe_due(trainer, self.every):
            return
        start = time.perf_counter()
        sigma, rel = self.measure(trainer.model, trainer.device)
        s = trainer.state
        for name, values in sigma.items():
            s.metrics[f"sensitivity/{name}"] = float(values.mean())
            s.histograms[f"sensitivity/{name}"] = values.float()
            if rel is not None:
                s.metrics[f"sensitivity_rel/{name}"] = float(rel[name].mean())
        log.info("sensitivity probe (%d pairs, %d layers) took %.2f s", self.n, len(sigma),
                 time.perf_counter() - start)

    def probe(self) -> tuple[Tensor, Tensor]:
        """The probe images ``(n, C, H, W)`` and labels ``(n,)`` (CPU; built once)."""
        if self._probe is None:
            self._probe = first_items(self.dataset, self.n)
        return self._probe

    def measure(
        self, model: nn.Module, device: torch.device | str | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``(σ, relative σ or None)``, each ``{layer: (C,) float64}`` over the probe pairs.

        Pairs whose x' is NaN or infinite are left out with a warning; ``({}, None)`` when none
        is left (nothing is logged that epoch).
        """
        x_all, y_all = self.probe()
        broken = 0
        with probe_mode(model, device) as (bare, device):
            meter = SensitivityMeter(bare, resolve_layers(bare, self.layers), self.reduction)
            for b, i in enumerate(range(0, self.n, self.batch_size)):
                x = x_all[i:i + self.batch_size].to(device)
                y = y_all[i:i + self.batch_size].to(device)
                generator = torch.Generator().manual_seed(self.seed + b)
                x_adv = self.perturb(bare, x, y, generator).detach()
                ok = torch.isfinite(x_adv).flatten(1).all(1)
                if not bool(ok.all()):  # a diverged attack: a panel is not worth the run
                    broken += int((~ok).sum())
                    x, x_adv = x[ok], x_adv[ok]
                if x.shape[0]:
                    meter.update(x, x_adv)
        if broken:
            log.warning("sensitivity probe: %d of %d adversarial images were NaN or infinite "
                        "(the attack diverged); sigma is over the other %d", broken, self.n,
                        meter.n)
        if meter.n == 0:
            return {}, None
        return meter.compute(), (meter.compute(relative=True) if self.relative else None)


"""The callbacks of a training run, from its config (``robustkit.config.build``'s helper).

Held-out evaluation (PGD-k built here: ``training/`` imports no attack), the sensitivity probe
and the saliency panel (their PGD x' built here too), the JSONL and TensorBoard loggers and the
checkpoint, in the order the trainer must call them.

Example:
    >>> cbs = wire_callbacks(cfg, loaders, DATASETS["sample-mnist"], Path("runs/x"), model, [])
    >>> [type(cb).__name__ for cb in cbs]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robustkit.config.loading import to_container
from robustkit.errors import ConfigError, user_input

__all__ = ["wire_callbacks"]

log = logging.getLogger(__name__)


def _plain(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def _holdout_attacks(cfg: DictConfig, info: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The held-out evaluation's attack, built here because ``training/`` imports no attack.

    PGD-k as ``robustkit evaluate``'s ``pgdK`` (α = ε/4 unless ``trainer.eval_alpha``, uniform
    random start, CE, stop on success, the best iterate per sample) on the bare model; the
    config has checked that k·α reaches ε. Its random starts come from a CPU generator that
    the evaluation reseeds per batch, so every epoch sees the same starts.
    """
    from robustkit.attacks import PGD

    t = cfg.trainer
    eps = t.eval_eps if t.eval_eps is not None else info.eps[t.eval_norm]
    alpha = t.eval_alpha if t.eval_alpha is not None else eps / 4
    with user_input(ConfigError, "trainer.eval_*"):
        # stop_on_success: a broken point stays broken, so accuracy is unchanged and the
        # already-broken points cost no more gradient evaluations.
        pgd = PGD(model, eps=eps, alpha=alpha, steps=t.eval_steps, norm=t.eval_norm,
                  random_start=True, loss="ce", stop_on_success=True, select="best",
                  generator=torch.Generator())
    return {f"pgd{t.eval_steps}": pgd}


def _probe_perturb(cfg: DictConfig, info: Any, model: torch.nn.Module,
                   section: str = "sensitivity"):
    """The sensitivity probe's (or saliency panel's) attack, ``perturb(model, x, y, generator)
    -> x_adv``.

    PGD at the held-out ε and norm (``trainer.eval_eps``/``eval_norm``): ``<section>.steps``
    steps of ε/4, uniform random start from the callback's generator, CE, the last iterate and
    no early stop, so every probe pair is a full-budget x' (methods.md §4.1's pairs, PGD-10
    instead of PGD-20 to keep the probe cheap). Built here because ``training/`` imports no
    attack; checked once on ``model`` so a bad setting fails at wiring, not after an epoch.
    """
    from robustkit.attacks import PGD

    t, s = cfg.trainer, cfg[section]
    eps = t.eval_eps if t.eval_eps is not None else info.eps[t.eval_norm]
    if s.steps < 4:  # s.steps * eps/4 must reach eps: a weaker x' understates σ
        raise ConfigError(f"config key '{section}.steps' must be >= 4 (steps of eps/4 must "
                          f"reach eps), got {s.steps}")
    settings = dict(eps=eps, alpha=eps / 4, steps=s.steps, norm=t.eval_norm, random_start=True,
                    loss="ce", stop_on_success=False, select="last")
    with user_input(ConfigError, section):
        PGD(model, **settings, generator=torch.Generator())

    def perturb(bare: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        return PGD(bare, **settings, generator=generator)(x, y)

    return perturb


def _eval_interval(t: DictConfig) -> int:
    """The probes' default interval: ``trainer.eval_every``, or with no held-out evaluation
    (``eval_every: null``) ``trainer.epochs``, so they run after the last epoch only."""
    return t.eval_every if t.eval_every is not None else t.epochs


def _sensitivity(cfg: DictConfig, loaders: Any, info: Any, model: torch.nn.Module) -> list[Any]:
    """``[SensitivityCallback]`` from the ``sensitivity`` section, or ``[]`` (disabled, no
    held-out split). Rank 0 measures on the bare model (the callback skips other ranks)."""
    from robustkit.sensitivity import resolve_layers
    from robustkit.training.callbacks import SensitivityCallback

    s, t = cfg.sensitivity, cfg.trainer
    if not s.enabled:
        return []
    if loaders.holdout is None or len(loaders.holdout.dataset) == 0:
        log.warning("sensitivity: no held-out split (data.holdout=0): no sensitivity/* logged")
        return []
    # None: with the held-out evaluation; eval_every null (none): after the last epoch only
    every = s.every if s.every is not None else _eval_interval(t)
    if not (isinstance(s.layers, str) or OmegaConf.is_list(s.layers)):
        raise ConfigError(f"config key 'sensitivity.layers' must be 'auto' or a list of module "
                          f"names, got {s.layers!r}")
    layers = s.layers if isinstance(s.layers, str) else [str(n) for n in s.layers]
    with user_input(ConfigError, "sensitivity.layers"):
        layers = resolve_layers(model, layers)  # an unknown name lists the valid ones now
    perturb = _probe_perturb(cfg, info, model)
    # seed 0, not cfg.seed: runs with different seeds start their probe PGD at the same points
    with user_input(ConfigError, "sensitivity"):
        return [SensitivityCallback(loaders.holdout, perturb, layers=layers, n=s.n, every=every,
                                    batch_size=loaders.holdout.batch_size, seed=0)]


def _saliency(cfg: DictConfig, loaders: Any, info: Any, model: torch.nn.Module) -> list[Any]:
    """``[SaliencyCallback]`` from the ``saliency`` section, or ``[]`` (disabled, no held-out
    split). Rank 0 explains on the bare model (the callback skips other ranks); its grids reach
    TensorBoard through ``TensorBoardCallback(image_fn=cb.images)``."""
    from robustkit.saliency import EXPLAINERS
    from robustkit.training.callbacks import SaliencyCallback

    s, t = cfg.saliency, cfg.trainer
    if not s.enabled:
        return []
    if loaders.holdout is None or len(loaders.holdout.dataset) == 0:
        log.warning("saliency: no held-out split (data.holdout=0): no saliency panel logged")
        return []
    every = s.every if s.every is not None else _eval_interval(t)
    names = [s.explainers] if isinstance(s.explainers, str) else list(s.explainers or [])
    bad = [str(n) for n in names if n not in EXPLAINERS]
    if not names or bad:
        raise ConfigError(f"config key 'saliency.explainers' must be a non-empty list of "
                          f"{sorted(EXPLAINERS)}, got unknown {bad or names}")
    perturb = _probe_perturb(cfg, info, model, section="saliency")
    # seed 0, not cfg.seed: runs with different seeds see the same x' and the same noise
    with user_input(ConfigError, "saliency"):
        return [SaliencyCallback(loaders.holdout, perturb, explainers=[str(n) for n in names],
                                 n=s.n, every=every, n_samples=s.n_samples, seed=0)]


def wire_callbacks(cfg: DictConfig, loaders: Any, info: Any, out_dir: Path,
                   model: torch.nn.Module, extra: list[Any]) -> list[Any]:
    """The trainer's callbacks from the ``trainer``, ``sensitivity``, ``saliency`` and ``log``
    sections, in the order they must run, with ``extra`` before the checkpoint.

    Example:
        >>> cbs = wire_callbacks(cfg, loaders, DATASETS["sample-mnist"], Path("runs/x"), model, [])
        >>> type(cbs[-1]).__name__
        'CheckpointCallback'
    """
    from robustkit.training.callbacks import (
        CheckpointCallback,
        EvalCallback,
        JSONLCallback,
        TensorBoardCallback,
    )

    t = cfg.trainer
    callbacks: list[Any] = []
    # Order matters: evaluation fills eval/* before the loggers and the checkpoint read it.
    if t.eval_every is not None and loaders.holdout is not None:
        with user_input(ConfigError, "trainer.eval_*"):
            callbacks.append(EvalCallback(
                loaders.holdout, _holdout_attacks(cfg, info, model), every=t.eval_every,
                n=t.eval_n, seed=cfg.seed))  # exactly eval_n images: the last batch cut short
    # Also before the loggers: it adds sensitivity/* to the epoch's metrics and histograms.
    callbacks.extend(_sensitivity(cfg, loaders, info, model))
    # Also before the loggers: saliency/* scalars; its grids go through TensorBoard's image_fn.
    saliency = _saliency(cfg, loaders, info, model)
    callbacks.extend(saliency)
    if cfg.log.jsonl:
        callbacks.append(JSONLCallback(out_dir / "metrics.jsonl", log_every=t.log_every))
    if cfg.log.tensorboard:
        hparams = {"seed": cfg.seed, "data": cfg.data.name, "model": cfg.model.name,
                   "objective": {"name": cfg.objective.name, **_plain(cfg.objective.params)},
                   "optim": {k: cfg.optim[k] for k in ("name", "lr", "weight_decay", "schedule")},
                   "epochs": t.epochs, "batch_size": cfg.data.batch_size}
        # image_every=1: the saliency callback's images() is empty when it did not explain
        callbacks.append(TensorBoardCallback(out_dir / "tb", config_text=OmegaConf.to_yaml(cfg),
                                             log_every=t.log_every, hparams=hparams,
                                             image_fn=saliency[0].images if saliency else None))
    callbacks.extend(extra)  # the caller's (the CLI's progress bar): after the loggers
    # Last: an epoch's logs reach the disk before its checkpoint, so a run killed between them
    # has logs ahead of last.pt (trimmed on resume), never a line missing behind it.
    callbacks.append(CheckpointCallback(out_dir, config=to_container(cfg),
                                        monitor=f"eval/pgd{t.eval_steps}",
                                        every=t.checkpoint_every))
    return callbacks

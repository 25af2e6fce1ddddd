"""Matched-strength λ grids: each regulariser's penalty at initialisation, and the λ that put it
at chosen levels (issue 20 (a): IGR, JR and SAGR compared at the same penalty, not the same λ).

The penalty is the regulariser's term of the loss, ``loss - CE`` as the objective computes it
(IGR: λ·mean‖∇ₓCE‖²; JR: λ/2·mean‖J‖²_F, its random projection seeded; SAGR: λ·mean R_SAGR),
so it is linear in λ: ``penalty(λ) = λ · penalty(1)``.

Example:
    >>> x, y = robustkit.data.load("sample-mnist", n=256)
    >>> unit = penalty_at_init("configs/train/mnist_jr.yaml", x, y)   # penalty at λ = 1
    >>> lams = match_lams({"jr": unit}, targets=[0.01, 0.1, 1])["jr"]
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PENALTIES", "penalty", "penalty_at_init", "match_lams", "round_sig", "calibrate"]

#: Objectives whose loss is CE + a λ-weighted input-gradient penalty.
PENALTIES = ("igr", "jr", "sagr")


def penalty(name: str, model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0,
            **params: Any) -> float:
    """The penalty term (``loss - CE``) of objective ``name`` on ``(x, y)`` for ``model``.

    Args:
        name: one of ``PENALTIES``.
        model: the model, its weights as they are (a float64 copy in eval mode is used, so
            dropout is off; ``model`` is left untouched).
        x, y: ``(N, C, H, W)`` in [0, 1] and ``(N,)`` labels.
        seed: seeds JR's random projections (and any other randomness of the call).
        params: the objective's hyper-parameters (``lam`` ...).

    Raises:
        ValueError: ``name`` is not one of ``PENALTIES``.
    """
    from robustkit.objectives import create_objective

    if name not in PENALTIES:
        raise ValueError(f"name must be one of {list(PENALTIES)}, got {name!r}")
    # float64: at initialisation the penalty can be ~1e-8 of the CE, below float32's resolution
    # eval mode: no dropout, so the measurement is deterministic (training adds dropout noise)
    model = copy.deepcopy(model).double().eval()
    objective = create_objective(name, model, **params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = objective(x.double(), y)
    return float((out.loss - out.metrics["loss/ce"]).detach())


def penalty_at_init(config: str | os.PathLike, x: Tensor, y: Tensor, *, lam: float = 1.0,
                    overrides: Sequence[str] = (), model: nn.Module | None = None) -> float:
    """The penalty of a training config's objective at λ = ``lam``, for its model at
    initialisation (built from the config's seed, as ``robustkit.config.build`` builds it),
    or for ``model`` when given (e.g. a trained reference model).

    Raises:
        ValueError: the config's objective is not one of ``PENALTIES``.
    """
    from omegaconf import OmegaConf

    from robustkit.config import load_config
    from robustkit.data import DATASETS
    from robustkit.models import create_model
    from robustkit.utils import seed_everything

    cfg = load_config(config, list(overrides))
    params = OmegaConf.to_container(cfg.objective.params, resolve=True)
    params["lam"] = lam
    if model is None:
        info = DATASETS[cfg.data.name]
        seed_everything(cfg.seed)  # as build(): the run's initial weights
        model = create_model(cfg.model.name, num_classes=info.num_classes, mean=info.mean,
                             std=info.std, in_channels=info.input_shape[0],
                             input_size=info.input_shape[-1],
                             **OmegaConf.to_container(cfg.model.params, resolve=True))
    return penalty(cfg.objective.name, model, x, y, seed=cfg.seed, **params)


def match_lams(unit: Mapping[str, float], targets: Sequence[float],
               digits: int = 1) -> dict[str, list[float]]:
    """For each method, the λ that puts its penalty at each target: ``target / unit``, rounded
    to ``digits`` significant digits so the grid reads well. The achieved penalty is
    ``λ · unit`` (up to about ±40 % off the target at one digit): report that, not the target.

    Args:
        unit: method -> its penalty at λ = 1 (``penalty_at_init``).
        targets: the penalty levels, shared by every method.

    Raises:
        ValueError: a non-positive unit penalty or target.
    """
    out = {}
    for method, u in unit.items():
        if not u > 0:
            raise ValueError(f"unit penalty of {method!r} must be > 0, got {u!r}")
        lams = []
        for t in targets:
            if not t > 0:
                raise ValueError(f"targets must be > 0, got {t!r}")
            lams.append(round_sig(t / u, digits))
        out[method] = lams
    return out


def round_sig(v: float, digits: int = 1) -> float:
    """``v`` rounded to ``digits`` significant digits (0.01234 -> 0.01 at one digit)."""
    if v == 0:
        return 0.0
    return float(f"{v:.{digits - 1}e}") if digits >= 1 and math.isfinite(v) else v


def calibrate(methods: Mapping[str, tuple[str, Sequence[str]]], x: Tensor, y: Tensor,
              targets: Sequence[float], model: nn.Module | None = None,
              digits: int = 1) -> Any:
    """The matched λ grid and the penalties it achieves, as a pandas DataFrame.

    Args:
        methods: label -> (training config, overrides), e.g.
            ``{"sagr_flat": ("configs/train/mnist_sagr.yaml", ["objective.params.a_pos=1"])}``.
        x, y: the images the penalty is measured on.
        targets: the penalty levels every method is put at.
        model: the reference model (e.g. the shipped standard one); ``None``: each config's
            model at initialisation.
        digits: significant digits of each λ.

    Returns:
        One row per method and target: ``label``, ``target``, ``lam``, ``penalty`` (at that
        λ on ``model``), ``unit`` (at λ = 1).
    """
    import pandas as pd

    unit = {k: penalty_at_init(cfg, x, y, overrides=ov, model=model)
            for k, (cfg, ov) in methods.items()}
    lams = match_lams(unit, targets, digits)
    rows = [{"label": k, "target": t, "lam": lam, "penalty": lam * unit[k], "unit": unit[k]}
            for k in methods for t, lam in zip(targets, lams[k], strict=True)]
    return pd.DataFrame(rows)

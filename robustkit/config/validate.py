"""Value checks after merging: choices, bounds, the held-out PGD's reach, evaluate's settings."""

from __future__ import annotations

import difflib
import errno
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustkit.config._merge import Label, _config_key
from robustkit.errors import ConfigError

_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("sgd", "adam"),
    "optim.schedule": ("multistep", "cosine", "onecycle", "constant"),
    "trainer.amp": ("off", "bf16", "fp16"),
    "trainer.eval_norm": ("Linf", "L2"),
}


def _one_of(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}{hint}")


# Numeric fields of TrainConfig and their ranges: (low, high, low_open, high_open); None: no
# bound. Checked at load, before anything is built: a NaN learning rate or a negative count
# would otherwise surface as a traceback (or silently wrong training) much later. Integer fields
# are integers already (OmegaConf refuses 1.5 and true); every float must also be finite.
_INF = math.inf
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, _INF, False, True),
    "data.batch_size": (1, _INF, False, True),
    "data.eval_batch_size": (1, _INF, False, True),
    "data.holdout": (0, _INF, False, True),
    "data.num_workers": (0, _INF, False, True),
    "data.limit": (1, _INF, False, True),
    "optim.lr": (0, _INF, True, True),
    "optim.momentum": (0, 1, False, True),  # SGD momentum / Adam beta1: [0, 1)
    "optim.weight_decay": (0, _INF, False, True),
    "optim.gamma": (0, 1, True, False),  # a decay factor: (0, 1]
    "optim.warmup_epochs": (0, _INF, False, True),
    "trainer.epochs": (1, _INF, False, True),
    "trainer.grad_clip": (0, _INF, True, True),
    "trainer.eval_every": (1, _INF, False, True),  # null (not 0): no held-out evaluation
    "trainer.eval_steps": (1, _INF, False, True),
    "trainer.eval_eps": (0, _INF, True, True),  # Linf: also <= 1 (pixel units), below
    "trainer.eval_alpha": (0, _INF, True, True),
    "trainer.eval_n": (1, _INF, False, True),
    "trainer.checkpoint_every": (1, _INF, False, True),
    "trainer.log_every": (1, _INF, False, True),
    "sensitivity.every": (1, _INF, False, True),
    "sensitivity.n": (1, _INF, False, True),
    "sensitivity.steps": (1, _INF, False, True),
    "saliency.every": (1, _INF, False, True),
    "saliency.n": (1, _INF, False, True),
    "saliency.n_samples": (1, _INF, False, True),
    "saliency.steps": (1, _INF, False, True),
}
# What an out-of-range message adds after the interval, for keys whose "off" is not a number.
_HINTS: dict[str, str] = {
    "trainer.eval_every": "null switches the held-out evaluation off",
}


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == _INF:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _check_range(value: Any, key: str, bounds: tuple[float, float, bool, bool]) -> None:
    """``value`` (a number or ``None``, which the schema allows where it is typed optional)."""
    if value is None:
        return
    low, high, low_open, high_open = bounds
    finite = "a finite number " if isinstance(value, float) else ""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        hint = f" ({_HINTS[key]})" if key in _HINTS else ""
        raise ConfigError(f"config key {key!r} must be {finite}{_interval(*bounds)}{hint}, "
                          f"got {value}")


def _check_no_nan(value: Any, key: str) -> None:
    """Free-form ``params``: the constructors check their ranges, but NaN is never a value
    (an infinite one can be: GAIRAT's ``lambda_max`` defaults to inf)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_no_nan(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_no_nan(v, f"{key}[{i}]")
    elif isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"config key {key!r} must be a number, got nan")


_SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))
_SHM = Path("/dev/shm")  # a real (memory) file system under /dev: a fine scratch folder


def _check_out_dir(value: str) -> None:
    """``trainer.out_dir`` must be a folder this process can create or write, checked without
    creating anything (a ``--dry-run`` leaves no trace): not under /proc, /sys or /dev (except
    /dev/shm), not an existing file, and its nearest existing ancestor a writable folder.

    ``robustkit train`` proves it again by writing there before any model or data is loaded
    (``RunDirectory.acquire``); this check makes the config itself refuse what can never work.
    """
    key = "config key 'trainer.out_dir'"
    path = Path(value).expanduser()
    real = Path(os.path.realpath(path))  # through symlinks: runs -> /proc/self is refused too
    inside = [d for d in _SYSTEM_DIRS if real == d or d in real.parents]
    if inside and not (real == _SHM or _SHM in real.parents):
        raise ConfigError(f"{key}: {value} is under {inside[0]}, a system folder (not for run "
                          "files); choose another trainer.out_dir")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {value} is an existing file, not a folder; choose another "
                          "trainer.out_dir")
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {value} cannot be created: {existing} is a file "
                          f"({os.strerror(errno.ENOTDIR)}); choose another trainer.out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == Path(os.path.abspath(path)) else f" (in {existing})"
        raise ConfigError(f"{key}: {value} is not writable{what}; choose another folder or "
                          "fix its permissions")


def _validate(cfg: DictConfig) -> None:
    from robustkit.data import DATASETS

    for key, choices in {**_CHOICES, "data.name": tuple(DATASETS)}.items():
        _one_of(OmegaConf.select(cfg, key), choices, _config_key(key))
    for key, bounds in _RANGES.items():
        _check_range(OmegaConf.select(cfg, key), key, bounds)
    for i, m in enumerate(cfg.optim.milestones):
        if not (math.isfinite(m) and m > 0):
            raise ConfigError(f"config key 'optim.milestones' must be finite numbers > 0 (epochs, "
                              f"or fractions < 1), got {list(cfg.optim.milestones)} (item {i})")
    t = cfg.trainer
    if cfg.optim.warmup_epochs > t.epochs:
        raise ConfigError(f"config key 'optim.warmup_epochs' ({cfg.optim.warmup_epochs:g}) must be "
                          f"<= trainer.epochs ({t.epochs}): the warm-up would never end")
    if t.eval_eps is not None and t.eval_norm == "Linf" and t.eval_eps > 1:
        raise ConfigError(f"config key 'trainer.eval_eps' must be in (0, 1] for Linf (pixel "
                          f"units, e.g. 8/255), got {t.eval_eps}")
    for section in ("model", "attack", "objective"):
        _check_no_nan(OmegaConf.to_container(cfg[section].params), f"{section}.params")
    init = cfg.model.init_from
    if init is not None and not str(init).strip():
        raise ConfigError("config key 'model.init_from' must be a checkpoint path or null, got "
                          "an empty string")
    _check_out_dir(t.out_dir)
    if t.eval_every is not None:  # null: no held-out evaluation, nothing to reach
        _check_eval_reach(t, DATASETS[cfg.data.name].eps[t.eval_norm])


def _check_eval_reach(t: DictConfig, default_eps: float) -> None:
    """Reject a held-out PGD whose ``eval_steps × eval_alpha`` cannot reach ε.

    Such an attack stays inside a smaller ball, so a natural model looks robust (issue #9
    measured 80 % "robust" accuracy with 5 steps of 0.01 at ε = 0.3) and ``best.pt``, which
    follows that number, is chosen on a meaningless value. An error, not a warning: the run is
    long and the number silently wrong.
    """
    eps = t.eval_eps if t.eval_eps is not None else default_eps
    alpha = t.eval_alpha if t.eval_alpha is not None else eps / 4
    # Relative slack: 3 steps of 0.1 must reach 0.3 despite float rounding.
    if t.eval_steps * alpha < eps * (1 - 1e-6):
        written = "eps/4" if t.eval_alpha is None else f"{alpha:g}"
        raise ConfigError(
            f"config keys 'trainer.eval_steps' x 'trainer.eval_alpha' = {t.eval_steps} x "
            f"{written} = {t.eval_steps * alpha:.4g} < eval eps {eps:.4g}: the held-out PGD "
            f"cannot reach the eps-ball's surface and would overstate robustness; raise "
            f"trainer.eval_steps or trainer.eval_alpha (null: eps/4, which needs >= 4 steps)")


def _validate_eval(cfg: DictConfig, label: Label) -> None:
    from robustkit.attacks.specs import check_aa_attacks, parse_attacks
    from robustkit.data import DATASETS

    if not cfg.model:
        raise ConfigError(f"{label('model')} is required (NAME, FILE.py:FN or robustbench:NAME)")
    _one_of(cfg.dataset, tuple(DATASETS), label("dataset"))
    _one_of(cfg.threat_model, ("Linf", "L2"), label("threat_model"))
    _one_of(cfg.aa_version, ("standard", "plus", "custom"), label("aa_version"))
    _one_of(cfg.protocol, ("standalone", "cascade"), label("protocol"))
    if cfg.eps is not None and not (math.isfinite(cfg.eps) and cfg.eps > 0 and (
            cfg.threat_model != "Linf" or cfg.eps <= 1)):
        raise ConfigError(f"{label('eps')} must be > 0 (and <= 1 for Linf) in [0, 1] pixel "
                          f"units, got {cfg.eps}")
    for key, low in (("batch_size", 1), ("n_examples", 1), ("seed", 0)):
        value = cfg[key]
        if value is not None and value < low:
            raise ConfigError(f"{label(key)} must be an integer >= {low}, got {value}")
    try:
        parse_attacks(list(cfg.attacks))
    except ValueError as err:
        raise ConfigError(f"{label('attacks')}: {err}") from None
    aa = list(cfg.aa_attacks) if cfg.aa_attacks is not None else None
    try:
        check_aa_attacks(cfg.aa_version, aa)
    except ValueError as err:
        raise ConfigError(f"{label('aa_attacks')} / {label('aa_version')}: {err}") from None

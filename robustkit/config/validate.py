"""Value checks after merging: choices, bounds, the held-out PGD's reach, evaluate's settings."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
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


def _validate(cfg: DictConfig) -> None:
    from robustkit.data import DATASETS

    for key, choices in {**_CHOICES, "data.name": tuple(DATASETS)}.items():
        _one_of(OmegaConf.select(cfg, key), choices, _config_key(key))
    positive = {"trainer.epochs": 1, "data.batch_size": 1, "trainer.eval_steps": 1,
                "trainer.log_every": 1, "trainer.checkpoint_every": 1, "trainer.eval_n": 1}
    non_negative = ("data.holdout", "data.num_workers", "trainer.eval_every",
                    "optim.weight_decay", "optim.warmup_epochs", "optim.momentum")
    for key, low in [*positive.items(), *((k, 0) for k in non_negative)]:
        value = OmegaConf.select(cfg, key)
        if value < low:
            raise ConfigError(f"config key {key!r} must be >= {low}, got {value}")
    for key in ("optim.lr", "trainer.eval_eps", "trainer.eval_alpha"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"config key 'data.limit' must be >= 1 or null, got {cfg.data.limit}")
    if any(m <= 0 for m in cfg.optim.milestones):
        raise ConfigError(f"config key 'optim.milestones' must be > 0 (epochs, or fractions < 1), "
                          f"got {list(cfg.optim.milestones)}")
    if cfg.trainer.eval_every > 0:
        _check_eval_reach(cfg.trainer, DATASETS[cfg.data.name].eps[cfg.trainer.eval_norm])


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
    if cfg.eps is not None and not (cfg.eps > 0 and (cfg.threat_model != "Linf" or cfg.eps <= 1)):
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

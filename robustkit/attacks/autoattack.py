"""AutoAttack through the official code, ``pyautoattack`` 0.2.0 (methods.md §1.5).

The composition and every setting are pyautoattack's own; this adapter only fits it to the
``Attack`` seam (eval mode, device from x, no side effects) and makes ``state_path`` resumable:
pyautoattack 0.2.0 writes its state file but cannot read it back (the attack set is stored as a
string, so the check on restore always fails, and ``y_adv`` is unbound on a restored run).
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult, Norm
from robustkit.utils import frozen_parameters

__all__ = ["AutoAttack"]

logger = logging.getLogger(__name__)

AttackName = Literal["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_VERSIONS = ("standard", "plus", "rand", "custom")


class AutoAttack(Attack):
    """AutoAttack (Croce & Hein, https://arxiv.org/abs/2003.01690), run by ``pyautoattack``.

    Each attack of the version runs on the points still classified correctly; a point is robust
    only if it survives all of them. ``torchattacks.AutoAttack`` is a different, weaker protocol
    (10-iteration APGD) and is never reported under this name.

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits.
        eps: budget in pixel units (default 8/255).
        norm: ``"Linf"`` or ``"L2"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square: the RobustBench protocol),
            ``"plus"``, ``"rand"`` or ``"custom"`` (then ``attacks`` lists what to run).
        attacks: with ``version="custom"`` only, e.g. ``["apgd-ce"]``.
        seed: pyautoattack's seed (default 0); the caller's RNG state is left untouched.
        batch_size: pyautoattack's internal batch size (default 500; random starts are drawn
            per batch, so it is part of the setting).

    Shape:
        x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)``; x_adv: like x (x itself where not broken).

    Example:
        >>> aa = AutoAttack(model, eps=8/255, version="standard")
        >>> robust = ~aa.perturb(x, y).info["success"]
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, norm: Norm = "Linf",
                 version: Literal["standard", "plus", "rand", "custom"] = "standard",
                 attacks: list[AttackName] | None = None, seed: int = 0,
                 batch_size: int = 500) -> None:
        super().__init__(model, eps, norm)
        if version not in _VERSIONS:
            raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
        if version == "custom" and not attacks:
            raise ValueError("version='custom' needs attacks, e.g. attacks=['apgd-ce']")
        if version != "custom" and attacks is not None:
            raise ValueError(f"attacks is only used with version='custom', not {version!r}")
        bad = [a for a in attacks or () if a not in _NAMES]
        if bad:
            raise ValueError(f"unknown attacks {bad}; known: {list(_NAMES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.version = version
        self.attacks = list(attacks) if attacks is not None else None
        self.seed = int(seed)
        self.batch_size = batch_size

    def perturb(self, x: Tensor, y: Tensor, *, state_path: str | Path | None = None
                ) -> AttackResult:
        """Run AutoAttack; ``info["success"]`` is True where ``x_adv`` is misclassified.

        Args:
            state_path: JSON file in pyautoattack's format; when it exists the run resumes from
                it (attacks already run are skipped and, as in pyautoattack, ``x_adv`` is x for
                points broken before; their ``success`` comes from the file).
        """
        return super().perturb(x, y, state_path=state_path)

    def build(self, device: torch.device | str) -> object:
        """The configured ``pyautoattack.AutoAttack`` (imported here: a lazy backend)."""
        try:
            from pyautoattack import AutoAttack as _AutoAttack
        except ImportError as err:  # pragma: no cover - a core dependency
            raise ImportError("robustkit's AutoAttack needs pyautoattack==0.2.0") from err
        return _AutoAttack(self.model, norm=self.norm, eps=self.eps, version=self.version,
                           attacks=self.attacks, device=device, seed=self.seed)

    def _perturb(self, x: Tensor, y: Tensor, state_path: str | Path | None = None
                 ) -> AttackResult:
        path = None if state_path is None else Path(state_path)
        aa = self.build(x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        # FAB calls backward(): frozen parameters keep every .grad untouched (and it is faster).
        with frozen_parameters(self.model):
            with torch.random.fork_rng(devices=devices):  # pyautoattack seeds the global RNG
                if path is not None and path.exists() and _read_state(path)[2] is None:
                    path.unlink()  # interrupted before the clean pass: nothing to resume
                if path is not None and path.exists():
                    x_adv, robust = self._resume(aa, x, y, path)
                else:
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                    x_adv, y_adv = aa.run_standard_evaluation(
                        x, y, batch_size=self.batch_size, state_path=path)
                    robust = y_adv == y
        return AttackResult(x_adv, {"success": ~robust.to(x.device),
                                    "eps": torch.full((x.shape[0],), self.eps, device=x.device)})

    def _resume(self, aa, x: Tensor, y: Tensor, path: Path) -> tuple[Tensor, Tensor]:
        from pyautoattack.state import EvaluationState

        wanted, done, flags, clean_acc = _read_state(path)
        if wanted != set(aa.attacks_to_run):
            raise ValueError(f"state_path {path} was written for attacks {sorted(wanted)}, "
                             f"not {sorted(aa.attacks_to_run)}")
        if flags.shape[0] != x.shape[0]:
            raise ValueError(f"state_path {path} holds {flags.shape[0]} robust flags, "
                             f"x has {x.shape[0]}")
        flags = flags.to(x.device)
        remaining = [a for a in aa.attacks_to_run if a not in done]
        logger.info("resuming AutoAttack from %s: done %s, remaining %s", path, sorted(done),
                    remaining)
        x_adv = x.clone()
        if remaining and bool(flags.any()):
            # The same attacks, in the same order, on the points still robust: what pyautoattack
            # itself would run after restoring (its own restore is broken in 0.2.0).
            idx = flags.nonzero().squeeze(1)
            aa.attacks_to_run = remaining
            x_sub, y_sub = aa.run_standard_evaluation(x[idx], y[idx], batch_size=self.batch_size)
            x_adv[idx] = x_sub.to(x.dtype)
            flags[idx] = y_sub == y[idx]
        state = EvaluationState(wanted, path=path, _run_attacks=set(wanted),
                                _clean_accuracy=clean_acc)
        state.robust_flags = flags  # the setter writes the file
        return x_adv, flags


def _read_state(path: Path) -> tuple[set[str], set[str], Tensor | None, float]:
    """Read pyautoattack's state JSON (it stores the attack set as the text of a Python set)."""
    d = json.loads(path.read_text())
    wanted = d["_attacks_to_run"]
    wanted = set(ast.literal_eval(wanted) if isinstance(wanted, str) else wanted)
    flags = d.get("_robust_flags")
    flags = None if flags is None else torch.tensor(flags, dtype=torch.bool)
    return wanted, set(d.get("_run_attacks", [])), flags, float(d.get("_clean_accuracy", "nan"))

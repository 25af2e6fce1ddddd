"""AutoAttack through the official code, ``pyautoattack`` 0.2.0 (methods.md §1.5).

The composition and every setting are pyautoattack's own. The adapter fits it to the ``Attack``
seam (eval mode, device from x, no side effects) and adds two things pyautoattack 0.2.0 lacks:

- **Which sub-attack broke each point.** pyautoattack runs its attacks one after another on the
  points still robust and keeps only the final flags. The adapter runs that same loop one
  sub-attack at a time: the object built by ``version=`` (so APGD's restarts, the 9 target
  classes, 100 iterations, 5,000 Square queries and the seed are exactly the version's), its
  ``attacks_to_run`` set to one attack, called on the points still robust. Each attack reseeds
  itself per batch and sees the same points in the same batches, so the flags and ``x_adv``
  equal one ``run_standard_evaluation`` call (tests/test_autoattack.py checks this), and
  ``info["broken_by"]`` says which attack broke each point: the gradient-masking check needs it
  (Square breaking what APGD and FAB missed, methods.md §1.5).
- **A resumable ``state_path``.** pyautoattack 0.2.0 writes its state file but cannot read it
  back (the attack set is stored as a string, so the check on restore always fails), and writes
  it with a plain ``open("w")``: a kill or a full disk mid-write leaves a torn file. The adapter
  never hands pyautoattack a ``state_path``; it writes the file itself, atomically, after the
  clean pass and after each sub-attack (so sub-attacks finished within a chunk are kept), in
  pyautoattack's keys plus ``broken_by``, and resumes from it. A torn, empty or otherwise
  unreadable file means "redo this chunk" (with a warning), never a dead run; a failed write is
  an ``OutputError`` naming the file, and the previous version of the file stays intact.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack, AttackResult, Norm
from robustkit.heartbeat import Heartbeat
from robustkit.utils import atomic_write_json, frozen_parameters, output_errors

__all__ = ["AutoAttack", "NOT_BROKEN", "MISCLASSIFIED"]

logger = logging.getLogger(__name__)

AttackName = Literal["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_VERSIONS = ("standard", "plus", "rand", "custom")
# pyautoattack's AutoAttack._set_version, in run order (a test compares them with the backend).
_VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
#: ``info["broken_by"]`` of a point no sub-attack broke.
NOT_BROKEN = -1
#: ``info["broken_by"]`` of a point misclassified before any attack (pyautoattack's clean pass).
MISCLASSIFIED = -2


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
            ``"plus"``, ``"rand"`` or ``"custom"`` (then ``attacks`` lists what to run, with
            pyautoattack's constructor defaults, e.g. 5 APGD restarts).
        attacks: with ``version="custom"`` only, e.g. ``["apgd-ce"]``.
        seed: pyautoattack's seed (default 0); the caller's RNG state is left untouched.
        batch_size: pyautoattack's internal batch size (default 500; random starts are drawn
            per batch, so it is part of the setting).

    Shape:
        x: ``(N, C, H, W)`` in [0, 1]; y: ``(N,)``; x_adv: like x (x itself where not broken).
        ``info["success"]``: ``(N,)`` bool; ``info["broken_by"]``: ``(N,)`` int64, an index into
        ``components``, ``NOT_BROKEN`` (-1) or ``MISCLASSIFIED`` (-2).

    Example:
        >>> aa = AutoAttack(model, eps=8/255, version="standard")
        >>> res = aa.perturb(x, y); robust, by = ~res.info["success"], res.info["broken_by"]
    """

    resumable: ClassVar[bool] = True  # perturb takes state_path= and resumes from it

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
        if attacks is not None and len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks lists a sub-attack twice: {list(attacks)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.version = version
        self.attacks = list(attacks) if attacks is not None else None
        self.seed = int(seed)
        self.batch_size = batch_size

    @property
    def components(self) -> list[str]:
        """The sub-attacks in run order: what ``info["broken_by"]`` indexes."""
        return list(self.attacks) if self.version == "custom" else list(
            _VERSION_ATTACKS[self.version])

    def perturb(self, x: Tensor, y: Tensor, *, state_path: str | Path | None = None
                ) -> AttackResult:
        """Run AutoAttack; ``info["success"]`` is True where ``x_adv`` is misclassified.

        Args:
            state_path: JSON file written (atomically) after the clean pass and after each
                sub-attack; when it exists the run resumes from it (finished sub-attacks are
                skipped and, as in pyautoattack, ``x_adv`` is x for points broken before; their
                ``success`` and ``broken_by`` come from the file). An unreadable or incomplete
                file is ignored with a warning: the chunk is recomputed (same seeds, same flags).

        Raises:
            ValueError: ``state_path`` was written for other sub-attacks or another number of
                points (a file of another run, not a torn one).
            OutputError: ``state_path`` cannot be written (full disk, read-only folder).
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
        names = list(aa.attacks_to_run)
        devices = [x.device] if x.device.type == "cuda" else []
        # FAB calls backward(): frozen parameters keep every .grad untouched (and it is faster).
        with frozen_parameters(self.model), torch.no_grad():
            # pyautoattack seeds the global RNG per batch: fork_rng leaves the caller's alone
            with torch.random.fork_rng(devices=devices):
                saved = _load_state(path, names, x.shape[0]) if path is not None else None
                if saved is None:
                    broken_by, done = self._clean_pass(x, y), []
                    _save_state(path, names, done, broken_by)
                else:
                    broken_by, done = saved[0].to(x.device), saved[1]
                    logger.info("resuming AutoAttack from %s: done %s", path, done)
                x_adv = x.clone()
                rate = _Rate()  # seconds per gradient step, for the heartbeat's ETA
                for k, name in enumerate(names):
                    if name in done:
                        continue
                    idx = (broken_by == NOT_BROKEN).nonzero().flatten()
                    if idx.numel():
                        aa.attacks_to_run = [name]  # the version's settings, one attack at a time
                        # per step, not per point: on small batches the per-iteration
                        # overhead dominates, and more points only make it an underestimate
                        work = _grad_steps(aa, name) or 0
                        # one opaque call: its heartbeat beats from a thread (points left, ETA)
                        with rate.timing(work), Heartbeat(
                                f"AutoAttack {name} (sub-attack {k + 1} of {len(names)})",
                                idx.numel(), expected_s=rate.expect(work)):
                            x_sub, y_sub = aa.run_standard_evaluation(
                                x[idx], y[idx], batch_size=self.batch_size)
                        hit = y_sub.to(y.device) != y[idx]
                        broken_by[idx[hit]] = k
                        x_adv[idx[hit]] = x_sub[hit].to(x_adv)
                    done.append(name)
                    _save_state(path, names, done, broken_by)
        return AttackResult(x_adv, {
            "success": broken_by != NOT_BROKEN,
            "broken_by": broken_by,
            "eps": torch.full((x.shape[0],), self.eps, device=x.device)})

    def _clean_pass(self, x: Tensor, y: Tensor) -> Tensor:
        """pyautoattack's first step: points misclassified without attack are never attacked."""
        out = torch.full((x.shape[0],), NOT_BROKEN, dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], self.batch_size):  # pyautoattack's batches
            sl = slice(start, start + self.batch_size)
            out[sl][self.model(x[sl]).argmax(1) != y[sl]] = MISCLASSIFIED
        return out


def _grad_steps(aa: object, name: str) -> float | None:
    """Rough cost of sub-attack ``name`` per point, in gradient steps (at most: APGD's restarts
    skip points already broken), from the settings of the pyautoattack object; None if unknown."""
    try:
        if name in ("apgd-ce", "apgd-dlr"):
            return aa.apgd.n_iter * aa.apgd.n_restarts
        if name == "apgd-t":
            t = aa.apgd_targeted
            return t.n_iter * t.n_target_classes * t.n_restarts
        if name in ("fab", "fab-t"):
            return aa.fab.n_iter * aa.fab.n_restarts * (
                aa.fab.n_target_classes if name == "fab-t" else 1)
        if name == "square":
            return aa.square.n_queries / 3  # forward passes only: about a third of a step
    except (AttributeError, TypeError):
        pass
    return None


class _Rate:
    """Seconds per unit of work, from the sub-attacks finished so far in one ``perturb``."""

    def __init__(self) -> None:
        self.seconds = self.work = 0.0

    def expect(self, work: float) -> float | None:
        """Expected seconds for ``work`` units; None before any timed work."""
        return self.seconds / self.work * work if self.work > 0 and work > 0 else None

    @contextlib.contextmanager
    def timing(self, work: float) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if work > 0:  # a sub-attack of unknown cost says nothing about the rate
            self.seconds += time.perf_counter() - t0
            self.work += work


def _save_state(path: Path | None, names: list[str], done: list[str], broken_by: Tensor) -> None:
    """pyautoattack's state keys (``_robust_flags`` etc.) plus the per-point ``broken_by``."""
    if path is None:
        return
    n = max(broken_by.numel(), 1)
    # full disk, quota, read-only: OutputError naming the file; the previous file stays intact
    with output_errors(path, "; the files already written are intact: free space or fix the "
                             "permissions and rerun to resume"):
        atomic_write_json(path, {
            "_attacks_to_run": names, "_run_attacks": list(done),
            "_robust_flags": (broken_by == NOT_BROKEN).tolist(),
            "_clean_accuracy": float((broken_by != MISCLASSIFIED).sum()) / n,
            "broken_by": broken_by.tolist(), "components": names,
        })


def _load_state(path: Path, names: list[str], n: int) -> tuple[Tensor, list[str]] | None:
    """``(broken_by, finished sub-attacks)`` from ``path``; None when there is nothing to resume
    (no file, or one that is torn, empty or malformed: the chunk is recomputed, with a warning).

    Raises:
        ValueError: the file was written for other sub-attacks or another number of points.
    """
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        wanted = d["_attacks_to_run"]
        # pyautoattack itself stores the attack set as the text of a Python set
        wanted = set(ast.literal_eval(wanted) if isinstance(wanted, str) else wanted)
    except (OSError, UnicodeDecodeError, ValueError, SyntaxError, KeyError, TypeError) as err:
        # A kill or a full disk mid-write (by older code or pyautoattack itself), or a hand edit:
        # redo this chunk rather than wedge every rerun.
        logger.warning("state_path %s is unreadable (%s: %s): recomputing this chunk", path,
                       type(err).__name__, err)
        return None
    if wanted != set(names):
        raise ValueError(f"state_path {path} was written for attacks {sorted(wanted)}, "
                         f"not {sorted(names)}")
    flags = d.get("_robust_flags")
    if flags is not None and len(flags) != n:
        raise ValueError(f"state_path {path} holds {len(flags)} robust flags, x has {n}")
    if d.get("broken_by") is None or d.get("components") != names:
        # Interrupted before the clean pass, or written by pyautoattack itself: it does not say
        # which attack broke which point, so the chunk is recomputed (same seeds, same flags).
        logger.info("state_path %s has no per-attack record: recomputing", path)
        return None
    by, done = d["broken_by"], d.get("_run_attacks")
    # The adapter runs the sub-attacks in order and records each as it finishes: anything else
    # (a truncated list, an index of a sub-attack not yet run) is not a state it wrote.
    ok = (isinstance(by, list) and len(by) == n and isinstance(done, list)
          and done == names[:len(done)]
          and all(type(b) is int and (b in (NOT_BROKEN, MISCLASSIFIED) or 0 <= b < len(done))
                  for b in by))
    if not ok:
        logger.warning("state_path %s is malformed (broken_by or _run_attacks): recomputing this "
                       "chunk", path)
        return None
    return torch.tensor(by, dtype=torch.long), list(done)

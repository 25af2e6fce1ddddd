"""Per-sample clean and robust flags for a model, a fixed image set and a dict of attacks.

The RobustBench protocol (methods.md §1.6, §7.4): clean flags on the first ``n`` test images,
then every attack on the clean-correct points; an example is *robust* when it stays correct
under **all** attacks (per-example AND, as AutoAttack counts it, methods.md §1.5).

Two protocols decide which points each attack sees:

- ``"standalone"`` (default): every attack runs on all clean-correct points, so each attack's
  accuracy is its own number (AutoAttack still cascades its sub-attacks internally, by its own
  protocol). Robust accuracy is the AND over attacks.
- ``"cascade"``: each attack runs only on points still robust after the previous ones (cheaper;
  an attack's accuracy then means "robust after it and all before it").

Evaluation is resumable: with ``state_dir`` every finished batch's flags are written atomically to
``state_dir/flags_<attack>.json`` next to a ``fingerprint.json`` of the settings; a re-run with the
same settings skips the finished batches. Each batch's randomness comes from a seed derived from
``(seed, attack name, batch index)``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import StateMismatchError
from robustkit.utils import atomic_write_json, eval_mode

__all__ = ["EvalResult", "evaluate_attacks", "StateMismatchError"]

logger = logging.getLogger(__name__)

Protocol = Literal["standalone", "cascade"]
ProgressFactory = Callable[[str, int], Any]  # (attack name, points) -> object with update/close
RESERVED = ("clean", "robust")


@dataclass
class EvalResult:
    """Per-sample flags of one evaluation.

    Attributes:
        labels: ``(N,)`` int64 labels of the evaluated points (dataset order).
        clean: ``(N,)`` bool, correctly classified without attack.
        correct: attack name -> ``(N,)`` bool, correct under that attack (False where clean is
            False; under ``"cascade"``: robust after that attack and all earlier ones).
        time_s: seconds per attack and ``"clean"`` (summed over resumed runs).
        max_perturbation: attack name -> largest ``||x_adv - x||`` seen (threat-model norm).
        protocol: ``"standalone"`` or ``"cascade"``.
    """

    labels: Tensor
    clean: Tensor
    correct: dict[str, Tensor] = field(default_factory=dict)
    time_s: dict[str, float] = field(default_factory=dict)
    max_perturbation: dict[str, float] = field(default_factory=dict)
    protocol: Protocol = "standalone"

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    @property
    def robust(self) -> Tensor:
        """``(N,)`` bool: clean-correct and correct under every attack (per-example AND)."""
        flags = self.clean.clone()
        for c in self.correct.values():
            flags &= c
        return flags

    def accuracy(self) -> dict[str, float]:
        """Fractions in [0, 1]: ``clean``, one entry per attack, then ``robust``."""
        n = max(self.n, 1)
        acc = {"clean": self.clean.sum().item() / n}
        acc.update({k: v.sum().item() / n for k, v in self.correct.items()})
        acc["robust"] = self.robust.sum().item() / n
        return acc


def evaluate_attacks(
    model: nn.Module,
    data: torch.utils.data.Dataset | tuple[Tensor, Tensor],
    attacks: Mapping[str, Attack],
    *,
    batch_size: int = 256,
    protocol: Protocol = "standalone",
    seed: int = 0,
    state_dir: str | Path | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
    device: torch.device | str | None = None,
    norm: Literal["Linf", "L2"] | None = None,
) -> EvalResult:
    """Clean flags, then each attack on the clean-correct points (see the module docstring).

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits; evaluated in eval mode (restored after).
        data: a dataset yielding ``(x, y, ...)`` (e.g. ``first_n(test_set, 1000)``) or ``(x, y)``.
        attacks: name -> attack, run in this order; ``"clean"`` and ``"robust"`` are reserved.
        batch_size: points per attack call (default 256); part of the resume fingerprint.
        protocol: ``"standalone"`` (default) or ``"cascade"``.
        seed: base of the per-(attack, batch) seeds (default 0).
        state_dir: folder for resumable per-batch flags; ``None`` keeps nothing.
        fingerprint: extra settings (model, checkpoint hash, eps, ...) that must match to resume.
        overwrite: discard a mismatching state instead of raising ``StateMismatchError``.
        progress: optional factory ``progress(name, total)`` of bars with ``update(k)``/``close()``.
        device: where batches go; default: the model's device.
        norm: the threat model's norm, in which ``max_perturbation`` is measured (default: each
            attack's own).

    Returns:
        ``EvalResult`` with per-sample flags.

    Shape:
        ``x``: ``(N, C, H, W) in [0, 1]``, ``y``: ``(N,)``.

    Example:
        >>> res = evaluate_attacks(model, (x, y), {"pgd20": PGD(model, steps=20)})
        >>> res.accuracy()["robust"]
    """
    if norm not in (None, "Linf", "L2"):
        raise ValueError(f"norm must be 'Linf', 'L2' or None, got {norm!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if protocol not in ("standalone", "cascade"):
        raise ValueError(f"protocol must be 'standalone' or 'cascade', got {protocol!r}")
    for name in attacks:
        if name in RESERVED or not name:
            raise ValueError(f"attacks: the name {name!r} is reserved or empty")
    source = _Source(data)
    labels = source.labels()
    if device is None:
        p = next(iter(list(model.parameters()) + list(model.buffers())), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    store = _Store(state_dir, {
        **dict(fingerprint or {}),
        "n": len(source), "batch_size": batch_size, "protocol": protocol, "seed": seed,
        "attacks": {k: repr(a) for k, a in attacks.items()},
        "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
    }, overwrite)
    result = EvalResult(labels=labels, clean=torch.zeros(len(source), dtype=torch.bool),
                        protocol=protocol)
    # clean pass on running BN statistics, as the attacks do (methods.md §1.1)
    with eval_mode(model):
        _run(None, torch.arange(len(source)), result, source, model, store, batch_size,
             seed, progress, device)
        still = result.clean.clone()
        for name, attack in attacks.items():
            active = torch.nonzero(still if protocol == "cascade" else result.clean).flatten()
            _run((name, attack), active, result, source, model, store, batch_size,
                 seed, progress, device, norm)
            still &= result.correct[name]
    return result


def _run(named, active, result, source, model, store, batch_size, seed, progress, device,
         norm=None):
    """One attack (``named=None``: the clean pass) over ``active`` in fixed chunks."""
    name = "clean" if named is None else named[0]
    flags = torch.zeros(len(source), dtype=torch.bool)
    saved = store.load(name)
    bar = progress(name, int(active.numel())) if progress is not None else None
    spent, max_pert = 0.0, 0.0
    try:
        for b, start in enumerate(range(0, active.numel(), batch_size)):
            idx = active[start:start + batch_size]
            rec = saved.get(str(b))
            if rec is not None:
                if rec["idx"] != idx.tolist():
                    raise StateMismatchError(
                        f"state_dir: saved batch {b} of {name!r} covers other points; the "
                        "state is inconsistent, re-run with overwrite (--overwrite)")
                logger.debug("%s batch %d restored from %s", name, b, store.dir)
            else:
                t0 = time.perf_counter()
                correct, pert = _batch(named, idx, b, source, model, store, seed, device, norm)
                rec = {"idx": idx.tolist(), "correct": correct.tolist(), "max_perturbation": pert,
                       "time_s": time.perf_counter() - t0}
                saved[str(b)] = rec
                store.save(name, saved)
            flags[idx] = torch.tensor(rec["correct"], dtype=torch.bool)
            spent += rec["time_s"]
            max_pert = max(max_pert, rec["max_perturbation"])
            if bar is not None:
                bar.update(int(idx.numel()))
    finally:
        if bar is not None:
            bar.close()
    if not saved:
        store.save(name, saved)  # an attack with nothing to attack is finished too
    result.time_s[name] = spent
    if named is None:
        result.clean = flags
    else:
        result.correct[name] = flags
        result.max_perturbation[name] = max_pert


def _batch(named, idx, b, source, model, store, seed, device, norm) -> tuple[Tensor, float]:
    x, y = source.get(idx)
    x, y = x.to(device), y.to(device)
    if named is None:
        with torch.no_grad():
            return (model(x).argmax(1) == y).cpu(), 0.0
    name, attack = named
    extra = {}
    aa_state = None
    if _accepts(attack, "state_path") and store.dir is not None:
        # AutoAttack's own resume file covers the chunk in progress (pyautoattack state_path).
        aa_state = store.dir / f"aastate_{_safe(name)}_{b:05d}.json"
        extra["state_path"] = aa_state
    s = _batch_seed(seed, name, b)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the caller's global RNG untouched
        torch.manual_seed(s)
        gen = getattr(attack, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(s)
        out = attack.perturb(x, y, **extra)
    x_adv = out.x_adv
    with torch.no_grad():  # correctness is judged here, by the model, not by the attack's claim
        correct = model(x_adv).argmax(1) == y
    success = out.info.get("success")
    if success is not None:
        # A resumed AutoAttack chunk returns x itself for points broken before the interruption;
        # only its success flags remember them, so a claimed success also counts as broken.
        claimed = success.to(correct.device).bool() & correct
        if claimed.any():
            logger.debug("%s batch %d: %d successes claimed without a misclassified x_adv",
                         name, b, int(claimed.sum()))
        correct &= ~success.to(correct.device).bool()
    correct = correct.cpu()
    delta = (x_adv - x).flatten(1)
    norm = delta.abs().amax(1) if (norm or attack.norm) == "Linf" else delta.norm(dim=1)
    if aa_state is not None and aa_state.exists():
        aa_state.unlink()  # the chunk is finished and recorded in flags_<name>.json
    return correct, float(norm.max().item()) if norm.numel() else 0.0


def _batch_seed(seed: int, name: str, b: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _accepts(attack: Attack, arg: str) -> bool:
    for fn in (attack.perturb, getattr(attack, "_perturb", None)):
        if fn is not None and arg in inspect.signature(fn).parameters:
            return True
    return False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class _Source:
    """Random access to ``(x, y)`` from a ``(x, y)`` pair or a dataset yielding ``(x, y, ...)``."""

    def __init__(self, data) -> None:
        self.xy = None
        if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
            x, y = data
            if y.shape != (x.shape[0],):
                raise ValueError(f"data: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            self.xy = (x, y.long())
        self.data = data

    def __len__(self) -> int:
        return self.xy[0].shape[0] if self.xy is not None else len(self.data)

    def labels(self) -> Tensor:
        if self.xy is not None:
            return self.xy[1].cpu()
        base, ids = self.data, None
        if isinstance(base, torch.utils.data.Subset):
            base, ids = base.dataset, torch.as_tensor(list(base.indices), dtype=torch.long)
        y = getattr(base, "y", None)
        if isinstance(y, Tensor) and y.dim() == 1:  # fast path: ImageDataset keeps labels
            return (y if ids is None else y[ids]).long().cpu()
        return torch.stack([torch.as_tensor(self.data[i][1]) for i in range(len(self))]).long()

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self.xy is not None:
            return self.xy[0][idx], self.xy[1][idx]
        items = [self.data[int(i)] for i in idx]
        return (torch.stack([it[0] for it in items]),
                torch.stack([torch.as_tensor(it[1]) for it in items]).long())


class _Store:
    """Per-attack JSON of finished batches, guarded by a fingerprint of the settings."""

    def __init__(self, state_dir, fingerprint: dict, overwrite: bool) -> None:
        self.dir = None if state_dir is None else Path(state_dir)
        if self.dir is None:
            return
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # canonical JSON types
        path = self.dir / "fingerprint.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != fingerprint:
                if not overwrite:
                    keys = sorted(k for k in set(old) | set(fingerprint)
                                  if old.get(k) != fingerprint.get(k))
                    raise StateMismatchError(
                        f"{self.dir} holds an evaluation with other settings (differs in: "
                        f"{', '.join(keys)}); use another output folder or --overwrite")
                logger.info("discarding the previous state in %s (overwrite)", self.dir)
                for f in [*self.dir.glob("flags_*.json"), *self.dir.glob("aastate_*.json")]:
                    f.unlink()
            elif any(self.dir.glob("flags_*.json")):
                logger.info("resuming the evaluation stored in %s", self.dir)
        atomic_write_json(path, fingerprint)

    def load(self, name: str) -> dict:
        if self.dir is None:
            return {}
        path = self.dir / f"flags_{_safe(name)}.json"
        return json.loads(path.read_text())["batches"] if path.exists() else {}

    def save(self, name: str, batches: dict) -> None:
        if self.dir is not None:
            atomic_write_json(self.dir / f"flags_{_safe(name)}.json",
                              {"attack": name, "batches": batches})

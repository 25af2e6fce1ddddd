"""The evaluation runner: one pass (clean or one attack) over chosen points, in fixed batches.

A pass splits its points into batches of ``batch_size`` in index order; batch ``b`` is computed
with the seed ``_batch_seed(seed, name, b)`` (or restored from the resumable state), so neither a
resume nor sharding over ranks changes a flag. With ``shard=True`` each rank computes a
contiguous run of whole batches (``distributed.shard_indices``) and the per-batch records are
all-gathered and placed by their point indices, so every rank ends with the full flags.

Example:
    >>> runner = _Runner(model, _Source((x, y)), _Store(None, {}, False), batch_size=64)
    >>> runner.attack("pgd20", pgd, torch.nonzero(runner.clean().correct).flatten())
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from robustkit import distributed as dist
from robustkit.errors import StateMismatchError
from robustkit.evaluation.state import _Store

if TYPE_CHECKING:
    from robustkit.attacks.base import Attack

logger = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Any]  # (pass name, points) -> object with update/close
#: ``info["broken_by"]`` of a point no sub-attack broke (robustkit.attacks.autoattack's value;
#: not imported from there: the evaluation, and the trainer through it, import no attack).
NOT_BROKEN = -1


@dataclass
class _Pass:
    """What one pass gives: flags for all N points (False where not run) and its totals."""

    correct: Tensor  # (N,) bool
    time_s: float
    max_perturbation: float = 0.0
    broken_by: Tensor | None = None  # (N,) int64 index into components; NOT_BROKEN elsewhere
    components: list[str] | None = None


@dataclass
class _Runner:
    """Runs passes of one evaluation; holds what every batch needs.

    Attributes:
        model: the evaluated model (the caller sets eval mode).
        source: random access to the points.
        store: the resumable state (a no-op store when there is no ``state_dir``).
        batch_size: points per batch.
        seed: base of the per-batch seeds.
        device: where batches go.
        norm: norm of ``max_perturbation`` (None: each attack's own).
        progress: bar factory or None.
        shard: split batches over the ``torch.distributed`` ranks.
    """

    model: nn.Module
    source: _Source
    store: _Store
    batch_size: int = 256
    seed: int = 0
    device: torch.device = torch.device("cpu")
    norm: Literal["Linf", "L2"] | None = None
    progress: ProgressFactory | None = None
    shard: bool = False

    def clean(self) -> _Pass:
        """Clean correctness of every point."""
        return self._pass("clean", torch.arange(len(self.source)), self._clean_batch)

    def attack(self, name: str, attack: Attack, active: Tensor) -> _Pass:
        """``attack`` on the points ``active`` (``(M,)`` indices in increasing order)."""
        names = getattr(attack, "components", None)
        out = self._pass(name, active, lambda b, idx: self._attack_batch(name, attack, b, idx),
                         components=None if names is None else list(names))
        return out

    def _pass(self, name: str, active: Tensor, compute: Callable[[int, Tensor], dict],
              components: list[str] | None = None) -> _Pass:
        batches = [active[s:s + self.batch_size] for s in range(0, active.numel(), self.batch_size)]
        mine = dist.shard_indices(len(batches)) if self.shard else range(len(batches))
        saved = self.store.load(name)
        extra = {} if components is None else {"components": components}
        records = {}
        bar = self.progress(name, sum(batches[b].numel() for b in mine)) if self.progress else None
        try:
            for b in mine:
                idx = batches[b]
                rec = saved.get(str(b))
                if rec is not None and rec["idx"] != idx.tolist():
                    raise StateMismatchError(
                        f"state_dir: saved batch {b} of {name!r} covers other points; the state "
                        "is inconsistent, re-run with overwrite (--overwrite)")
                if rec is None:
                    t0 = time.perf_counter()
                    rec = compute(b, idx)
                    rec.update(idx=idx.tolist(), time_s=time.perf_counter() - t0)
                    saved[str(b)] = rec
                    self.store.save(name, saved, **extra)
                else:
                    logger.debug("%s batch %d restored from %s", name, b, self.store.dir)
                records[b] = rec
                if bar is not None:
                    bar.update(int(idx.numel()))
        finally:
            if bar is not None:
                bar.close()
        if not saved:
            self.store.save(name, saved, **extra)  # an attack with nothing to attack is finished
        if self.shard:  # every rank runs this collective: the batch count is the same everywhere
            for part in dist.all_gather_object(records):
                records.update(part)
        return _assemble(records, len(self.source), components)

    def _clean_batch(self, b: int, idx: Tensor) -> dict:
        x, y = self._load(idx)
        with torch.no_grad():
            return {"correct": (self.model(x).argmax(1) == y).cpu().tolist(),
                    "max_perturbation": 0.0}

    def _attack_batch(self, name: str, attack: Attack, b: int, idx: Tensor) -> dict:
        x, y = self._load(idx)
        # a declared resumable attack (AutoAttack) keeps its own file for the batch in progress
        state = self.store.aa_state(name, b) if getattr(attack, "resumable", False) else None
        extra = {} if state is None else {"state_path": state}
        s = _batch_seed(self.seed, name, b)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # leave the caller's global RNG untouched
            torch.manual_seed(s)
            gen = getattr(attack, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(s)
            out = attack.perturb(x, y, **extra)
        x_adv = out.x_adv
        with torch.no_grad():  # correctness is judged here, by the model, not by the attack's claim
            correct = self.model(x_adv).argmax(1) == y
        success = out.info.get("success")
        if success is not None:
            # A resumed AutoAttack chunk returns x itself for points broken before the
            # interruption; only its success flags remember them, so a claim counts as broken.
            correct &= ~success.to(correct.device).bool()
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if (self.norm or attack.norm) == "Linf" else delta.norm(dim=1)
        rec = {"correct": correct.cpu().tolist(),
               "max_perturbation": float(size.max().item()) if size.numel() else 0.0}
        if getattr(attack, "components", None) is not None:
            if "broken_by" not in out.info:
                raise ValueError(f"attack {name!r} lists components but its info has no "
                                 "'broken_by'")
            rec["broken_by"] = out.info["broken_by"].cpu().tolist()
        if state is not None and state.exists():
            state.unlink()  # the batch is finished and recorded in flags_<name>.json
        return rec

    def _load(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.source.get(idx)
        return x.to(self.device), y.to(self.device)


def _assemble(records: dict[int, dict], n: int, components: list[str] | None) -> _Pass:
    """Per-batch records -> ``(N,)`` flags, placed by each record's point indices."""
    correct = torch.zeros(n, dtype=torch.bool)
    broken_by = None if components is None else torch.full((n,), NOT_BROKEN, dtype=torch.long)
    spent, max_pert = 0.0, 0.0
    for rec in records.values():
        idx = torch.tensor(rec["idx"], dtype=torch.long)
        correct[idx] = torch.tensor(rec["correct"], dtype=torch.bool)
        if broken_by is not None:
            broken_by[idx] = torch.tensor(rec["broken_by"], dtype=torch.long)
        spent += rec["time_s"]
        max_pert = max(max_pert, rec["max_perturbation"])
    return _Pass(correct, spent, max_pert, broken_by, components)


def _batch_seed(seed: int, name: str, b: int) -> int:
    """The seed of batch ``b`` (its global index) of pass ``name``: a hash, so nearby seeds and
    batches do not give correlated streams."""
    digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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

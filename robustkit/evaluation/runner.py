"""The evaluation runner: one pass (clean or one attack) over chosen points, in fixed batches.

A pass splits its points into batches of ``batch_size`` in index order; batch ``b`` is computed
with the seed ``_batch_seed(seed, name, b)`` (or restored from the resumable state), so neither a
resume nor sharding over ranks changes a flag. With ``shard=True`` each rank computes a
contiguous run of whole batches (``distributed.shard_indices``) and the per-batch records are
all-gathered and placed by their point indices, so every rank ends with the full flags; a rank
that fails still joins the gather, so every rank raises instead of waiting for it.

Correctness is judged here, by the model: a point whose logits are not finite (NaN or inf) is
never correct (NaN logits argmax to class 0), and the pass records it (``_Pass.nonfinite``).
Images must be floating point, finite and in [0, 1], labels integers within the model's classes
(``ValueError`` naming ``data``), checked per batch as it is loaded.

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
from robustkit.evaluation.state import _Store
from robustkit.heartbeat import Heartbeat

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
    nonfinite: Tensor | None = None  # (N,) bool: the model's logits were NaN/inf there


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
        records: dict[int, dict] = {}
        failure = None
        try:
            self._run_batches(name, batches, mine, compute, components, records)
        except Exception as err:  # re-raised below, after the collective every rank must join
            failure = err
        if self.shard:  # every rank runs this collective: the batch count is the same everywhere
            parts = dist.all_gather_object((records, _describe(failure)))
            if failure is None:
                dist.raise_first_failure([p[1] for p in parts])
            for part, _ in parts:
                records.update(part)
        if failure is not None:
            raise failure
        return _assemble(records, len(self.source), components)

    def _run_batches(self, name: str, batches: list[Tensor], mine: range | list[int],
                     compute: Callable[[int, Tensor], dict], components: list[str] | None,
                     records: dict[int, dict]) -> None:
        """Restore or compute this rank's batches ``mine`` of a pass into ``records``."""
        saved = self.store.load(name, components)
        extra = {} if components is None else {"components": components}
        total = sum(batches[b].numel() for b in mine)
        # no bar: a heartbeat line every ~30 s (points left, elapsed, ETA) keeps a run to a file
        # from going quiet for the length of a pass
        bar = self.progress(name, total) if self.progress else Heartbeat(name, total)
        try:
            for b in mine:
                idx = batches[b]
                rec = saved.get(str(b))
                if rec is not None and rec["idx"] != idx.tolist():
                    # e.g. a cascade whose earlier attack was recomputed (non-deterministic GPU
                    # kernels) and now leaves other points: the record is stale, not the run.
                    logger.warning("saved batch %d of %r covers other points; recomputing it",
                                   b, name)
                    rec = None
                if rec is None:
                    t0 = time.perf_counter()
                    rec = compute(b, idx)
                    rec.update(idx=idx.tolist(), time_s=time.perf_counter() - t0)
                    saved[str(b)] = rec
                    self.store.save(name, saved, **extra)
                else:
                    logger.debug("%s batch %d restored from %s", name, b, self.store.dir)
                records[b] = rec
                bar.update(int(idx.numel()))
        finally:
            bar.close()
        if not saved:
            self.store.save(name, saved, **extra)  # an attack with nothing to attack is finished

    def _clean_batch(self, b: int, idx: Tensor) -> dict:
        x, y = self._load(idx)
        with torch.no_grad():
            logits = self.model(x)
        k = logits.shape[-1]
        out_of_range = (y < 0) | (y >= k)
        if out_of_range.any():
            j = int(out_of_range.nonzero()[0])
            raise ValueError(f"data: point {int(idx[j])} has label {int(y[j])}, outside the "
                             f"model's {k} classes")
        return {**_judge(logits, y, idx), "max_perturbation": 0.0}

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
            rec = _judge(self.model(x_adv), y, idx)
        success = out.info.get("success")
        if success is not None:
            # A resumed AutoAttack chunk returns x itself for points broken before the
            # interruption; only its success flags remember them, so a claim counts as broken.
            claimed = success.bool().cpu().tolist()
            rec["correct"] = [c and not s for c, s in zip(rec["correct"], claimed, strict=True)]
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if (self.norm or attack.norm) == "Linf" else delta.norm(dim=1)
        rec["max_perturbation"] = float(size.max().item()) if size.numel() else 0.0
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
        _check_images(x, idx)
        return x.to(self.device), y.to(self.device)


def _judge(logits: Tensor, y: Tensor, idx: Tensor) -> dict:
    """Correct where the argmax is ``y`` and every logit is finite: a NaN row argmaxes to class
    0, so without the second condition label-0 points would count as correct."""
    finite = torch.isfinite(logits).all(-1)
    correct = (logits.argmax(-1) == y) & finite
    return {"correct": correct.cpu().tolist(),
            "nonfinite": idx[~finite.cpu()].tolist()}


def _check_images(x: Tensor, idx: Tensor) -> None:
    """``ValueError`` naming ``data`` unless ``x`` is floating point, finite and in [0, 1].

    One fused comparison per batch (NaN fails both bounds, inf one of them); the slow path only
    runs to name the first bad point.
    """
    if not x.is_floating_point():
        raise ValueError(f"data: images must be floating point in [0, 1], got {x.dtype} "
                         "(divide uint8 images by 255)")
    inside = ((x >= 0) & (x <= 1)).flatten(1).all(1)
    if bool(inside.all()):
        return
    j = int((~inside).nonzero()[0])
    xi = x[j]
    if not bool(torch.isfinite(xi).all()):
        raise ValueError(f"data: point {int(idx[j])} has NaN or inf pixels; images must be "
                         "finite and in [0, 1]")
    raise ValueError(f"data: point {int(idx[j])} has pixels in [{xi.min().item():.4g}, "
                     f"{xi.max().item():.4g}], outside [0, 1]; robustkit models take [0, 1] "
                     "images and normalise inside (robustkit.models.Normalize)")


def _describe(err: BaseException | None) -> tuple[str, str] | None:
    """A picklable summary of a rank's failure for the other ranks (None: no failure)."""
    return None if err is None else (type(err).__name__, " ".join(str(err).split()))


def _assemble(records: dict[int, dict], n: int, components: list[str] | None) -> _Pass:
    """Per-batch records -> ``(N,)`` flags, placed by each record's point indices."""
    correct = torch.zeros(n, dtype=torch.bool)
    nonfinite = torch.zeros(n, dtype=torch.bool)
    broken_by = None if components is None else torch.full((n,), NOT_BROKEN, dtype=torch.long)
    spent, max_pert = 0.0, 0.0
    for rec in records.values():
        idx = torch.tensor(rec["idx"], dtype=torch.long)
        correct[idx] = torch.tensor(rec["correct"], dtype=torch.bool)
        nonfinite[torch.tensor(rec.get("nonfinite", []), dtype=torch.long)] = True
        if broken_by is not None:
            broken_by[idx] = torch.tensor(rec["broken_by"], dtype=torch.long)
        spent += rec["time_s"]
        max_pert = max(max_pert, rec["max_perturbation"])
    return _Pass(correct, spent, max_pert, broken_by, components, nonfinite)


def _batch_seed(seed: int, name: str, b: int) -> int:
    """The seed of batch ``b`` (its global index) of pass ``name``: a hash, so nearby seeds and
    batches do not give correlated streams."""
    digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _Source:
    """Random access to ``(x, y)`` from a ``(x, y)`` pair or a dataset yielding ``(x, y, ...)``.

    Labels of any integer dtype are cast to int64; float, bool or complex labels are refused
    (``ValueError`` naming ``data``): casting 0.7 to a class would hide a bug.
    """

    def __init__(self, data) -> None:
        self.xy = None
        if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor):
            x, y = data
            if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
                raise ValueError(f"data: y must be a tensor of shape ({x.shape[0]},), got "
                                 f"{tuple(y.shape) if isinstance(y, Tensor) else type(y)}")
            self.xy = (x, _labels(y))
        self.data = data

    def __len__(self) -> int:
        return self.xy[0].shape[0] if self.xy is not None else len(self.data)

    def _base(self) -> tuple[Any, Tensor | None]:
        """The dataset under a ``Subset`` and the subset's indices (None: all, in order)."""
        base, ids = self.data, None
        if isinstance(base, torch.utils.data.Subset):
            base, ids = base.dataset, torch.as_tensor(list(base.indices), dtype=torch.long)
        return base, ids

    def labels(self) -> Tensor:
        if self.xy is not None:
            return self.xy[1].cpu()
        base, ids = self._base()
        y = getattr(base, "y", None)
        if isinstance(y, Tensor) and y.dim() == 1:  # fast path: ImageDataset keeps labels
            return _labels(y if ids is None else y[ids]).cpu()
        return _labels(torch.stack([torch.as_tensor(self.data[i][1])
                                    for i in range(len(self))]))

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self.xy is not None:
            return self.xy[0][idx], self.xy[1][idx]
        items = [self.data[int(i)] for i in idx]
        return (torch.stack([it[0] for it in items]),
                _labels(torch.stack([torch.as_tensor(it[1]) for it in items])))

    def sha256(self, chunk: int = 1024) -> str:
        """sha256 of the evaluated images and labels, for the resume fingerprint.

        Fast paths hash the tensors as stored: an ``(x, y)`` pair, or an ``ImageDataset``'s uint8
        ``.x`` (no transform); any other dataset is read once, in chunks, as the runner sees it.
        Names, dtypes and shapes are hashed with the bytes.
        """
        h = hashlib.sha256()
        if self.xy is not None:
            _hash_tensor(h, "x", self.xy[0])
            _hash_tensor(h, "y", self.xy[1])
            return h.hexdigest()
        base, ids = self._base()
        x = getattr(base, "x", None)
        if (isinstance(x, Tensor) and x.dtype == torch.uint8 and x.dim() == 4
                and getattr(base, "transform", None) is None
                and len(getattr(base, "y", ())) == x.shape[0]):
            _hash_tensor(h, "x_uint8", x if ids is None else x[ids])
            _hash_tensor(h, "y", self.labels())
            return h.hexdigest()
        for start in range(0, len(self), chunk):
            xb, yb = self.get(torch.arange(start, min(start + chunk, len(self))))
            _hash_tensor(h, f"x[{start}:]", xb)
            _hash_tensor(h, f"y[{start}:]", yb)
        return h.hexdigest()


def _labels(y: Tensor) -> Tensor:
    """Integer labels as int64; float, bool and complex labels are refused."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"data: labels must be integers, got {y.dtype}")
    return y.long()


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``t`` (any dtype, any device) to ``h``."""
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    flat = t.reshape(-1).contiguous().cpu()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())  # raw bytes: bfloat16 has no numpy dtype


def _model_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (unwrapped), names included, in name
    order: editing any weight or statistic changes it. About a second for a WRN-34-10."""
    bare = dist.unwrap(model)
    tensors = dict(bare.named_parameters())
    tensors.update(bare.named_buffers())
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()

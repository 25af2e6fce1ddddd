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

An attack with sub-attacks (``AutoAttack``: a ``components`` list and ``info["broken_by"]``)
also gets per-sub-attack flags in ``EvalResult.components``, which the gradient-masking checks
read. Evaluation is resumable (``state_dir``, see ``robustkit.evaluation.state``); each batch's
randomness comes from a seed derived from ``(seed, attack name, batch index)``, so a resumed or a
sharded run equals an uninterrupted single-process one. The resume fingerprint always includes
the sha256 of the model's parameters and buffers and of the evaluated images and labels, so a
state is never reused for edited weights or other images with the same names.

A point whose logits are not finite counts as incorrect (clean and under every attack) and is
listed in ``EvalResult.nonfinite``; ``post_checks`` turns that into a failed ``finite_logits``
check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from robustkit import distributed as dist
from robustkit.errors import StateMismatchError
from robustkit.evaluation.runner import (
    NOT_BROKEN,
    ProgressFactory,
    _describe,
    _model_sha256,
    _Runner,
    _Source,
)
from robustkit.evaluation.state import _Store, rank_dir
from robustkit.utils import eval_mode

if TYPE_CHECKING:  # typing only: evaluation (and the trainer through it) imports no attack
    from robustkit.attacks.base import Attack

__all__ = ["EvalResult", "evaluate_attacks", "StateMismatchError", "RESERVED"]

logger = logging.getLogger(__name__)

Protocol = Literal["standalone", "cascade"]
#: Names an attack may not take: the clean column, the worst case, the flags.json sub-key.
RESERVED = ("clean", "robust", "components")


@dataclass
class EvalResult:
    """Per-sample flags of one evaluation.

    Attributes:
        labels: ``(N,)`` int64 labels of the evaluated points (dataset order).
        clean: ``(N,)`` bool, correctly classified without attack.
        correct: attack name -> ``(N,)`` bool, correct under that attack (False where clean is
            False; under ``"cascade"``: robust after that attack and all earlier ones).
        time_s: seconds per attack and ``"clean"`` (summed over batches, ranks and resumes).
        max_perturbation: attack name -> largest ``||x_adv - x||`` seen (threat-model norm).
        protocol: ``"standalone"`` or ``"cascade"``.
        components: attack name -> sub-attack name -> ``(N,)`` bool, still correct after the
            sub-attacks up to and including this one (AutoAttack's own cascade; False where
            the attack did not run); only for attacks with sub-attacks, in run order.
        nonfinite: ``"clean"`` and each attack name -> ``(N,)`` bool, the model's logits were
            NaN or inf there (on x, or on that attack's x_adv); such points count as incorrect.
        checks: pre- and post-checks (``Check``), set by ``robustkit.evaluate``.
        meta: the settings ``to_dict``/``save`` record, set by ``robustkit.evaluate``.

    Examples:
        >>> res.accuracy()["robust"]
        >>> res.components["autoattack"]["apgd-ce"].float().mean()
    """

    labels: Tensor
    clean: Tensor
    correct: dict[str, Tensor] = field(default_factory=dict)
    time_s: dict[str, float] = field(default_factory=dict)
    max_perturbation: dict[str, float] = field(default_factory=dict)
    protocol: Protocol = "standalone"
    components: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    nonfinite: dict[str, Tensor] = field(default_factory=dict)
    # Set by robustkit.evaluate (empty from evaluate_attacks alone): the pre- and post-checks,
    # and build_results' keyword arguments (model, dataset, eps, ..., extra with the name).
    checks: list = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # Views and files (robustkit.evaluation.export): what robustkit evaluate prints and saves.
    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` dictionary (needs the settings ``robustkit.evaluate`` records)."""
        from robustkit.evaluation.export import to_dict

        return to_dict(self)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per accuracy column (and AutoAttack sub-attack)."""
        from robustkit.evaluation.export import to_frame

        return to_frame(self)

    def plot(self) -> Any:
        """A matplotlib ``Figure``: accuracy per attack, clean to robust."""
        from robustkit.evaluation.export import plot

        return plot(self)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write the CLI's ``results.json``, ``flags.json`` and ``model_info/.../<name>.json``."""
        from robustkit.evaluation.export import save

        return save(self, folder)

    def table(self) -> str:
        """The table and checks ``robustkit evaluate`` prints, as text."""
        from robustkit.evaluation.export import table

        return table(self)

    def _repr_html_(self) -> str:
        from robustkit.evaluation.export import to_html

        return to_html(self)

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

    def attacked(self, name: str) -> Tensor:
        """``(N,)`` bool, the points attack ``name`` ran on: clean-correct ones, and under
        ``"cascade"`` only those still robust after the attacks before it."""
        if name not in self.correct:
            raise ValueError(f"name: no attack {name!r}; known: {list(self.correct)}")
        seen = self.clean.clone()
        if self.protocol == "cascade":
            for k, flags in self.correct.items():
                if k == name:
                    break
                seen &= flags
        return seen

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
    shard: bool = False,
) -> EvalResult:
    """Clean flags, then each attack on the clean-correct points (see the module docstring).

    Args:
        model: maps ``(N, C, H, W)`` in [0, 1] to logits; evaluated in eval mode (every
            submodule's mode restored after).
        data: a dataset yielding ``(x, y, ...)`` (e.g. ``first_n(test_set, 1000)``) or ``(x, y)``.
        attacks: name -> attack, run in this order; ``"clean"``, ``"robust"`` and
            ``"components"`` are reserved.
        batch_size: points per attack call (default 256); part of the resume fingerprint.
        protocol: ``"standalone"`` (default) or ``"cascade"``.
        seed: base of the per-(attack, batch) seeds (default 0).
        state_dir: folder for resumable per-batch flags; ``None`` keeps nothing. With
            ``shard=True`` on several processes each rank keeps its own subfolder
            ``rank<r>-of<world>``; a rerun with another number of processes recomputes (into
            its own subfolders) instead of reusing them.
        fingerprint: extra settings (model name, checkpoint hash, eps, ...) that must match to
            resume; the attacks' own settings (``Attack.settings()``), the number of points,
            batch size, protocol, seed, ``norm``, world size, robustkit's and torch's versions
            and the sha256 of the model's parameters and buffers and of the images and labels
            are always included.
        overwrite: discard a mismatching state instead of raising ``StateMismatchError``.
        progress: optional factory ``progress(name, total)`` of bars with ``update(k)``/``close()``.
        device: where batches go; default: the model's device.
        norm: the threat model's norm, in which ``max_perturbation`` is measured (default: each
            attack's own).
        shard: split the batches of every pass over the ``torch.distributed`` ranks (each takes
            a contiguous run of whole batches) and all-gather the flags, so every rank returns
            the single-process result; a no-op without a process group.

    Returns:
        ``EvalResult`` with per-sample flags.

    Raises:
        StateMismatchError: ``state_dir`` holds a run with other settings (and not overwrite).
        OutputError: the state cannot be written (full disk, read-only); what was written stays.
        ValueError: ``data`` holds images that are not floating point, finite and in [0, 1],
            non-integer labels, or labels outside the model's classes.

    Shape:
        ``x``: ``(N, C, H, W) in [0, 1]``, ``y``: ``(N,)``.

    Example:
        >>> res = evaluate_attacks(model, (x, y), {"pgd20": PGD(model, steps=20)})
        >>> res.accuracy()["robust"]
    """
    if norm not in (None, "Linf", "L2"):
        raise ValueError(f"norm must be 'Linf', 'L2' or None, got {norm!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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
    world = dist.world_size() if shard else 1
    store = _Store(None, {}, overwrite)
    if state_dir is not None:
        failure = None
        try:
            store = _Store(state_dir if world == 1 else rank_dir(state_dir, dist.rank(), world), {
                **dict(fingerprint or {}),
                "n": len(source), "batch_size": batch_size, "protocol": protocol, "seed": seed,
                # the norm max_perturbation is measured in (hence the perturbation check)
                "norm": norm,
                # the batches each rank owns, hence its state folder
                "world_size": world,
                # the code that computes the flags: another torch can flip a borderline point
                "versions": _versions(),
                # every setting that changes a flag (steps, alpha, loss, restarts, version, ...)
                "attacks": {k: {"class": type(a).__name__, **a.settings()}
                            for k, a in attacks.items()},
                # the weights and images themselves: names alone do not say they are unchanged
                "model_sha256": _model_sha256(model),
                "data_sha256": source.sha256(),
            }, overwrite)
        except Exception as err:  # every rank learns of it below, so none waits at a gather
            failure = err
        if world > 1:
            parts = dist.all_gather_object(_describe(failure))
            if failure is None:
                dist.raise_first_failure(parts)
        if failure is not None:
            raise failure
    runner = _Runner(model=model, source=source, store=store, batch_size=batch_size, seed=seed,
                     device=torch.device(device), norm=norm, progress=progress, shard=shard)
    result = EvalResult(labels=labels, clean=torch.zeros(len(source), dtype=torch.bool),
                        protocol=protocol)
    # clean pass on running BN statistics, as the attacks do (methods.md §1.1)
    with eval_mode(model):
        clean = runner.clean()
        result.clean, result.time_s["clean"] = clean.correct, clean.time_s
        result.nonfinite["clean"] = clean.nonfinite
        still = result.clean.clone()
        for name, attack in attacks.items():
            active = torch.nonzero(still if protocol == "cascade" else result.clean).flatten()
            out = runner.attack(name, attack, active)
            result.correct[name], result.time_s[name] = out.correct, out.time_s
            result.max_perturbation[name] = out.max_perturbation
            result.nonfinite[name] = out.nonfinite
            if out.components is not None:
                result.components[name] = _after_each(out.broken_by, out.components, active)
            still &= out.correct
    for name, flags in result.nonfinite.items():
        if flags.any():
            logger.warning("%s: the model's logits are NaN or inf on %d point(s) (first: %s); "
                           "they count as incorrect", name, int(flags.sum()),
                           flags.nonzero().flatten()[:5].tolist())
    return result


def _versions() -> dict[str, str]:
    """robustkit's and torch's versions, part of the resume fingerprint (the attacks' backends,
    pyautoattack and torchattacks, are in the CLI's ``attack_settings``)."""
    from robustkit import __version__

    return {"robustkit": __version__, "torch": torch.__version__}


def _after_each(broken_by: Tensor, names: list[str], active: Tensor) -> dict[str, Tensor]:
    """Sub-attack k's flags: attacked, and broken by no sub-attack up to k (AutoAttack order)."""
    out = {}
    for k, sub in enumerate(names):
        flags = torch.zeros_like(broken_by, dtype=torch.bool)
        b = broken_by[active]
        flags[active] = (b == NOT_BROKEN) | (b > k)  # MISCLASSIFIED (-2) is never correct
        out[sub] = flags
    return out

"""Training schedules as pure functions of ``(epoch, epochs)`` (methods.md §7.1).

``epoch`` counts from 0 and ``epochs`` is the total T, as in ``TrainContext``. Fractions of T make
every schedule independent of the run length: FAT's 50/90/120 rule becomes (50/120, 90/120, 1).

Example:
    >>> tau_schedule(49, 120, FAT_TAU)   # 0 (the 50th epoch; FAT.py: adjust_tau(50) = 0)
    >>> tau_schedule(50, 120, FAT_TAU)   # 1 (the 51st)
    >>> gamma_t(45, 100, gamma_max=1.0)  # 0.5 (half-way up the 0.3T-0.6T ramp)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

__all__ = ["FAT_TAU", "SRD_TAU", "TauSchedule", "check_tau_schedule", "tau_schedule", "gamma_t",
           "gairat_lambda", "warmup_done"]

TauSchedule = Sequence[tuple[float, int]] | int | None

# FAT (Zhang et al., ICML 2020): τ = 0 for epochs ≤ 50, 1 for ≤ 90, 2 after, over 120 epochs.
FAT_TAU: tuple[tuple[float, int], ...] = ((50 / 120, 0), (90 / 120, 1), (1.0, 2))
# SRD-DAT (methods.md §3.3, item 9): FAT's rule rounded to 0.4T and 0.75T.
SRD_TAU: tuple[tuple[float, int], ...] = ((0.4, 0), (0.75, 1), (1.0, 2))

# Fractions such as 0.3 * 10 are 3.0000000000000004 in floating point; comparisons get this slack
# so "epoch <= 0.3T" holds at epoch 3 of 10.
_SLACK = 1e-9


def check_tau_schedule(breakpoints: TauSchedule, name: str = "tau_schedule") -> None:
    """Raise ``ValueError`` unless ``breakpoints`` is None, an int >= 0, or ((fraction, tau), ...)
    with increasing fractions in (0, 1] and integer taus >= 0."""
    if breakpoints is None:
        return
    if isinstance(breakpoints, bool):
        raise ValueError(
            f"{name} must be an int, None or ((fraction, tau), ...), got {breakpoints!r}")
    if isinstance(breakpoints, int):
        if breakpoints < 0:
            raise ValueError(f"{name} must be >= 0, got {breakpoints}")
        return
    try:
        pairs = [(float(f), t) for f, t in breakpoints]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be ((fraction, tau), ...), got {breakpoints!r}") from None
    if not pairs:
        raise ValueError(f"{name} must have at least one (fraction, tau) pair")
    last = 0.0
    for f, t in pairs:
        if not last < f <= 1.0:
            raise ValueError(f"{name}: fractions must increase within (0, 1], got {breakpoints!r}")
        if isinstance(t, bool) or int(t) != t or t < 0:
            raise ValueError(f"{name}: tau values must be integers >= 0, got {t!r}")
        last = f


def tau_schedule(epoch: int, epochs: int, breakpoints: TauSchedule = SRD_TAU) -> int | None:
    """FAT-style early-stop budget τ_t: the τ of the first breakpoint with ``epoch + 1 <= f·T``.

    FAT counts epochs from 1 (FAT.py calls ``adjust_tau(epoch + 1)``: τ = 0 for epochs 1-50 of
    120, 1 for 51-90, 2 for 91-120), so the 0-based ``epoch`` is shifted by one: τ_1 holds for
    exactly ``f_1·T`` epochs.

    Args:
        epoch: current epoch, from 0.
        epochs: total epochs T (>= 1).
        breakpoints: ``((f_1, τ_1), (f_2, τ_2), ...)`` with increasing fractions; past the last
            fraction its τ holds. An int is a constant τ; ``None`` means no early stopping.

    Returns:
        τ_t (int), or ``None`` when ``breakpoints`` is None.
    """
    _check_epochs(epoch, epochs)
    if breakpoints is None or isinstance(breakpoints, int):
        return breakpoints
    for fraction, tau in breakpoints:
        if epoch + 1 <= fraction * epochs + _SLACK:
            return int(tau)
    return int(breakpoints[-1][1])


def gamma_t(
    epoch: int, epochs: int, gamma_max: float = 1.0, ramp: tuple[float, float] = (0.3, 0.6)
) -> float:
    """SRD-DAT's weight exponent: 0 before ``ramp[0]·T``, linear up to ``gamma_max`` at
    ``ramp[1]·T``, constant after (methods.md §3.3, Module B, item 4).

    A ramp with equal ends is a step at that fraction.
    """
    _check_epochs(epoch, epochs)
    start, end = float(ramp[0]), float(ramp[1])
    if not 0 <= start <= end:
        raise ValueError(f"ramp must satisfy 0 <= start <= end, got {ramp!r}")
    t = epoch / epochs
    if t < start - _SLACK:
        return 0.0
    if t >= end - _SLACK:
        return float(gamma_max)
    return float(gamma_max) * (t - start) / (end - start)


def gairat_lambda(
    epoch: int,
    epochs: int,
    lam: float = -1.0,
    burn_in: float = 0.5,
    lambda_max: float = math.inf,
    schedule: Literal["fixed", "linear"] = "fixed",
) -> float:
    """GAIRAT's λ_t (https://arxiv.org/abs/2010.01736): ``lambda_max`` (+inf: uniform weights)
    during burn-in, then ``lam`` (``"fixed"``) or a linear decay from ``lambda_max`` (``"linear"``).

    The reference counts epochs from 1 and switches at epoch 60 of 120; here the switch happens
    when ``epoch + 1 >= burn_in·T`` (0-based ``epoch``), the same epoch.
    """
    _check_epochs(epoch, epochs)
    if schedule not in ("fixed", "linear"):
        raise ValueError(f"schedule must be 'fixed' or 'linear', got {schedule!r}")
    if epoch + 1 < burn_in * epochs - _SLACK:
        return float(lambda_max)
    if schedule == "fixed":
        return float(lam)
    if math.isinf(lambda_max):
        raise ValueError("a 'linear' GAIRAT schedule needs a finite lambda_max")
    return float(lambda_max - (epoch + 1) / epochs * (lambda_max - lam))


def warmup_done(epoch: int, epochs: int, warmup: float) -> bool:
    """True once ``epoch >= warmup·T`` (AWP's warm-up; ``warmup = 0`` is always on)."""
    _check_epochs(epoch, epochs)
    return epoch >= warmup * epochs - _SLACK


def _check_epochs(epoch: int, epochs: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")

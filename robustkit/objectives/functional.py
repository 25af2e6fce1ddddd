"""Per-sample functions shared by the objectives (methods.md §2–§3, §7.1).

Everything maps logits or probabilities ``(N, K)`` to per-sample tensors ``(N,)``: divergences,
the confidence gap and skewness of SRD-DAT's Module A, its budget map, and the sample weights
(methods.md's ``SampleWeighter`` instances are plain functions here; weights are detached).

Example:
    >>> s_hat = normalized_skewness(torch.softmax(model(x), dim=1))
    >>> eps_i = budget_map(robustness_score(confidence_gap(p), s_hat), correct, 4/255, 8/255)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.pgd import PGD
from robustkit.distributed import unwrap

__all__ = [
    "per_sample_kl", "accuracy", "confidence_gap", "skewness", "max_skewness",
    "normalized_skewness", "robustness_score", "budget_map", "power_weights", "clip_renormalize",
    "gair_weights", "input_gradient", "build_pgd", "attack_metrics", "check_hparam",
]

# Below this second central moment a probability vector counts as uniform and its skewness is 0
# (methods.md §3.3, item 3): m3 / m2^1.5 is 0/0 there.
_M2_FLOOR = 1e-12


def build_pgd(model: nn.Module, **kwargs) -> PGD:
    """The paper-default PGD of an objective, built on the bare module (``select="last"``)."""
    kwargs.setdefault("select", "last")  # training uses the last iterate (methods.md §1.1)
    return PGD(unwrap(model), **kwargs)


def attack_metrics(info: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scalars every attacked objective logs from ``AttackResult.info`` (methods.md §7.3 names):
    ``steps_per_sample`` (mean gradient evaluations), ``eps_mean``, ``frac_perturbed``."""
    out: dict[str, Tensor] = {}
    if "steps_used" in info:
        out["steps_per_sample"] = info["steps_used"].detach().float().mean()
    if "eps" in info:
        eps = info["eps"].detach().float()
        out["eps_mean"] = eps.mean()
        out["frac_perturbed"] = (eps > 0).float().mean()
    return out


def check_hparam(name: str, value: float, low: float = 0.0, high: float = math.inf,
                 low_open: bool = False) -> float:
    """``float(value)``, or ``ValueError`` naming ``name`` when outside ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok or math.isnan(value):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
    return value


def per_sample_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p ‖ q)`` summed over classes, per sample; gradients flow through both arguments.

    The TRADES outer term (https://arxiv.org/abs/1901.08573): its mean over the batch equals the
    reference ``KLDivLoss(reduction="sum") / B``.

    Shape: ``(N, K), (N, K) -> (N,)``.
    """
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of ``argmax logits == y`` (a detached 0-dim float tensor)."""
    return (logits.detach().argmax(dim=1) == y).float().mean()


def confidence_gap(probs: Tensor) -> Tensor:
    """``p_(1) - p_(2)`` in [0, 1]: the top-1 minus top-2 probability (methods.md §3.3, item 2).

    Shape: ``(N, K) -> (N,)``, K >= 2.
    """
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def skewness(probs: Tensor) -> Tensor:
    """Sample skewness ``m3 / m2^1.5`` of the K probabilities, mean ``1/K`` (methods.md §3.3).

    Returns 0 where ``m2 < 1e-12`` (the uniform vector).

    Shape: ``(N, K) -> (N,)``.
    """
    dev = probs - 1.0 / probs.shape[1]  # the mean of a probability vector is exactly 1/K
    m2 = dev.pow(2).mean(dim=1)
    m3 = dev.pow(3).mean(dim=1)
    flat = m2 < _M2_FLOOR
    return torch.where(flat, torch.zeros_like(m2), m3 / m2.clamp_min(_M2_FLOOR).pow(1.5))


def max_skewness(num_classes: int) -> float:
    """``s_max(K) = (K - 2) / sqrt(K - 1)``, the skewness of a one-hot vector (8/3 for K = 10)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return (num_classes - 2) / math.sqrt(num_classes - 1)


def normalized_skewness(probs: Tensor) -> Tensor:
    """``ŝ = (1 + clip(s / s_max(K), -1, 1)) / 2`` in [0, 1]: one-hot 1, uniform ½.

    For K = 2 the skewness is always 0 (s_max = 0), so ŝ = ½.

    Shape: ``(N, K) -> (N,)``.
    """
    s_max = max_skewness(probs.shape[1])
    if s_max == 0:
        return torch.full_like(probs[:, 0], 0.5)
    return 0.5 * (1 + (skewness(probs) / s_max).clamp(-1, 1))


def robustness_score(gap: Tensor, skew_hat: Tensor, lambda_gap: float = 0.7) -> Tensor:
    """``r = λ_g·g + (1 - λ_g)·ŝ`` in [0, 1] (methods.md §3.3, item 4)."""
    return lambda_gap * gap + (1 - lambda_gap) * skew_hat


def budget_map(
    score: Tensor,
    correct: Tensor,
    eps_lo: float,
    eps_hi: float,
    q: float = 1.0,
    misclassified: Literal["clean", "uniform"] = "clean",
    invert: bool = False,
) -> Tensor:
    """Per-sample budget ``ε_i = c_i·[ε_lo + (ε_hi - ε_lo)·r_i^q]`` (methods.md §3.3, item 5).

    ``invert=True`` (an ablation, not methods.md's map) reflects the budget of a correct sample
    within ``[ε_lo, ε_hi]``: ``ε_i = ε_lo + (ε_hi - ε_lo)·(1 - r_i^q)`` = ``ε_lo + ε_hi`` minus
    the default budget, so fragile samples (small r) get the larger budget and robust ones the
    smaller. Misclassified samples keep their budget (0 or ``eps_hi``).

    Args:
        score: ``(N,)`` robustness scores in [0, 1].
        correct: ``(N,)`` bool, clean prediction correct.
        eps_lo, eps_hi: smallest and largest budget of a correct sample (pixel units).
        q: curvature of the map (1 = linear).
        misclassified: ``"clean"`` gives misclassified samples ε = 0 (no perturbation, IAAT),
            ``"uniform"`` gives them ``eps_hi``.
        invert: use ``1 - r_i^q`` in place of ``r_i^q`` (default False).

    Shape: ``(N,) -> (N,)``.
    """
    power = score.clamp(0, 1).pow(q)
    eps = eps_lo + (eps_hi - eps_lo) * (1 - power if invert else power)
    other = 0.0 if misclassified == "clean" else eps_hi
    return torch.where(correct, eps, torch.full_like(eps, other))


def clip_renormalize(weights: Tensor, omega_max: float) -> Tensor:
    """Scale non-negative weights to mean 1 with every weight in ``[0, omega_max]``.

    Clipping at ``omega_max`` and renormalising are iterated to their fixed point: the result is
    ``min(c·w_i, omega_max)`` with ``c`` chosen so the mean is exactly 1 (one renormalisation after
    one clip could push weights above the clip again). Weights that are 0 stay 0 unless nothing
    else can carry the mass, in which case the remainder is spread evenly over them.

    Shape: ``(M,) -> (M,)``; ``omega_max >= 1``.
    """
    n = weights.numel()
    if n == 0:
        return weights
    w = weights.clamp_min(0)
    clipped = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(n + 1):  # each pass clips at least one more weight, so n + 1 passes suffice
        free = ~clipped
        budget = n - omega_max * int(clipped.sum())  # python float: no float32 rounding
        total = w[free].sum()
        if total <= 0:  # the free weights are all 0: share the remaining mass evenly
            out = torch.where(clipped, torch.full_like(w, omega_max), w)
            return torch.where(free, budget / int(free.sum()), out)
        scaled = budget * w / total
        newly = free & (scaled > omega_max)
        if not newly.any():
            return torch.where(clipped, torch.full_like(w, omega_max), scaled)
        clipped |= newly
    return torch.where(clipped, torch.full_like(w, omega_max), scaled)  # pragma: no cover


def power_weights(
    v: Tensor, mask: Tensor, gamma: float, omega_max: float = 5.0
) -> Tensor:
    """SRD-DAT's weights ``ω_i ∝ v_i^γ`` over ``P = mask``, mean 1 over P, ω_i = 1 outside P.

    ``ω_i = |P|·v_i^γ / Σ_{j∈P} v_j^γ``, then clipped to ``[0, omega_max]`` and renormalised
    (iterated, see ``clip_renormalize``); γ = 0 gives uniform weights. Invariant to rescaling
    all ``v`` (methods.md §3.3, Module B, item 3). The result is detached.

    Shape: ``(N,), (N,) bool -> (N,)``.
    """
    v = v.detach()
    omega = torch.ones_like(v)
    if mask.any():
        vp = v[mask].clamp_min(0)
        top = vp.max()
        if torch.isfinite(top) and top > 0:
            # divided by the largest first: the same weights, without under/overflow of v^γ
            w = (vp / top).pow(gamma)  # 0**0 = 1: γ = 0 is exactly uniform
        else:
            w = torch.ones_like(vp)  # all-zero (or non-finite) divergences carry no ranking
        omega[mask] = clip_renormalize(w, omega_max)
    return omega


def gair_weights(kappa: Tensor, steps: int, lam: float) -> Tensor:
    """GAIRAT's Tanh weights ``½(1 + tanh(λ + 5(1 - κ/⌊K/2⌋)))``, renormalised to sum N.

    Zhang et al., "Geometry-aware Instance-reweighted Adversarial Training", ICLR 2021
    (https://arxiv.org/abs/2010.01736). ``lam = +inf`` (burn-in) gives uniform weights.

    Shape: ``(N,) -> (N,)`` detached.
    """
    half = max(steps // 2, 1)
    if math.isinf(lam) and lam > 0:
        return torch.ones_like(kappa, dtype=torch.float)
    z = lam + 5 * (1 - kappa.float() / half)
    # ½(1 + tanh z) = σ(2z) exactly; 1 + tanh z cancels in float32 for very negative z (κ near K),
    # losing the small weights' digits (5 % off at κ = K = 7, λ = -1), while σ keeps them
    w = torch.sigmoid(2 * z)
    return (w * w.numel() / w.sum()).detach()


def input_gradient(
    model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """``∇_x CE(f(x), y)`` summed over the batch (so per sample), by ``torch.autograd.grad``.

    With ``create_graph=True`` the gradient keeps its graph, so a penalty on it can be
    back-propagated to the parameters (IGR, JR, SAGR). Parameter ``.grad`` is never written.

    Returns:
        ``(grad, logits)``: ``grad`` shaped like ``x``, ``logits`` ``(N, K)`` of that forward.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad, logits

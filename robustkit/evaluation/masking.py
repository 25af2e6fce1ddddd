"""Gradient-masking checks on an ``EvalResult`` (methods.md §1.5; Athalye et al., ICML 2018,
https://arxiv.org/abs/1802.00420; Carlini et al., https://arxiv.org/abs/1902.06705).

Every attack, and every AutoAttack sub-attack (``EvalResult.components``), becomes a *unit*: the
points it ran on and the points it broke there. Units are black box (Square, standalone or inside
AutoAttack) or gradient based (everything else). Three signs of masked gradients:

- ``black_box:<unit>``: a black-box unit broke points that every gradient unit which ran on them
  missed. Gradients that point nowhere useful (quantised inputs, a decoy term) defeat APGD and
  FAB, not Square.
- ``gradient_gap:<unit>``: an iterative gradient attack is far less successful than another on
  the same points (e.g. PGD-20 68 % vs AutoAttack's APGD 0 %).
- ``monotone:<weak><<strong>``: within a family (``strength``), more effort gave a higher accuracy.
  Effort is the pair (steps, restarts): an attack is expected to be at least as strong as another
  only when it has at least as many steps AND at least as many restarts (``pgd20x5`` over
  ``pgd20``, ``pgd100x5`` over ``pgd50``). ``pgd20x5`` and ``pgd50`` are not ranked (100 against
  50 gradient evaluations, but fewer steps per run), nor ``pgd1x20`` and ``pgd10``: twenty
  single ε/4 steps cannot reach what ten chained ones do, and a product ``steps x restarts``
  called the sound shipped MNIST model masked for it.

``post_checks`` (what the CLI runs after attacking) adds the finite-logits and perturbation-size
checks to these.

Example:
    >>> checks = post_checks(result, eps=8/255, strength={"pgd20": ("pgd-ce", 20, 1),
    ...                                                   "pgd100x5": ("pgd-ce", 100, 5)})
    >>> [c.to_dict() for c in checks if c.severity == "fail"]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from robustkit.evaluation.checks import BLACK_BOX, Check, finite_logits, log_checks

__all__ = ["post_checks", "masking_checks", "BLACK_BOX_COMPONENTS", "BLACK_BOX_GAIN_FAIL",
           "FAIL_MIN_POINTS", "GRADIENT_GAP_FAIL", "GRADIENT_GAP_WARN", "MONOTONE_FAIL",
           "MIN_EFFORT"]

# AutoAttack sub-attacks that use no gradient (Square: score-based random search).
BLACK_BOX_COMPONENTS = ("square",)

# Square breaking >= 2 % of the evaluated points after every gradient attack missed them: the
# gradient attacks are not doing their job, so the reported robustness is not trustworthy. Any
# smaller positive gain is a warning: the public TRADES MNIST SmallCNN loses 0.5 % of 200 points
# (1 point) to Square after the white-box attacks, and pyautoattack warns about that too.
BLACK_BOX_GAIN_FAIL = 0.02
# A fail also needs more than one point, so one lucky Square query on a tiny set only warns.
FAIL_MIN_POINTS = 2
# An iterative gradient attack >= 10 percentage points less successful than another on the same
# points fails; >= 5 points warns. Sound defences show PGD-20 a few points above AutoAttack
# (TRADES WRN-34-10 on RobustBench: 56.61 % reported vs 53.08 % AA); gaps of 10+ points come
# from masked gradients or a misconfigured attack (steps x alpha that cannot reach eps).
GRADIENT_GAP_FAIL = 0.10
GRADIENT_GAP_WARN = 0.05
# An attack with at least the steps and the restarts of another in its family giving >= 2 %
# higher accuracy fails, for the reason Square's gain does: a stronger attack must not miss what
# a weaker one finds.
MONOTONE_FAIL = 0.02
# Single-step attacks (FGSM, PGD-1) are expected to be far weaker than iterative ones
# (Madry et al. 2018): only attacks with at least this many steps per run enter the gradient-gap
# check (restarts do not make PGD-1 iterative).
MIN_EFFORT = 2


@dataclass(frozen=True)
class _Unit:
    """An attack or AutoAttack sub-attack: ``(N,)`` bool masks of the points it ran on and broke."""

    name: str
    seen: Tensor
    broken: Tensor
    black_box: bool
    iterative: bool  # enters the gradient-gap check
    group: bool = False  # AutoAttack's gradient sub-attacks as one (their members are units too)


def masking_checks(result, *, strength: Mapping[str, tuple] | None = None,
                   black_box: tuple[str, ...] = BLACK_BOX, min_samples: int = 1,
                   rel_tol: float = 0.002) -> list[Check]:
    """The black-box, gradient-gap and monotone checks (see the module docstring).

    Args:
        result: ``robustkit.evaluation.EvalResult``.
        strength: attack name -> ``(family, steps, restarts)`` of iterative gradient attacks
            (``attacks.specs.strength``); a pair ``(family, effort)`` means ``effort`` steps
            and one restart.
        black_box: standalone attack names (before any ``(``) that are black box.
        min_samples, rel_tol: a monotone reversal warns only above ``max(min_samples / n,
            rel_tol)`` (default: one sample, 0.2 %).

    Returns:
        Checks: ``black_box:*`` (one per black-box unit, when a gradient unit ran too),
        ``gradient_gap:*`` (one per iterative gradient unit, when there are two or more) and
        ``monotone:*`` (one per neighbouring pair within a family).
    """
    n = max(result.n, 1)
    units = _units(result, strength or {}, black_box)
    white = [u for u in units if not u.black_box and not u.group]
    checks = []
    for b in (u for u in units if u.black_box and white):
        missed = b.broken.clone()
        for w in white:
            missed &= ~w.broken  # a gradient unit that did not run on a point did not break it
        gain = int(missed.sum())
        sev = _severity(gain, n, BLACK_BOX_GAIN_FAIL, warn_above=0)
        checks.append(Check(
            f"black_box:{b.name}", sev,
            f"{b.name} broke {gain} points ({gain / n:.2%} of the evaluated) that every "
            f"gradient attack ({', '.join(w.name for w in white)}) missed"
            + ("" if sev == "ok" else ": possible gradient masking, try adaptive attacks"),
            {"only_black_box": gain, "fraction": gain / n, "gradient_attacks":
             [w.name for w in white]}))
    iterative = [u for u in units if u.iterative]
    for u in iterative if len(iterative) > 1 else ():
        gap, other = max((_correct_on_common(u, v) for v in iterative if v is not u),
                         key=lambda t: t[0])
        sev = _severity(gap, n, GRADIENT_GAP_FAIL, warn_fraction=GRADIENT_GAP_WARN)
        text = (f"{u.name} left {gap} more points ({gap / n:.2%} of the evaluated) correct "
                f"than {other} on the same points" if gap > 0 else
                f"{u.name} is as strong as every other iterative gradient attack on the same "
                "points")
        checks.append(Check(
            f"gradient_gap:{u.name}", sev,
            text + ("" if sev == "ok" else ": gradients unreliable or the weaker attack "
                    "misconfigured (gradient masking?)"),
            {"gap": gap / n, "points": gap, "vs": other}))
    checks += _monotone(units, strength or {}, n, max(min_samples / n, rel_tol))
    return checks


def _units(result, strength: Mapping[str, tuple], black_box: tuple[str, ...]
           ) -> list[_Unit]:
    """Every attack, and every sub-attack of an attack with ``components``, as a unit; plus
    each AutoAttack's gradient sub-attacks together (``group``) for the gradient-gap check."""
    units = []
    for name, correct in result.correct.items():
        seen = result.attacked(name)
        subs = result.components.get(name)
        if subs is None:
            steps = _effort(strength[name])[0] if name in strength else 0
            units.append(_Unit(name, seen, seen & ~correct, name.split("(")[0] in black_box,
                               steps >= MIN_EFFORT))
            continue
        before = seen
        for sub, after in subs.items():  # AutoAttack's own cascade: each sees what is left
            units.append(_Unit(f"{name}/{sub}", before, before & ~after,
                               sub in BLACK_BOX_COMPONENTS, False))
            before = after
        grad = [u for u in units[-len(subs):] if not u.black_box]
        if grad:  # the gradient sub-attacks together: iterative (100 steps), compared as one
            broken = grad[0].broken.clone()
            for u in grad[1:]:
                broken |= u.broken
            label = f"{name}/{'+'.join(u.name.rsplit('/', 1)[1] for u in grad)}"
            units.append(_Unit(label, seen, broken, False, True, group=True))
    return units


def _correct_on_common(u: _Unit, v: _Unit) -> tuple[int, str]:
    """``(u's correct points - v's correct points, v's name)`` on the points both ran on."""
    common = u.seen & v.seen
    return int((common & ~u.broken).sum()) - int((common & ~v.broken).sum()), v.name


def _effort(entry: tuple) -> tuple[int, int]:
    """``(steps, restarts)`` of a ``strength`` entry: ``(family, steps, restarts)``, or the older
    ``(family, effort)``, read as ``effort`` steps and one restart."""
    return (int(entry[1]), int(entry[2])) if len(entry) > 2 else (int(entry[1]), 1)


def _dominates(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """At least as many steps and restarts as ``b``, and more of one."""
    return a != b and a[0] >= b[0] and a[1] >= b[1]


def _monotone(units: list[_Unit], strength: Mapping[str, tuple], n: int,
              tol: float) -> list[Check]:
    """One check per pair of a family where one attack dominates the other (``_dominates``)
    and no third member lies between them: chains give neighbouring pairs, as before."""
    by_name = {u.name: u for u in units}
    groups: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for k, entry in strength.items():
        if k in by_name:
            groups.setdefault(entry[0], []).append((_effort(entry), k))
    checks = []
    for family, members in groups.items():
        members.sort()
        pairs = [(w, s) for w in members for s in members if _dominates(s[0], w[0]) and not any(
            _dominates(m[0], w[0]) and _dominates(s[0], m[0]) for m in members)]
        for (_, weak), (_, strong) in pairs:
            gap, _ = _correct_on_common(by_name[strong], by_name[weak])
            sev = _severity(gap, n, MONOTONE_FAIL, warn_fraction=tol, strict_warn=True)
            checks.append(Check(
                f"monotone:{weak}<{strong}", sev,
                f"{strong} left {gap} more points correct than {weak} on the same points"
                + ("" if sev == "ok" else ": more steps and restarts gave a higher accuracy "
                                           "(masking?)"),
                {"gap": gap / n, "robust_to_strong_only": max(gap, 0), "family": family}))
    return checks


def _severity(points: int, n: int, fail_fraction: float, *, warn_above: int | None = None,
              warn_fraction: float | None = None, strict_warn: bool = False) -> str:
    """``"fail"`` at ``>= fail_fraction`` of n and more than one point, else ``"warning"`` above
    ``warn_above`` points or at ``warn_fraction`` of n (``> `` with ``strict_warn``)."""
    frac = points / n
    if points >= FAIL_MIN_POINTS and frac >= fail_fraction - 1e-12:  # 1e-12: float division
        return "fail"
    if warn_above is not None and points > warn_above:
        return "warning"
    if warn_fraction is not None and points > 0 and (
            frac > warn_fraction if strict_warn else frac >= warn_fraction - 1e-12):
        return "warning"
    return "ok"


def post_checks(result, *, eps: float, strength: Mapping[str, tuple] | None = None,
                black_box: tuple[str, ...] = BLACK_BOX, min_samples: int = 1,
                rel_tol: float = 0.002) -> list[Check]:
    """Checks on an ``EvalResult``: perturbation sizes and gradient-masking signs.

    Args:
        result: ``robustkit.evaluation.EvalResult``.
        eps: the budget every ``x_adv`` must respect (same norm as the attacks).
        strength: attack name -> ``(family, steps, restarts)`` for iterative gradient attacks,
            e.g. ``{"pgd20": ("pgd-ce", 20, 1), "pgd100x5": ("pgd-ce", 100, 5)}``: those with 2
            or more steps enter the gradient-gap check, and within a family an attack with at
            least the steps and the restarts of another must not give a higher accuracy.
        black_box: attack names (before any ``(``) treated as black-box attacks; AutoAttack's
            ``square`` sub-attack always is.
        min_samples: within a family, an accuracy reversal is a warning only when larger than
            this many samples (default 1) and than ``rel_tol`` (default 0.2 %, AutoAttack's
            Square threshold).

    Returns:
        ``finite_logits``, ``perturbation:<attack>`` checks, then those of
        ``masking.masking_checks``.
    """
    checks = [finite_logits(result)]
    for name, pert in result.max_perturbation.items():
        ok = pert <= eps * (1 + 1e-4) + 1e-6  # float32 rounding of the projection
        rel = "<=" if ok else "EXCEEDS"
        checks.append(Check(f"perturbation:{name}", "ok" if ok else "fail",
                            f"max perturbation {pert:.6g} {rel} eps {eps:.6g}",
                            {"max_perturbation": pert, "eps": eps}))
    checks += masking_checks(result, strength=strength, black_box=black_box,
                             min_samples=min_samples, rel_tol=rel_tol)
    log_checks(checks)
    return checks

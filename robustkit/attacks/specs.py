"""The ``--attacks`` list of ``robustkit evaluate``: parsed and validated up front, then built.

Forms (ε and the norm come from the evaluation; methods.md §1.4, §7.4):

- ``clean``: accepted and ignored (clean accuracy is always reported);
- ``pgdK`` / ``pgdKxR``: PGD-CE, K steps, α = ε/4, uniform random start, R restarts, per-sample
  early stop on success and the best iterate kept (evaluation settings);
- ``cwK`` / ``cwKxR``: the same with the CW margin loss (CW∞ as in FAT/GAIRAT's scripts);
- ``fgsm``; ``autoattack`` (official AutoAttack through pyautoattack, ``--aa-version``);
- ``square``: AutoAttack's Square alone (5,000 queries), a black-box check for gradient masking;
- ``torchattacks:NAME`` or ``torchattacks:NAME(key=value, ...)``: any torchattacks class, given ε.

An empty list is refused (it would report the clean accuracy as robust). Counts are held to
sane maxima, so a typo cannot run without end: K <= ``MAX_STEPS`` (10,000), R <=
``MAX_RESTARTS`` (1,000), and torchattacks' ``steps``, ``n_restarts`` and ``n_queries`` (<=
``MAX_QUERIES``, 100,000) likewise.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

__all__ = ["AttackSpec", "parse_attacks", "split_list", "check_aa_attacks", "build_attacks",
           "strength", "targets_needed", "VALID_FORMS", "AA_ATTACKS", "MAX_STEPS", "MAX_RESTARTS",
           "MAX_QUERIES"]

VALID_FORMS = ("clean, pgdK, pgdKxR, cwK, cwKxR, fgsm, autoattack, square, torchattacks:NAME, "
               "torchattacks:NAME(key=value, ...) (K steps, R restarts: pgd20, pgd100x5, cw30)")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AA_TARGETS = 9  # APGD-T and FAB-T in AutoAttack standard/plus use 9 target classes (§1.5)
ALPHA_FRACTION = 0.25  # α = ε/4 for every PGD evaluation (2/255 at ε = 8/255, methods.md §1.4)
Kind = Literal["pgd", "cw", "fgsm", "autoattack", "square", "torchattacks"]
# Sane maxima of what one entry may ask for: ``pgd99999999999999999999999`` would run without end.
# 10,000 steps is 100x AutoAttack's APGD (100 iterations) and 500x PGD-20; 1,000 restarts is
# 200x AutoAttack "plus" (5). Square's 100,000 queries are 20x AutoAttack's 5,000.
MAX_STEPS = 10_000
MAX_RESTARTS = 1_000
MAX_QUERIES = 100_000
# torchattacks keyword arguments held to the same maxima (their names in torchattacks 3.5).
_COUNT_KWARGS = {"steps": MAX_STEPS, "n_restarts": MAX_RESTARTS, "restarts": MAX_RESTARTS,
                 "n_queries": MAX_QUERIES}


@dataclass(frozen=True)
class AttackSpec:
    """One parsed entry of ``--attacks``; ``name`` is its canonical text (the results key)."""

    name: str
    kind: Kind
    steps: int = 0
    restarts: int = 1
    cls: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        """``steps`` and ``restarts`` within the sane maxima (``MAX_STEPS``, ``MAX_RESTARTS``),
        also for a spec built directly rather than parsed."""
        if self.kind in ("pgd", "cw"):
            _check_count(self.name, "steps", self.steps, MAX_STEPS)
            _check_count(self.name, "restarts", self.restarts, MAX_RESTARTS)
        for key, cap in _COUNT_KWARGS.items():
            if key in self.kwargs:
                _check_count(self.name, key, self.kwargs[key], cap)


def _check_count(item: str, what: str, value: Any, cap: int, written: str | None = None
                 ) -> None:
    """``ValueError`` naming ``item`` unless ``value`` is an integer in ``[1, cap]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
        shown = written if written is not None else repr(value)
        if len(shown) > 40:
            shown = f"{shown[:20]}... ({len(shown)} characters)"
        raise ValueError(f"{item[:60]!r}: {what} must be an integer in [1, {cap:,}], got {shown}")


def _digits(text: str) -> int:
    """``int(text)`` of a decimal count; past 12 significant digits (already over every maximum)
    ``10**12``, since ``int()`` of a 5,000-digit string raises its own, confusing error."""
    return int(text) if len(text.lstrip("0")) <= 12 else 10**12


def split_list(text: str) -> list[str]:
    """Split on commas outside parentheses (``torchattacks:X(a=1,b=2)`` stays whole).

    Example:
        >>> split_list("clean, pgd20,torchattacks:Square(n_queries=10, p_init=0.8)")
        ['clean', 'pgd20', 'torchattacks:Square(n_queries=10, p_init=0.8)']
    """
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_attacks(text: str | list[str]) -> list[AttackSpec]:
    """Parse ``"clean,pgd20,autoattack"`` (or a list of entries); ``clean`` is dropped.

    Raises:
        ValueError: an empty list (nothing would run, and clean would be reported as robust),
            or naming the bad entry: an unknown form (listing the valid ones), a duplicate, or
            steps / restarts outside ``[1, MAX_STEPS]`` / ``[1, MAX_RESTARTS]``.
    """
    items = [p for t in ([text] if isinstance(text, str) else text) for p in split_list(str(t))]
    if not items:
        # Nothing to run would report clean = robust and a RobustBench entry for no attack.
        raise ValueError("the list of attacks is empty; give at least one, e.g. "
                         "clean,pgd20,autoattack (clean alone: clean accuracy only)")
    specs: list[AttackSpec] = []
    for item in items:
        spec = _parse_one(item)
        if spec is None:
            continue
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"{spec.name!r} is listed twice")
        specs.append(spec)
    return specs


def _parse_one(item: str) -> AttackSpec | None:
    low = item.lower()
    if low == "clean":
        return None
    if low in ("fgsm", "autoattack", "square"):
        return AttackSpec(low, low)  # type: ignore[arg-type]
    m = re.fullmatch(r"(pgd|cw)(\d+)(?:x(\d+))?", low)
    if m:
        steps, restarts = _digits(m[2]), _digits(m[3] or "1")
        _check_count(item, "steps", steps, MAX_STEPS, m[2])
        _check_count(item, "restarts", restarts, MAX_RESTARTS, m[3])
        name = f"{m[1]}{steps}" + (f"x{restarts}" if restarts > 1 else "")
        return AttackSpec(name, m[1], steps=steps, restarts=restarts)  # type: ignore[arg-type]
    m = re.fullmatch(r"torchattacks:([A-Za-z_]\w*)\s*(?:\((.*)\))?", item, flags=re.S)
    if m:
        return _torchattacks_spec(item, m[1], m[2] or "")
    raise ValueError(f"unknown attack {item!r}; valid forms: {VALID_FORMS}")


def _torchattacks_spec(item: str, cls: str, args: str) -> AttackSpec:
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        if None in kwargs:
            raise ValueError
    except (SyntaxError, ValueError):
        raise ValueError(f"cannot read the arguments of {item!r}; write "
                         "torchattacks:NAME(key=value, ...) with literal values") from None
    try:
        import torchattacks
    except ImportError:
        raise ValueError(f"{item!r} needs torchattacks (pip install "
                         "'robustkit[torchattacks]')") from None
    if not isinstance(getattr(torchattacks, cls, None), type):
        raise ValueError(f"torchattacks has no attack class {cls!r}")
    name = f"torchattacks:{cls}" + (f"({args.strip()})" if kwargs else "")
    return AttackSpec(name, "torchattacks", cls=cls, kwargs=kwargs)


def strength(specs: list[AttackSpec]) -> dict[str, tuple[str, int, int]]:
    """``name -> (family, steps, restarts)`` for ``masking.post_checks``: the PGD-CE and CW
    families (``pgd-ce``, ``pgd-cw``). An attack with at least the steps and the restarts of
    another must not give a higher accuracy (``pgd20x5`` over ``pgd20``); ``pgd20x5`` and
    ``pgd50`` are not ranked against each other."""
    return {s.name: ("pgd-ce" if s.kind == "pgd" else "pgd-cw", s.steps, s.restarts)
            for s in specs if s.kind in ("pgd", "cw")}


def targets_needed(specs: list[AttackSpec], aa_version: str = "standard",
                   aa_attacks: list[str] | None = None) -> int:
    """Target classes the configured targeted attacks need (0 when none is targeted)."""
    if not any(s.kind == "autoattack" for s in specs):
        return 0
    if aa_version == "custom":
        return AA_TARGETS if {"apgd-t", "fab-t"} & set(aa_attacks or ()) else 0
    return AA_TARGETS


def check_aa_attacks(aa_version: str, aa_attacks: list[str] | None) -> None:
    """``aa_attacks`` names AutoAttack's sub-attacks, and only with ``aa_version="custom"``.

    Raises:
        ValueError: a custom version without attacks, attacks without it, or an unknown name.
    """
    if aa_version == "custom" and not aa_attacks:
        raise ValueError(f"the custom version needs a list of attacks: some of "
                         f"{', '.join(AA_ATTACKS)}")
    if aa_version != "custom" and aa_attacks:
        raise ValueError(f"a list of attacks needs the custom version, got {aa_version!r}")
    for a in aa_attacks or ():
        if a not in AA_ATTACKS:
            raise ValueError(f"unknown AutoAttack attack {a!r}; valid: {', '.join(AA_ATTACKS)}")


def _version(package: str) -> str | None:
    """An attack backend's installed version (results.json and the resume fingerprint)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_attacks(specs: list[AttackSpec], model: nn.Module, *, eps: float,
                  norm: Literal["Linf", "L2"] = "Linf", seed: int = 0,
                  aa_version: Literal["standard", "plus", "custom"] = "standard",
                  aa_attacks: list[str] | None = None) -> tuple[dict, dict[str, dict]]:
    """Build the attacks; returns ``(name -> Attack, name -> exact settings for results.json)``.

    PGD draws its random starts from a CPU ``torch.Generator`` (reseeded per batch by
    ``evaluate_attacks``), so the same seed gives the same starts on CPU and GPU.
    """
    import torch

    from robustkit.attacks import FGSM, PGD, AutoAttack, create_attack

    check_aa_attacks(aa_version, aa_attacks)
    attacks, settings = {}, {}
    for s in specs:
        if s.kind in ("pgd", "cw"):
            kw = dict(eps=eps, alpha=ALPHA_FRACTION * eps, steps=s.steps, random_start=True,
                      norm=norm, loss="ce" if s.kind == "pgd" else "cw", restarts=s.restarts,
                      stop_on_success=True, select="best")
            attacks[s.name] = PGD(model, generator=torch.Generator(), **kw)
            settings[s.name] = {"class": "PGD", "family": s.kind, **kw}
        elif s.kind == "fgsm":
            attacks[s.name] = FGSM(model, eps=eps, norm=norm)
            settings[s.name] = {"class": "FGSM", "family": "fgsm", "eps": eps, "norm": norm}
        elif s.kind in ("autoattack", "square"):
            version = aa_version if s.kind == "autoattack" else "custom"
            which = (aa_attacks if version == "custom" else None) if s.kind == "autoattack" \
                else ["square"]
            attacks[s.name] = AutoAttack(model, eps=eps, norm=norm, version=version,
                                         attacks=which, seed=seed)
            settings[s.name] = {"class": "AutoAttack", "family": s.kind, "version": version,
                                "attacks": which, "eps": eps, "norm": norm, "seed": seed,
                                "backend": "pyautoattack",
                                "backend_version": _version("pyautoattack")}
        else:
            import torchattacks

            # Unbounded attacks (CW, DeepFool) take no eps: post_checks flags their perturbation.
            takes_eps = "eps" in inspect.signature(getattr(torchattacks, s.cls).__init__).parameters
            kw = {**({"eps": eps} if takes_eps else {}), **s.kwargs}
            attacks[s.name] = create_attack(f"torchattacks:{s.cls}", model, **kw)
            settings[s.name] = {"class": f"torchattacks.{s.cls}", "family": "torchattacks",
                                "norm": norm, "backend_version": _version("torchattacks"), **kw}
    return attacks, settings

"""``EvalResult`` -> ``results.json`` (fractions in [0, 1]) and RobustBench's model_info JSON.

RobustBench's leaderboard files (``model_info/<dataset>/<threat_model>/<name>.json``) hold
percentages as strings with two decimals and ε as text (``"8/255"``, ``"0.5"``); robustkit writes
the same fields. ``autoattack_acc`` is a leaderboard number only for AutoAttack ``standard`` on the
full test set of a RobustBench dataset at its ε, run alone; anything else (another version, a
subset, a cascade after other attacks) gets a footnote saying what it is, and so does every
failed check (gradient masking, perturbation size).

``results.json`` says what each accuracy means (``accuracy_meaning``: the attacks it is cumulative
over, in words too), and for AutoAttack the accuracy after each sub-attack (``components``) and
how many points each sub-attack broke (``broken_by``).

Example:
    >>> res = build_results(result, model="resnet18", dataset="cifar10", threat_model="Linf",
    ...                     eps=8/255, seed=0, subset="first 1000 test images")
    >>> write_model_info("runs/eval", res, name="resnet18")
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
import time
from pathlib import Path
from typing import Any

from robustkit.evaluation.state import write_json
from robustkit.utils import safe_name

__all__ = ["build_results", "write_results", "model_info", "write_model_info", "format_eps",
           "accuracy_meaning", "broken_by_counts", "sha256_file", "versions", "PROTOCOL_NOTES",
           "LEADERBOARD_EPS", "FULL_TEST_SIZE", "MASKING_CHECKS"]

# RobustBench leaderboards robustkit can produce entries for, with their ε (methods.md §1.6).
LEADERBOARD_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5,
                   ("cifar100", "Linf"): 8 / 255}
# Size of each dataset's full test split (Tiny-ImageNet: the labelled val split).
FULL_TEST_SIZE = {"cifar10": 10_000, "cifar100": 10_000, "mnist": 10_000, "tinyimagenet": 10_000}

PROTOCOL_NOTES = {
    "standalone": "Each attack runs on every clean-correct point, so each attack's accuracy is "
                  "its own number (AutoAttack cascades its sub-attacks by its own protocol). "
                  "'robust' is the per-example AND over all attacks (worst case).",
    "cascade": "Each attack runs only on points still robust after the earlier ones, so an "
               "attack's accuracy is the robust accuracy after it and all attacks before it. "
               "'robust' is the per-example AND over all attacks (worst case).",
}
# Checks whose failure means the gradients cannot be trusted (robustkit.evaluation.masking).
MASKING_CHECKS = ("black_box:", "gradient_gap:", "monotone:")


def format_eps(eps: float) -> str:
    """ε as RobustBench writes it: ``"8/255"`` for a whole number of 255ths in (0, 1) (to 1e-9)
    that six significant digits cannot write exactly, else the short decimal (``"0.5"``,
    ``"0.3"``, ``"0.2"`` rather than ``"51/255"``, ``"0"``, ``"1e-12"`` rather than ``"0/255"``).

    Example:
        >>> format_eps(8 / 255), format_eps(0.031), format_eps(0.2)
        ('8/255', '0.031', '0.2')
    """
    text = f"{eps:.6g}"
    k = eps * 255
    n = round(k) if math.isfinite(k) else 0
    if 1 <= n < 255 and abs(k - n) < 1e-9 and float(text) != eps:
        return f"{n}/255"
    return text


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages an evaluation depends on (``None`` when absent)."""
    out = {"python": platform.python_version()}
    for pkg in ("robustkit", "torch", "torchvision", "pyautoattack", "torchattacks", *extra):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_results(result, *, model: str, dataset: str, threat_model: str, eps: float,
                  seed: int, subset: str, checkpoint: str | Path | None = None,
                  architecture: str | None = None, attacks: dict[str, dict] | None = None,
                  checks: list | None = None, extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The ``results.json`` dictionary of one evaluation.

    Args:
        result: ``robustkit.evaluation.EvalResult``.
        model: the model spec (registry name, ``file.py:fn`` or ``robustbench:<name>``).
        dataset, threat_model, eps, seed: the evaluation's settings (ε in pixel units).
        subset: what was evaluated, e.g. ``"first 1000 test images"``.
        checkpoint: weights file; its sha256 and best/last tag are recorded.
        architecture: the network's name (e.g. ``"ResNet18"``).
        attacks: name -> exact settings (class, ε, α, steps, ...), as built.
        checks: ``Check`` objects or dicts from ``robustkit.evaluation.checks``.
        extra: more top-level fields (merged last).
    """
    from robustkit import __version__

    ckpt = None
    if checkpoint is not None:
        p = Path(checkpoint)
        ckpt = {"path": str(p), "sha256": sha256_file(p),
                "tag": p.stem if p.stem in ("best", "last") else None}
    acc = result.accuracy()
    out = {
        "model": model,
        "dataset": dataset,
        "threat_model": threat_model,
        "eps": float(eps),
        "eps_text": format_eps(eps),
        "n_examples": result.n,
        "subset": subset,
        "seed": seed,
        "protocol": {"name": result.protocol, "note": PROTOCOL_NOTES[result.protocol]},
        "accuracy": acc,
        "accuracy_meaning": accuracy_meaning(result),
        "n_correct": {k: round(v * result.n) for k, v in acc.items()},
        "components": {k: {sub: f.sum().item() / max(result.n, 1) for sub, f in subs.items()}
                       for k, subs in result.components.items()},
        "broken_by": {k: broken_by_counts(result, k) for k in result.components},
        "time_s": {k: round(v, 3) for k, v in result.time_s.items()},
        "max_perturbation": result.max_perturbation,
        "checkpoint": ckpt,
        "architecture": architecture,
        "attacks": attacks or {k: {} for k in result.correct},
        "checks": [c if isinstance(c, dict) else c.to_dict() for c in (checks or [])],
        "robustkit_version": __version__,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.update(extra or {})
    return out


def accuracy_meaning(result) -> dict[str, dict[str, Any]]:
    """Per column of ``accuracy``: ``cumulative_after`` (the attacks it is robust after) and a
    ``description``. Under ``"cascade"`` an attack's column covers it and every earlier attack."""
    names = list(result.correct)
    out = {"clean": {"cumulative_after": [], "description": "accuracy without attack"}}
    for i, k in enumerate(names):
        before = names[:i] if result.protocol == "cascade" else []
        text = (f"robust accuracy after {', '.join(before)} and then {k} (cascade: {k} ran only "
                f"on the points still robust after {', '.join(before)})" if before else
                f"accuracy under {k} alone (run on every clean-correct point)")
        if k in result.components:
            text += f"; {k}'s sub-attacks ran in cascade: {', '.join(result.components[k])}"
        out[k] = {"cumulative_after": [*before, k], "description": text}
    out["robust"] = {"cumulative_after": names,
                     "description": "per-example worst case: correct under every attack"}
    return out


def broken_by_counts(result, name: str) -> dict[str, int]:
    """Points each sub-attack of ``name`` broke (first, in its run order)."""
    out, before = {}, result.attacked(name)
    for sub, after in result.components[name].items():
        out[sub] = int((before & ~after).sum())
        before = after
    return out


def write_results(out_dir: str | Path, results: dict[str, Any],
                  result=None) -> Path:
    """Write ``out_dir/results.json`` (and ``flags.json`` of per-sample 0/1 flags if ``result``).

    Raises:
        OutputError: a file cannot be written (named; files already written stay intact).
    """
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    write_json(path, results)
    if result is not None:
        flags = {"labels": result.labels.tolist(), "clean": result.clean.int().tolist()}
        flags.update({k: v.int().tolist() for k, v in result.correct.items()})
        flags["robust"] = result.robust.int().tolist()
        # per sub-attack: still correct after it (AutoAttack order); "components" is reserved
        flags["components"] = {k: {sub: f.int().tolist() for sub, f in subs.items()}
                               for k, subs in result.components.items()}
        write_json(out_dir / "flags.json", flags)
    return path


def model_info(results: dict[str, Any], *, name: str | None = None,
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """RobustBench leaderboard fields from a ``results.json`` dictionary.

    ``autoattack_acc`` is the accuracy under the (first) AutoAttack in ``results["attacks"]``
    (settings ``{"family": "autoattack", "version": ...}``), ``null`` when none ran; a footnote says
    when it is not a leaderboard number (other version, subset, ε or dataset).

    Args:
        results: from ``build_results``.
        name: the entry's ``name`` (default: ``results["model"]``).
        meta: overrides for ``link``, ``authors``, ``venue``, ``reported``, ``additional_data``...
    """
    acc = results["accuracy"]
    n, dataset, tm = results["n_examples"], results["dataset"], results["threat_model"]
    aa = [(k, s) for k, s in results["attacks"].items() if s.get("family") == "autoattack"]
    notes, aa_acc = [], None
    if not aa:
        attacks = ", ".join(k for k in acc if k not in ("clean", "robust")) or "none"
        notes.append(f"AutoAttack not run; worst case over {attacks}: {_pct(acc['robust'])}% "
                     f"on the {results['subset']}; not a leaderboard number")
    else:
        key, settings = aa[0]
        version = settings.get("version", "standard")
        aa_acc = _pct(acc[key])
        where = f"AA-{version}" + ("" if n == FULL_TEST_SIZE.get(dataset)
                                   else f" on the {results['subset']}")
        board = LEADERBOARD_EPS.get((dataset, tm))
        if board is not None and abs(board - results["eps"]) > 1e-9:
            where += f", eps = {results['eps_text']} instead of {format_eps(board)}"
        before = _cascaded_before(results, key)
        if where != "AA-standard" or board is None or before:
            notes.append(f"{where} (not a leaderboard number)")
        if before:
            notes.append(f"cascade: AutoAttack ran only on the points still robust after "
                         f"{', '.join(before)}, so autoattack_acc is the robust accuracy after "
                         f"{', '.join(before)} and AutoAttack together, not AutoAttack alone")
        if acc["robust"] < acc[key]:
            notes.append(f"worst case over all attacks run: {_pct(acc['robust'])}%")
    for c in results.get("checks", []):
        if c.get("severity", "ok" if c.get("passed", True) else "fail") == "fail":
            kind = ("gradient-masking check failed" if c["name"].startswith(MASKING_CHECKS)
                    else f"check {c['name']} failed")
            notes.append(f"{kind}: {c['message']}")
    info = {
        "link": "",
        "name": name or results["model"],
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "N/A",
        "architecture": results.get("architecture") or "",
        "eps": results["eps_text"],
        "clean_acc": _pct(acc["clean"]),
        "reported": None,
        "autoattack_acc": aa_acc,
    }
    if notes:
        info["footnote"] = "; ".join(notes)
    info.update(meta or {})
    return info


def write_model_info(out_dir: str | Path, results: dict[str, Any], *, name: str,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/model_info/<dataset>/<threat_model>/<name>.json``; returns its path.

    Each of the three parts is one file-name component (``utils.safe_name``: ``../x`` or
    ``/abs/x`` become ``_.._x-<hash>``, ``_abs_x-<hash>``), so the file is always inside
    ``out_dir``; the entry's ``name`` field keeps ``name`` as given.
    """
    path = (Path(out_dir) / "model_info" / safe_name(str(results["dataset"]), "dataset")
            / safe_name(str(results["threat_model"]), "threat_model")
            / f"{safe_name(name)}.json")
    write_json(path, model_info(results, name=name, meta=meta))
    return path


def _cascaded_before(results: dict[str, Any], key: str) -> list[str]:
    """The attacks that ran before ``key`` under the cascade protocol (empty otherwise)."""
    if results["protocol"]["name"] != "cascade":
        return []
    meaning = results.get("accuracy_meaning", {}).get(key)
    if meaning is not None:
        return [k for k in meaning["cumulative_after"] if k != key]
    names = [k for k in results["accuracy"] if k not in ("clean", "robust")]
    return names[:names.index(key)]


def _pct(fraction: float) -> str:
    """RobustBench's percentage strings, two decimals: ``0.8492 -> "84.92"``."""
    return f"{100 * fraction:.2f}"

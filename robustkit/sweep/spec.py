"""A sweep file -> the runs it names (architecture.md §2: ``sweep/spec.py``).

A sweep file is YAML::

    name: regularisers            # the sweep's name (a plain name)
    out: ~/runs/regularisers      # output root: one run directory per run, plus the summary
    base: configs/train/mnist_jr.yaml   # a training config (relative to the current folder)
    seeds: [0, 1]                 # each run once per seed (default [0]); sets the config's seed
    overrides: [trainer.epochs=2] # dotted key=value applied to every run
    grid:                         # cartesian product of the values
      objective.params.lam: [0.01, 0.1]
    list:                         # explicit override sets, each combined with every grid point
      - {objective.params.n_proj: 1}
      - {objective.params.n_proj: 2}
    groups:                       # optional: several methods in one sweep; each group takes
      - label: igr                # base/overrides/grid/list/seeds of its own (the top level's
        base: configs/train/mnist_igr.yaml   # are the defaults; overrides add up)
        grid: {objective.params.lam: [0.1, 1]}
    eval:                         # after training, the same images for every run
      dataset: mnist              # first ``n`` test images of this dataset
      data_root: ../shared/data
      n: 1000
      eps: 0.1
      attacks: clean,autoattack   # robustkit evaluate's --attacks
      checkpoint: last            # last | best
      aa_version: standard        # AutoAttack's version; custom: with aa_attacks [apgd-ce, ...]
    baseline: jr_lam0.01          # a run's name without its _seed<k>: the paired tests' reference;
                                  # or a label: each run is paired with the baseline group's run
                                  # at the same grid position and seed (matched grids)
    slurm: {partition: gpu, time: 120, gpus: 1, cpus: 4}   # --executor slurm (time in minutes)

Each run is named ``<label>[_<key><value>...]_seed<k>`` (the key's last dotted part, or the
whole key when two keys share it), made file-safe by :func:`robustkit.utils.safe_name`, and
trains in ``<out>/<name>`` with ``trainer.resume=auto``: rerunning resumes it.

Example:
    >>> spec = load_sweep("configs/sweeps/smoke.yaml")
    >>> [r.name for r in spec.runs]
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustkit.errors import ConfigError
from robustkit.utils import check_plain_name, safe_name

__all__ = ["DONE", "RunSpec", "EvalSpec", "SweepSpec", "load_sweep", "parse_sweep", "expand_grid",
           "run_name"]

#: The file that marks a finished run (trained and evaluated), holding its record.
DONE = "sweep_done.json"
_TOP = ("name", "out", "base", "seeds", "overrides", "grid", "list", "groups", "eval",
        "baseline", "slurm", "description")
_GROUP = ("label", "base", "seeds", "overrides", "grid", "list")
_EVAL = ("dataset", "data_root", "n", "eps", "attacks", "checkpoint", "batch_size", "seed",
         "norm", "device", "aa_version", "aa_attacks")
_SLURM = ("partition", "time", "gpus", "cpus", "mem_gb", "account", "qos")


@dataclass
class EvalSpec:
    """What every run is evaluated with after training: the same images and attacks."""

    dataset: str = "mnist"
    data_root: str | None = None
    n: int = 1000
    eps: float | None = None
    attacks: str = "clean,pgd20"
    checkpoint: str = "last"
    batch_size: int = 500
    seed: int = 0
    norm: str = "Linf"
    device: str | None = None
    aa_version: str = "standard"  # standard | plus | custom (then aa_attacks)
    aa_attacks: list[str] | None = None  # with custom, e.g. [apgd-ce, apgd-t]


@dataclass
class RunSpec:
    """One run of a sweep: a config, its overrides and where it trains."""

    name: str
    label: str
    config: str
    overrides: tuple[str, ...]
    params: dict[str, Any]
    seed: int
    out_dir: Path
    index: int = 0  # position of its grid point in its group (pairs runs with a label baseline)

    @property
    def stem(self) -> str:
        """The name without ``_seed<k>``: what ``baseline`` names."""
        return self.name[: -len(f"_seed{self.seed}")]


@dataclass
class SweepSpec:
    """A parsed sweep file: its runs, evaluation, baseline and SLURM options."""

    name: str
    out: Path
    runs: list[RunSpec]
    eval: EvalSpec | None = None
    baseline: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def load_sweep(path: str | os.PathLike, out: str | os.PathLike | None = None) -> SweepSpec:
    """Read and expand a sweep file; ``out`` replaces its ``out:`` (the output root).

    Raises:
        ConfigError: a missing or unreadable file, an unknown key, a bad value (one line).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"sweep file {str(p)!r} is not valid YAML: {first}") from None
    spec = parse_sweep(data, out=out)
    spec.path = p
    return spec


def parse_sweep(data: Any, out: str | os.PathLike | None = None) -> SweepSpec:
    """A sweep file's mapping (as read from YAML) -> ``SweepSpec`` (see the module docstring).

    Raises:
        ConfigError: naming the key, for anything malformed.
    """
    top = _mapping(data, "sweep file", _TOP)
    name = _name(top.get("name"), "name")
    root = out if out is not None else top.get("out")
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError("sweep key 'out': give the output root (a folder), e.g. out: runs/sweep")
    root = Path(os.path.expanduser(str(root)))
    groups = top.get("groups")
    if groups is None:
        groups = [{}]
    elif not isinstance(groups, list) or not groups:
        raise ConfigError("sweep key 'groups': a non-empty list of mappings")
    runs: list[RunSpec] = []
    for i, g in enumerate(groups):
        g = _mapping(g, f"groups[{i}]", _GROUP)
        runs.extend(_group_runs(top, g, i, root))
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f"sweep: two runs share the name {r.name!r} (give the groups "
                              "different labels or different values)")
        seen[r.name] = 1
    ev = _eval(top["eval"]) if top.get("eval") is not None else None
    baseline = top.get("baseline")
    if baseline is not None:
        stems = {r.stem for r in runs} | {r.label for r in runs}
        if baseline not in stems:
            raise ConfigError(f"sweep key 'baseline': {baseline!r} is neither a run nor a label "
                              f"of this sweep (known: {', '.join(sorted(stems))})")
    slurm = _mapping(top.get("slurm") or {}, "slurm", _SLURM)
    return SweepSpec(name, root, runs, ev, baseline, dict(slurm))


def expand_grid(grid: dict[str, list[Any]] | None,
                items: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every combination: the cartesian product of ``grid`` (in key order), each combined
    with every mapping of ``items`` (the explicit list form; ``None``: just the grid).

    Example:
        >>> expand_grid({"a": [1, 2], "b": [3]}, [{"c": 0}, {"c": 1}])
        [{'a': 1, 'b': 3, 'c': 0}, {'a': 1, 'b': 3, 'c': 1}, {'a': 2, 'b': 3, 'c': 0}, ...]
    """
    grid = grid or {}
    keys = list(grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    extra = items if items else [{}]
    return [{**p, **e} for p in points for e in extra]


def run_name(label: str, params: dict[str, Any], seed: int) -> str:
    """``<label>[_<key><value>...]_seed<k>``, one safe file-name component (deterministic)."""
    last = [k.rsplit(".", 1)[-1] for k in params]
    parts = [label]
    for key, short in zip(params, last, strict=True):
        parts.append(f"{short if last.count(short) == 1 else key}{_text(params[key])}")
    return safe_name("_".join(parts), "run name") + f"_seed{seed}"


def _group_runs(top: dict[str, Any], g: dict[str, Any], i: int, root: Path) -> list[RunSpec]:
    """A group's runs: its keys over the top level's (grid merged, overrides added up)."""
    where = f"groups[{i}]" if "groups" in top else "sweep"
    base = g.get("base", top.get("base"))
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: key 'base' (a training config file) is missing")
    if not Path(base).is_file():
        raise ConfigError(f"{where} key 'base': config {base!r} not found (paths are relative "
                          "to the current folder)")
    label = g.get("label", Path(base).stem)
    label = safe_name(_name(label, f"{where} key 'label'"), "label")
    seeds = g.get("seeds", top.get("seeds", [0]))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{where} key 'seeds': a list of integers, got {seeds!r}")
    common = (_overrides(top.get("overrides"), "sweep key 'overrides'")
              + _overrides(g.get("overrides"), f"{where} key 'overrides'"))
    grid = {**_grid(top.get("grid"), "sweep key 'grid'"),
            **_grid(g.get("grid"), f"{where} key 'grid'")}
    items = _items(g.get("list", top.get("list")), f"{where} key 'list'")
    runs = []
    for index, params in enumerate(expand_grid(grid, items)):
        for seed in seeds:
            name = run_name(label, params, seed)
            out = root / name
            overrides = tuple(common + [f"{k}={_yaml(v)}" for k, v in params.items()] + [
                f"seed={seed}", f"trainer.out_dir={out}", "trainer.resume=auto",
                "log.progress=false"])
            runs.append(RunSpec(name, label, base, overrides, dict(params), seed, out, index))
    return runs


def _mapping(data: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")
    return data


def _name(value: Any, where: str) -> str:
    try:
        return check_plain_name(value if isinstance(value, str) else "", where)
    except ValueError as err:
        raise ConfigError(str(err) if isinstance(value, str) else
                          f"{where}: a plain name is required, got {value!r}") from None


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={_yaml(v)}" for k, v in value.items()]
    if not isinstance(value, list) or any(not isinstance(v, str) or "=" not in v for v in value):
        raise ConfigError(f"{where}: a list of key=value strings (or a mapping)")
    return list(value)


def _grid(value: Any, where: str) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping of dotted key -> list of values")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, list) or not v:
            raise ConfigError(f"{where}: {k!r} needs a non-empty list of values, got {v!r}")
    return value


def _items(value: Any, where: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or any(
            not isinstance(v, dict) or not v for v in value):
        raise ConfigError(f"{where}: a non-empty list of mappings (dotted key -> value)")
    return value


def _eval(value: Any) -> EvalSpec:
    ev = _mapping(value, "eval", _EVAL)
    spec = EvalSpec(**ev)
    from robustkit.utils import parse_number

    if spec.eps is not None:
        try:
            spec.eps = parse_number(spec.eps)
        except ValueError as err:
            raise ConfigError(f"eval key 'eps': {err}") from None
    for key in ("n", "batch_size"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval key {key!r}: an integer >= 1, got {v!r}")
    if spec.checkpoint not in ("last", "best"):
        raise ConfigError(f"eval key 'checkpoint': 'last' or 'best', got {spec.checkpoint!r}")
    if not isinstance(spec.attacks, str) or not spec.attacks:
        raise ConfigError("eval key 'attacks': a string such as clean,pgd20,autoattack")
    from robustkit.attacks.specs import parse_attacks
    from robustkit.errors import user_input

    with user_input(ConfigError, "eval key 'attacks'"):  # before any run trains
        parse_attacks(spec.attacks)
    if spec.aa_version not in ("standard", "plus", "custom"):
        raise ConfigError(f"eval key 'aa_version': standard, plus or custom, got "
                          f"{spec.aa_version!r}")
    if (spec.aa_version == "custom") != bool(spec.aa_attacks):
        raise ConfigError("eval keys 'aa_version'/'aa_attacks': aa_attacks (e.g. [apgd-ce, "
                          "apgd-t]) goes with aa_version: custom, and only with it")
    return spec


def _text(v: Any) -> str:
    """A value as it appears in a run name: 0.1 -> '0.1', 1e-3 -> '0.001', [1, 2] -> '1,2'."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_text(x) for x in v)
    return str(v)


def _yaml(v: Any) -> str:
    """A value as the right-hand side of an override (YAML): JSON for all but strings."""
    return v if isinstance(v, str) else json.dumps(v)

"""Run a sweep: each run trained (resumably) and evaluated on the same images.

Three ways to run, one function per run (:func:`run_one`, importable, so it pickles):

- ``executor="none"``: in this process (``jobs=1``) or ``jobs`` processes at a time
  (``concurrent.futures.ProcessPoolExecutor``, spawned; each with cores / jobs torch threads);
- ``executor="local"``: submitit's ``LocalExecutor`` (one subprocess per run, ``jobs`` at a time,
  logs in ``<out>/submitit/``);
- ``executor="slurm"``: submitit's SLURM executor, one job array (``jobs`` at a time) with the
  sweep file's ``slurm:`` options (``partition``, ``time`` in minutes, ``gpus``, ``cpus``...).

A run is *finished* when its folder holds ``sweep_done.json`` (written after its evaluation)
made with the sweep's current ``eval`` settings: rerunning a sweep skips finished runs and
resumes the others from their ``last.pt`` (``trainer.resume=auto``); a half-done evaluation
resumes from its ``eval/state``; a run evaluated with other ``eval`` settings is evaluated again
(not retrained), so every run of a sweep is judged on the same images.

Example:
    >>> result = run(load_sweep("configs/sweeps/smoke.yaml"), jobs=2)
    >>> result.table.runs
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from robustkit.errors import ConfigError, UserError
from robustkit.sweep.spec import DONE, EvalSpec, RunSpec, SweepSpec

__all__ = ["run", "run_one", "status", "SweepResult", "DONE", "EXECUTORS"]

logger = logging.getLogger(__name__)

EXECUTORS = ("none", "local", "slurm")
_INIT = "sweep_init.json"  # the penalty at initialisation, written before the first step
_TIME = "sweep_time.json"  # training seconds, summed over the invocations that finished


@dataclass
class SweepResult:
    """What ``run`` did: finished runs skipped, runs run now, failures (name -> message)."""

    spec: SweepSpec
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    table: Any = None  # a SweepTable (robustkit.sweep.collect) when every run has finished


def status(r: RunSpec, ev: EvalSpec | None = None) -> str:
    """``"done"`` (evaluated), ``"stale"`` (evaluated with other ``eval`` settings than ``ev``:
    it is evaluated again, not retrained), ``"partial"`` (a ``last.pt`` to resume) or
    ``"new"``."""
    if (r.out_dir / DONE).is_file():
        if ev is not None and _read(r.out_dir / DONE).get("eval") != _plain_eval(ev):
            return "stale"
        return "done"
    return "partial" if (r.out_dir / "last.pt").is_file() else "new"


def _plain_eval(ev: EvalSpec) -> dict[str, Any]:
    """The eval settings as ``sweep_done.json`` stores them (JSON types)."""
    return json.loads(json.dumps(vars(ev)))


def run(spec: SweepSpec, *, jobs: int = 1, executor: str = "none", collect: bool = True,
        dry_run: bool = False, only: Sequence[str] | None = None) -> SweepResult:
    """Train and evaluate every unfinished run of ``spec``; finished runs are skipped.

    Args:
        spec: from ``load_sweep``/``parse_sweep``.
        jobs: runs at a time (processes, local submitit jobs, or the SLURM array's limit).
        executor: ``"none"``, ``"local"`` or ``"slurm"`` (module docstring).
        collect: build the table (``result.table``) when no run is left unfinished.
        dry_run: decide what would run; run nothing.
        only: run only these groups (labels) or runs (names, with or without ``_seed<k>``),
            to split one sweep over processes or machines that share its output folder
            (give each a disjoint part); the others are neither run nor counted as failed.

    Raises:
        ConfigError: a bad ``jobs``/``executor``, ``eval`` missing from the sweep, or an
            ``only`` entry that names no label or run (the labels listed).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs: an integer >= 1, got {jobs!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: one of {', '.join(EXECUTORS)}, got {executor!r}")
    if spec.eval is None:
        raise ConfigError("sweep key 'eval' is missing: every run is evaluated after training")
    result = SweepResult(spec)
    chosen = _select(spec, only)
    todo = [r for r in chosen if status(r, spec.eval) != "done"]
    result.skipped = [r.name for r in chosen if r not in todo]
    logger.info("sweep %s: %d runs, %d finished, %d to run (%s, %d at a time)", spec.name,
                len(spec.runs), len(result.skipped), len(todo), executor, jobs)
    if dry_run or not todo:
        return _finish(result, collect and not dry_run)
    _check(todo, spec.eval)
    spec.out.mkdir(parents=True, exist_ok=True)
    if executor == "none":
        outcomes = _run_processes(todo, spec.eval, jobs)
    else:
        outcomes = _run_submitit(todo, spec, jobs, executor)
    for r, err in zip(todo, outcomes, strict=True):
        if err is None:
            result.ran.append(r.name)
        else:
            result.failed[r.name] = err
            logger.error("run %s failed: %s", r.name, err)
    return _finish(result, collect)


def _select(spec: SweepSpec, only: Sequence[str] | None) -> list[RunSpec]:
    """The runs ``only`` names (labels, run names, run names without the seed), in file order."""
    if only is None:
        return list(spec.runs)
    if isinstance(only, str) or not only:
        raise ConfigError(f"--only: a non-empty list of labels or run names, got {only!r}")
    known = {r.label for r in spec.runs} | {r.name for r in spec.runs} | \
        {r.stem for r in spec.runs}
    unknown = [o for o in only if o not in known]
    if unknown:
        labels = ", ".join(dict.fromkeys(r.label for r in spec.runs))
        raise ConfigError(f"--only: {', '.join(map(repr, unknown))} names no run of sweep "
                          f"{spec.name!r} (labels: {labels})")
    wanted = set(only)
    return [r for r in spec.runs if wanted & {r.label, r.name, r.stem}]


def run_one(r: RunSpec, ev: EvalSpec) -> dict[str, Any]:
    """Train ``r`` (resuming its ``last.pt``), evaluate it, write ``sweep_done.json``.

    Returns:
        The record written to ``sweep_done.json``.
    """
    import torch

    import robustkit
    from robustkit.config import build
    from robustkit.evaluation.results import write_json

    x, y = _images(ev)
    built = build(r.config, list(r.overrides))
    out = built.out_dir
    if built.resume is None:  # a fresh start: the model is at its initialisation
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / _INIT, {"penalty_init": _penalty(built, x, y)})
    spent = _read(out / _TIME).get("train_s", 0.0)
    if built.trainer.state.epoch < built.trainer.epochs:
        start = time.perf_counter()
        built.fit()
        spent += time.perf_counter() - start
        write_json(out / _TIME, {"train_s": spent})
    model = built.model
    if ev.checkpoint == "best" and (out / "best.pt").is_file():
        from robustkit.models import load_weights

        load_weights(model, out / "best.pt")
    model.eval()
    start = time.perf_counter()
    res = robustkit.evaluate(
        model, x, y, attacks=ev.attacks, eps=ev.eps, norm=ev.norm, dataset=ev.dataset,
        aa_version=ev.aa_version, aa_attacks=ev.aa_attacks,
        name=r.name, subset=f"first {len(y)} {ev.dataset} test images",
        batch_size=ev.batch_size, seed=ev.seed, device=ev.device or built.trainer.device,
        # overwrite: a state made for other weights (training went on since) is discarded;
        # one made for these weights and settings is resumed
        state_dir=out / "eval" / "state", overwrite=True)
    res.save(out / "eval")
    record = {
        "name": r.name, "label": r.label, "config": r.config, "params": r.params,
        "seed": r.seed, "index": r.index, "overrides": list(r.overrides),
        "objective": built.cfg.objective.name,
        "epochs": int(built.trainer.state.epoch), "train_s": spent,
        "eval_s": time.perf_counter() - start, "checkpoint": ev.checkpoint,
        "images_sha256": _digest(x, y), "eval": _plain_eval(ev),
        "penalty_init": _read(out / _INIT).get("penalty_init"),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / DONE, record)
    return record


def _check(todo: list[RunSpec], ev: EvalSpec) -> None:
    """Before anything trains: every run's config with its overrides, and the images.

    Raises:
        ConfigError: a run's config or override is bad (naming the run and the key).
        DataError: the evaluation images cannot be loaded.
    """
    from robustkit.config import load_config

    for r in todo:
        try:
            load_config(r.config, list(r.overrides))
        except ConfigError as err:
            raise ConfigError(f"run {r.name}: {' '.join(str(err).split())}") from None
    _images(ev)


def _images(ev: EvalSpec) -> tuple[Any, Any]:
    from robustkit.data import load
    from robustkit.errors import DataError, user_input

    with user_input(DataError, "eval"):
        return load(ev.dataset, "test", n=ev.n, root=ev.data_root)


def _penalty(built: Any, x: Any, y: Any) -> float | None:
    """The regulariser's term of the loss (loss - CE) at initialisation, on the first 256
    evaluation images; ``None`` for objectives without one."""
    from robustkit.sweep.calibrate import PENALTIES, penalty

    name = built.cfg.objective.name
    if name not in PENALTIES:
        return None
    from omegaconf import OmegaConf

    model = built.model  # penalty() works on a float64 copy
    params = OmegaConf.to_container(built.cfg.objective.params, resolve=True)
    return penalty(name, model, x[:256], y[:256], **params)


def _digest(x: Any, y: Any) -> str:
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _call(r: RunSpec, ev: EvalSpec, threads: int | None = None) -> str | None:
    """``run_one`` in a worker: None when it finished, else the error in one line.

    ``threads``: torch's intra-op threads in this worker (the cores shared by ``jobs``
    workers, so N processes do not each take every core).
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        run_one(r, ev)
        return None
    except UserError as err:
        return " ".join(str(err).split())


def _run_processes(todo: list[RunSpec], ev: EvalSpec, jobs: int) -> list[str | None]:
    if jobs == 1:  # in this process: a bug shows its traceback
        return [_call(r, ev) for r in todo]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_call, r, ev, threads) for r in todo]
        return [_outcome(f.result) for f in futures]


def _run_submitit(todo: list[RunSpec], spec: SweepSpec, jobs: int,
                  executor: str) -> list[str | None]:
    import submitit

    folder = spec.out / "submitit" / "%j"
    s = spec.slurm
    if executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(s.get("time", 24 * 60)),
                             gpus_per_node=int(s.get("gpus", 0)))
        outcomes: list[str | None] = []
        for i in range(0, len(todo), jobs):  # LocalExecutor starts all it gets: waves of jobs
            wave = [ex.submit(_call, r, spec.eval) for r in todo[i:i + jobs]]
            outcomes += [_outcome(j.result) for j in wave]
        return outcomes
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as err:  # 'Could not detect "srun"': not a SLURM node
        raise ConfigError(f"--executor slurm: {' '.join(str(err).split())[:200]}") from None
    params = {"timeout_min": int(s.get("time", 60)), "gpus_per_node": int(s.get("gpus", 0)),
              "cpus_per_task": int(s.get("cpus", 1)), "slurm_array_parallelism": jobs,
              "name": spec.name}
    if s.get("partition"):
        params["slurm_partition"] = s["partition"]
    if s.get("mem_gb"):
        params["mem_gb"] = s["mem_gb"]
    extra = {k: s[k] for k in ("account", "qos") if s.get(k)}
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    try:
        with ex.batch():
            submitted = [ex.submit(_call, r, spec.eval) for r in todo]
    except (FileNotFoundError, RuntimeError) as err:  # no sbatch here, or sbatch refused
        raise ConfigError(f"--executor slurm: submission failed ({' '.join(str(err).split())[:200]}"
                          "); is this a SLURM login node?") from None
    logger.info("submitted %d SLURM jobs (%s); waiting", len(submitted),
                ", ".join(j.job_id for j in submitted[:3]))
    return [_outcome(j.result) for j in submitted]


def _outcome(result: Any) -> str | None:
    """A worker's answer, or its crash in one line (the full traceback is in its log)."""
    try:
        return result()
    except Exception as err:  # a crashed worker: report it, keep the other runs going
        text = " ".join(str(err).split())
        return f"{type(err).__name__}: {text[-300:]}"


def _finish(result: SweepResult, collect: bool) -> SweepResult:
    if collect and all(status(r, result.spec.eval) == "done" for r in result.spec.runs):
        from robustkit.sweep.collect import collect as collect_table

        result.table = collect_table(result.spec)
    return result

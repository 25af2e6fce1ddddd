"""Sweeps: a grid of configs and overrides -> resumable runs -> one table with paired tests.

``load_sweep`` reads a sweep file (format: :mod:`robustkit.sweep.spec`), ``run`` trains and
evaluates every unfinished run (locally, N at a time, or through submitit: local or SLURM),
``collect`` turns the finished runs into a ``SweepTable`` (accuracies with Wilson CIs, McNemar
against a baseline with Holm's correction, the robust-vs-clean trade-off figure). ``robustkit
sweep FILE.yaml`` is the same calls.

Example:
    >>> spec = load_sweep("configs/sweeps/smoke.yaml")
    >>> result = run(spec, jobs=2)
    >>> collect(spec).tests
"""

from robustkit.sweep.collect import SweepTable, collect, holm, mcnemar, tradeoff_figure, wilson
from robustkit.sweep.launch import SweepResult, run, run_one, status
from robustkit.sweep.spec import (
    EvalSpec,
    RunSpec,
    SweepSpec,
    expand_grid,
    load_sweep,
    parse_sweep,
    run_name,
)

__all__ = ["load_sweep", "parse_sweep", "expand_grid", "run_name", "SweepSpec", "RunSpec",
           "EvalSpec", "run", "run_one", "status", "SweepResult", "collect", "SweepTable",
           "mcnemar", "holm", "wilson", "tradeoff_figure"]

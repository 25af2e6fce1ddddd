"""Mutation testing of one module with mutmut, in a scratch copy of the checkout.

``make mutate MODULE=robustkit/objectives/srd_dat.py`` (or a folder such as
``robustkit/training/callbacks/``) copies the working tree (tracked and untracked, not ignored
files, as they are now) to ``.mutate/<module>/``, configures mutmut there to mutate only that
module and to run only the test files that cover it, runs ``mutmut run``, and writes
``.mutate/<module>/summary.json`` (mutants, killed, survived, timeouts, the survivors' names) and
prints the survivors. The checkout itself is never modified, so other work can go on beside it.

The covering test files come from ``COVERING`` below, else from the tests that import the module;
``TESTS="tests/a.py tests/b.py"`` overrides both. ``tests/MUTATION.md`` keeps the tally and the
reasons a surviving mutant is equivalent.

Example:
    make mutate MODULE=robustkit/objectives/schedules.py
    .venv/bin/python tests/mutate.py robustkit/objectives/schedules.py --max-children 2
    cd .mutate/robustkit_objectives_schedules && ../../.venv/bin/mutmut show <mutant name>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module (or folder) -> the test files (or pytest node ids, ``file.py::test``) that pin it. A
# module not listed falls back to the test files that import it by its dotted name.
COVERING: dict[str, list[str]] = {
    "robustkit/objectives/srd_dat.py": [
        "tests/test_srd_dat_oracle.py", "tests/test_objectives.py",
        "tests/test_objectives_oracles.py"],
    "robustkit/objectives/functional.py": [
        "tests/test_srd_dat_oracle.py", "tests/test_objectives.py",
        "tests/test_objectives_oracles.py"],
    "robustkit/objectives/fat.py": [
        "tests/test_objectives.py", "tests/test_objectives_oracles.py", "tests/test_schedules.py"],
    "robustkit/objectives/fast_at.py": ["tests/test_fast_at.py"],
    "robustkit/objectives/schedules.py": [
        "tests/test_schedules.py", "tests/test_objectives.py"],
    # test_cli_train.py is left out: it repeats test_trainer.py's loop tests through the CLI and
    # adds ~25 s to every surviving mutant (536 mutants ran ~100 min with it on 2 shared cores)
    "robustkit/training/trainer.py": [
        "tests/test_trainer.py", "tests/test_checkpoint.py", "tests/test_trainer_rng_resume.py"],
    "robustkit/training/callbacks/": [
        "tests/test_trainer.py", "tests/test_checkpoint.py", "tests/test_saliency_callback.py",
        "tests/test_sensitivity_callback.py", "tests/test_runs_train_io.py",
        "tests/test_runs_train_dir.py", "tests/test_cli_train.py"],
    # The callbacks folder as a whole runs for hours on 2 shared cores (every CLI run in
    # test_runs_train_* goes through all of them): #18 mutated it one file at a time, each with
    # the tests of that file and only the CLI tests aimed at it (node ids). checkpoint.py: no
    # CLI test (with the 4 best.pt resume tests of test_runs_train_dir and the full-disk one of
    # test_runs_train_io, 357 mutants took ~70 min): test_trainer.py pins best.pt's reconciling
    # at the Trainer level.
    "robustkit/training/callbacks/base.py": [
        "tests/test_saliency_callback.py", "tests/test_sensitivity_callback.py",
        "tests/test_trainer.py"],
    "robustkit/training/callbacks/checkpoint.py": [
        "tests/test_trainer.py", "tests/test_checkpoint.py"],
    "robustkit/training/callbacks/evaluation.py": [
        "tests/test_trainer.py",
        "tests/test_cli_train.py::test_eval_n_scores_exactly_that_many_images",
        *(f"tests/test_eval_shard.py::{t}" for t in (
            "test_eval_callback_runs_the_evaluation_runner",
            "test_eval_callback_builds_attacks_on_the_bare_model",
            "test_eval_callback_bad_arguments"))],
    "robustkit/training/callbacks/jsonl.py": [
        "tests/test_trainer.py",
        "tests/test_runs_train_dir.py::test_resumed_metrics_jsonl_equals_an_uninterrupted_run",
        "tests/test_runs_train_io.py::test_a_full_disk_is_one_line_and_corrupts_nothing"],
    "robustkit/training/callbacks/tensorboard.py": [
        "tests/test_trainer.py", "tests/test_saliency_callback.py",
        "tests/test_runs_train_dir.py::test_tensorboard_resumes_with_purge_step_after_the_checkpoint"],
    "robustkit/training/callbacks/saliency.py": ["tests/test_saliency_callback.py"],
    "robustkit/training/callbacks/sensitivity.py": ["tests/test_sensitivity_callback.py"],
    # Evaluation, attack specs, transforms (#18): the test files that call the module, each
    # run under ~30 min on 2 shared cores. Left out: test_eval_torchrun (torchrun subprocesses)
    # and the CLI half of test_eval_fingerprint (AutoAttack runs of ~10 s: one surviving
    # mutant cost ~90 s there); build_attacks has unit tests in test_attack_specs instead.
    "robustkit/evaluation/protocol.py": [
        "tests/test_evaluation.py", "tests/test_eval_resume.py", "tests/test_eval_inputs.py",
        "tests/test_eval_state.py", "tests/test_eval_masking.py", "tests/test_eval_shard.py",
        *(f"tests/test_eval_fingerprint.py::{t}" for t in (
            "test_library_field_refused", "test_norm_mixed_the_perturbation_size",
            "test_state_version_refused", "test_versions_refused",
            "test_world_size_starts_afresh_in_its_own_folder",
            "test_fingerprint_records_the_versions", "test_a_rank_without_shard_evaluates_alone",
            "test_ranks_share_a_state_failure", "test_a_sharded_rank_evaluates_only_its_batches",
            "test_cascade_attack_order_is_never_mixed")),
        # EvalResult's views (to_dict, to_frame, plot, save, summary): the quick tests of them
        *(f"tests/test_python_api.py::{t}" for t in (
            "test_to_frame_rows_match_the_flags", "test_plot_html_table_and_save",
            "test_a_result_without_settings_cannot_be_saved",
            "test_evaluate_a_module_with_built_attacks"))],
    "robustkit/evaluation/checks.py": [
        "tests/test_checks.py", "tests/test_check_edges.py", "tests/test_evaluation.py",
        "tests/test_eval_inputs.py", "tests/test_eval_masking.py", "tests/test_masking_effort.py"],
    "robustkit/evaluation/results.py": [
        "tests/test_evaluation.py", "tests/test_checks.py", "tests/test_check_edges.py",
        "tests/test_eval_inputs.py", "tests/test_eval_masking.py", "tests/test_eval_resume.py",
        "tests/test_eval_cli.py", "tests/test_cli_evaluate.py", "tests/test_output_names.py"],
    "robustkit/evaluation/masking.py": [
        "tests/test_checks.py", "tests/test_check_edges.py", "tests/test_masking_effort.py",
        "tests/test_eval_masking.py", "tests/test_eval_inputs.py", "tests/test_evaluation.py"],
    "robustkit/attacks/specs.py": [
        "tests/test_attack_specs.py", "tests/test_masking_effort.py", "tests/test_cli_evaluate.py"],
    "robustkit/data/transforms.py": ["tests/test_data.py", "tests/test_train_transform.py"],
}


def slug(module: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", module.strip("/").removesuffix(".py")).strip("_")


def covering_tests(module: str) -> list[str]:
    """The test files for ``module``: ``COVERING``, else those importing its dotted name."""
    key = module if module in COVERING else module.rstrip("/") + "/"
    listed = COVERING.get(module) or COVERING.get(key)
    if listed:
        return [t for t in listed if (ROOT / t.split("::")[0]).exists()]
    dotted = module.strip("/").removesuffix(".py").replace("/", ".")
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if dotted in path.read_text(encoding="utf-8"):
            found.append(str(path.relative_to(ROOT)))
    return found


def scratch_copy(dest: Path) -> None:
    """The working tree as it is now (tracked + untracked, not ignored) into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def configure(dest: Path, module: str, tests: list[str], max_children: int) -> None:
    """Append a ``[tool.mutmut]`` section to the copy's pyproject.toml."""
    glob = module.rstrip("/") + "/*" if (ROOT / module).is_dir() else module
    lines = [
        "", "[tool.mutmut]",
        'source_paths = ["robustkit"]',
        f"only_mutate = [{json.dumps(glob)}]",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        # torch is not fork-safe after a test run in the same process
        'process_isolation = "forkserver"',
        f"max_children = {max_children}",
        'also_copy = ["configs", "experiments", "train", "evaluate", "benchmarks", "README.md"]',
    ]
    with open(dest / "pyproject.toml", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def parse_results(text: str) -> dict[str, list[str]]:
    """``mutmut results --all true`` lines ``name: status`` grouped by status."""
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        name, status = (part.strip() for part in line.rsplit(":", 1))
        if name and status:
            groups.setdefault(status, []).append(name)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a file or folder under robustkit/, e.g. "
                        "robustkit/objectives/srd_dat.py")
    parser.add_argument("--tests", default="", help="space-separated test files (default: "
                        "COVERING in this script, else the tests importing the module)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs")
    parser.add_argument("--keep", action="store_true", help="reuse an existing scratch copy "
                        "(mutmut then resumes where it stopped)")
    args = parser.parse_args(argv)
    module = args.module.strip()
    if not (ROOT / module).exists() or not module.startswith("robustkit/"):
        parser.error(f"MODULE must be a file or folder under robustkit/, got {module!r}")
    tests = args.tests.split() or covering_tests(module)
    if not tests:
        parser.error(f"no test file covers {module}; pass TESTS=...")
    dest = ROOT / ".mutate" / slug(module)
    if dest.exists() and not args.keep:
        shutil.rmtree(dest)
    if not dest.exists():
        scratch_copy(dest)
        configure(dest, module, tests, args.max_children)
    mutmut = Path(sys.executable).with_name("mutmut")
    print(f"mutate {module} with {' '.join(tests)} in {dest.relative_to(ROOT)}", flush=True)
    # mutmut redraws a spinner many times a second: its output goes to a log, not the terminal
    # one torch thread per mutant process: max_children processes share the cores already
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(dest / "mutmut.log", "w", encoding="utf-8") as log:
        run = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children)],
                             cwd=dest, stdout=log, stderr=subprocess.STDOUT, env=env)
    if run.returncode:
        tail = (dest / "mutmut.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        print(f"mutmut run failed (exit {run.returncode}); end of mutmut.log:\n{tail}")
    res = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True)
    groups = parse_results(res.stdout)
    total = sum(len(v) for v in groups.values())
    summary = {
        "module": module, "tests": tests, "mutants": total,
        "killed": len(groups.get("killed", [])),
        "survived": groups.get("survived", []),
        "timeout": groups.get("timeout", []),
        "other": {k: v for k, v in groups.items() if k not in ("killed", "survived", "timeout")},
    }
    diffs = {}
    for name in summary["survived"] + summary["timeout"]:
        shown = subprocess.run([str(mutmut), "show", name], cwd=dest, capture_output=True,
                               text=True).stdout
        diffs[name] = "\n".join(
            line for line in shown.splitlines()
            if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))
    summary["diffs"] = diffs
    (dest / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"{module}: {total} mutants, {summary['killed']} killed, "
          f"{len(summary['survived'])} survived, {len(summary['timeout'])} timeouts")
    for name, diff in diffs.items():
        print(f"  {name}:\n    " + diff.replace("\n", "\n    "))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())

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

Narrowed runs (a recount after tests were added, or a module too slow to run whole):
``--mutants NAME_OR_GLOB ...`` runs only those mutants (mutmut names such as
``robustkit.training.trainer.xǁTrainerǁfit__mutmut_3``, or fnmatch globs such as
``'robustkit.training.trainer.xǁTrainerǁfit__mutmut_*'``); ``--only-survivors-of SUMMARY``
runs only the survivors (and timeouts) recorded in an earlier ``summary.json``. Tests are only
ever added between the two runs, so a mutant killed then stays killed. A function whose code
changed since (its mutants may be numbered differently) is rerun whole by a glob: the earlier
summary records a hash of every function's source (``function_hashes``; for an older summary
without them, the module copy beside it is read). The summary of a narrowed run counts the
mutants not rerun as ``killed_earlier``; ``renumbered`` lists the functions rerun whole and
``diff_mismatch`` any former survivor whose diff is not the same as before (then the earlier
numbering did not hold: rerun that function with a glob). Copy the earlier summary.json out of
``.mutate/<module>/`` first, or pass it there: it is read before the scratch copy is replaced.

Example:
    make mutate MODULE=robustkit/objectives/schedules.py
    .venv/bin/python tests/mutate.py robustkit/objectives/schedules.py --max-children 2
    cd .mutate/robustkit_objectives_schedules && ../../.venv/bin/mutmut show <mutant name>
    .venv/bin/python tests/mutate.py robustkit/training/trainer.py --max-children 1 \
        --only-survivors-of .mutate/robustkit_training_trainer/summary.json
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
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
    # base.py and jsonl.py: test_callback_edges.py calls them directly (a stand-in trainer), so
    # the probe callbacks' slow tests (real training runs) are not needed to pin base.py, nor
    # test_trainer.py's (every one of its fits writes through JSONLCallback) to pin jsonl.py
    "robustkit/training/callbacks/base.py": [
        "tests/test_callback_edges.py", "tests/test_trainer.py"],
    "robustkit/training/callbacks/checkpoint.py": [
        "tests/test_trainer.py", "tests/test_checkpoint.py"],
    "robustkit/training/callbacks/evaluation.py": [
        "tests/test_trainer.py",
        "tests/test_cli_train.py::test_eval_n_scores_exactly_that_many_images",
        *(f"tests/test_eval_shard.py::{t}" for t in (
            "test_eval_callback_runs_the_evaluation_runner",
            "test_eval_callback_builds_attacks_on_the_bare_model",
            "test_eval_callback_bad_arguments"))],
    # jsonl.py: its two CLI tests (a resumed run's metrics.jsonl, a full disk) cost ~1 min per
    # mutant on 2 shared cores; test_callback_edges.py checks the same lines and the same cut-back
    # of a failed append directly
    "robustkit/training/callbacks/jsonl.py": ["tests/test_callback_edges.py"],
    "robustkit/training/callbacks/tensorboard.py": [
        "tests/test_tensorboard_callback_edges.py", "tests/test_trainer.py",
        "tests/test_saliency_callback.py",
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
        "tests/test_results_edges.py", "tests/test_evaluation.py", "tests/test_checks.py",
        "tests/test_check_edges.py",
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


def function_hashes(root: Path, module: str) -> dict[str, str]:
    """mutmut's name of every function and method of ``module`` (a file or folder under
    ``root``) -> a hash of its source (``ast.dump``: line numbers and comments do not count)."""
    path = root / module
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    out = {}
    for file in files:
        dotted = str(file.relative_to(root).with_suffix("")).replace("/", ".")
        dotted = dotted.removesuffix(".__init__")
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in tree.body:
            pairs = [(f"x_{node.name}", node)] if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [
                (f"x\u01c1{node.name}\u01c1{sub.name}", sub) for sub in node.body
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
            ] if isinstance(node, ast.ClassDef) else []
            for name, fn in pairs:
                out[f"{dotted}.{name}"] = hashlib.sha1(ast.dump(fn).encode()).hexdigest()[:16]
    return out


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def survivors_to_rerun(old: dict, old_hashes: dict[str, str] | None,
                       new_hashes: dict[str, str]) -> tuple[list[str], list[str]]:
    """The mutant names (or globs) to rerun for an earlier summary, and the functions rerun
    whole because their source changed (or is new) since that summary."""
    names = list(old["survived"]) + list(old["timeout"])
    if old_hashes is None:  # unknown: trust the numbering, the diffs are checked afterwards
        return names, []
    changed = sorted(f for f, h in new_hashes.items() if old_hashes.get(f) != h)
    keep = [n for n in names if function_of(n) not in changed]
    return keep + [f"{f}__mutmut_*" for f in changed], changed


def diffs_of(dest: Path, names: list[str]) -> dict[str, str | None]:
    """The ``-``/``+`` lines of each mutant's diff (``mutmut show``, in one process; None for a
    name that does not exist)."""
    code = (
        "import json, sys\n"
        "from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant\n"
        "out = {}\n"
        "for n in json.load(sys.stdin):\n"
        "    try:\n"
        "        out[n] = get_diff_for_mutant(n, path=find_mutant(n).path)\n"
        "    except Exception:\n"
        "        out[n] = None\n"
        "json.dump(out, sys.stdout)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=dest, input=json.dumps(names),
                         capture_output=True, text=True, check=True)
    return {n: None if d is None else "\n".join(
        line for line in d.splitlines()
        if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))
        for n, d in json.loads(run.stdout).items()}


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
    narrow = parser.add_mutually_exclusive_group()
    narrow.add_argument("--mutants", nargs="+", default=[], metavar="NAME_OR_GLOB",
                        help="run only these mutants (mutmut names or fnmatch globs)")
    narrow.add_argument("--only-survivors-of", type=Path, metavar="SUMMARY",
                        help="run only the survivors and timeouts of an earlier summary.json "
                        "(functions changed since are rerun whole)")
    args = parser.parse_args(argv)
    module = args.module.strip()
    if not (ROOT / module).exists() or not module.startswith("robustkit/"):
        parser.error(f"MODULE must be a file or folder under robustkit/, got {module!r}")
    tests = args.tests.split() or covering_tests(module)
    if not tests:
        parser.error(f"no test file covers {module}; pass TESTS=...")
    dest = ROOT / ".mutate" / slug(module)
    new_hashes = function_hashes(ROOT, module)
    selected, renumbered, old = list(args.mutants), [], None
    if args.only_survivors_of:  # read before the scratch copy (which may hold it) is replaced
        old = json.loads(args.only_survivors_of.read_text(encoding="utf-8"))
        old_hashes = old.get("function_hashes")
        beside = args.only_survivors_of.resolve().parent
        if old_hashes is None and (beside / module).exists():
            old_hashes = function_hashes(beside, module)
        selected, renumbered = survivors_to_rerun(old, old_hashes, new_hashes)
        if not selected:
            parser.error(f"{args.only_survivors_of} lists no survivor to rerun")
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
    if selected:
        print(f"only {len(selected)} mutant names/globs" + (
            f" (functions changed since, rerun whole: {', '.join(renumbered)})"
            if renumbered else ""), flush=True)
    start = time.monotonic()
    with open(dest / "mutmut.log", "w", encoding="utf-8") as log:
        run = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children),
                              *selected], cwd=dest, stdout=log, stderr=subprocess.STDOUT,
                             env=env)
    wall = time.monotonic() - start
    if run.returncode:
        tail = (dest / "mutmut.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        print(f"mutmut run failed (exit {run.returncode}); end of mutmut.log:\n{tail}")
    res = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True)
    groups = parse_results(res.stdout)
    total = sum(len(v) for v in groups.values())
    not_rerun = groups.pop("not checked", []) if selected else []
    summary = {
        "module": module, "tests": tests, "mutants": total,
        "killed": len(groups.get("killed", [])) + len(not_rerun),
        "survived": groups.get("survived", []),
        "timeout": groups.get("timeout", []),
        "other": {k: v for k, v in groups.items() if k not in ("killed", "survived", "timeout")},
        "wall_s": round(wall, 1), "max_children": args.max_children,
        "function_hashes": new_hashes,
    }
    if selected:  # narrowed: the mutants not rerun were killed by the earlier run
        summary.update(selected=selected, renumbered=renumbered,
                       rerun=total - len(not_rerun), killed_earlier=len(not_rerun))
    olddiffs = old.get("diffs", {}) if old is not None else {}
    recheck = [n for n in olddiffs if function_of(n) not in renumbered]
    shown = diffs_of(dest, summary["survived"] + summary["timeout"] + recheck)
    summary["diffs"] = {n: shown[n] for n in summary["survived"] + summary["timeout"]}
    if old is not None:  # a former survivor whose diff changed: the numbering did not hold
        summary["diff_mismatch"] = sorted(n for n in recheck if shown.get(n) != olddiffs[n])
    (dest / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"{module}: {total} mutants, {summary['killed']} killed"
          + (f" ({summary['killed_earlier']} in an earlier run, {summary['rerun']} rerun)"
             if selected else "")
          + f", {len(summary['survived'])} survived, {len(summary['timeout'])} timeouts, "
          f"{wall:.0f} s")
    if summary.get("diff_mismatch"):
        print("  numbering changed (rerun these functions with a glob): "
              + ", ".join(summary["diff_mismatch"]))
    for name, diff in summary["diffs"].items():
        print(f"  {name}:\n    " + diff.replace("\n", "\n    "))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())

"""robustkit.sweep: grid expansion, names, file errors, statistics against plain computations,
and the runner end to end on tiny runs (skip finished, resume unfinished, submitit's local
executor, the CLI)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustkit.errors import ConfigError
from robustkit.sweep import (
    collect,
    expand_grid,
    holm,
    load_sweep,
    mcnemar,
    parse_sweep,
    run,
    run_name,
    status,
    wilson,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"
JR = str(ROOT / "configs" / "train" / "mnist_jr.yaml")
NATURAL = str(ROOT / "configs" / "train" / "mnist_natural.yaml")


# --- the file -> runs ---------------------------------------------------------------------

def test_expand_grid_is_the_cartesian_product_times_the_list():
    grid = {"a": [1, 2, 3], "b": ["x", "y"]}
    items = [{"c": 0}, {"c": 1, "d": True}]
    expected = []
    for a in grid["a"]:  # plain nested loops, key order
        for b in grid["b"]:
            for item in items:
                expected.append({"a": a, "b": b, **item})
    assert expand_grid(grid, items) == expected
    assert expand_grid(grid) == [dict(zip("ab", p, strict=True))
                                 for p in itertools.product([1, 2, 3], "xy")]
    assert expand_grid({}, None) == [{}]
    assert expand_grid(None, [{"c": 2}]) == [{"c": 2}]


def test_run_names_are_deterministic_safe_and_distinct():
    assert run_name("jr", {"objective.params.lam": 0.01}, 0) == "jr_lam0.01_seed0"
    assert run_name("jr", {"objective.params.lam": 1e-3}, 3) == "jr_lam0.001_seed3"
    # two keys with the same last part keep their whole key
    two = run_name("x", {"attack.params.eps": 0.1, "objective.params.eps": 0.2}, 0)
    assert "attack.params.eps0.1" in two and "objective.params.eps0.2" in two
    frac = run_name("x", {"objective.params.eps": "8/255"}, 1)
    assert "/" not in frac and frac.endswith("_seed1")
    assert frac == run_name("x", {"objective.params.eps": "8/255"}, 1)
    assert frac != run_name("x", {"objective.params.eps": "8_255"}, 1)


def _sweep(**kw):
    data = {"name": "t", "out": "/tmp/unused", "base": JR,
            "eval": {"dataset": "sample-mnist", "n": 8}}
    data.update(kw)
    return data


def test_parse_groups_seeds_overrides_and_out_dirs(tmp_path):
    spec = parse_sweep(_sweep(
        out=str(tmp_path), seeds=[0, 1], overrides=["trainer.epochs=1"],
        groups=[{"label": "jr", "grid": {"objective.params.lam": [0.1, 1.0]},
                 "overrides": ["data.limit=8"]},
                {"label": "nat", "base": NATURAL, "seeds": [5]}],
        baseline="jr"))
    names = [r.name for r in spec.runs]
    assert names == ["jr_lam0.1_seed0", "jr_lam0.1_seed1", "jr_lam1_seed0", "jr_lam1_seed1",
                     "nat_seed5"]
    r = spec.runs[2]
    assert r.out_dir == tmp_path / "jr_lam1_seed0" and r.index == 1 and r.stem == "jr_lam1"
    assert r.overrides[:2] == ("trainer.epochs=1", "data.limit=8")
    assert "objective.params.lam=1.0" in r.overrides and "seed=0" in r.overrides
    assert f"trainer.out_dir={tmp_path / 'jr_lam1_seed0'}" in r.overrides
    assert "trainer.resume=auto" in r.overrides
    assert spec.runs[4].overrides[0] == "trainer.epochs=1" and "data.limit=8" not in \
        spec.runs[4].overrides
    # the list form: explicit sets, combined with every grid point
    spec = parse_sweep(_sweep(grid={"objective.params.lam": [1]},
                              list=[{"objective.params.n_proj": 1},
                                    {"objective.params.n_proj": 2}]))
    assert [r.name for r in spec.runs] == ["mnist_jr_lam1_n_proj1_seed0",  # label: base stem
                                          "mnist_jr_lam1_n_proj2_seed0"]


@pytest.mark.parametrize("change, needle", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"out": None}, "'out'"),
    ({"base": "nope.yaml"}, "not found"),
    ({"seeds": [0.5]}, "'seeds'"),
    ({"grid": {"objective.params.lam": []}}, "non-empty list"),
    ({"baseline": "nobody"}, "neither a run nor a label"),
    ({"eval": {"n": 0}}, "'n'"),
    ({"eval": {"checkpoint": "middle"}}, "'checkpoint'"),
    ({"eval": {"attacks": "clean,bogus7"}}, "eval key 'attacks'"),
    ({"eval": {"aa_version": "custom"}}, "aa_attacks"),
    ({"name": "../x"}, "a name, not a path"),
    ({"groups": [{"label": "a"}, {"label": "a"}]}, "share the name"),
    ({"overrides": ["no_equals_sign"]}, "key=value"),
])
def test_bad_sweep_files_raise_one_line_config_errors(change, needle):
    data = _sweep()
    data.update(change)
    with pytest.raises(ConfigError, match=needle) as err:
        parse_sweep(data)
    assert "\n" not in str(err.value)


def test_bad_override_or_data_fails_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = parse_sweep(_sweep(out=str(tmp_path), overrides=["trainer.epochz=1"]))
    with pytest.raises(ConfigError, match="run mnist_jr_seed0: .*epochz"):
        run(spec)
    spec = parse_sweep(_sweep(out=str(tmp_path), eval={"dataset": "mnist", "n": 8,
                                                       "data_root": str(tmp_path / "none")}))
    with pytest.raises(ValueError):  # DataError: no MNIST there
        run(spec)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys):
    from robustkit.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nout: [unclosed\n")
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustkit sweep: error:") and "\n" not in err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sweep", str(SMOKE), "--out", str(tmp_path / "o"), "--only", "jr,nope",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--only: 'nope' names no run" in err and "\n" not in err


# --- statistics against plain computations -------------------------------------------------

def _plain_mcnemar(a, b):
    n01 = sum(1 for u, v in zip(a, b, strict=True) if u and not v)
    n10 = sum(1 for u, v in zip(a, b, strict=True) if v and not u)
    d = n01 + n10
    if d == 0:
        return n01, n10, 1.0
    if d < 25:  # exact: twice the smaller tail of Binomial(d, 1/2), capped at 1
        tail = sum(math.comb(d, k) for k in range(min(n01, n10) + 1)) / 2 ** d
        return n01, n10, min(1.0, 2 * tail)
    stat = (abs(n01 - n10) - 1) ** 2 / d  # chi2, 1 dof: sf(x) = erfc(sqrt(x / 2))
    return n01, n10, math.erfc(math.sqrt(stat / 2))


@pytest.mark.parametrize("n, p_a, p_b, seed", [(30, 0.6, 0.5, 0), (200, 0.7, 0.6, 1),
                                               (1000, 0.9, 0.85, 2), (40, 0.5, 0.5, 3)])
def test_mcnemar_equals_the_plain_computation(n, p_a, p_b, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) < p_a, rng.random(n) < p_b
    n01, n10, p, method = mcnemar(a, b)
    e01, e10, ep = _plain_mcnemar(a.tolist(), b.tolist())
    assert (n01, n10) == (e01, e10)
    assert p == pytest.approx(ep, rel=1e-9, abs=1e-12)
    assert method == ("exact" if e01 + e10 < 25 else "chi2")
    # symmetric in the two runs
    assert mcnemar(b, a)[2] == pytest.approx(p, rel=1e-12)


def test_mcnemar_edges():
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0, "exact")
    # 10 discordant pairs all one way: exact p = 2 / 2**10
    a, b = [True] * 10 + [False] * 5, [False] * 10 + [False] * 5
    assert mcnemar(a, b)[2] == pytest.approx(2 / 1024)
    assert mcnemar(a, b, exact=False)[3] == "chi2"
    # the switch: 24 discordant pairs exact, 25 chi2 (statsmodels' rule)
    assert mcnemar([True] * 24, [False] * 24)[3] == "exact"
    assert mcnemar([True] * 25, [False] * 25)[3] == "chi2"
    assert mcnemar([True] * 13 + [False] * 12, [False] * 13 + [True] * 12)[2] == pytest.approx(
        1.0)  # (|13 - 12| - 1)^2 / 25 = 0
    with pytest.raises(ValueError, match="paired"):
        mcnemar([True], [True, False])


def test_holm_equals_the_plain_step_down_loop():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 12):
        p = rng.random(m) ** 3
        p[0] = p[-1]  # a tie
        order = sorted(range(m), key=lambda i: p[i])
        expected, running = [0.0] * m, 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * p[i]))
            expected[i] = running
        assert holm(p) == pytest.approx(expected, rel=1e-12)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


@pytest.mark.parametrize("k, n", [(0, 10), (7, 10), (930, 1000), (1000, 1000)])
def test_wilson_equals_the_formula(k, n):
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9)
    assert hi == pytest.approx(min(1.0, centre + half), abs=1e-9)


# --- penalties at initialisation ----------------------------------------------------------

def test_penalty_is_igr_lambda_times_the_plain_gradient_norm_and_linear_in_lambda():
    from robustkit.models import create_model
    from robustkit.sweep.calibrate import match_lams, penalty, penalty_at_init

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
    torch.nn.init.normal_(model.model.classifier.fc3.weight, std=0.1)  # not the zero init
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    got = penalty("igr", model, x, y, lam=0.7)
    norms = []
    model.eval()  # penalty() measures without dropout
    for i in range(6):  # per-sample input gradient of the CE, by hand
        xi = x[i:i + 1].double().requires_grad_()
        ce = F.cross_entropy(model.double()(xi), y[i:i + 1])
        (g,) = torch.autograd.grad(ce, xi)
        norms.append(float(g.pow(2).sum()))
    model.float()
    assert got == pytest.approx(0.7 * sum(norms) / 6, rel=1e-6)
    assert got > 0
    assert penalty("jr", model, x, y, lam=2.0) == pytest.approx(
        2 * penalty("jr", model, x, y, lam=1.0), rel=1e-9)
    # a fresh small_cnn has a zero last layer: constant logits, every penalty exactly 0
    assert penalty_at_init(JR, x, y) == 0.0
    assert match_lams({"a": 0.33, "b": 82.8}, [0.3, 3]) == {"a": [0.9, 9.0], "b": [0.004, 0.04]}
    with pytest.raises(ValueError, match="unit penalty"):
        match_lams({"a": 0.0}, [1.0])


# --- the runner, end to end ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The shipped smoke sweep (3 tiny runs), run once with two processes at a time."""
    out = tmp_path_factory.mktemp("sweep")
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the sweep file's base paths are relative to the current folder
    try:
        spec = load_sweep(SMOKE, out=out)
        result = run(spec, jobs=2)
    finally:
        os.chdir(cwd)
    return spec, result


def test_smoke_sweep_runs_every_run_and_collects_one_table(smoke):
    spec, result = smoke
    assert result.failed == {} and sorted(result.ran) == sorted(r.name for r in spec.runs)
    table = result.table
    runs = table.runs
    for col in ("run", "label", "objective", "objective.params.lam", "seed", "n", "clean",
                "clean_lo", "clean_hi", "pgd5", "pgd5_lo", "pgd5_hi", "robust", "robust_lo",
                "robust_hi", "penalty_init", "train_s", "eval_s", "epochs"):
        assert col in runs.columns, col
    assert list(runs["n"]) == [64] * 3 and list(runs["epochs"]) == [1] * 3
    assert (runs["robust_lo"] <= runs["robust"]).all() and (runs["robust"] <=
                                                             runs["robust_hi"]).all()
    # every run on the same images: labels in flags.json identical
    flags = {r.name: json.loads((r.out_dir / "eval" / "flags.json").read_text())
             for r in spec.runs}
    labels = {tuple(f["labels"]) for f in flags.values()}
    assert len(labels) == 1
    row = runs.set_index("run").loc["jr_lam0.1_seed0"]
    assert row["clean"] == sum(flags["jr_lam0.1_seed0"]["clean"]) / 64
    # paired tests against jr_lam0.01: McNemar on the flags, Holm over the 2 comparisons
    tests = table.tests.set_index("run")
    assert sorted(tests.index) == ["jr_lam0.1_seed0", "natural_seed0"]
    base = flags["jr_lam0.01_seed0"]["robust"]
    ps = []
    for name in tests.index:
        e01, e10, ep = _plain_mcnemar(flags[name]["robust"], base)
        assert (tests.loc[name, "b"], tests.loc[name, "c"]) == (e01, e10)
        assert tests.loc[name, "p"] == pytest.approx(ep)
        ps.append(ep)
    assert list(tests["p_holm"]) == pytest.approx(holm(ps))
    assert "Holm over m = 2" in table.family and "jr_lam0.01" in table.family
    # a collector built from the folder alone gives the same table
    again = collect(spec.out, baseline="jr_lam0.01")
    assert again.runs.sort_values("run").reset_index(drop=True).equals(
        runs.sort_values("run").reset_index(drop=True))
    fig = table.figure()
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["jr", "natural"]
    paths = table.save(spec.out / "report")
    assert all(p.is_file() for p in paths.values())
    assert (spec.out / "report" / "tests.csv").read_text().startswith("# Holm over m = 2")


def test_rerun_skips_finished_and_resumes_unfinished(smoke, monkeypatch):
    spec, _ = smoke
    monkeypatch.chdir(ROOT)
    again = run(spec)
    assert again.ran == [] and sorted(again.skipped) == sorted(r.name for r in spec.runs)
    # other eval settings: evaluated again (not retrained), so all runs share the images
    from dataclasses import replace

    assert {status(r, spec.eval) for r in spec.runs} == {"done"}
    assert {status(r, replace(spec.eval, n=32)) for r in spec.runs} == {"stale"}
    # an unfinished run: its evaluation lost, last.pt kept; a longer schedule asked for
    target = spec.runs[2]
    (target.out_dir / "sweep_done.json").unlink()
    assert status(target) == "partial"
    first = [json.loads(line) for line in (target.out_dir / "metrics.jsonl").read_text()
             .splitlines()]
    longer = load_sweep(SMOKE, out=spec.out)
    longer.runs = [r for r in longer.runs if r.name == target.name]
    longer.baseline = None
    r = longer.runs[0]
    r.overrides = tuple(o if o != "trainer.epochs=1" else "trainer.epochs=2"
                        for o in r.overrides)
    result = run(longer)
    assert result.ran == [target.name] and status(target) == "done"
    record = json.loads((target.out_dir / "sweep_done.json").read_text())
    assert record["epochs"] == 2
    rows = [json.loads(line) for line in (target.out_dir / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[: len(first)] == first  # epoch 1 kept, not retrained
    assert len(rows) > len(first)


def test_submitit_local_executor_runs_a_tiny_sweep(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(ROOT)
    spec = load_sweep(SMOKE, out=tmp_path)
    spec.runs = spec.runs[:1]
    spec.baseline = None
    result = run(spec, executor="local", jobs=1)
    assert result.failed == {}, result.failed
    assert result.ran == [spec.runs[0].name] and status(spec.runs[0]) == "done"
    assert list((tmp_path / "submitit").glob("*/*_log.out"))  # submitit's own job logs
    assert len(result.table.runs) == 1 and len(result.table.tests) == 0


def test_cli_sweep_dry_run_and_collect(smoke, capsys, monkeypatch):
    from robustkit.cli import main

    spec, _ = smoke
    monkeypatch.chdir(ROOT)
    assert main(["sweep", str(SMOKE), "--out", str(spec.out), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("done ") == 3 and "jr_lam0.1_seed0" in out
    assert main(["sweep", str(SMOKE), "--out", str(spec.out), "--collect",
                 "--baseline", "natural"]) == 0
    out = capsys.readouterr().out
    assert "Holm over m = 2" in out and (spec.out / "summary.csv").is_file()
    assert main(["sweep", str(SMOKE), "--out", str(spec.out), "--executor", "local",
                 "--jobs", "0"]) == 2


def _fake_run(root, name, label, index, robust, params=None, seed=0):
    """A finished run's two files, as run_one writes them (no training)."""
    folder = root / name
    (folder / "eval").mkdir(parents=True)
    n = len(robust)
    (folder / "sweep_done.json").write_text(json.dumps({
        "name": name, "label": label, "objective": label, "params": params or {},
        "seed": seed, "index": index, "images_sha256": "same", "train_s": 1.0,
        "eval_s": 2.0, "epochs": 1, "penalty_init": 0.0}))
    (folder / "eval" / "flags.json").write_text(json.dumps({
        "labels": list(range(n)), "clean": [1] * n, "robust": robust}))


def test_label_baseline_pairs_runs_at_the_same_grid_position(tmp_path):
    rng = np.random.default_rng(0)
    flags = {}
    for label in ("jr", "igr"):
        for i, lam in enumerate((0.1, 1.0)):
            flags[f"{label}_lam{lam:g}_seed0"] = (rng.random(60) < 0.5 + 0.2 * i).astype(
                int).tolist()
            _fake_run(tmp_path, f"{label}_lam{lam:g}_seed0", label, i,
                      flags[f"{label}_lam{lam:g}_seed0"], {"objective.params.lam": lam})
    flags["pgd_seed0"] = [1] * 60
    _fake_run(tmp_path, "pgd_seed0", "pgd", 0, flags["pgd_seed0"])
    table = collect(tmp_path, baseline="jr")
    tests = table.tests.set_index("run")
    # igr's k-th lambda against jr's k-th; the single pgd run (another grid size) is not tested
    assert dict(tests["baseline"]) == {"igr_lam0.1_seed0": "jr_lam0.1_seed0",
                                       "igr_lam1_seed0": "jr_lam1_seed0"}
    ps = []
    for run_, ref in tests["baseline"].items():
        e01, e10, ep = _plain_mcnemar(flags[run_], flags[ref])
        assert (tests.loc[run_, "b"], tests.loc[run_, "c"]) == (e01, e10)
        ps.append(ep)
    assert list(tests["p_holm"]) == pytest.approx(holm(ps))
    assert "Holm over m = 2" in table.family and "same grid position" in table.family
    # a run name as baseline: every other run against it
    one = collect(tmp_path, baseline="pgd")
    assert sorted(one.tests["run"]) == sorted(k for k in flags if k != "pgd_seed0")
    assert set(one.tests["baseline"]) == {"pgd_seed0"}
    assert "Holm over m = 4" in one.family
    # runs on other images: refused
    other = json.loads((tmp_path / "pgd_seed0" / "sweep_done.json").read_text())
    other["images_sha256"] = "other"
    (tmp_path / "pgd_seed0" / "sweep_done.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="different images"):
        collect(tmp_path, baseline="jr")


def test_slurm_options_reach_submitit_as_one_array(tmp_path, monkeypatch):
    """No cluster here: submitit's AutoExecutor replaced by a recorder; the jobs run inline."""
    import contextlib

    import submitit

    from robustkit.sweep import launch

    seen = {}

    class Job:
        def __init__(self, fn, args):
            self.job_id, self._out = "42_0", fn(*args)

        def result(self):
            return self._out

    class Recorder:
        def __init__(self, folder, cluster):
            seen.update(folder=folder, cluster=cluster)

        def update_parameters(self, **kw):
            seen["params"] = kw

        @contextlib.contextmanager
        def batch(self):
            seen["batched"] = True
            yield

        def submit(self, fn, *args):
            seen.setdefault("submitted", []).append(args[0].name)
            return Job(lambda *a: None, args)  # the run itself is not executed

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    spec = parse_sweep(_sweep(out=str(tmp_path), grid={"objective.params.lam": [0.1, 1.0]},
                              slurm={"partition": "gpu", "time": 90, "gpus": 1, "cpus": 4,
                                     "mem_gb": 16, "account": "lab"}))
    outcomes = launch._run_submitit(spec.runs, spec, 3, "slurm")
    assert outcomes == [None, None]
    assert seen["cluster"] == "slurm" and seen["folder"] == tmp_path / "submitit" / "%j"
    assert seen["params"] == {"timeout_min": 90, "gpus_per_node": 1, "cpus_per_task": 4,
                              "slurm_array_parallelism": 3, "name": "t",
                              "slurm_partition": "gpu", "mem_gb": 16,
                              "slurm_additional_parameters": {"account": "lab"}}
    assert seen["batched"] and seen["submitted"] == [r.name for r in spec.runs]


def test_slurm_without_a_cluster_is_one_user_error(tmp_path, monkeypatch):
    import shutil

    pytest.importorskip("submitit")
    if shutil.which("srun"):
        pytest.skip("a SLURM node: submission would really happen")
    monkeypatch.chdir(ROOT)
    spec = parse_sweep(_sweep(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="--executor slurm: .*srun"):
        run(spec, executor="slurm")


def test_only_runs_the_named_part_and_names_unknown_entries(smoke, monkeypatch):
    """only= picks labels, run names and names without the seed, in file order; the rest is
    neither run nor skipped-as-finished; a name of nothing is a one-line error."""
    from robustkit.sweep.launch import _select

    spec, _ = smoke
    names = [r.name for r in spec.runs]
    assert [r.name for r in _select(spec, ["natural"])] == ["natural_seed0"]
    assert [r.name for r in _select(spec, ["jr_lam0.1", "natural_seed0"])] == [
        n for n in names if n in ("jr_lam0.1_seed0", "natural_seed0")]
    assert [r.name for r in _select(spec, ["jr"])] == [n for n in names if n.startswith("jr")]
    assert _select(spec, None) == spec.runs
    for bad, match in ((["nope", "jr"], r"'nope' names no run of sweep .*labels: "),
                       ([], "non-empty list"), ("jr", "non-empty list")):
        with pytest.raises(ConfigError, match=match):
            run(spec, only=bad, dry_run=True)
    monkeypatch.chdir(ROOT)
    part = run(spec, only=["jr"], dry_run=True)
    assert sorted(part.skipped) == sorted(n for n in names if n.startswith("jr"))


def test_a_half_finished_group_is_paired_run_by_run_when_the_spec_is_given(tmp_path,
                                                                          monkeypatch):
    """Grid sizes come from the spec: igr's finished second point is paired with jr's second
    while igr's first is still running. From the folder alone the finished igr run looks like a
    one-point grid and is not paired (the spec is what knows the grid)."""
    monkeypatch.chdir(ROOT)
    spec = parse_sweep({"name": "half", "out": str(tmp_path), "baseline": "jr", "groups": [
        {"label": label, "base": f"configs/train/mnist_{label}.yaml",
         "grid": {"objective.params.lam": [0.1, 1.0]}} for label in ("jr", "igr")]})
    rng = np.random.default_rng(1)
    flags = {name: (rng.random(80) < 0.6).astype(int).tolist()
             for name in ("jr_lam0.1_seed0", "jr_lam1_seed0", "igr_lam1_seed0")}
    for name, fl in flags.items():
        label, lam = name.split("_lam")[0], float(name.split("_lam")[1].split("_")[0])
        _fake_run(tmp_path, name, label, [0.1, 1.0].index(lam), fl, {"objective.params.lam": lam})
    tests = collect(spec).tests.set_index("run")
    assert dict(tests["baseline"]) == {"igr_lam1_seed0": "jr_lam1_seed0"}
    e01, e10, _ = _plain_mcnemar(flags["igr_lam1_seed0"], flags["jr_lam1_seed0"])
    assert (tests.loc["igr_lam1_seed0", "b"], tests.loc["igr_lam1_seed0", "c"]) == (e01, e10)
    assert collect(tmp_path, baseline="jr").tests.empty

"""Python first (issue 19 §1): ``robustkit.data.load``, ``robustkit.evaluate`` and
``robustkit.config.build`` are the library calls behind ``robustkit evaluate`` and ``robustkit
train``; the CLI's files and the library's are the same for the same inputs."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import robustkit
from robustkit.cli import main
from robustkit.config import Run, build, load_config, to_container
from robustkit.data import DATASETS, first_n, load, load_dataset
from robustkit.errors import ConfigError, ModelError, OutputError
from robustkit.evaluation import Check, EvalResult, evaluate_attacks
from robustkit.evaluation.api import evaluate
from robustkit.testing import TinyCNN
from robustkit.training.checkpoint import load_checkpoint
from robustkit.training.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SHIPPED = "robustkit:mnist_smallcnn_robust"
# results.json fields that depend on the clock, not on the inputs
TIMING = ("time_s", "created")


# ----------------------------------------------------------------------------- data.load


@pytest.mark.parametrize("name", ["sample-mnist", "sample-cifar10"])
def test_load_gives_the_first_n_images_the_cli_evaluates(name):
    x, y = load(name, n=12)
    c, h, w = DATASETS[name].input_shape
    assert x.shape == (12, c, h, w) and x.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    data = first_n(load_dataset(name, "test"), 12)  # what `robustkit evaluate` iterates
    for i in (0, 5, 11):
        xi, yi, idx = data[i]
        assert torch.equal(x[i], xi) and int(y[i]) == int(yi) and int(idx) == i
    assert 0 <= x.min() and x.max() <= 1


def test_load_splits_sizes_and_errors():
    x_all, y_all = load("sample-mnist")
    assert len(x_all) == len(y_all) == len(load_dataset("sample-mnist", "test"))
    x_tr, _ = load("sample-mnist", "train", n=3)
    assert torch.equal(x_tr[0], load_dataset("sample-mnist", "train")[0][0])
    assert not torch.equal(x_tr[0], x_all[0])  # the train split, not the test split
    for bad, words in [(dict(n=0), "n must be"), (dict(n=len(x_all) + 1), "holds only"),
                       (dict(name="nope"), "name must be one of"),
                       (dict(split="val"), "split must be")]:
        with pytest.raises(ValueError, match=words):
            load(**{"name": "sample-mnist", **bad})


# ----------------------------------------------------------------------------- evaluate


def _cli_evaluate(out: Path, model: str, n: int, attacks: str, *extra: str) -> None:
    assert main(["evaluate", "--model", model, "--dataset", "sample-mnist", "--n-examples",
                 str(n), "--attacks", attacks, "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--out", str(out), *extra]) == 0


def _json_files(folder: Path) -> dict[str, object]:
    """Every JSON file the evaluation wrote outside its resumable state, by relative path."""
    return {str(p.relative_to(folder)): json.loads(p.read_text())
            for p in sorted(folder.rglob("*.json")) if "state" not in p.relative_to(folder).parts}


@pytest.mark.parametrize("model, attacks, protocol", [
    (SHIPPED, "clean,pgd5,fgsm", "standalone"),
    # a registry model without checkpoint: its random weights come from the seed, as in the CLI
    ("small_cnn", "clean,fgsm,pgd3x2", "cascade"),
])
def test_cli_json_equals_evaluate_save(tmp_path, model, attacks, protocol):
    """The CLI's results.json, flags.json and RobustBench JSON are the library's, field for
    field, for the same inputs; only the timings (``time_s``, ``created``) may differ. The
    resume fingerprints agree too: the same weights (a seeded registry model), images,
    attacks and settings."""
    cli, lib = tmp_path / "cli", tmp_path / "lib"
    _cli_evaluate(cli, model, 16, attacks, "--protocol", protocol)
    torch.manual_seed(123)  # another global RNG state than the CLI met: evaluate seeds itself
    x, y = load("sample-mnist", n=16)
    res = evaluate(model, x, y, attacks=attacks, dataset="sample-mnist", protocol=protocol,
                   subset="first 16 test images", batch_size=8, device="cpu",
                   state_dir=lib / "state", fingerprint={"data_root": None})
    fa, fb = (json.loads((d / "state" / "fingerprint.json").read_text()) for d in (cli, lib))
    fa.pop("data_sha256"), fb.pop("data_sha256")  # hashed as stored: uint8 there, float32 in x
    assert fa == fb and fa["model_sha256"]
    paths = res.save(lib)
    assert set(paths) == {"results", "flags", "model_info"} and all(
        p.is_file() for p in paths.values())
    a, b = _json_files(cli), _json_files(lib)
    assert set(a) == set(b) == {"results.json", "flags.json",
                                f"model_info/sample-mnist/Linf/{model.split(':')[-1]}.json"}
    for key in TIMING:
        assert key in a["results.json"]
        a["results.json"].pop(key), b["results.json"].pop(key)
    assert a == b
    assert a["results.json"]["protocol"]["name"] == protocol
    assert set(p.name for p in cli.iterdir()) - set(p.name for p in lib.iterdir()) == {
        "config.yaml"}  # the CLI's own: its flags


def test_tensors_and_a_dataset_give_the_same_result():
    x, y = load("sample-mnist", n=12)
    model = robustkit.models.load_model(SHIPPED, num_classes=10, in_channels=1, input_size=28)
    kw = dict(attacks="clean,pgd3", eps=0.3, batch_size=5)
    a = evaluate(model, x, y, **kw)
    b = evaluate(model, first_n(load_dataset("sample-mnist", "test"), 12), **kw)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.correct["pgd3"], b.correct["pgd3"])
    assert a.meta["model"] == "SmallCNN" and a.meta["extra"]["name"] == "SmallCNN"
    assert a.meta["subset"] == "12 images" and a.meta["dataset"] is None
    # without a dataset the table and the figure say what they know, not "on None"
    assert "None" not in a.table() and "SmallCNN, 12 images, Linf eps = 0.3" in a.table()
    assert "None" not in a._repr_html_() and "on images" not in a._repr_html_()


def test_evaluate_a_module_with_built_attacks(tmp_path):
    from robustkit.attacks import PGD

    model = TinyCNN(1, 10, 28).eval()
    x, y = load("sample-mnist", n=6)
    pgd = PGD(model, eps=0.1, alpha=0.05, steps=2)
    res = evaluate(model, x, y, attacks={"mine": pgd}, eps=0.1, name="tiny")
    assert list(res.correct) == ["mine"] and res.n == 6
    assert res.to_dict()["attacks"]["mine"]["class"] == "PGD"
    assert [c.name for c in res.checks][:2] == ["eval_mode", "logits"]
    paths = res.save(tmp_path)  # no dataset: no RobustBench file (they are per dataset)
    assert set(paths) == {"results", "flags"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags.json", "results.json"]
    assert json.loads(paths["results"].read_text())["name"] == "tiny"


def test_evaluate_refuses_bad_arguments_naming_them():
    x, y = load("sample-mnist", n=4)
    model = TinyCNN(1, 10, 28).eval()
    cases = [
        (dict(model=model, x=x, y=y), ValueError, "eps: give eps, or dataset="),
        (dict(model="small_cnn", x=x, y=y, eps=0.3), ValueError, "dataset: needed"),
        (dict(model=model, x=x, y=y, eps=0.3, checkpoint="w.pt"), ValueError, "checkpoint:"),
        (dict(model=model, x=x, y=None, eps=0.3), ValueError, "y must be a tensor"),
        (dict(model=model, x=x, y=y[:3], eps=0.3), ValueError, "x must be"),
        (dict(model=model, x=x, y=y, eps=0.3, norm="L1"), ValueError, "norm must be"),
        (dict(model=model, x=x, y=y, eps=0.3, protocol="x"), ValueError, "protocol must be"),
        (dict(model=model, x=x, y=y, eps=0.3, batch_size=0), ValueError, "batch_size must"),
        (dict(model=model, x=x, y=y, dataset="nope"), ValueError, "dataset must be"),
        (dict(model=3, x=x, y=y, eps=0.3), ValueError, "model must be"),
        (dict(model=model, x=x, y=y, eps=0.3, attacks="clean,pgdx"), ValueError,
         "unknown attack 'pgdx'"),
        # a shipped MNIST model on CIFAR-10: the class count passes, the shape does not
        (dict(model=SHIPPED, x=x, y=y, dataset="sample-cifar10"), ModelError, SHIPPED),
        (dict(model=model, x=x, y=y, eps=0.3, attacks="torchattacks:PGD(nope=1)"),
         ConfigError, "^attacks: "),
    ]
    for kwargs, kind, words in cases:
        with pytest.raises(kind, match=words):
            evaluate(**kwargs)


def _result(meta: bool = True) -> EvalResult:
    """A hand-made result: 4 points, one attack with two sub-attacks, one failed check."""
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    res = EvalResult(labels=torch.arange(4), clean=t(1, 1, 1, 0),
                     correct={"pgd3": t(1, 1, 0, 0), "autoattack": t(1, 0, 0, 0)},
                     time_s={"clean": 0.5, "pgd3": 1.0, "autoattack": 2.0},
                     max_perturbation={"pgd3": 0.3, "autoattack": 0.29},
                     components={"autoattack": {"apgd-ce": t(1, 1, 0, 0),
                                                "square": t(1, 0, 0, 0)}})
    if meta:
        res.checks = [Check("logits", "ok", "outputs are logits"),
                      Check("black_box:autoattack/square", "fail", "Square <beats> PGD")]
        res.meta = dict(model="m.py:net", dataset="sample-mnist", threat_model="Linf",
                        eps=0.3, seed=0, subset="first 4 test images", checkpoint=None,
                        architecture="Net", attacks={"pgd3": {}, "autoattack": {
                            "family": "autoattack", "version": "standard"}},
                        extra={"name": "net", "batch_size": 2, "device": "cpu",
                               "world_size": 1})
    return res


def test_to_frame_rows_match_the_flags():
    frame = _result().to_frame()
    assert list(frame.index) == ["clean", "pgd3", "autoattack", "autoattack/apgd-ce",
                                 "autoattack/square", "robust"]
    assert list(frame.columns) == ["accuracy", "correct", "n", "time_s", "max_perturbation"]
    assert frame["correct"].tolist() == [3, 2, 1, 2, 1, 1]
    assert frame.loc["autoattack", "accuracy"] == 0.25 and (frame["n"] == 4).all()
    assert frame.loc["pgd3", "time_s"] == 1.0 and frame.loc["pgd3", "max_perturbation"] == 0.3
    assert frame["time_s"].isna().tolist() == [False, False, False, True, True, True]
    bare = _result(meta=False).to_frame()  # flags alone (evaluate_attacks): the same table
    assert bare.equals(frame)


def test_plot_html_table_and_save(tmp_path):
    from matplotlib.figure import Figure

    res = _result()
    fig = res.plot()
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    assert [round(b.get_height(), 6) for b in bars] == [75.0, 50.0, 25.0, 25.0]  # no sub rows
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "clean", "pgd3", "autoattack", "robust"]
    page = res._repr_html_()
    assert "<table" in page and "autoattack/square" in page and "75" in page
    assert "Square &lt;beats&gt; PGD" in page and "FAIL" in page  # escaped, shown
    text = res.table()
    assert "net on sample-mnist, first 4 test images, Linf eps = 0.3" in text
    assert "after square" in text and "1 broken" in text and "A check FAILED" in text
    paths = res.save(tmp_path)
    info = json.loads(paths["model_info"].read_text())
    assert paths["model_info"] == tmp_path / "model_info/sample-mnist/Linf/net.json"
    assert info["autoattack_acc"] == "25.00" and "gradient-masking" in info["footnote"]
    flags = json.loads(paths["flags"].read_text())
    assert flags["robust"] == [1, 0, 0, 0] and flags["components"]["autoattack"]["square"] == [
        1, 0, 0, 0]


def test_a_result_without_settings_cannot_be_saved(tmp_path):
    res = evaluate_attacks(TinyCNN(1, 10, 28).eval(), load("sample-mnist", n=2), {})
    assert res.to_frame().loc["clean", "n"] == 2 and "<table" in res._repr_html_()
    for call in (res.save, lambda _: res.to_dict(), lambda _: res.table()):
        with pytest.raises(ValueError, match="flags only"):
            call(tmp_path)
    assert not any(tmp_path.iterdir())


def test_top_level_exports_load_on_use():
    assert robustkit.evaluate is evaluate and robustkit.EvalResult is EvalResult
    assert robustkit.data.load is load and "evaluate" in dir(robustkit)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        robustkit.nope  # noqa: B018
    code = "import sys, robustkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    assert out.strip() == "False"  # importing the package does no work


def test_the_library_never_imports_the_cli_and_only_config_reads_configs():
    for path in (ROOT / "robustkit").rglob("*.py"):
        rel = path.relative_to(ROOT / "robustkit").parts
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        if rel[0] not in ("cli", "__main__.py"):  # python -m robustkit is the CLI
            assert not {m for m in imported if m.startswith("robustkit.cli")}, path
        # Above the library, like the CLI: the demo builds its yaml, a sweep builds one run per
        # grid point through config.build
        if rel[0] not in ("cli", "__main__.py", "config", "demo.py", "sweep"):
            assert not {m for m in imported if m.startswith("robustkit.config")}, path


# ----------------------------------------------------------------------------- config.build

FAST = ["trainer.device=cpu", "log.progress=false", "log.tensorboard=false",
        "sensitivity.enabled=false", "saliency.enabled=false", "data.limit=128"]


def _first_step(out: Path) -> dict:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if r["type"] == "step")


def test_a_run_built_in_python_is_the_cli_run(tmp_path, monkeypatch):
    """``build(...).fit()`` from a notebook and ``robustkit train`` in the same folder: the
    same config.yaml byte for byte, the same first-step loss and the same trained weights."""
    monkeypatch.chdir(tmp_path)  # a relative out_dir: both runs write config.yaml's "runs/x"
    overrides = ["trainer.out_dir=runs/x", *FAST]
    assert main(["train", "-c", str(SMOKE), *overrides]) == 0
    shutil.move("runs/x", "cli")
    run = build(str(SMOKE), overrides)
    assert isinstance(run, Run) and run.resume is None
    assert not Path("runs/x/config.yaml").exists()  # building writes nothing
    state = run.fit()
    assert state.epoch == 1 and state.step == 2  # 128 images / batch 64
    cli, lib = Path("cli"), Path("runs/x")
    assert (lib / "config.yaml").read_bytes() == (cli / "config.yaml").read_bytes()
    a, b = _first_step(cli), _first_step(lib)
    assert a["step"] == b["step"] == 1 and a["train/loss"] == b["train/loss"]
    wa, wb = load_checkpoint(cli / "last.pt")["model"], load_checkpoint(lib / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    assert not (lib / ".lock").exists()  # fit() took the lock and gave it back


def test_build_takes_a_path_a_dict_or_a_config(tmp_path):
    out = [f"trainer.out_dir={tmp_path}", *FAST]
    want = to_container(load_config(SMOKE, out))
    raw = yaml.safe_load(SMOKE.read_text())
    for config, overrides in [(str(SMOKE), out), (SMOKE, out), (raw, out),
                              (load_config(SMOKE, out), ()),
                              (load_config(SMOKE), out)]:
        r = build(config, overrides)
        assert to_container(r.cfg) == want
        assert r.steps_per_epoch == 2 and r.out_dir == tmp_path
    with pytest.raises(TypeError, match="config must be"):
        build(42)
    with pytest.raises(ConfigError, match="'trainer.epoch'"):
        build(raw, ["trainer.epoch=2"])


def test_extra_callbacks_run_before_the_checkpoint(tmp_path):
    from robustkit.training.callbacks import CheckpointCallback, EvalCallback, JSONLCallback

    mine = object()
    r = build(SMOKE, [f"trainer.out_dir={tmp_path}", *FAST], callbacks=[mine])
    kinds = [type(cb) for cb in r.trainer.callbacks]
    assert kinds[0] is EvalCallback and kinds[-1] is CheckpointCallback
    assert r.trainer.callbacks[-2] is mine and kinds.index(JSONLCallback) < len(kinds) - 2
    # log.progress is the CLI's (tqdm lives in cli/): the library adds no progress bar
    r = build(SMOKE, [f"trainer.out_dir={tmp_path}", *FAST, "log.progress=true"])
    assert "ProgressCallback" not in {type(cb).__name__ for cb in r.trainer.callbacks}


def test_fit_refuses_a_folder_in_use_and_build_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    holder = RunDirectory(out)
    holder.acquire()  # another live run
    try:
        run = build(SMOKE, [f"trainer.out_dir={out}", *FAST])
        with pytest.raises(OutputError, match="in use by another live run"):
            run.fit()
        assert not (out / "config.yaml").exists()
    finally:
        holder.release()
    (out / "last.pt").parent.mkdir(parents=True, exist_ok=True)
    (out / "last.pt").write_bytes(b"an earlier run")
    with pytest.raises(OutputError, match="already holds last.pt"):
        build(SMOKE, [f"trainer.out_dir={out}", *FAST])


def test_the_cli_computes_nothing_and_stays_about_1000_lines():
    """Issue #19 §1: no sigma, metric, statistic or tensor work in cli/ (the commands parse,
    call the library, print and save), and cli/ stays about 1,000 lines in all."""
    import ast

    total = 0
    for path in sorted((ROOT / "robustkit" / "cli").glob("*.py")):
        source = path.read_text()
        total += len(source.splitlines())
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        code = "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith("#"))
        assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy", "scipy")
                    or m.startswith(("robustkit.reports.stats", "robustkit.sensitivity.measure",
                                     "robustkit.saliency.metrics"))}, path.name
        for word in ("torch.", "np.", "bootstrap(", "bootstrap_ci", "wilcoxon", ".mean(",
                     ".argmax("):
            assert word not in code, (path.name, word)
    assert total <= 1050, total


def test_the_cli_modules_stay_thin():
    """cli/train.py and cli/evaluate.py parse, call the library, print and save."""
    for name, limit in (("train", 160), ("evaluate", 240)):
        source = (ROOT / "robustkit" / "cli" / f"{name}.py").read_text()
        assert len(source.splitlines()) <= limit, name
    train = (ROOT / "robustkit" / "cli" / "train.py").read_text()
    for word in ("create_model", "create_objective", "create_attack", "Trainer(", "optim."):
        assert word not in train, word
    assert importlib.import_module("robustkit.cli.train").build is build  # the old import

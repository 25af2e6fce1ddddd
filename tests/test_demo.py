"""``robustkit demo`` from an installed wheel: everything it reads is package data.

The wheel is built from a copy of the package (so the tree gets no ``build/``) and installed
into a folder of its own; the checks run in a fresh interpreter outside the source tree, where
a ``Path(__file__).parents[2]`` lookup would find nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from robustkit.demo import MODELS, PAIR, resources_used

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "robustkit", src / "robustkit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the offline venv already has setuptools and wheel.
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = dist.glob("robustkit-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def _run_installed(target: Path, cwd: Path, code: str, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_resources_are_package_files():
    with resources_used() as (configs, factory):
        assert set(configs) == set(MODELS)
        for path in configs.values():
            assert path.is_file() and path.parent == ROOT / "robustkit" / "assets" / "demo_configs"
        file, _, fn = factory.rpartition(":")
        assert Path(file) == ROOT / "robustkit" / "testing.py" and fn == "pyautoattack_resnet18"
    assert not (ROOT / "configs" / "demo").exists()  # one copy of each YAML, in the package


def test_wheel_carries_what_the_demo_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in MODELS:
        member = f"robustkit/assets/demo_configs/{model}.yaml"
        assert member in names, member
        assert zipfile.ZipFile(wheel).read(member) == \
            (ROOT / "robustkit" / "assets" / "demo_configs" / f"{model}.yaml").read_bytes()
    assert "robustkit/testing.py" in names  # the ResNet-18 factory
    assert {"robustkit/assets/mnist_sample.npz", "robustkit/assets/cifar10_sample.npz"} <= names
    # the shipped reference pair (robustkit:NAME): weights, cards and their checksums
    assert {f"robustkit/assets/models/{n}.{ext}" for n in PAIR for ext in ("pt", "json")} <= names
    assert "robustkit/assets/checksums.json" in names
    assert not any(n.startswith(("configs/", "evaluate/", "tests/")) for n in names)


def test_installed_wheel_finds_and_loads_the_demo_inputs(installed, tmp_path):
    code = f"""
import sys
from pathlib import Path
import robustkit
assert Path(robustkit.__file__).is_relative_to({str(installed)!r}), robustkit.__file__
from robustkit.demo import resources_used
from robustkit.config import load_config
from robustkit.cli import main
with resources_used() as (configs, factory):
    for name, path in configs.items():
        assert Path(path).is_relative_to({str(installed)!r}), path
        assert load_config(path).data.name == "sample-mnist"
    assert factory.startswith({str(installed)!r}), factory
    rc = main(["evaluate", "--model", factory, "--dataset", "sample-cifar10", "--n-examples",
               "2", "--batch-size", "2", "--attacks", "clean", "--device", "cpu",
               "--no-progress", "--out", "out"])
from robustkit.models import load_pretrained, pretrained
for name in {PAIR!r}:
    load_pretrained(name)  # from the installed wheel, sha256 checked
    assert str(pretrained._asset(name + ".pt")).startswith({str(installed)!r})
sys.exit(rc)
"""
    proc = _run_installed(installed, tmp_path, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = tmp_path / "out" / "model_info" / "sample-cifar10" / "Linf"
    assert (info / "pyautoattack_resnet18.json").is_file()  # named by the function


@pytest.mark.slow
def test_demo_end_to_end_from_the_wheel(installed, tmp_path):
    code = ("import sys\nfrom robustkit.cli import main\n"
            "sys.exit(main(['demo', '--epochs', '1', '--cifar-n', '8', '--mnist-n', '16', "
            "'--sensitivity-n', '16', '--inspect-n', '4', '--out', 'demo']))\n")
    proc = _run_installed(installed, tmp_path, code, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in MODELS:
        assert (tmp_path / "demo" / model / "last.pt").is_file()
    for label in (*(f"demo_{m}" for m in MODELS), *PAIR):
        res = json.loads((tmp_path / "demo" / f"eval_{label}" / "results.json").read_text())
        assert res["n_examples"] == 16 and "autoattack" in res["accuracy"]
    labels = {*PAIR, *(f"demo_{m}" for m in MODELS)}
    sens = json.loads((tmp_path / "demo" / "sensitivity" / "sensitivity.json").read_text())
    assert set(sens["models"]) == labels
    assert (tmp_path / "demo" / "sensitivity" / "sigma_mean.png").is_file()
    summary = json.loads((tmp_path / "demo" / "inspect" / "summary.json").read_text())
    assert set(summary["models"]) == labels and summary["n"] == 4
    assert summary["models"][PAIR[0]]["kind"] == "standard"
    assert summary["models"][PAIR[1]]["kind"] == "robust"
    page = (tmp_path / "demo" / "index.html").read_text()
    assert "inspect/grid_adaptgrad.png" in page and "sensitivity/sigma_mean.png" in page
    assert "SmallCNN on MNIST" in proc.stdout and "index.html" in proc.stdout

"""``robustkit evaluate`` end to end on the shipped CIFAR-10 sample (robustkit.cli.evaluate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustkit.attacks.specs import parse_attacks
from robustkit.cli import main
from robustkit.config import load_eval_config
from robustkit.data import first_n, load_dataset
from robustkit.evaluation.api import default_name as _default_name
from robustkit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
FACTORY = """
import torch
from robustkit.testing import TinyCNN

def lenet5_pgd():
    torch.manual_seed(0)
    return TinyCNN(3, {k}, 32)
"""


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "archs.py"  # one file of architectures: the entry is the function's
    path.write_text(FACTORY.format(k=10))
    return f"{path}:lenet5_pgd"


def evaluate(*argv):
    return main(["evaluate", "--dataset", "sample-cifar10", "--no-progress", *argv])


def sample(n):
    data = first_n(load_dataset("sample-cifar10", "test"), n)
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(n)])
    return x, y


def test_file_model_end_to_end(tmp_path, factory, capsys):
    out = tmp_path / "out"
    rc = evaluate("--model", factory, "--n-examples", "16", "--attacks", "clean,pgd5,fgsm",
                  "--batch-size", "8", "--out", str(out))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    flags = json.loads((out / "flags.json").read_text())
    # Named by the function, not the file stem (archs), in the JSON, results and table.
    info = json.loads((out / "model_info/sample-cifar10/Linf/lenet5_pgd.json").read_text())
    x, y = sample(16)
    torch.manual_seed(0)
    from robustkit.testing import TinyCNN

    with torch.no_grad():
        expected = (TinyCNN(3, 10, 32).eval()(x).argmax(1) == y).sum().item() / 16
    acc = res["accuracy"]
    assert acc["clean"] == expected
    assert list(acc) == ["clean", "pgd5", "fgsm", "robust"]
    assert acc["robust"] <= min(acc["pgd5"], acc["fgsm"]) <= acc["clean"]
    assert acc["robust"] == sum(flags["robust"]) / 16
    assert all(r == (c and p and f) for r, c, p, f in
               zip(flags["robust"], flags["clean"], flags["pgd5"], flags["fgsm"], strict=True))
    assert res["eps"] == 8 / 255 and res["n_examples"] == 16
    assert res["subset"] == "first 16 test images"
    assert res["attacks"]["pgd5"]["alpha"] == pytest.approx(2 / 255)
    assert {c["name"] for c in res["checks"]} >= {"logits", "deterministic", "gradients"}
    assert info["clean_acc"] == f"{100 * expected:.2f}" and info["autoattack_acc"] is None
    assert res["name"] == info["name"] == "lenet5_pgd"
    printed = capsys.readouterr().out
    assert "lenet5_pgd on sample-cifar10" in printed and "archs" not in printed.split(" on ")[0]
    assert "first 16 test images" in printed and "8/255" in printed and "robust" in printed


def test_registry_model_checkpoint_and_resume(tmp_path, capsys):
    torch.manual_seed(1)
    net = create_model("cifar_cnn", 10, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    ckpt = tmp_path / "best.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "out"
    argv = ["--model", "cifar_cnn", "--checkpoint", str(ckpt), "--n-examples", "12",
            "--attacks", "clean,fgsm", "--batch-size", "6", "--out", str(out)]
    assert evaluate(*argv) == 0
    res = json.loads((out / "results.json").read_text())
    x, y = sample(12)
    with torch.no_grad():
        assert res["accuracy"]["clean"] == (net(x).argmax(1) == y).sum().item() / 12
    assert res["checkpoint"]["tag"] == "best" and len(res["checkpoint"]["sha256"]) == 64
    # Each batch's record holds its wall time, so an unchanged file was not recomputed.
    first = [(out / "state" / f"flags_{k}.json").read_text() for k in ("clean", "fgsm")]
    assert evaluate(*argv) == 0  # resumed: nothing recomputed, same numbers
    assert [(out / "state" / f"flags_{k}.json").read_text() for k in ("clean", "fgsm")] == first
    assert json.loads((out / "results.json").read_text())["accuracy"] == res["accuracy"]
    capsys.readouterr()
    assert evaluate(*argv, "--eps", "4/255") == 2  # other settings, same folder: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "eps" in err[0]
    assert evaluate(*argv, "--eps", "4/255", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["eps"] == 4 / 255


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_net"], "no_such_net"),
    (["--attacks", "clean,pgdx"], "unknown attack 'pgdx'"),
    (["--attacks", "torchattacks:NoSuch"], "NoSuch"),
    (["--eps", "abc"], "--eps"),
    (["--eps", "-1"], "--eps"),
    (["--n-examples", "5000"], "5000"),
    (["--aa-version", "custom"], "--aa-attacks"),
    (["--wrong-classes"], "classes"),
    (["--wrong-checkpoint"], "does not match"),
])
def test_bad_input_is_one_line(tmp_path, factory, capsys, argv, message):
    model = ["--model", factory]
    if argv == ["--wrong-classes"]:
        path = tmp_path / "seven.py"
        path.write_text(FACTORY.format(k=7))
        argv, model = [], ["--model", f"{path}:lenet5_pgd"]
    elif argv == ["--wrong-checkpoint"]:
        ckpt = tmp_path / "other.pt"
        torch.save(create_model("cifar_cnn", 10).state_dict(), ckpt)
        argv, model = ["--checkpoint", str(ckpt)], ["--model", "small_cnn"]
    full = model + ["--n-examples", "4", "--attacks", "clean", "--out", str(tmp_path / "o")]
    rc = evaluate(*full, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0] and err[0].startswith("robustkit evaluate: error")


def test_subprocess_error_has_no_traceback(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(create_model("cifar_cnn", 10).state_dict(), ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "robustkit", "evaluate", "--model", "small_cnn", "--checkpoint",
         str(ckpt), "--dataset", "sample-cifar10", "--n-examples", "4", "--out",
         str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--attacks", "pgdKxR", "robustbench:NAME", "FILE.py:FN", "8/255", "--overwrite"):
        assert word in text


def test_config_file_and_flag_override(tmp_path, factory):
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "sample-cifar10", "attacks": ["clean", "fgsm"],
                                   "eps": "2/255", "n_examples": 8, "batch_size": 4}))
    out = tmp_path / "out"
    assert main(["evaluate", "-c", str(cfg), "--model", factory, "--n-examples", "6",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["eps"] == 2 / 255 and res["n_examples"] == 6 and list(res["attacks"]) == ["fgsm"]
    assert res["batch_size"] == 4  # from the file: no flag given
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the resolved settings
    assert saved["n_examples"] == 6 and saved["eps"] == 2 / 255 and saved["model"] == factory
    cfg.write_text(yaml.safe_dump({"epsilon": 0.1}))
    assert main(["evaluate", "-c", str(cfg), "--model", factory]) == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "evaluate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_eval_config(path, {"model": "small_cnn"})
    assert {s.name for s in parse_attacks(list(cfg.attacks))} >= {
        "pgd20" if "mnist" not in path.name else "pgd40", "autoattack"}
    assert cfg.dataset in path.name and cfg.threat_model in path.name


def test_default_name_is_the_function_or_model_name():
    assert _default_name("path/archs.py:lenet5_pgd") == "lenet5_pgd"
    assert _default_name("C:/models/archs.py:wide") == "wide"  # a colon in the path
    assert _default_name("robustbench:Standard") == "Standard"
    assert _default_name("preact_resnet18") == "preact_resnet18"


def test_attack_list_parsing():
    specs = parse_attacks("clean, pgd20,PGD100x5,cw30,fgsm,autoattack,square,"
                          "torchattacks:Square(n_queries=10, p_init=0.8)")
    assert [s.name for s in specs] == ["pgd20", "pgd100x5", "cw30", "fgsm", "autoattack",
                                       "square", "torchattacks:Square(n_queries=10, p_init=0.8)"]
    assert specs[1].steps == 100 and specs[1].restarts == 5
    assert specs[-1].kwargs == {"n_queries": 10, "p_init": 0.8}
    for bad in ("pgd", "pgd0", "pgd20,pgd20", "torchattacks:Square(10)", "aa"):
        with pytest.raises(ValueError):
            parse_attacks(bad)

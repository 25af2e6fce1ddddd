"""``robustkit evaluate`` reproduces pyautoattack's example ResNet-18 (issue 3's done-when check).

Oracles are independent of robustkit: the official CIFAR-10 ``test_batch`` pickle (first 1,000
test images, ``../shared/data``) read with ``pickle``, a plain-torch clean pass (must be equal
exactly) and ``torchattacks.PGD(eps, alpha=eps/4, steps=20)`` (within one point: both start at
random, so a few borderline images may differ). The model is a standard (non-robust) network, so
at ε = 8/255 both PGD numbers are near 0; ε = 1/255 leaves an accuracy in between, where the
comparison has teeth. ``ROBUSTKIT_REPRO_N`` sets the number of images (default 200 on CPU, 1000
on CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from robustkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "evaluate" / "pyautoattack_resnet18.py"


@pytest.mark.slow
@pytest.mark.parametrize("eps_text", ["8/255", "1/255"])
def test_reproduces_pyautoattack_resnet18(tmp_path, shared_data, capsys, eps_text):
    torchattacks = pytest.importorskip("torchattacks")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = int(os.environ.get("ROBUSTKIT_REPRO_N", 1000 if device == "cuda" else 200))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", f"{SPEC}:load", "--dataset", "sample-cifar10",
               "--n-examples", str(n), "--attacks", "clean,pgd20", "--batch-size", "100",
               "--eps", eps_text,
               "--device", device, "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())

    # Oracle data: the official pickle, uint8 rows of 3072 (R, G, B planes) -> [0, 1].
    with open(shared_data / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = torch.tensor(batch[b"data"][:n]).view(n, 3, 32, 32).float() / 255
    y = torch.tensor(batch[b"labels"][:n])
    spec = importlib.util.spec_from_file_location("repro_model", SPEC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load().to(device).eval()

    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        hit = torch.cat([model(x[i:i + 100]).argmax(1) == y[i:i + 100] for i in range(0, n, 100)])
    clean, pgd = int(hit.sum()), 0
    torch.manual_seed(0)
    eps = int(eps_text.split("/")[0]) / 255
    attack = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True)
    # As the protocol does: attack the clean-correct points (in chunks of the batch size); a
    # clean error is an error under attack. Which images share a batch changes a few borderline
    # outcomes at eps = 1/255, for torchattacks too (measured: 75 vs 77 of 200).
    idx = hit.nonzero().flatten()
    for i in range(0, len(idx), 100):
        j = idx[i:i + 100]
        x_adv = attack(x[j], y[j])
        with torch.no_grad():
            pgd += int((model(x_adv).argmax(1) == y[j]).sum())
    ours = res["n_correct"]
    report = (f"n={n} eps={eps_text} device={device}: clean robustkit {ours['clean']} / plain "
              f"torch {clean}; pgd20 robustkit {ours['pgd20']} / torchattacks.PGD {pgd}")
    with capsys.disabled():
        print("\n" + report)
    assert ours["clean"] == clean, report
    assert abs(ours["pgd20"] - pgd) <= 0.01 * n, report

"""``torchrun -m robustkit evaluate`` (issue 10 §5): 2 gloo processes split the points by whole
batches, keep per-rank resumable state, survive a failing rank without hanging, and rank 0 writes
the same results.json, flags.json and RobustBench JSON as one process (AutoAttack included)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from robustkit.cli import main

REPO = Path(__file__).resolve().parents[1]

FACTORY = '''
import os

import torch
from torch import nn

from robustkit.data import load_dataset


class Centroid(nn.Module):
    """Nearest class mean of the shipped MNIST sample (85 % clean on the first 40 test images).

    With RK_FAIL_RANK set to this process's RANK, the 7th forward pass that takes an input
    gradient raises: the pre-check's one, PGD's 5 steps on the rank's first batch, then the
    first step of its second batch (an injected crash mid-attack)."""

    def __init__(self):
        super().__init__()
        train = load_dataset("sample-mnist", "train")
        x = train.x.float().div(255).flatten(1)
        means = torch.stack([x[train.y == k].mean(0) for k in range(10)])
        self.fc = nn.Linear(784, 10)
        with torch.no_grad():
            self.fc.weight.copy_(2 * means)
            self.fc.bias.copy_(-(means ** 2).sum(1))
        self.grad_calls = 0

    def forward(self, x):
        if x.requires_grad and os.environ.get("RK_FAIL_RANK") == os.environ.get("RANK", "-"):
            self.grad_calls += 1
            if self.grad_calls == 7:
                raise RuntimeError("injected failure")
        return self.fc(x.flatten(1))


def centroid():
    return Centroid()
'''

# AutoAttack custom with APGD-CE only: pyautoattack's Square takes 5,000 queries per point (the
# CLI does not shorten it); APGD-CE keeps its 100 iterations and seeded restarts.
ARGS = ["--dataset", "sample-mnist", "--n-examples", "40", "--batch-size", "8", "--eps", "0.1",
        "--attacks", "clean,pgd5,autoattack", "--aa-version", "custom", "--aa-attacks",
        "apgd-ce", "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(model: str, out: Path, fail_rank: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RK_FAIL_RANK"):
        env.pop(var, None)
    if fail_rank is not None:
        env["RK_FAIL_RANK"] = str(fail_rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "robustkit", "evaluate", "--model", model,
           *ARGS, "--out", str(out)]
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True,
                          timeout=240)


def _batches(path: Path) -> dict:
    return json.loads(path.read_text())["batches"]


def _outputs(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    info = json.loads((out / "model_info/sample-mnist/Linf/centroid.json").read_text())
    keep = ("accuracy", "n_correct", "components", "broken_by", "max_perturbation", "attacks",
            "accuracy_meaning", "n_examples", "subset", "eps", "protocol")
    return {"results": {k: res[k] for k in keep}, "checks": [
        (c["name"], c["severity"], c["message"]) for c in res["checks"]],
        "flags": json.loads((out / "flags.json").read_text()), "model_info": info}


def test_torchrun_evaluate_equals_one_process_and_resumes_per_rank(tmp_path):
    (tmp_path / "centroid.py").write_text(FACTORY)
    model = f"{tmp_path / 'centroid.py'}:centroid"
    out = tmp_path / "out"
    state = out / "state"

    # 1. rank 1 crashes in its second PGD batch: both ranks stop (no hang), the state stays.
    proc = _torchrun(model, out, fail_rank=1)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "injected failure" in proc.stderr
    assert "[rank0]: RuntimeError: rank 1: injected failure" in proc.stderr  # rank 0 knew
    r0, r1 = state / "rank0-of2", state / "rank1-of2"
    # 34 clean-correct points: 5 PGD batches of 8 (global indices), ranks own 0-2 and 3-4
    assert sorted(_batches(r0 / "flags_clean.json")) == ["0", "1", "2"]
    assert sorted(_batches(r1 / "flags_clean.json")) == ["3", "4"]
    assert sorted(_batches(r0 / "flags_pgd5.json")) == ["0", "1", "2"]
    assert sorted(_batches(r1 / "flags_pgd5.json")) == ["3"]
    saved = {p: _batches(p) for p in [r0 / "flags_clean.json", r1 / "flags_clean.json",
                                      r0 / "flags_pgd5.json", r1 / "flags_pgd5.json"]}
    assert not (out / "results.json").exists()

    # 2. the same command resumes: every saved batch is reused as it was (same time_s).
    proc = _torchrun(model, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, batches in saved.items():
        now = _batches(path)
        assert {k: now[k] for k in batches} == batches, path
    assert sorted(_batches(r1 / "flags_pgd5.json")) == ["3", "4"]
    assert sorted(_batches(r1 / "flags_autoattack.json")) == ["3", "4"]
    assert proc.stdout.count("centroid on sample-mnist") == 1  # rank 0 alone prints
    sharded = _outputs(out)
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2

    # 3. one process, same --out: another world size recomputes into its own state (no reuse
    #    of the rank folders), and every number and flag is the sharded run's.
    shutil.copytree(state, tmp_path / "sharded_state")
    assert main(["evaluate", "--model", model, *ARGS, "--out", str(out)]) == 0
    single = _outputs(out)
    assert single == sharded
    assert sorted(_batches(state / "flags_pgd5.json")) == ["0", "1", "2", "3", "4"]
    for r in ("rank0-of2", "rank1-of2"):  # untouched
        for f in (state / r).glob("flags_*.json"):
            assert f.read_text() == (tmp_path / "sharded_state" / r / f.name).read_text()
    acc = single["results"]["accuracy"]
    assert 0 < acc["robust"] < acc["pgd5"] <= acc["clean"] < 1  # the flags carry information
    assert single["results"]["components"]["autoattack"]["apgd-ce"] == acc["autoattack"]

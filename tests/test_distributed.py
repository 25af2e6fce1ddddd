"""DDP through the real Trainer: 2 CPU processes with gloo; sharded evaluation = one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustkit import distributed as dist
from robustkit.attacks.pgd import PGD
from robustkit.testing import TinyCNN, separable_toy_data
from robustkit.training.callbacks import EvalCallback
from robustkit.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, world", [(0, 2), (7, 1), (7, 3), (10, 4), (3, 5), (1000, 4)])
def test_shard_indices_partition_in_order(n, world):
    shards = [dist.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.init_from_env("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert dist.is_main() and dist.rank() == 0 and dist.world_size() == 1
    t = torch.arange(4.0)
    assert torch.equal(dist.all_reduce_mean(t), t) and torch.equal(dist.all_gather_cat(t), t)
    model = TinyCNN()
    assert dist.wrap_ddp(model) is model and dist.unwrap(model) is model
    assert dist.shard_indices(5) == range(5)
    dist.barrier()
    dist.cleanup()




WORKER = '''
import json, os, sys
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit.attacks.pgd import PGD  # imported once, before the fork
from robustkit import distributed as dist
from robustkit.training.callbacks import CheckpointCallback, EvalCallback, JSONLCallback
from robustkit.objectives.base import Objective, ObjectiveOutput
from robustkit.testing import TinyCNN, separable_toy_data
from robustkit.training.trainer import Trainer


class CE(Objective):
    def loss(self, x, y, adv, ctx):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        return ObjectiveOutput(loss, logits, {"margin": logits.detach()[:, 0]})


def worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = dist.init_from_env("cpu")
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = TinyCNN(1, 2, 8)
    ddp = dist.wrap_ddp(model, info.device)
    x, y = separable_toy_data(128)
    ds = TensorDataset(x, y, torch.arange(128))
    loader = DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, shuffle=True, seed=0))
    hx, hy = separable_toy_data(50, seed=1)
    holdout = DataLoader(TensorDataset(hx, hy), batch_size=8)
    ev = EvalCallback(holdout, {"pgd5": PGD(model, eps=0.25, alpha=0.0625, steps=5)})
    cbs = [ev, CheckpointCallback(out, monitor="eval/pgd5"), JSONLCallback(out + "/metrics.jsonl")]
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    state = Trainer(ddp, CE(ddp), opt, epochs=3, callbacks=cbs).fit(loader)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    every = dist.all_gather_cat(flat[None])
    res = {
        "world": info.world_size,
        "same_weights": all(torch.equal(every[0], p) for p in every),
        "losses": [h["train/loss"] for h in state.history],
        "hist_n": state.histograms["margin"].numel(),
        "eval": ev.evaluate(ddp),
        "gathered": dist.all_gather_cat(torch.arange(rank + 1)).tolist(),
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.cleanup()


if __name__ == "__main__":
    # fork: the workers inherit the imported modules instead of importing them again (faster).
    mp.start_processes(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2,
                       start_method="fork")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "run"
    out.mkdir()
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["same_weights"] and r1["same_weights"]
    assert r0["losses"] == r1["losses"]  # means reduced over both ranks
    assert r0["losses"][-1] < 0.5 * r0["losses"][0]
    assert r0["hist_n"] == r1["hist_n"] == 128  # (N,) metrics gathered from both ranks
    assert r0["gathered"] == r1["gathered"] == [0, 0, 1]  # unequal sizes, rank order
    # Rank 0 alone wrote: three epoch lines, not six; the checkpoint holds both ranks' RNGs.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 3 and len(last["rng"]) == 2
    # Sharded evaluation (4 + 3 batches on the two ranks) = one process on the same weights.
    model = TinyCNN(1, 2, 8)
    model.load_state_dict(last["model"])
    hx, hy = separable_toy_data(50, seed=1)
    single = EvalCallback(DataLoader(TensorDataset(hx, hy), batch_size=8),
                          {"pgd5": PGD(model, eps=0.25, alpha=0.0625, steps=5)})
    assert r0["eval"] == r1["eval"] == single.evaluate(model)
    assert 0 < r0["eval"]["eval/pgd5"] < r0["eval"]["eval/clean"]  # the attack did something

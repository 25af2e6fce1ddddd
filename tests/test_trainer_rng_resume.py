"""Resume restores every rank's own random streams (#18 d): 2 gloo processes, and the old and
changed-world-size cases in one process."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from robustkit import distributed as dist
from robustkit.objectives.base import Objective, ObjectiveOutput
from robustkit.testing import TinyCNN, separable_toy_data
from robustkit.training.checkpoint import load_checkpoint, save_checkpoint
from robustkit.training.trainer import Trainer
from robustkit.utils import seed_everything

REPO = Path(__file__).resolve().parents[1]

WORKER = '''
import hashlib, json, os, random, sys
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit import distributed as dist
from robustkit.objectives.base import Objective, ObjectiveOutput
from robustkit.testing import TinyCNN, separable_toy_data
from robustkit.training.callbacks import CheckpointCallback
from robustkit.training.checkpoint import load_checkpoint
from robustkit.training.trainer import Trainer
from robustkit.utils import seed_everything


class Noisy(Objective):
    """Draws from the global torch, NumPy and Python RNGs at every step, as augmentation and
    random starts do: a rank that resumed another rank's streams trains differently."""

    def loss(self, x, y, adv, ctx):
        noise = 0.1 * torch.randn_like(x) + float(np.random.uniform(-0.05, 0.05))
        x = (x + noise + random.uniform(-0.05, 0.05)).clamp(0, 1)
        logits = self.model(x)
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {})


def rng_digest():
    """This process's three global RNG states, hashed (reading them draws nothing)."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    name, keys, pos, has_gauss, cached = np.random.get_state()
    h.update(keys.tobytes() + repr((pos, has_gauss, cached)).encode())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()


class Killed(BaseException):
    pass


class KillAfter:
    """Put after CheckpointCallback: last.pt holds this epoch, then the run dies."""

    def __init__(self, epoch, seen):
        self.epoch, self.seen = epoch, seen

    def on_epoch_end(self, trainer):
        if trainer.state.epoch == self.epoch:
            self.seen["at_kill"] = rng_digest()
            raise Killed


def run(rank, out, kill=None, resume=False):
    # each rank its own streams, as robustkit train seeds cfg.seed + rank
    random.seed(100 + rank), np.random.seed(100 + rank), torch.manual_seed(100 + rank)
    model = TinyCNN(1, 2, 8)
    ddp = dist.wrap_ddp(model)
    x, y = separable_toy_data(64)
    ds = TensorDataset(x, y, torch.arange(64))
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=True, seed=0))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    seen = {}
    cbs = [CheckpointCallback(out)] + ([KillAfter(kill, seen)] if kill else [])
    trainer = Trainer(ddp, Noisy(ddp), opt, epochs=3, callbacks=cbs)
    if resume:
        random.seed(999), np.random.seed(999), torch.manual_seed(999)  # undone by the load
        trainer.load_state_dict(load_checkpoint(os.path.join(out, "last.pt")))
        seen["after_load"] = rng_digest()
    try:
        trainer.fit(loader)
    except Killed:
        dist.barrier()  # rank 0 has written last.pt before it raised
        return seen
    seen["end"] = rng_digest()
    seen["draws"] = [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()]
    seen["weights"] = torch.nn.utils.parameters_to_vector(model.parameters()).tolist()
    return seen


def worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    res = {"straight": run(rank, os.path.join(out, "straight")),
           "killed": run(rank, os.path.join(out, "resumed"), kill=1)}
    res["resumed"] = run(rank, os.path.join(out, "resumed"), resume=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.cleanup()


if __name__ == "__main__":
    mp.start_processes(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2,
                       start_method="fork")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_resume_their_own_random_streams(tmp_path):
    """Kill after epoch 1 of 3 and resume: on each rank the torch, NumPy and Python RNG states
    right after the load equal those at the kill, and at the end those of a run that was never
    interrupted (so do the weights, which all-reduce both ranks' noisy gradients)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                          os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(ranks):
        assert res["resumed"]["after_load"] == res["killed"]["at_kill"], f"rank {r}"
        assert res["resumed"]["end"] == res["straight"]["end"], f"rank {r}"
        assert res["resumed"]["draws"] == res["straight"]["draws"], f"rank {r}"
        assert res["resumed"]["weights"] == res["straight"]["weights"], f"rank {r}"
    # the ranks' streams differ, so restoring rank 0's on rank 1 would be caught
    assert ranks[0]["killed"]["at_kill"] != ranks[1]["killed"]["at_kill"]
    assert len(load_checkpoint(tmp_path / "resumed" / "last.pt")["rng"]) == 2


# ----------------------------------------------------------- single process: the load rules


class _CE(Objective):
    def loss(self, x, y, adv, ctx):
        logits = self.model(x)
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {})


def _trainer() -> Trainer:
    model = TinyCNN(1, 2, 8)
    return Trainer(model, _CE(model), torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)


def _draws() -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()]


def _checkpoint(tmp_path) -> Path:
    x, y = separable_toy_data(16)
    t = _trainer()
    t.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    save_checkpoint(tmp_path / "c.pt", t.state_dict())
    return tmp_path / "c.pt"


def test_a_single_rng_state_as_a_dict_still_loads(tmp_path):
    """A checkpoint holding one state (a dict, not a per-rank list) restores it."""
    state = load_checkpoint(_checkpoint(tmp_path))
    expected = _draws_after(state)
    state["rng"] = state["rng"][0]
    assert _draws_after(state) == expected


def _draws_after(state) -> list:
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    _trainer().load_state_dict(state)
    return _draws()


def test_more_ranks_than_saved_states_get_distinct_streams(tmp_path, monkeypatch, caplog):
    """Resumed on 2 ranks from a 1-process checkpoint: rank 0 continues the saved streams,
    rank 1 gets its own (reproducibly), not a copy of rank 0's."""
    state = load_checkpoint(_checkpoint(tmp_path))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with caplog.at_level(logging.WARNING, "robustkit.training.trainer"):
        rank0 = _draws_after(state)
    assert ("checkpoint has RNG states of 1 ranks, now 2: random streams are not those of an "
            "uninterrupted run") in caplog.text
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    assert _draws_after(state) == rank0  # the saved streams themselves
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    rank1 = _draws_after(state)
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))
    assert _draws_after(state) == rank1


def test_ranks_beyond_the_saved_states_never_share_a_stream(tmp_path, monkeypatch):
    """Resumed on 128 ranks from an 8-rank checkpoint: ranks 0-7 continue their own saved
    streams, ranks 8-127 reseed from state r % 8; no two of the 128 ranks draw the same numbers
    (sixteen ranks start from each saved state, and the eight states' reseeds must not meet)."""
    state = load_checkpoint(_checkpoint(tmp_path))
    saved, continued = [], []
    for seed in range(8):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        saved.append(_trainer().state_dict()["rng"][0])
        continued.append(json.dumps(_draws()))  # what rank `seed` must draw after the resume
    state["rng"] = saved
    monkeypatch.setattr(dist, "world_size", lambda: 128)
    draws = []
    for r in range(128):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        draws.append(json.dumps(_draws_after(state)))
    assert len(set(draws)) == 128
    assert draws[:8] == continued  # ranks 0-7: the saved streams themselves


@pytest.mark.gpu
def test_the_cuda_stream_resumes_and_a_cpu_checkpoint_loads_on_cuda():
    """On CUDA the checkpoint also holds the CUDA generator's state and a resume takes it back;
    a checkpoint written on the CPU (no CUDA state) still resumes on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def cuda_trainer() -> Trainer:
        model = TinyCNN(1, 2, 8)
        return Trainer(model, _CE(model), torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
                       device="cuda")

    t = cuda_trainer()
    torch.cuda.manual_seed(3)
    state = t.state_dict()
    assert "cuda" in state["rng"][0]
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed(4)
    t.load_state_dict(state)
    assert torch.rand(4, device="cuda").tolist() == expected
    cpu_state = _trainer().state_dict()
    assert "cuda" not in cpu_state["rng"][0]
    cuda_trainer().load_state_dict(cpu_state)


def test_a_rank_beyond_the_saved_states_reseeds_from_its_state_plus_its_rank(tmp_path,
                                                                             monkeypatch):
    """The rule of ``_load_rng``, checked against a plain replay: rank 2 of 3 resumed from a
    1-process checkpoint takes saved state 2 % 1 = 0, draws a seed in [0, 2**31 - 1) from it,
    adds its rank and seeds every generator with that (a reproducible, documented stream)."""
    state = load_checkpoint(_checkpoint(tmp_path))
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 2)
    got = _draws_after(state)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    _trainer().load_state_dict(state)  # the saved state itself, then the replayed reseed
    seed_everything(int(torch.randint(0, 2**31 - 1, ()).item()) + 2)
    assert _draws() == got


def test_a_cuda_checkpoint_resumes_on_the_cpu_without_touching_cuda(tmp_path, monkeypatch):
    """A checkpoint written on CUDA (its RNG state holds "cuda") resumed on the CPU restores the
    CPU streams and never calls the CUDA generator (no CUDA on the machine, or not wanted)."""
    state = load_checkpoint(_checkpoint(tmp_path))
    expected = _draws_after(state)
    state["rng"][0]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: calls.append(a))
    assert _draws_after(state) == expected
    assert "cuda" not in _trainer().state_dict()["rng"][0]
    assert calls == []

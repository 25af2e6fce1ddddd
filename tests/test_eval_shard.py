"""Sharded evaluation (2 gloo processes) equals one process; EvalCallback runs evaluate_attacks;
neither the training package nor the evaluation imports an attack."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustkit.attacks.pgd import PGD
from robustkit.evaluation import evaluate_attacks
from robustkit.testing import LinearModel, TinyCNN, random_batch
from robustkit.training.callbacks import EvalCallback
from robustkit.training.callbacks import evaluation as evaluation_callback

REPO = Path(__file__).resolve().parents[1]


WORKER = '''
import json, os, sys
import torch
import torch.multiprocessing as mp

from robustkit import distributed as dist
from robustkit.attacks.base import Attack, AttackResult
from robustkit.attacks.pgd import PGD
from robustkit.evaluation import evaluate_attacks
from robustkit.testing import LinearModel


class Components(Attack):
    """Breaks points by id (pixel 0 holds id / 100): ids % 5 == 0 by sub-attack 0, % 7 == 0 by 1."""

    components = ["first", "second"]

    def __init__(self, model):
        super().__init__(model, eps=0.0)

    def _perturb(self, x, y):
        ids = (x[:, 0, 0, 0] * 100).round().long()
        by = torch.full_like(ids, -1)
        by[ids % 7 == 0] = 1
        by[ids % 5 == 0] = 0
        return AttackResult(x.clone(), {"success": by >= 0, "broken_by": by})


def setup():
    """52 points (7 batches of 8: ranks take 4 + 3) on the decision boundary of a linear model,
    so PGD's seeded random start decides many flags."""
    torch.manual_seed(0)
    model = LinearModel((3, 8, 8), 10).eval()
    x = 0.5 + 0.01 * torch.randn(52, 3, 8, 8)
    x[:, 0, 0, 0] = torch.arange(52) / 100
    y = model(x).argmax(1)
    y[::9] = (y[::9] + 1) % 10  # a few clean mistakes
    attacks = {"pgd": PGD(model, eps=0.1, alpha=1e-4, steps=1), "parts": Components(model)}
    return model, (x, y), attacks


def flags(result):
    out = {"clean": result.clean.tolist(), **{k: v.tolist() for k, v in result.correct.items()}}
    out.update({f"parts/{k}": v.tolist() for k, v in result.components["parts"].items()})
    return out


def worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    model, data, attacks = setup()
    res = {p: flags(evaluate_attacks(model, data, attacks, batch_size=8, protocol=p, seed=3,
                                     shard=True)) for p in ("standalone", "cascade")}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.cleanup()


if __name__ == "__main__":
    mp.start_processes(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2,
                       start_method="fork")  # fork: the workers inherit the imports (faster)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_evaluation_equals_one_process(tmp_path):
    script = tmp_path / "eval_worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    spec = importlib.util.spec_from_file_location("eval_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model, data, attacks = worker.setup()
    for protocol in ("standalone", "cascade"):
        single = worker.flags(evaluate_attacks(model, data, attacks, batch_size=8,
                                               protocol=protocol, seed=3))
        assert ranks[0][protocol] == ranks[1][protocol] == single, protocol
    pgd = torch.tensor(single["pgd"])
    assert 0 < pgd.sum() < torch.tensor(single["clean"]).sum()  # the seeds decided something


@pytest.fixture
def holdout():
    torch.manual_seed(0)
    model = TinyCNN(3, 10, 8)
    x, _ = random_batch(40, (3, 8, 8), 10, seed=1)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    return model.train(), DataLoader(TensorDataset(x, y, torch.arange(40)), batch_size=8)


def test_eval_callback_runs_the_evaluation_runner(holdout, monkeypatch):
    model, loader = holdout
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return evaluate_attacks(*args, **kwargs)

    monkeypatch.setattr(evaluation_callback, "evaluate_attacks", spy)
    bn = model.features[1].running_mean.clone()
    pgd = PGD(model, eps=0.05, alpha=0.02, steps=3)
    got = EvalCallback(loader, {"pgd3": pgd}, seed=5).evaluate(model)
    assert calls and calls[0]["shard"] and calls[0]["seed"] == 5 and calls[0]["batch_size"] == 8
    assert model.training and torch.equal(model.features[1].running_mean, bn)  # eval mode, restored
    ref = evaluate_attacks(model, loader.dataset, {"pgd3": pgd}, batch_size=8, seed=5)
    assert got == {"eval/clean": ref.accuracy()["clean"], "eval/pgd3": ref.accuracy()["pgd3"]}
    assert got["eval/clean"] == 0.75 and got["eval/pgd3"] < 0.75


def test_eval_callback_builds_attacks_on_the_bare_model(holdout):
    model, loader = holdout
    seen = []

    def attacks(bare):
        seen.append(bare)
        return {"pgd1": PGD(bare, eps=0.05, alpha=0.02, steps=1),
                "pgd3": PGD(bare, eps=0.05, alpha=0.02, steps=3)}

    cb = EvalCallback(loader, attacks, max_batches=2)
    got = cb.evaluate(nn.DataParallel(model))  # a wrapper, as DDP is: attacks get the module
    assert seen == [model]
    assert list(got) == ["eval/clean", "eval/pgd1", "eval/pgd3"]
    ref = evaluate_attacks(model, TensorDataset(*loader.dataset[:16]), attacks(model),
                           batch_size=8)
    assert got["eval/pgd3"] == ref.accuracy()["pgd3"]  # the first 2 batches only


@pytest.mark.parametrize("kw, match", [
    ({"attacks": 3}, "attacks"), ({"every": 0}, "every"), ({"max_batches": 0}, "max_batches"),
])
def test_eval_callback_bad_arguments(holdout, kw, match):
    _, loader = holdout
    with pytest.raises(ValueError, match=match):
        EvalCallback(loader, **{"attacks": {}, **kw})


def _imports(path: Path) -> list[str]:
    """Modules a file imports at run time (``if TYPE_CHECKING:`` blocks skipped)."""
    out = []
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


@pytest.mark.parametrize("folder", ["training", "evaluation"])
def test_training_and_evaluation_import_no_attack(folder):
    """architecture.md §2: the trainer and the runner take built attacks. Only the composition
    root of ``robustkit.evaluate`` (evaluation/api.py, the library call behind the CLI) builds
    them from spec strings; the runner, protocol, state and checks never import an attack."""
    roots = {REPO / "robustkit" / "evaluation" / "api.py"}
    paths = sorted((REPO / "robustkit" / folder).rglob("*.py"))  # callbacks/ too
    assert folder != "evaluation" or roots <= set(paths)  # the exemption names a real file
    for path in paths:
        if path in roots:
            continue
        bad = [m for m in _imports(path) if m.startswith("robustkit.attacks")]
        assert not bad, (str(path.relative_to(REPO)), bad)


def test_sharding_without_a_process_group_is_the_plain_run():
    model = LinearModel((3, 8, 8), 10).eval()
    x, y = random_batch(20, (3, 8, 8), 10)
    attacks = {"pgd": PGD(model, eps=0.05, steps=2)}
    a = evaluate_attacks(model, (x, y), attacks, batch_size=6, seed=1, shard=True)
    b = evaluate_attacks(model, (x, y), attacks, batch_size=6, seed=1)
    assert torch.equal(a.correct["pgd"], b.correct["pgd"]) and torch.equal(a.clean, b.clean)

"""``robustkit train``: the smoke run end to end on the CPU, resume, errors, help, schedules."""

from __future__ import annotations

import json
import logging
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from robustkit.cli import main
from robustkit.config import build, load_config, to_container
from robustkit.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
QUIET = ["log.progress=false", "trainer.device=cpu"]


def _train(out: Path, *overrides: str) -> int:
    return main(["train", "-c", SMOKE, f"trainer.out_dir={out}", *QUIET, *overrides])


def test_smoke_run_writes_the_run_directory(tmp_path, capsys):
    assert _train(tmp_path) == 0
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    cfg = load_config(tmp_path / "config.yaml")  # the saved config is a valid config
    assert cfg.trainer.out_dir == str(tmp_path) and cfg.data.limit == 256
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 4  # 256 images / batch 64
    assert state["config"] == to_container(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert len(epochs) == 1 and 0 <= epochs[0]["eval/pgd3"] <= epochs[0]["eval/clean"] <= 1
    assert "train/steps_per_sample" in epochs[0]  # SRD-DAT's cost is logged
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "eval/pgd3" in out  # the summary says where things are


def test_resume_continues_where_the_run_stopped(tmp_path, monkeypatch):
    """A 2-epoch run stopped (Ctrl-C) in its second epoch and resumed from its last.pt ends as
    the uninterrupted run. Both runs are configured for 2 epochs: SRD-DAT's schedules depend on
    trainer.epochs, so extending a finished 1-epoch run is not the same run."""
    from robustkit.training.trainer import Trainer

    first, resumed, straight = tmp_path / "first", tmp_path / "resumed", tmp_path / "straight"
    fast = ["log.tensorboard=false", "trainer.epochs=2"]
    real = Trainer._train_step

    def train_step(self, batch, epoch):
        if self.state.step == 5:  # in epoch 2 (4 steps per epoch): last.pt holds epoch 1
            raise KeyboardInterrupt
        return real(self, batch, epoch)

    monkeypatch.setattr(Trainer, "_train_step", train_step)
    assert _train(first, *fast) == 130
    monkeypatch.undo()
    assert load_checkpoint(first / "last.pt")["epoch"] == 1
    assert _train(resumed, *fast, f"trainer.resume={first / 'last.pt'}") == 0
    assert _train(straight, *fast) == 0
    a, b = load_checkpoint(resumed / "last.pt"), load_checkpoint(straight / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 8
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert a["history"][-1]["eval/pgd3"] == b["history"][-1]["eval/pgd3"]


def test_unknown_key_exits_2_with_one_line(tmp_path, capsys):
    assert _train(tmp_path, "trainer.epoch=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'trainer.epoch'" in err and "'trainer.epochs'" in err
    assert not tmp_path.joinpath("config.yaml").exists()


def test_bad_objective_param_exits_2_naming_it(tmp_path, capsys):
    assert _train(tmp_path, "objective.params.bata=3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bata" in err and "beta" in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_help_explains_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("key=value", "8/255", "trainer.resume", "torchrun", "--dry-run"):
        assert needle in text, needle


def test_dry_run_builds_and_trains_nothing(tmp_path, capsys):
    assert _train(tmp_path, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run:" in out and "small_cnn" in out and "4 steps" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_train_script_is_a_thin_wrapper(tmp_path, monkeypatch, capsys):
    argv = ["train/train.py", "--dry-run", "-c", SMOKE, f"trainer.out_dir={tmp_path}", *QUIET]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "train" / "train.py"), run_name="__main__")
    assert exit_.value.code == 0 and "dry run:" in capsys.readouterr().out


def test_limit_trains_on_the_first_images(tmp_path):
    r = build(load_config(SMOKE, [f"trainer.out_dir={tmp_path}", *QUIET]))
    assert len(r.loaders.train.dataset) == 256 and r.steps_per_epoch == 4
    idx = torch.cat([batch[2] for batch in r.loaders.train])
    assert sorted(idx.tolist()) == list(range(256))  # each of the first 256, once per epoch


def _lrs(tmp_path, *overrides: str) -> list[float]:
    """The learning rate of every optimizer step of a smoke run (4 steps per epoch)."""
    r = build(load_config(SMOKE, [f"trainer.out_dir={tmp_path}", *QUIET, "optim.lr=1.0",
                                  *overrides]))
    lrs = []
    for _ in range(r.cfg.trainer.epochs * r.steps_per_epoch):
        lrs.append(r.optimizer.param_groups[0]["lr"])
        r.optimizer.step()  # no gradients: only silences the scheduler-order warning
        r.scheduler.step()
    return lrs


def test_multistep_milestones_in_epochs_or_fractions(tmp_path):
    epochs = _lrs(tmp_path, "trainer.epochs=4", "optim.schedule=multistep",
                  "optim.milestones=[2, 3]", "optim.gamma=0.5")
    assert epochs == [1.0] * 8 + [0.5] * 4 + [0.25] * 4  # x0.5 after epochs 2 and 3
    fractions = _lrs(tmp_path, "trainer.epochs=4", "optim.schedule=multistep",
                     "optim.milestones=[1/2, 3/4]", "optim.gamma=0.5")
    assert fractions == epochs


def test_cosine_onecycle_and_warmup(tmp_path):
    cosine = _lrs(tmp_path, "trainer.epochs=2", "optim.schedule=cosine")
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True)
    assert cosine[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    onecycle = _lrs(tmp_path, "trainer.epochs=5", "optim.schedule=onecycle",
                    "optim.warmup_epochs=1")
    assert onecycle[0] == 0.0 and onecycle[4] == 1.0 and max(onecycle) == 1.0  # peak at epoch 1
    assert onecycle[4:] == sorted(onecycle[4:], reverse=True) and onecycle[-1] > 0
    warm = _lrs(tmp_path, "trainer.epochs=2", "optim.schedule=constant", "optim.warmup_epochs=1")
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_attack_section_builds_the_training_attack(tmp_path):
    path = tmp_path / "at.yaml"
    path.write_text(
        "data: {name: sample-mnist, batch_size: 64, holdout: 64, limit: 128}\n"
        "model: {name: small_cnn}\n"
        "attack: {name: pgd, params: {eps: 3/10, alpha: 1/10, steps: 2, loss: ce}}\n"
        "objective: {name: pgd_at}\n"
        f"trainer: {{epochs: 1, out_dir: {tmp_path / 'run'}, device: cpu}}\n"
    )
    r = build(load_config(path))
    attack = r.objective.attack
    assert type(attack).__name__ == "PGD" and attack.model is r.model  # the bare model
    assert attack.eps == pytest.approx(0.3) and attack.steps == 2


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29761", "-m", "robustkit", "train", "-c", SMOKE,
           f"trainer.out_dir={tmp_path}", *QUIET]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained srd_dat") == 1  # only rank 0 prints and writes
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 4 and len(state["rng"]) == 2  # global batch 64 = 2 ranks x 32


@pytest.mark.parametrize("overrides, eps, alpha, norm", [
    ([], 0.3, 0.1, "Linf"),  # smoke.yaml: 3 steps of 0.1
    (["trainer.eval_alpha=null", "trainer.eval_steps=4"], 0.3, 0.075, "Linf"),  # eps/4
    (["trainer.eval_norm=L2", "trainer.eval_alpha=null", "trainer.eval_steps=8"], 2.0, 0.5,
     "L2"),  # the dataset's L2 eps (MNIST: 2.0)
    (["trainer.eval_eps=0.2", "trainer.eval_alpha=1/10"], 0.2, 0.1, "Linf"),
])
def test_cli_builds_the_held_out_attack(tmp_path, monkeypatch, overrides, eps, alpha, norm):
    """The CLI, not training/, builds the held-out PGD and hands it to EvalCallback."""
    import robustkit.training.callbacks as callbacks

    seen = {}

    class Recorder(callbacks.EvalCallback):  # the real callback, its arguments recorded
        def __init__(self, loader, attacks, **kwargs):
            seen.update(loader=loader, attacks=attacks, **kwargs)
            super().__init__(loader, attacks, **kwargs)

    monkeypatch.setattr(callbacks, "EvalCallback", Recorder)
    r = build(load_config(SMOKE, [f"trainer.out_dir={tmp_path}", *QUIET, *overrides]))
    (name, pgd), = seen["attacks"].items()
    steps = r.cfg.trainer.eval_steps
    assert name == f"pgd{steps}" and type(pgd).__name__ == "PGD"
    assert pgd.model is r.model  # the bare model
    s = pgd.settings()
    assert s["eps"] == pytest.approx(eps) and s["alpha"] == pytest.approx(alpha)
    assert (s["steps"], s["norm"], s["loss"], s["random_start"], s["select"], s["restarts"],
            s["targeted"], s["stop_on_success"]) == (steps, norm, "ce", True, "best", 1, False,
                                                   True)
    assert isinstance(pgd.generator, torch.Generator)  # reseeded per batch: same starts
    assert seen["loader"] is r.loaders.holdout and seen["seed"] == r.cfg.seed
    assert seen["every"] == 1 and seen["n"] == 64  # exactly eval_n (smoke: 64) images


def test_held_out_metrics_follow_the_cli_attack(tmp_path):
    """A fitted epoch stores eval/clean and eval/pgd<k> from the CLI-built attack."""
    assert _train(tmp_path, "log.tensorboard=false", "trainer.eval_steps=4",
                  "trainer.eval_alpha=null") == 0
    state = load_checkpoint(tmp_path / "last.pt")
    last = state["history"][-1]
    assert 0 <= last["eval/pgd4"] <= last["eval/clean"] <= 1 and "eval/pgd3" not in last


def test_the_lr_printed_and_logged_per_epoch_is_the_one_it_used(tmp_path, capsys):
    """multistep x0.5 after epochs 1 and 2 (smoke: lr 0.01, sample-mnist, 2 steps per epoch):
    the progress lines on stderr and metrics.jsonl say 0.01, 0.005, 0.0025 (#18 c)."""
    assert _train(tmp_path, "log.progress=true", "log.tensorboard=false", "data.limit=128",
                  "trainer.epochs=3", "trainer.eval_every=null", "sensitivity.enabled=false",
                  "saliency.enabled=false", "optim.schedule=multistep",
                  "optim.milestones=[1, 2]", "optim.gamma=0.5") == 0
    err = capsys.readouterr().err
    printed = [m.group(1) for m in re.finditer(r"epoch \d/3: .*?\blr=([0-9.e-]+)", err)]
    assert printed == ["0.01", "0.005", "0.0025"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in lines if r["type"] == "epoch"] == [0.01, 0.005, 0.0025]
    assert [r["lr"] for r in lines if r["type"] == "step"] == [0.01, 0.01, 0.005, 0.005,
                                                                0.0025, 0.0025]


@pytest.mark.parametrize("epochs, checkpoint_every, eval_every", [(5, 2, 3), (2, 3, 7)])
def test_cli_final_epoch_ends_in_last_pt_and_is_evaluated(tmp_path, epochs, checkpoint_every,
                                                          eval_every):
    """#18 a through the CLI's wiring (sample-mnist smoke run, 2 steps per epoch): last.pt holds
    the trained model's tensors, the final epoch has eval/pgd3, best.pt the first best."""
    r = build(load_config(SMOKE, [
        f"trainer.out_dir={tmp_path}", *QUIET, "log.tensorboard=false", "data.limit=128",
        "sensitivity.enabled=false", "saliency.enabled=false", f"trainer.epochs={epochs}",
        f"trainer.checkpoint_every={checkpoint_every}", f"trainer.eval_every={eval_every}"]))
    state = r.trainer.fit(r.loaders.train)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == epochs
    for key, value in r.model.state_dict().items():
        assert torch.equal(last["model"][key], value), key
    scored = [i + 1 for i, h in enumerate(state.history) if "eval/pgd3" in h]
    assert scored == sorted({e for e in range(1, epochs + 1) if e % eval_every == 0} | {epochs})
    values = [state.history[e - 1]["eval/pgd3"] for e in scored]
    first_best = scored[values.index(max(values))]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == state.best_epoch == first_best


def test_eval_every_null_runs_no_held_out_evaluation(tmp_path, capsys):
    """#18: trainer.eval_every=null is the way to switch the held-out evaluation off (0 is
    refused at load): no EvalCallback, no eval/* in any epoch, no best.pt, and the final epoch
    still in last.pt (2 epochs, checkpoint_every 5: last.pt only because it is the final one)."""
    assert _train(tmp_path, "log.tensorboard=false", "data.limit=128", "trainer.epochs=2",
                  "trainer.checkpoint_every=5", "trainer.eval_every=null",
                  "sensitivity.enabled=false", "saliency.enabled=false") == 0
    assert "(config.yaml, last.pt, metrics.jsonl)" in capsys.readouterr().out
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and last["best"] is None and last["best_epoch"] is None
    assert [sorted(k for k in h if k.startswith("eval/")) for h in last["history"]] == [[], []]
    assert not (tmp_path / "best.pt").exists()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [1, 2]
    assert not any(k.startswith("eval/") for r in lines for k in r)
    assert (load_config(SMOKE, ["trainer.eval_every=null"]).trainer.eval_every is None)


def test_eval_n_scores_exactly_that_many_images(tmp_path, caplog):
    """#18 h: trainer.eval_n=200 with held-out batches of 128 scores 200 images (128 + 72), not
    two whole batches (256); the log says n=200 (sample-mnist smoke run)."""
    with caplog.at_level(logging.INFO, "robustkit.training.callbacks.evaluation"):
        assert _train(tmp_path, "log.tensorboard=false", "data.limit=128", "data.holdout=400",
                      "data.eval_batch_size=128", "trainer.eval_n=200",
                      "sensitivity.enabled=false", "saliency.enabled=false") == 0
    said = [r.getMessage() for r in caplog.records if "held-out evaluation" in r.getMessage()]
    assert len(said) == 1 and "n=200 images" in said[0], said
    assert re.search(r"clean \d+/200, pgd3 \d+/200$", said[0]), said[0]
    last = load_checkpoint(tmp_path / "last.pt")["history"][-1]
    for key in ("eval/clean", "eval/pgd3"):  # fractions of 200
        assert last[key] * 200 == pytest.approx(round(last[key] * 200), abs=1e-9), key


def test_the_log_names_the_training_images_used_under_data_limit(tmp_path, caplog, capsys):
    """#18 j: data.limit=100 on sample-mnist: the data log, the "training ..." line and the dry
    run's summary say 100 training images, not the split's 5936."""
    with caplog.at_level(logging.INFO):
        assert _train(tmp_path / "dry", "data.limit=100", "--dry-run") == 0
        assert "on 100 sample-mnist training images" in capsys.readouterr().out
        assert _train(tmp_path / "run", "log.tensorboard=false", "data.limit=100",
                      "trainer.eval_every=null", "sensitivity.enabled=false",
                      "saliency.enabled=false") == 0
    said = [r.getMessage() for r in caplog.records]
    data = [m for m in said if m.startswith("sample-mnist: ")]
    assert len(data) == 2 and all(m.startswith("sample-mnist: 100 training (the first of 5936")
                                  for m in data), data
    assert any(m.startswith("training small_cnn") and "on 100 sample-mnist training images" in m
               for m in said), said

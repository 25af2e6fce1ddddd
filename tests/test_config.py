"""Typed configs: every training YAML loads, validates and wires; errors name the key.

Wiring uses small synthetic loaders of each dataset's shape (no data files needed, no forward
through the big models); a slow test dry-runs the real loaders on ``../shared/data``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit.cli import main
from robustkit.cli.train import build
from robustkit.config import ConfigError, build_config, load_config, save_config, to_container
from robustkit.data import DATASETS, Loaders
from robustkit.objectives import OBJECTIVES
from robustkit.training.callbacks import CheckpointCallback, EvalCallback
from robustkit.training.checkpoint import check_plain

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(
    [*(ROOT / "configs" / "train").glob("*.yaml"), *(ROOT / "configs" / "demo").glob("*.yaml"),
     ROOT / "configs" / "smoke.yaml"]
)
SMOKE = ROOT / "configs" / "smoke.yaml"
# Big inputs or big models: build them, but never run a forward pass in the fast suite.
_NO_FORWARD = {"preact_resnet18", "resnet18", "wrn_28_10", "wrn_34_10"}


def _fake_loaders(name: str, n: int = 8) -> Loaders:
    """Loaders of ``(x, y, idx)`` with the dataset's shape and classes (random pixels)."""
    info = DATASETS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *info.input_shape), generator=g)
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    ds = TensorDataset(x, y, torch.arange(n))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    return Loaders(DataLoader(ds, batch_size=4, sampler=sampler), DataLoader(ds, batch_size=4),
                   DataLoader(ds, batch_size=4), info)


def test_the_configs_exist():
    names = {p.stem for p in TRAIN_CONFIGS}
    for objective in OBJECTIVES:  # one MNIST and one CIFAR-10 experiment per objective
        assert {f"mnist_{objective}", f"cifar10_{objective}"} <= names
    for ds in ("cifar100", "tinyimagenet"):
        assert {f"{ds}_pgd_at", f"{ds}_trades", f"{ds}_srd_dat"} <= names
    assert {"natural", "srd_dat", "smoke"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_training_config_loads_and_wires(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    # Self-contained files: the keys a reader needs are written out, not left to defaults.
    assert "seed" in raw
    assert {"epochs", "out_dir", "resume"} <= set(raw["trainer"])
    cfg = load_config(path, [f"trainer.out_dir={tmp_path}", "trainer.device=cpu"])
    if path.parent.name == "train":
        assert cfg.name == path.stem
        assert raw["trainer"]["out_dir"] == f"runs/{path.stem}"
    info = DATASETS[cfg.data.name]
    loaders = None if cfg.data.name.startswith("sample-") else _fake_loaders(cfg.data.name)
    r = build(cfg, loaders=loaders)
    assert isinstance(r.objective, OBJECTIVES[cfg.objective.name])
    assert r.optimizer.param_groups[0]["initial_lr"] == pytest.approx(cfg.optim.lr)
    assert r.optimizer.param_groups[0]["weight_decay"] == pytest.approx(cfg.optim.weight_decay)
    assert r.trainer.epochs == cfg.trainer.epochs
    assert r.steps_per_epoch == len(r.loaders.train) > 0
    evals = [cb for cb in r.trainer.callbacks if isinstance(cb, EvalCallback)]
    assert len(evals) == 1
    want_eps = cfg.trainer.eval_eps if cfg.trainer.eval_eps is not None else info.eps["Linf"]
    assert evals[0].eps == pytest.approx(want_eps)
    ckpt = [cb for cb in r.trainer.callbacks if isinstance(cb, CheckpointCallback)]
    assert ckpt[0].monitor == evals[0].key  # best.pt follows the evaluated PGD-k
    params = r.model.state_dict()
    assert params["normalize.mean"].numel() == info.input_shape[0]
    if cfg.model.name not in _NO_FORWARD:
        x = torch.rand(2, *info.input_shape)
        assert r.model.eval()(x).shape == (2, info.num_classes)
    assert not (tmp_path / "config.yaml").exists()  # building writes nothing


def test_attack_eps_follows_the_dataset():
    mnist = load_config(ROOT / "configs/train/mnist_pgd_at.yaml")
    cifar = load_config(ROOT / "configs/train/cifar10_pgd_at.yaml")
    assert mnist.objective.params.eps == pytest.approx(0.3)
    assert cifar.objective.params.eps == pytest.approx(8 / 255)  # written "8/255" in the YAML


@pytest.mark.parametrize(
    "override, named, nearest",
    [
        ("trainer.epoch=2", "trainer.epoch", "trainer.epochs"),
        ("trainr.epochs=2", "trainr", "trainer"),
        ("optim.momentun=0.5", "optim.momentun", "optim.momentum"),
        ("objective.beta=3", "objective.beta", "objective.params.beta"),
        ("data.batchsize=3", "data.batchsize", "data.batch_size"),
    ],
)
def test_unknown_keys_name_the_key_and_the_nearest(override, named, nearest):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert f"'{named}'" in str(err.value) and f"'{nearest}'" in str(err.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match="'optim.weight_decy'.*'optim.weight_decay'"):
        load_config(path)


def test_misspelt_objective_param_fails_with_the_accepted_names(tmp_path):
    cfg = load_config(SMOKE, ["objective.params.bata=3", f"trainer.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="'bata'.*'beta'"):
        build(cfg)


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.nesterov=maybe", "optim.nesterov"),
        ("trainer.amp=bf17", "trainer.amp.*'bf16'"),
        ("optim.schedule=cosin", "optim.schedule.*'cosine'"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer=3", "'trainer' is a section"),
        ("objective.params.eps=8/0", "objective.params.eps"),
        ("noequals", "key=value"),
    ],
)
def test_wrong_types_and_values_raise(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, [override])


def test_fractions_become_floats_where_numbers_are_expected():
    cfg = build_config(
        {"objective": {"params": {"eps": "8/255", "tau_schedule": [["50/120", 0], [1, 2]],
                                  "inner_loss": "kl"}},
         "optim": {"milestones": ["1/2", 0.75]}},
        ["trainer.eval_eps=8/255", "objective.params.alpha=2/255", "optim.lr=1/10"],
    )
    assert cfg.objective.params.eps == 8 / 255 and cfg.objective.params.alpha == 2 / 255
    assert cfg.trainer.eval_eps == 8 / 255 and cfg.optim.lr == pytest.approx(0.1)
    assert list(cfg.optim.milestones) == [0.5, 0.75]
    assert to_container(cfg)["objective"]["params"]["tau_schedule"] == [[50 / 120, 0], [1, 2]]
    assert cfg.objective.params.inner_loss == "kl"  # other strings stay strings


def test_overrides_apply_in_order_on_top_of_the_file():
    base = load_config(SMOKE)
    cfg = load_config(SMOKE, ["trainer.epochs=3", "objective.params.beta=3",
                              "trainer.epochs=5", "data.limit=null", "trainer.amp=off"])
    assert base.trainer.epochs == 1 and cfg.trainer.epochs == 5
    assert cfg.objective.params.beta == 3 and "beta" not in base.objective.params
    assert cfg.objective.params.k_max == base.objective.params.k_max  # untouched keys kept
    assert base.data.limit == 256 and cfg.data.limit is None
    assert cfg.trainer.amp == "off"  # YAML 1.1 reads off as false; the str field gets "off"


def test_defaults_name_and_run_dir(tmp_path):
    path = tmp_path / "my_exp.yaml"
    path.write_text("seed: 3\n")
    cfg = load_config(path)
    assert cfg.name == "my_exp" and cfg.trainer.out_dir == str(Path("runs") / "my_exp")
    assert cfg.seed == 3 and cfg.optim.lr == 0.1  # schema defaults fill the rest


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/train/cifar10_srd_dat.yaml", ["objective.params.q=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_container(again) == to_container(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "8/255" not in text and "0.0313725" in text  # saved resolved, as floats
    check_plain(to_container(cfg))  # checkpoint-safe plain data


def test_config_is_read_only():
    cfg = load_config(SMOKE)
    with pytest.raises(Exception):  # noqa: B017 (omegaconf's ReadonlyConfigError)
        cfg.trainer.epochs = 7


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if p.parent.name == "train"
                                  and not p.stem.startswith("cifar100")],
                         ids=lambda p: p.stem)
def test_dry_run_on_the_offline_data(path, shared_data, tmp_path, capsys):
    code = main(["train", "-c", str(path), "--dry-run", "--data-root", str(shared_data),
                 f"trainer.out_dir={tmp_path}", "trainer.device=cpu", "data.num_workers=0"])
    assert code == 0
    assert "dry run:" in capsys.readouterr().out
    assert not (tmp_path / "last.pt").exists()

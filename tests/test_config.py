"""Typed configs: every training YAML loads, validates and wires; errors name the key.

Wiring uses small synthetic loaders of each dataset's shape (no data files needed, no forward
through the big models); a slow test dry-runs the real loaders on ``../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit.cli import main
from robustkit.config import (
    ConfigError,
    build,
    build_config,
    load_config,
    load_eval_config,
    save_config,
    to_container,
)
from robustkit.data import DATASETS, Loaders
from robustkit.objectives import OBJECTIVES
from robustkit.training.callbacks import CheckpointCallback, EvalCallback
from robustkit.training.checkpoint import check_plain

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(
    [*(ROOT / "configs" / "train").glob("*.yaml"),
     *(ROOT / "robustkit" / "assets" / "demo_configs").glob("*.yaml"),
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
    assert {"srd_dat", "smoke"} <= names


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
    (name, pgd), = evals[0].attacks.items()  # the CLI built the held-out attack
    assert name == f"pgd{cfg.trainer.eval_steps}" and pgd.eps == pytest.approx(want_eps)
    assert pgd.model is r.model  # the bare model, never the DDP wrapper
    ckpt = [cb for cb in r.trainer.callbacks if isinstance(cb, CheckpointCallback)]
    assert ckpt[0].monitor == f"eval/{name}"  # best.pt follows the evaluated PGD-k
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
    with pytest.raises(ConfigError, match="nope.yaml"):
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


# ----------------------------------------------------------------- eval_steps x eval_alpha


@pytest.mark.parametrize("overrides", [
    ["trainer.eval_steps=5", "trainer.eval_alpha=0.01"],  # issue #9: 0.05 of eps 0.3
    ["trainer.eval_steps=20", "trainer.eval_alpha=0.01"],  # 0.2 < 0.3
    ["trainer.eval_steps=3", "trainer.eval_alpha=null"],  # 3 x eps/4
    ["trainer.eval_steps=10", "trainer.eval_eps=0.5", "trainer.eval_alpha=0.04"],
])
def test_held_out_pgd_that_cannot_reach_eps_is_rejected(overrides):
    with pytest.raises(ConfigError, match="eval_steps.*eval_alpha.*cannot reach"):
        load_config(SMOKE, overrides)


@pytest.mark.parametrize("overrides", [
    ["trainer.eval_steps=4", "trainer.eval_alpha=null"],  # 4 x eps/4 = eps exactly
    ["trainer.eval_steps=3", "trainer.eval_alpha=0.1"],  # 0.30000000000000004 >= 0.3
    ["trainer.eval_steps=30", "trainer.eval_alpha=0.01"],
    ["trainer.eval_steps=1", "trainer.eval_every=null"],  # no held-out evaluation at all
])
def test_held_out_pgd_that_reaches_eps_is_accepted(overrides):
    load_config(SMOKE, overrides)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_held_out_attack_reaches_eps(path):
    cfg = load_config(path)
    t = cfg.trainer
    eps = t.eval_eps if t.eval_eps is not None else DATASETS[cfg.data.name].eps[t.eval_norm]
    alpha = t.eval_alpha if t.eval_alpha is not None else eps / 4
    assert t.eval_steps * alpha >= eps * (1 - 1e-9)


# ----------------------------------------------------------------------------- EvalConfig

EVAL_CONFIGS = sorted((ROOT / "configs" / "evaluate").glob("*.yaml"))


def _eval_file(tmp_path, **keys) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_evaluate_config_loads(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_eval_config(path, {"model": "small_cnn"})
    for key, value in raw.items():  # every written value arrives, fractions as floats
        assert cfg[key] == (load_eval_config(None, {"model": "m", "dataset": "mnist",
                                                    key: value})[key])
    assert cfg.eps == pytest.approx({"L2": 0.5, "Linf": 0.3 if "mnist" in path.name
                                     else 8 / 255}[cfg.threat_model])


def test_eval_defaults_and_flag_strings():
    cfg = load_eval_config(None, {"model": "small_cnn", "dataset": "cifar10", "eps": "8/255",
                                  "n_examples": "100", "attacks": "clean, pgd20,"
                                  "torchattacks:Square(n_queries=10, p_init=0.8)",
                                  "aa_version": "custom", "aa_attacks": "apgd-ce,apgd-t",
                                  "out": None})
    assert cfg.eps == 8 / 255 and cfg.n_examples == 100 and cfg.batch_size == 256
    assert list(cfg.attacks) == ["clean", "pgd20", "torchattacks:Square(n_queries=10, p_init=0.8)"]
    assert list(cfg.aa_attacks) == ["apgd-ce", "apgd-t"]
    assert cfg.threat_model == "Linf" and cfg.protocol == "standalone" and cfg.out is None
    with pytest.raises(Exception):  # noqa: B017 (omegaconf's ReadonlyConfigError)
        cfg.eps = 0.1


def test_flags_override_the_file_and_none_means_not_given(tmp_path):
    path = _eval_file(tmp_path, dataset="sample-mnist", eps="1/10", n_examples=8, seed=3,
                      attacks="clean,pgd5")
    cfg = load_eval_config(path, {"model": "small_cnn", "eps": "0.2", "seed": None})
    assert cfg.eps == pytest.approx(0.2) and cfg.seed == 3 and cfg.n_examples == 8
    assert list(cfg.attacks) == ["clean", "pgd5"]  # a comma string in the file is a list too


@pytest.mark.parametrize("key, value, match", [
    ("eps", "abc", "expected a number or a fraction"),
    ("eps", "8/0", "expected a number or a fraction"),
    ("eps", 2, r"must be > 0 \(and <= 1 for Linf\)"),
    ("eps", -0.1, "must be > 0"),
    ("batch_size", "many", "could not be converted to Integer"),
    ("batch_size", 1.5, "converted to Integer"),
    ("batch_size", 0, ">= 1"),
    ("n_examples", 0, ">= 1"),
    ("seed", -1, ">= 0"),
    ("dataset", "cifar11", "did you mean 'cifar10'"),
    ("threat_model", "Linf2", "did you mean 'Linf'"),
    ("protocol", "cascaded", "did you mean 'cascade'"),
    ("aa_version", "custom", "needs a list of attacks"),
    ("aa_attacks", "apgd-ce", "needs the custom version"),
    ("attacks", "clean,pgdx", "unknown attack 'pgdx'"),
    ("attacks", "pgd20,pgd20", "listed twice"),
    ("model", "", "is required"),
])
def test_file_and_flag_values_get_the_same_checks(tmp_path, key, value, match):
    base = {"model": "small_cnn", "dataset": "sample-mnist"}
    with pytest.raises(ConfigError, match=match) as from_flag:
        load_eval_config(None, {**base, key: str(value)})
    assert f"--{key.replace('_', '-')}" in str(from_flag.value)
    path = _eval_file(tmp_path, **{key: value})
    flags = {k: v for k, v in base.items() if k != key}
    with pytest.raises(ConfigError, match=match) as from_file:
        load_eval_config(path, flags)
    assert f"'{key}'" in str(from_file.value) and str(path) in str(from_file.value)


@pytest.mark.parametrize("written, nearest", [
    ("epsilon", "eps"), ("n_example", "n_examples"), ("threat", "threat_model"),
    ("attack", "attacks"),
])
def test_unknown_evaluate_key_names_the_nearest(tmp_path, written, nearest):
    path = _eval_file(tmp_path, **{written: 1})
    with pytest.raises(ConfigError, match=f"'{written}'.*did you mean '{nearest}'"):
        load_eval_config(path, {"model": "small_cnn"})


def test_evaluate_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_eval_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- clean\n- pgd20\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_eval_config(bad, {"model": "m"})


# ------------------------------------------------- ranges, non-finite numbers, out_dir (#18)


@pytest.mark.parametrize("override, match", [
    ("optim.lr=.inf", r"'optim.lr' must be a finite number > 0, got inf"),
    ("optim.lr=1e400", r"'optim.lr' must be a finite number > 0, got inf"),  # overflows to inf
    ("optim.lr=inf", r"'optim.lr' must be a finite number, got 'inf'"),
    ("optim.lr=nan", r"'optim.lr' must be a finite number, got 'nan'"),
    ("optim.lr=.nan", r"'optim.lr' must be a finite number > 0, got nan"),
    ("optim.lr=0", r"'optim.lr' must be a finite number > 0"),
    ("optim.momentum=1", r"'optim.momentum' must be a finite number in \[0, 1\), got 1.0"),
    ("optim.momentum=-0.1", r"'optim.momentum' must be a finite number in \[0, 1\)"),
    ("optim.weight_decay=-1e-4", r"'optim.weight_decay' must be a finite number >= 0"),
    ("optim.weight_decay=.inf", r"'optim.weight_decay' must be a finite number >= 0"),
    ("optim.gamma=0", r"'optim.gamma' must be a finite number in \(0, 1\]"),
    ("optim.gamma=10", r"'optim.gamma' must be a finite number in \(0, 1\]"),
    ("optim.warmup_epochs=-1", r"'optim.warmup_epochs' must be a finite number >= 0"),
    ("optim.warmup_epochs=2", r"'optim.warmup_epochs' \(2\) must be <= trainer.epochs \(1\)"),
    ("optim.milestones=[.inf]", r"'optim.milestones' must be finite numbers > 0"),
    ("optim.milestones=[1, .nan]", r"'optim.milestones' must be finite numbers > 0.*item 1"),
    ("trainer.grad_clip=.nan", r"'trainer.grad_clip' must be a finite number > 0"),
    ("trainer.grad_clip=0", r"'trainer.grad_clip' must be a finite number > 0"),
    ("trainer.eval_eps=.inf", r"'trainer.eval_eps' must be a finite number > 0"),
    ("trainer.eval_eps=1.5", r"'trainer.eval_eps' must be in \(0, 1\] for Linf"),
    ("trainer.eval_alpha=-0.1", r"'trainer.eval_alpha' must be a finite number > 0"),
    ("trainer.epochs=-1", r"'trainer.epochs' must be >= 1, got -1"),
    ("data.batch_size=-64", r"'data.batch_size' must be >= 1, got -64"),
    ("data.eval_batch_size=0", r"'data.eval_batch_size' must be >= 1"),
    ("data.holdout=-1", r"'data.holdout' must be >= 0"),
    ("data.num_workers=-1", r"'data.num_workers' must be >= 0"),
    ("data.limit=0", r"'data.limit' must be >= 1"),
    ("trainer.eval_every=-1", r"'trainer.eval_every' must be >= 1 \(null switches the held-out "
                              r"evaluation off\), got -1"),
    ("trainer.eval_every=0", r"'trainer.eval_every' must be >= 1 \(null switches the held-out "
                             r"evaluation off\), got 0"),
    ("trainer.eval_steps=0", r"'trainer.eval_steps' must be >= 1"),
    ("trainer.eval_n=0", r"'trainer.eval_n' must be >= 1"),
    ("trainer.checkpoint_every=0", r"'trainer.checkpoint_every' must be >= 1"),
    ("trainer.log_every=0", r"'trainer.log_every' must be >= 1"),
    ("seed=-1", r"'seed' must be >= 0"),
    ("sensitivity.every=0", r"'sensitivity.every' must be >= 1"),
    ("sensitivity.n=0", r"'sensitivity.n' must be >= 1"),
    ("sensitivity.steps=0", r"'sensitivity.steps' must be >= 1"),
    ("saliency.every=0", r"'saliency.every' must be >= 1"),
    ("saliency.n=-1", r"'saliency.n' must be >= 1"),
    ("saliency.n_samples=0", r"'saliency.n_samples' must be >= 1"),
    ("saliency.steps=0", r"'saliency.steps' must be >= 1"),
    ("objective.params.beta=.nan", r"'objective.params.beta' must be a number, got nan"),
    ("attack.params.eps=[.nan]", r"'attack.params.eps\[0\]' must be a number, got nan"),
])
def test_out_of_range_and_non_finite_numbers_are_refused_at_load(tmp_path, override, match):
    """Refused by load_config itself (nothing built), one line naming the key."""
    with pytest.raises(ConfigError, match=match) as err:
        load_config(SMOKE, [f"trainer.out_dir={tmp_path}", override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["optim.momentum=0", "optim.gamma=1", "optim.weight_decay=0", "optim.warmup_epochs=1"],
    ["trainer.eval_every=1"],  # the least interval
    ["trainer.eval_every=null"],  # no held-out evaluation (0 is refused: see above)
    ["trainer.eval_every=7", "trainer.checkpoint_every=9"],  # beyond the last epoch: the last
    ["trainer.eval_norm=L2", "trainer.eval_eps=2.0", "trainer.eval_alpha=null",
     "trainer.eval_steps=4"],  # L2 budgets above 1 are pixel-unit norms, not out of range
    ["objective.params.lambda_max=.inf", "data.holdout=0", "seed=0"],  # inf can be a value
])
def test_boundary_values_are_accepted(tmp_path, overrides):
    load_config(SMOKE, [f"trainer.out_dir={tmp_path}", *overrides])


def test_a_config_that_is_not_utf8_is_one_config_error(tmp_path):
    latin1 = "data: {name: sample-mnist}\nname: café\n".encode("latin-1")
    for name, data in [("latin1.yaml", latin1),
                       ("utf16.yaml", "seed: 1\n".encode("utf-16")),
                       ("binary.yaml", bytes(range(128, 256)))]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=f"{name}: not UTF-8 text") as err:
            load_config(path)
        assert "\n" not in str(err.value)
        with pytest.raises(ConfigError, match=f"{name}: not UTF-8 text"):
            load_eval_config(path, {"model": "small_cnn", "dataset": "sample-mnist"})


def test_out_dir_is_checked_at_load_without_creating_it(tmp_path, monkeypatch):
    def refused(out_dir, match):
        with pytest.raises(ConfigError, match=match) as err:
            load_config(SMOKE, [f"trainer.out_dir={out_dir}"])
        assert "'trainer.out_dir'" in str(err.value) and "\n" not in str(err.value)

    for system in ("/proc/x", "/sys/x", "/dev/null", "/dev/x/y", "/proc"):
        refused(system, f"{system} is under /(proc|sys|dev), a system folder")
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        load_config(SMOKE, ["trainer.out_dir=/dev/shm/robustkit-test/x"])  # a real tmpfs
    (tmp_path / "link").symlink_to("/proc/self")
    refused(tmp_path / "link" / "x", "is under /proc")  # through a symlink too
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "is an existing file, not a folder")
    refused(tmp_path / "file" / "a" / "b", r"cannot be created: .*file is a file \(Not a dir")
    # root ignores permission bits: a read-only parent is simulated at os.access
    locked, real_access = tmp_path / "locked", os.access
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and
                        real_access(p, mode, **kw))
    refused(locked / "runs" / "x", r"runs/x is not writable \(in .*locked\)")
    refused(locked, "locked is not writable; choose another folder")
    cfg = load_config(SMOKE, [f"trainer.out_dir={tmp_path / 'new' / 'deep'}"])  # creatable
    assert cfg.trainer.out_dir.endswith("deep") and not (tmp_path / "new").exists()

"""``model.init_from``: fine-tuning from a checkpoint's weights (issue 20 (b)).

Oracle: the weights written to the file by the test itself. The run built with the key holds
exactly those weights (robustkit's own last.pt format and a bare state_dict), the optimizer,
epoch counter and objective start fresh (not a resume), the key is in config.yaml, and a bad
file (missing, not a checkpoint, pickled code, other keys) is a one-line ConfigError.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import yaml

from robustkit.cli import main
from robustkit.config import ConfigError, build, load_config
from robustkit.training.checkpoint import save_checkpoint

SMOKE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
_FAST = ["trainer.device=cpu", "data.limit=64", "data.batch_size=32", "sensitivity.enabled=false",
         "saliency.enabled=false", "log.tensorboard=false", "log.progress=false"]


def _build(out, *extra):
    return build(load_config(SMOKE, [f"trainer.out_dir={out}", *_FAST, *extra]))


def _other_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights moved by small random values (still trainable, finite logits): a
    fresh build cannot hold these by chance."""
    g = torch.Generator().manual_seed(123)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g).to(v.dtype)
            if v.is_floating_point() and not k.startswith("normalize.") else v.clone()
            for k, v in model.state_dict().items()}


def _assert_weights(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.fixture
def source(tmp_path):
    """A robustkit checkpoint (the trainer's state_dict, saved as last.pt is) of another run,
    with weights that differ from a fresh build, and the same weights as a bare state_dict."""
    run = _build(tmp_path / "src")
    weights = _other_weights(run.model)
    run.model.load_state_dict(weights)
    run.trainer.state.epoch, run.trainer.state.step = 7, 99  # a resume would pick these up
    state = run.trainer.state_dict()
    state.update(config={"name": "src"}, metrics={})
    ckpt = tmp_path / "src" / "last.pt"
    save_checkpoint(ckpt, state)
    bare = tmp_path / "bare.pt"
    torch.save(weights, bare)
    return weights, ckpt, bare


@pytest.mark.parametrize("which", ["checkpoint", "bare"])
def test_the_built_model_holds_the_checkpoint_weights_and_nothing_else_is_resumed(
        source, tmp_path, which):
    weights, ckpt, bare = source
    fresh = _build(tmp_path / "fresh")
    assert not all(torch.equal(fresh.model.state_dict()[k], v) for k, v in weights.items())
    run = _build(tmp_path / "ft", f"model.init_from={ckpt if which == 'checkpoint' else bare}")
    _assert_weights(run.model, weights)
    # not a resume: epoch, step, optimizer state and LR schedule start fresh
    assert run.trainer.state.epoch == 0 and run.trainer.state.step == 0
    assert run.resume is None and run.optimizer.state_dict()["state"] == {}
    assert run.scheduler.last_epoch == 0


def test_the_rng_after_build_is_the_same_with_and_without_init_from(source, tmp_path):
    _, ckpt, _ = source
    _build(tmp_path / "a")
    a = torch.rand(4)
    _build(tmp_path / "b", f"model.init_from={ckpt}")
    b = torch.rand(4)
    assert torch.equal(a, b)


def test_fit_trains_from_the_weights_and_config_yaml_records_the_key(source, tmp_path):
    weights, ckpt, _ = source
    out = tmp_path / "ft"
    run = _build(out, f"model.init_from={ckpt}", "trainer.eval_every=null")
    _assert_weights(run.model, weights)
    state = run.fit()
    assert state.epoch == 1  # one fresh epoch, not epoch 8 of the source run
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init_from"] == str(ckpt)
    moved = run.model.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in weights.items())  # it did train


def test_a_relative_path_is_read_from_the_current_folder_and_tilde_is_home(
        source, tmp_path, monkeypatch):
    weights, ckpt, _ = source
    monkeypatch.chdir(tmp_path)
    _assert_weights(_build(tmp_path / "rel", "model.init_from=src/last.pt").model, weights)
    monkeypatch.setenv("HOME", str(tmp_path))
    _assert_weights(_build(tmp_path / "home", "model.init_from=~/bare.pt").model, weights)


def test_resuming_takes_the_weights_from_the_resumed_checkpoint(source, tmp_path):
    """A rerun of a fine-tuning run (trainer.resume=auto, as sweeps do) continues its own
    last.pt; init_from is not loaded again (the fine-tuning's weights are in last.pt)."""
    weights, ckpt, _ = source
    run = _build(tmp_path / "src", f"model.init_from={tmp_path / 'missing.pt'}",
                 "trainer.resume=auto")
    assert run.resume == ckpt and run.trainer.state.epoch == 7
    _assert_weights(run.model, weights)


def _one_line_error(out, init, match):
    with pytest.raises(ConfigError, match=match) as err:
        _build(out, f"model.init_from={init}")
    msg = str(err.value)
    assert "\n" not in msg and "model.init_from" in msg
    return msg


def test_a_missing_file_is_a_one_line_error(tmp_path):
    _one_line_error(tmp_path / "x", tmp_path / "nope.pt", "not found")


def test_a_file_that_is_no_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("model: small_cnn\n")
    _one_line_error(tmp_path / "x", bad, "corrupt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _one_line_error(tmp_path / "x", empty, "empty")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    _one_line_error(tmp_path / "x", tmp_path / "nostate.pt", "no state dict")


class _Payload:
    """Unpickling this would create ``marker``: it must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    _one_line_error(tmp_path / "x", evil, "refused")
    assert not marker.exists()


def test_other_keys_are_refused_strictly_naming_them(source, tmp_path):
    weights, _, _ = source
    missing = dict(weights)
    dropped = sorted(missing)[-1]
    del missing[dropped]
    torch.save(missing, tmp_path / "missing.pt")
    msg = _one_line_error(tmp_path / "x", tmp_path / "missing.pt", "missing keys")
    assert dropped in msg and "unexpected" not in msg
    extra = {**weights, "model.extra.weight": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pt")
    msg = _one_line_error(tmp_path / "x", tmp_path / "extra.pt", "unexpected keys")
    assert "model.extra.weight" in msg and "missing" not in msg
    # bare-architecture keys with one tensor missing: still strict after the wrapping
    gone = sorted(k for k in weights if k.startswith("model."))[-1]
    bare_arch = {k.removeprefix("model."): v for k, v in weights.items()
                 if not k.startswith("normalize.") and k != gone}
    torch.save(bare_arch, tmp_path / "arch.pt")
    assert gone in _one_line_error(tmp_path / "x", tmp_path / "arch.pt", "missing keys")


def test_bare_architecture_keys_load_as_evaluate_loads_them_keeping_the_models_normalisation(
        source, tmp_path):
    """The architecture's own state_dict (no ``normalize.``/``model.`` prefix, as a user saves
    ``model.model.state_dict()`` or another codebase's weights): loaded into ``model.``; the
    normalisation stays the built model's, even when the file's would differ."""
    weights, _, _ = source
    bare_arch = {k.removeprefix("model."): v for k, v in weights.items()
                 if not k.startswith("normalize.")}
    torch.save(bare_arch, tmp_path / "arch.pt")
    fresh = _build(tmp_path / "fresh").model.state_dict()
    run = _build(tmp_path / "ft", f"model.init_from={tmp_path / 'arch.pt'}")
    want = {k: (fresh[k] if k.startswith("normalize.") else v) for k, v in weights.items()}
    _assert_weights(run.model, want)


def test_an_empty_path_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(SMOKE, [f"trainer.out_dir={tmp_path}", "model.init_from=''"])


def test_the_cli_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "-c", str(SMOKE), f"trainer.out_dir={tmp_path / 'x'}",
                 "trainer.device=cpu", f"model.init_from={tmp_path / 'nope.pt'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.init_from" in err[0]

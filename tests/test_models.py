"""robustkit.models: registry, Normalize, architectures against reference code, loading."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkit.models import (
    MODELS,
    ModelError,
    Normalize,
    create_model,
    load_model,
    load_state_dict_file,
)

ROOT = Path(__file__).resolve().parents[1]
AA_FACTORY = ROOT / "evaluate" / "pyautoattack_resnet18.py"

# (in_channels, input_size) each registered model is meant for; every MODELS key must be here.
SHAPES = {
    "small_cnn": [(1, 28), (3, 32)],
    "cifar_cnn": [(3, 32)],
    "preact_resnet18": [(3, 32)],
    "resnet18": [(3, 32), (3, 64)],
    "wrn_28_10": [(3, 32)],
    "wrn_34_10": [(3, 32)],
}
# Parameter counts for 10 classes quoted in the literature / RobustBench model cards.
KNOWN_PARAMS = {
    "resnet18": 11.17e6,
    "preact_resnet18": 11.17e6,
    "wrn_28_10": 36.48e6,
    "wrn_34_10": 46.16e6,
}
CASES = [(name, c, s) for name in MODELS for c, s in SHAPES.get(name, [])]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so outputs differ clearly between models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not name.startswith("normalize."):
                t.copy_(0.1 * torch.randn(t.shape, generator=g) + ("running_var" in name))
    return model


def _aa_weights() -> Path:
    pyautoattack = pytest.importorskip("pyautoattack")
    return Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"


@pytest.fixture(scope="module")
def aa_model() -> nn.Module:
    """AutoAttack's example ResNet-18, loaded once through the ``FILE.py:FN`` form."""
    _aa_weights()
    return load_model(f"{AA_FACTORY}:load", num_classes=10)


def test_every_model_has_shapes():
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("name,channels,size", CASES)
def test_registry_builds_and_runs(name, channels, size):
    k = 10 if (channels, size) == (3, 32) else 7
    model = create_model(name, k, in_channels=channels, input_size=size).eval()
    assert list(model._modules) == ["normalize", "model"]
    assert model.get_submodule("model") is model.model
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, k) and torch.isfinite(out).all()
    if name in KNOWN_PARAMS and k == 10:
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - KNOWN_PARAMS[name]) / KNOWN_PARAMS[name] < 1e-3, n


def test_known_parameter_counts_are_checked():
    assert {name for name, c, s in CASES if (c, s) == (3, 32)} >= set(KNOWN_PARAMS)


def test_layers_reachable_by_name():
    model = create_model("resnet18", 10)
    assert isinstance(model.get_submodule("model.layer3"), nn.Sequential)
    assert isinstance(create_model("wrn_28_10", 10, widen_factor=1).get_submodule("model.block3"),
                      nn.Module)


def test_create_model_errors():
    with pytest.raises(ModelError, match="resnet18.*wrn_34_10"):
        create_model("resnet19", 10)
    with pytest.raises(ModelError, match="accepted keyword arguments: drop"):
        create_model("small_cnn", 10, dropout=0.3)
    with pytest.raises(ValueError, match="std is missing"):
        create_model("cifar_cnn", 10, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="mean has 2 values"):
        create_model("cifar_cnn", 10, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cifar_cnn", 0)
    assert isinstance(ModelError("x"), ValueError)


def test_normalize_math_and_buffers():
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    norm = Normalize(mean, std)
    x = torch.rand(4, 3, 5, 5)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.double().mean.dtype == torch.float64
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(0.5, (0.2, 0.0, 0.1))
    with pytest.raises(ValueError, match="same number of channels"):
        Normalize((0.1, 0.2), (0.1, 0.2, 0.3))


def test_create_model_applies_normalize_first():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = _randomize(create_model("cifar_cnn", 10, mean=mean, std=std, width=4)).eval()
    x = torch.rand(3, 3, 32, 32)
    z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.model(z))
    plain = create_model("cifar_cnn", 10, width=4).eval()  # no mean/std: identity Normalize
    torch.testing.assert_close(plain(x), plain.model(x))


def test_resnet18_equals_autoattack_example(aa_model):
    """Our ResNet-18 is AutoAttack's example architecture: its weights load and agree."""
    ours = load_model("resnet18", num_classes=10, checkpoint=_aa_weights())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), aa_model(x), rtol=1e-4, atol=1e-5)


def test_wrn_and_preact_equal_robustbench_architectures():
    from robustkit.models import PreActResNet, WideResNet
    from robustkit.models.zoo import _import_robustbench

    _import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActBlockV2
    from robustbench.model_zoo.architectures.resnet import PreActResNet as RBPreAct
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet as RBWide

    pairs = [
        (RBWide(depth=16, widen_factor=2, sub_block1=True), WideResNet(depth=16, widen_factor=2,
                                                                       sub_block1=True)),
        (RBPreAct(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True), PreActResNet()),
    ]
    x = torch.rand(2, 3, 32, 32)
    for ref, ours in pairs:
        _randomize(ref).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    ["plain", "trainer", "state_dict", "model_state_dict", "net", "ddp", "bare"],
)
def test_checkpoint_formats_round_trip(tmp_path, wrap):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    src = _randomize(create_model("cifar_cnn", 10, mean=mean, std=std, width=4), seed=1).eval()
    sd = src.state_dict()
    payload = {
        "plain": sd,
        "trainer": {"model": sd, "optimizer": {"state": {}}, "epoch": 3, "config": {"a": "b"}},
        "state_dict": {"state_dict": sd},
        "model_state_dict": {"model_state_dict": sd, "epoch": 1},
        "net": {"net": sd},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "bare": src.model.state_dict(),
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    dst = load_model("cifar_cnn", num_classes=10, mean=mean, std=std, checkpoint=path, width=4)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    assert not dst.training


def test_checkpoint_normalisation_wins_over_arguments(tmp_path):
    src = create_model("cifar_cnn", 10, mean=0.3, std=0.2)
    torch.save(src.state_dict(), tmp_path / "c.pt")
    dst = load_model("cifar_cnn", num_classes=10, mean=0.9, std=0.5, checkpoint=tmp_path / "c.pt")
    assert torch.allclose(dst.normalize.mean, torch.full((3,), 0.3))
    assert set(load_state_dict_file(tmp_path / "c.pt")) == set(src.state_dict())


def test_mismatching_checkpoint(tmp_path):
    torch.save(create_model("small_cnn", 10, in_channels=1, input_size=28).state_dict(),
               tmp_path / "s.pt")
    with pytest.raises(ModelError, match=r"missing keys: .*--model"):
        load_model("cifar_cnn", num_classes=10, checkpoint=tmp_path / "s.pt")
    with pytest.raises(ModelError, match=r"shape keys: model\.classifier\.fc3\.weight"):
        load_model("small_cnn", num_classes=100, in_channels=1, input_size=28,
                   checkpoint=tmp_path / "s.pt")
    torch.save({"optimizer": {}, "epoch": 2}, tmp_path / "empty.pt")
    with pytest.raises(ModelError, match="holds no state dict"):
        load_state_dict_file(tmp_path / "empty.pt")
    with pytest.raises(ModelError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this object writes a marker file: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    sd = create_model("small_cnn", 10, in_channels=1, input_size=28).state_dict()
    torch.save({"state_dict": sd, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"state_dict": sd, "x": _Payload(marker)}))
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(ModelError, match="was refused"):
            load_state_dict_file(tmp_path / name)
        with pytest.raises(ModelError, match="refused"):
            load_model("small_cnn", num_classes=10, in_channels=1, input_size=28,
                       checkpoint=tmp_path / name)
    assert not marker.exists()
    torch.save(create_model("small_cnn", 10, in_channels=1, input_size=28), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"model\.state_dict\(\)"):
        load_state_dict_file(tmp_path / "m.pt")  # a whole pickled nn.Module is refused too


class _Shell:
    """Unpickling this runs a shell command through os.system (a module torch blocks outright:
    its message says "unsupported GLOBAL posix.system whose module posix is blocked", not
    "Unsupported global", and was once reported as corruption)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_an_os_system_payload_is_refused_not_called_corrupt(tmp_path):
    marker = tmp_path / "marker.txt"
    pickle.loads(pickle.dumps(_Shell(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    sd = create_model("small_cnn", 10, in_channels=1, input_size=28).state_dict()
    torch.save({"state_dict": sd, "extra": _Shell(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="was refused: .*posix.system") as err:
        load_state_dict_file(tmp_path / "evil.pt")
    assert "corrupt" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


FACTORY_FILE = """
import torch
from torch import nn
from helper import WIDTH   # a sibling module: the file's folder is importable

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(WIDTH, 3))

def not_a_module():
    return 42

def raises():
    raise RuntimeError("boom")

def ten_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(WIDTH, 10))
"""


@pytest.fixture
def factory_file(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 64\n")
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY_FILE)
    return path


def test_file_factory(factory_file, tmp_path):
    shape = {"num_classes": 3, "in_channels": 1, "input_size": 8}
    model = load_model(f"{factory_file}:build", **shape)
    assert not model.training and model(torch.rand(5, 1, 8, 8)).shape == (5, 3)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    torch.save({"model": other.state_dict()}, tmp_path / "w.pt")
    loaded = load_model(f"{factory_file}:build", checkpoint=tmp_path / "w.pt", **shape)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x), other(x))
    with pytest.raises(ModelError, match="outputs 10 classes but the dataset has 3"):
        load_model(f"{factory_file}:ten_classes", **shape)
    with pytest.raises(ModelError, match=r"fails on a \(1, 3, 8, 8\) input"):
        load_model(f"{factory_file}:build", num_classes=3, in_channels=3, input_size=8)


def test_bad_specs(factory_file, tmp_path):
    kw = {"num_classes": 3, "in_channels": 1, "input_size": 8}
    bad = tmp_path / "broken.py"
    bad.write_text("def f(:\n")
    cases = [
        ("resnet19", "known models: small_cnn"),
        ("foo:bar", "expected a registry name"),
        (str(factory_file), "expected a registry name"),
        (f"{factory_file}:", "path/to/file.py:function"),
        (f"{tmp_path / 'absent.py'}:build", "not found"),
        (f"{factory_file}:nope", "no function 'nope'.*build"),
        (f"{factory_file}:not_a_module", "returned a int"),
        (f"{factory_file}:raises", r"raises\(\) raised RuntimeError: boom"),
        (f"{bad}:f", "importing .* failed: SyntaxError"),
        ("", "spec must be"),
        ("robustbench:", "needs a model name"),
    ]
    for spec, message in cases:
        with pytest.raises(ModelError, match=message):
            load_model(spec, **kw)


def test_zoo_argument_errors():
    kw = {"num_classes": 10}
    with pytest.raises(ModelError, match="cifar10, cifar100, imagenet, not dataset='mnist'"):
        load_model("robustbench:Standard", dataset="mnist", **kw)
    with pytest.raises(ModelError, match="checkpoint cannot be combined"):
        load_model("robustbench:Standard", dataset="cifar10", checkpoint="x.pt", **kw)
    with pytest.raises(ModelError, match="not in the zoo .*close names: Carmon2019Unlabeled"):
        load_model("robustbench:Carmon2019Unlabelled", dataset="cifar10", **kw)


def _online(host: str = "drive.google.com") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_zoo_offline_gives_clear_error(tmp_path):
    if _online():
        pytest.skip("network available: the zoo would download real weights")
    with pytest.raises(ModelError, match="needs network access to download the weights"):
        load_model("robustbench:Standard", num_classes=10, dataset="cifar10", model_dir=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_pyautoattack_factory_file(monkeypatch):
    _aa_weights()
    monkeypatch.chdir(ROOT)  # the spec exactly as a user types it from the repository root
    with pytest.raises(ModelError, match="outputs 10 classes but the dataset has 100"):
        load_model("evaluate/pyautoattack_resnet18.py:load", num_classes=100)


def test_pyautoattack_model_is_ready(aa_model):
    assert not aa_model.training
    with torch.no_grad():
        out = aa_model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.slow
def test_pyautoattack_model_accuracy_on_cifar10(shared_data, aa_model):
    """Clean accuracy of model_test.pt on the first 1,000 CIFAR-10 test images (measured 93.7%)."""
    import numpy as np

    path = shared_data / "cifar10" / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:  # the official CIFAR pickle format: trusted shared data
        batch = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.asarray(batch[b"data"]).reshape(-1, 3, 32, 32)).float() / 255
    y = torch.tensor(batch[b"labels"])
    with torch.no_grad():
        correct = sum((aa_model(x[i : i + 250]).argmax(1) == y[i : i + 250]).sum().item()
                      for i in range(0, 1000, 250))
    assert correct / 1000 == pytest.approx(0.937, abs=0.005)

"""robustkit:<name> shipped models: the loading mechanism (sha256, float16 -> float32, the card,
errors), on a fake asset folder, so it is tested whatever is shipped."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from robustkit.cli import main
from robustkit.errors import ModelError
from robustkit.models import create_model, load_model
from robustkit.models import pretrained as P

ASSETS = Path(__file__).resolve().parents[1] / "robustkit" / "assets"
# In the package folder but not shipped data: the checksum file itself and the module marker.
NOT_DATA = {"checksums.json", "__init__.py"}


def _record(root: Path, *names: str) -> None:
    """Record the sha256 of ``root/<name>`` in ``root/checksums.json`` (as ship_model does)."""
    path = root / "checksums.json"
    sums = json.loads(path.read_text()) if path.is_file() else {"files": {}}
    for name in names:
        sums["files"][name] = {"sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
    path.write_text(json.dumps(sums))


@pytest.fixture
def fake_assets(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, mean=0.1307, std=0.3081, in_channels=1, input_size=28)
    buf = io.BytesIO()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, buf)
    (tmp_path / "models" / "mnist_smallcnn_robust.pt").write_bytes(buf.getvalue())
    card = {"name": "mnist_smallcnn_robust",
            "architecture": {"name": "small_cnn", "params": {}, "num_classes": 10,
                             "in_channels": 1, "input_size": 28, "mean": [0.1307],
                             "std": [0.3081]}}
    (tmp_path / "models" / "mnist_smallcnn_robust.json").write_text(json.dumps(card))
    _record(tmp_path, "models/mnist_smallcnn_robust.pt", "models/mnist_smallcnn_robust.json")
    monkeypatch.setattr(P, "_root", lambda: tmp_path)
    monkeypatch.setattr(P, "PRETRAINED", {"mnist_smallcnn_standard": "mnist_smallcnn_standard",
                                          "mnist_smallcnn_robust": "mnist_smallcnn_robust"})
    return tmp_path, model


def test_load_pretrained_gives_the_float16_rounded_weights_in_float32(fake_assets):
    _, model = fake_assets
    got = P.load_pretrained("mnist_smallcnn_robust")
    assert not got.training
    for (k, a), (_, b) in zip(got.state_dict().items(), model.state_dict().items(), strict=True):
        assert a.dtype == torch.float32, k
        torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0)
    same = load_model("robustkit:mnist_smallcnn_robust", num_classes=10, in_channels=1,
                      input_size=28)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(same(x), got(x))
    assert P.model_card("mnist_smallcnn_robust")["architecture"]["name"] == "small_cnn"


def test_changed_weights_are_refused_by_their_sha256(fake_assets):
    root, _ = fake_assets
    path = root / "models" / "mnist_smallcnn_robust.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        P.load_pretrained("mnist_smallcnn_robust")


def test_nothing_is_registered_without_its_files():
    """Every registered name ships both files (no entry points at weights that are not there)."""
    assert P.available_pretrained() == list(P.PRETRAINED)


def test_unknown_or_missing_names_are_clear(fake_assets):
    with pytest.raises(ModelError, match=r"shipped: robustkit:mnist_smallcnn_standard, "
                                         r"robustkit:mnist_smallcnn_robust"):
        P.load_pretrained("mnist_resnet")
    with pytest.raises(ModelError, match="files are missing"):
        P.load_pretrained("mnist_smallcnn_standard")  # registered, not in the fake folder
    with pytest.raises(ModelError, match="checkpoint cannot be combined"):
        load_model("robustkit:mnist_smallcnn_robust", num_classes=10, in_channels=1,
                   input_size=28, checkpoint="x.pt")
    with pytest.raises(ModelError, match="100"):  # a class-count mismatch with the dataset
        load_model("robustkit:mnist_smallcnn_robust", num_classes=100, in_channels=1,
                   input_size=28)


def test_every_shipped_asset_is_covered_by_a_matching_checksum():
    """Every data file under robustkit/assets/ (samples, weights, model cards) has its sha256 in
    checksums.json, and nothing else is listed: a card edited without its checksum, or a new
    asset shipped without one, fails here before it fails a user."""
    shipped = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*")
               if p.is_file() and p.name not in NOT_DATA and "__pycache__" not in p.parts
               and "demo_configs" not in p.parts}  # the demo's yaml: a config, not data
    sums = json.loads((ASSETS / "checksums.json").read_text())["files"]
    assert {f"models/{stem}.{ext}" for stem in P.PRETRAINED.values() for ext in ("pt", "json")
            } <= shipped
    assert set(sums) == shipped
    for name, entry in sums.items():
        data = (ASSETS / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert len(data) == entry["bytes"], name


@pytest.fixture
def assets_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the real shipped models and their checksums, loaded in place of the package's."""
    root = tmp_path / "assets"
    shutil.copytree(ASSETS / "models", root / "models")
    shutil.copy(ASSETS / "checksums.json", root / "checksums.json")
    monkeypatch.setattr(P, "_root", lambda: root)
    return root


def test_an_edited_model_card_is_refused_in_one_line(assets_copy, capsys):
    """The card decides the architecture built and what `inspect` calls standard/robust: a card
    whose objective was changed (natural -> pgd_at, the standard model passed off as robust) is
    refused by model_card, load_pretrained and the CLI."""
    card_path = assets_copy / "models" / "mnist_smallcnn_standard.json"
    card = json.loads(card_path.read_text())
    assert card["objective"]["name"] == "natural"
    card["objective"]["name"] = "pgd_at"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    for call in (P.model_card, P.load_pretrained):
        with pytest.raises(ModelError, match=r"model card's sha256 .* differs") as err:
            call("mnist_smallcnn_standard")
        assert "models/mnist_smallcnn_standard.json" in str(err.value)
        assert "\n" not in str(err.value)
    assert P.load_pretrained("mnist_smallcnn_robust") is not None  # its own card is intact
    rc = main(["evaluate", "--model", "robustkit:mnist_smallcnn_standard", "--dataset",
               "sample-mnist", "--n-examples", "2", "--attacks", "clean", "--no-progress",
               "--out", str(assets_copy.parent / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("robustkit evaluate: error: ") and "sha256" in err[0]


def test_a_card_without_a_recorded_checksum_is_refused(assets_copy):
    sums = json.loads((assets_copy / "checksums.json").read_text())
    del sums["files"]["models/mnist_smallcnn_robust.json"]
    (assets_copy / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(ModelError,
                       match=r"no sha256 recorded for models/mnist_smallcnn_robust\.json"):
        P.model_card("mnist_smallcnn_robust")


@pytest.mark.parametrize("change, named", [
    ({"num_classes": 7}, r"model\.classifier\.fc3\.weight: checkpoint \(10, 200\) vs model "
                         r"\(7, 200\)"),
    ({"name": "cifar_cnn"}, r"missing keys: model\."),
])
def test_a_card_whose_architecture_does_not_match_its_weights_is_one_line(fake_assets, change,
                                                                          named):
    """Shipped together with matching checksums, but describing another network: a ModelError
    naming the model and the mismatching keys, not torch's multi-line size-mismatch error."""
    root, _ = fake_assets
    path = root / "models" / "mnist_smallcnn_robust.json"
    card = json.loads(path.read_text())
    card["architecture"].update(change)
    path.write_text(json.dumps(card))
    _record(root, "models/mnist_smallcnn_robust.json")
    with pytest.raises(ModelError, match=named) as err:
        P.load_pretrained("mnist_smallcnn_robust")
    message = str(err.value)
    assert message.startswith("robustkit:mnist_smallcnn_robust: the model card's architecture")
    assert "does not match its weights" in message and "\n" not in message


class _System:
    """Unpickling this runs a shell command (a real payload: plain pickle executes it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_a_pickle_payload_as_shipped_weights_is_refused_and_never_runs(fake_assets, tmp_path,
                                                                      fmt):
    """Weights replaced by a pickle whose unpickling calls os.system, with the checksum updated
    to match (a tampered installation): refused in one line, the payload never runs."""
    root, model = fake_assets
    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_System(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    evil = {**model.state_dict(), "extra": _System(marker)}
    path = root / "models" / "mnist_smallcnn_robust.pt"
    if fmt == "torch":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    _record(root, "models/mnist_smallcnn_robust.pt")
    with pytest.raises(ModelError, match="refused") as err:
        P.load_pretrained("mnist_smallcnn_robust")
    assert "corrupt" not in str(err.value) and "\n" not in str(err.value)
    assert "robustkit:mnist_smallcnn_robust" in str(err.value)
    with pytest.raises(ModelError, match="refused"):
        load_model("robustkit:mnist_smallcnn_robust", num_classes=10, in_channels=1,
                   input_size=28)
    assert not marker.exists()


def _ship_model_module():
    import importlib.util

    path = ASSETS.parents[1] / "train" / "ship_model.py"
    spec = importlib.util.spec_from_file_location("ship_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipping_a_model_records_the_checksums_of_its_weights_and_card(tmp_path, monkeypatch):
    """train/ship_model.py (the generator): both new files get an entry, the card's written
    last; every other entry (the samples' provenance included) is kept."""
    from robustkit.training.checkpoint import save_checkpoint

    ship = _ship_model_module()
    assets = tmp_path / "assets"
    (assets / "models").mkdir(parents=True)
    shutil.copy(ASSETS / "checksums.json", assets / "checksums.json")
    before = json.loads((assets / "checksums.json").read_text())["files"]
    monkeypatch.setattr(ship, "ASSETS", assets)
    model = create_model("small_cnn", 10, mean=0.1307, std=0.3081, in_channels=1, input_size=28)
    cfg = {"data": {"name": "mnist", "holdout": 1000},
           "model": {"name": "small_cnn", "params": {}}, "objective": {"name": "natural"}}
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": cfg,
                                           "epoch": 1, "step": 10})
    ship.main(["mnist_tiny", "--checkpoint", str(tmp_path / "best.pt"), "--export-only"])
    after = json.loads((assets / "checksums.json").read_text())["files"]
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"models/mnist_tiny.pt", "models/mnist_tiny.json"}
    for name in ("models/mnist_tiny.pt", "models/mnist_tiny.json"):
        data = (assets / name).read_bytes()
        assert after[name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    monkeypatch.setattr(P, "_root", lambda: assets)
    monkeypatch.setattr(P, "PRETRAINED", {"mnist_tiny": "mnist_tiny"})
    assert P.model_card("mnist_tiny")["objective"]["name"] == "natural"
    P.load_pretrained("mnist_tiny")  # what was shipped loads

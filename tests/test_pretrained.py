"""robustkit:<name> shipped models: the loading mechanism (sha256, float16 -> float32, the card,
errors), on a fake asset folder, so it is tested whatever is shipped."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from robustkit.errors import ModelError
from robustkit.models import create_model, load_model
from robustkit.models import pretrained as P


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
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    (tmp_path / "checksums.json").write_text(json.dumps(
        {"files": {"models/mnist_smallcnn_robust.pt": {"sha256": sha}}}))
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

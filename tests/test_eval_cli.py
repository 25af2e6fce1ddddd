"""``robustkit evaluate`` when files go wrong (issue 10 §1, §3): --out checked before anything is
loaded, a full disk is one line naming the file with the state intact for the rerun, stale
temporary files are removed, and the fingerprint sees edited weights, other images and another
--data-root (robustkit.cli.evaluate)."""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from robustkit.cli import main
from robustkit.data import load_dataset

FACTORY = """
import torch
from torch import nn
from robustkit.data import load_dataset

def net():
    # nearest class mean of the shipped MNIST sample (about 85 % clean): PGD has work to do
    train = load_dataset("sample-mnist", "train")
    x = train.x[:2000].float().div(255).flatten(1)
    y = train.y[:2000]
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    fc = nn.Linear(784, 10)
    with torch.no_grad():
        fc.weight.copy_(2 * means)
        fc.bias.copy_(-(means ** 2).sum(1) + {shift} * torch.arange(10))
    return nn.Sequential(nn.Flatten(), fc)
"""


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "archs.py"
    path.write_text(FACTORY.format(shift=0))
    return path


def evaluate(out, factory, *argv, dataset="sample-mnist"):
    return main(["evaluate", "--model", f"{factory}:net", "--dataset", dataset, "--n-examples",
                 "12", "--batch-size", "4", "--attacks", "clean,pgd5", "--eps", "0.1",
                 "--no-progress", "--out", str(out), *argv])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("robustkit evaluate: error: ")
    return err[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or data is a test failure: --out is checked first."""
    def refuse(*a, **kw):
        raise AssertionError("loaded before --out was checked")

    monkeypatch.setattr("robustkit.models.load_model", refuse)
    monkeypatch.setattr("robustkit.data.load_dataset", refuse)


def test_out_is_an_existing_file(tmp_path, factory, capsys, nothing_loads):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert str(out) in line and "existing file" in line
    assert out.read_text() == "keep me"


def test_out_below_a_file(tmp_path, factory, capsys, nothing_loads):
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "eval"
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert str(out) in line and "not writable" in line


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_out_read_only_or_unwritable(tmp_path, factory, capsys, nothing_loads, monkeypatch,
                                     code):
    real = Path.write_bytes

    def write_bytes(self, data):  # the writability probe fails as on a read-only mount
        if self.name.startswith(".write-test"):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "ro"
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert str(out) in line and os.strerror(code) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_really_read_only(tmp_path, factory, capsys, nothing_loads):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert evaluate(out, factory) == 2
        assert str(out) in one_line(capsys)
    finally:
        out.chmod(0o700)


def _records(path: Path) -> dict:
    return json.loads(path.read_text())["batches"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_full_disk_during_the_state_then_resume(tmp_path, factory, capsys, monkeypatch,
                                                failing_replace, code):
    out = tmp_path / "out"
    failing_replace(code, "flags_pgd5.json", after=1)
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert "flags_pgd5.json" in line and os.strerror(code) in line and "rerun" in line
    monkeypatch.undo()
    state = out / "state"
    kept = _records(state / "flags_pgd5.json")  # intact and parseable: the first batch
    assert list(kept) == ["0"] and len(_records(state / "flags_clean.json")) == 3
    assert not list(state.glob(".*.tmp")) and not (out / "results.json").exists()
    assert evaluate(out, factory) == 0  # the rerun resumes
    assert _records(state / "flags_pgd5.json")["0"] == kept["0"]  # not recomputed (same time)
    fresh = tmp_path / "fresh"
    assert evaluate(fresh, factory) == 0
    got, ref = (json.loads((d / "flags.json").read_text()) for d in (out, fresh))
    assert got == ref


@pytest.mark.parametrize("target", ["results.json", "flags.json", "config.yaml", "net.json"])
def test_full_disk_while_writing_results(tmp_path, factory, capsys, monkeypatch, failing_replace,
                                         target):
    out = tmp_path / "out"
    failing_replace(errno.ENOSPC, target)
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert target in line and "No space left on device" in line
    monkeypatch.undo()
    before = {p.name: p.read_text() for p in (out / "state").glob("flags_*.json")}
    assert set(before) == {"flags_clean.json", "flags_pgd5.json"}
    assert evaluate(out, factory) == 0  # nothing recomputed: the state files are unchanged
    assert {p.name: p.read_text() for p in (out / "state").glob("flags_*.json")} == before
    assert (out / "results.json").is_file() and (out / "flags.json").is_file()


def test_stale_temporary_files_are_removed_at_start(tmp_path, factory):
    out = tmp_path / "out"
    assert evaluate(out, factory) == 0
    stale = [out / ".results.json.k2j3.tmp", out / "state" / ".flags_pgd5.json.a1.tmp"]
    for f in stale:
        f.write_bytes(b"x" * 100)
    keep = out / "notes.tmp"  # not an atomic write's temporary file
    keep.write_text("mine")
    assert evaluate(out, factory) == 0
    assert not any(f.exists() for f in stale) and keep.exists()


def test_edited_factory_weights_are_not_resumed(tmp_path, factory, capsys):
    """The issue's case: the same FILE.py:FN with other weights reported the old numbers."""
    out = tmp_path / "out"
    assert evaluate(out, factory) == 0
    factory.write_text(FACTORY.format(shift=0.5))
    capsys.readouterr()
    assert evaluate(out, factory) == 2
    line = one_line(capsys)
    assert "model_sha256" in line and "--overwrite" in line
    assert evaluate(out, factory, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert evaluate(fresh, factory) == 0
    got, ref = (json.loads((d / "results.json").read_text()) for d in (out, fresh))
    assert got["accuracy"] == ref["accuracy"]


def _idx(path: Path, array: torch.Tensor) -> None:
    """An MNIST IDX file (big-endian header, unsigned bytes), gzip-compressed."""
    dims = list(array.shape)
    head = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(head + array.contiguous().numpy().tobytes()))


def _mnist_root(root: Path, invert: bool = False) -> Path:
    test = load_dataset("sample-mnist", "test")
    x = test.x[:16, 0]
    _idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", 255 - x if invert else x)
    _idx(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", test.y[:16].to(torch.uint8))
    return root


def test_another_data_root_is_not_resumed(tmp_path, factory, capsys):
    """The issue's case: --data-root at inverted images reported 87.5 % (fresh: 0 %)."""
    a = _mnist_root(tmp_path / "a")
    same = _mnist_root(tmp_path / "same")  # equal files, another folder
    inverted = _mnist_root(tmp_path / "inv", invert=True)
    out = tmp_path / "out"
    assert evaluate(out, factory, "--data-root", str(a), dataset="mnist") == 0
    assert evaluate(out, factory, "--data-root", str(a), dataset="mnist") == 0  # resumes
    capsys.readouterr()
    assert evaluate(out, factory, "--data-root", str(same), dataset="mnist") == 2
    line = one_line(capsys)
    assert "data_root" in line and "data_sha256" not in line
    assert evaluate(out, factory, "--data-root", str(inverted), dataset="mnist") == 2
    line = one_line(capsys)
    assert "data_root" in line and "data_sha256" in line

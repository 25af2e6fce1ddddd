"""robustkit.data: shipped samples, readers of the official layouts, splits and loaders."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from robustkit.data import (
    DATASETS,
    DataError,
    ImageDataset,
    build_loaders,
    check_num_classes,
    first_n,
    load_cifar,
    load_dataset,
    load_mnist,
    load_sample,
    load_tiny_imagenet,
    train_transform,
)
from robustkit.data import samples as samples_mod
from robustkit.data.samples import CHECKSUMS, SAMPLES, decode_sample, encode_sample

SAMPLE_SPLITS = [(n, s) for n in SAMPLES for s in ("train", "test")]


def _manifest() -> dict:
    return json.loads(samples_mod.asset_bytes(CHECKSUMS))["files"]


# ---- fake official layouts ----------------------------------------------------------------------


def _write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _fake_mnist(folder, n=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (img, lbl) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(folder / img, x, gz)
        _write_idx(folder / lbl, y, gz)
        out[split] = (x, y)
    return out


def _cifar_batch(path, x_nchw: np.ndarray, labels, key=b"labels", extra=None, protocol=4) -> None:
    d = {b"batch_label": b"fake", key: list(map(int, labels)),
         b"data": x_nchw.reshape(len(x_nchw), -1).astype(np.uint8), **(extra or {})}
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def _fake_cifar10(folder, sizes=(7, 5), n_test=4, seed=0, protocol=4):
    """``data_batch_1..len(sizes)`` of the given sizes, a short ``test_batch``, ``batches.meta``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for k, n in enumerate(sizes, start=1):
        x, y = rng.integers(0, 256, (n, 3, 32, 32)), rng.integers(0, 10, n)
        _cifar_batch(folder / f"data_batch_{k}", x, y, protocol=protocol)
        xs.append(x)
        ys.append(y)
    xt, yt = rng.integers(0, 256, (n_test, 3, 32, 32)), rng.integers(0, 10, n_test)
    _cifar_batch(folder / "test_batch", xt, yt, protocol=protocol)
    names = [f"class{k}".encode() for k in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def _jpeg(path, color, gray=False):
    mode, c = ("L", color[0]) if gray else ("RGB", tuple(color))
    Image.new(mode, (64, 64), c).save(path, "JPEG", quality=100)


def _fake_tiny(root):
    """3 classes listed unsorted; 11 train images in class c (names _0.._10), 3 val images."""
    folder = root / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius\nn02\tfrog\nn03\tcat\n")
    for label, wnid in enumerate(sorted(wnids)):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for k in range(11 if wnid == "n03" else 2):
            _jpeg(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (20 * k, label * 100, 0))
    rows = [("val_0.JPEG", "n02", 1, 2, 30, 40), ("val_1.JPEG", "n03", 0, 0, 63, 63),
            ("val_2.JPEG", "n01", 5, 6, 7, 8)]
    for k, row in enumerate(rows):
        _jpeg(folder / "val" / "images" / row[0], (200, 10 * k, 0), gray=k == 2)
    (folder / "val" / "val_annotations.txt").write_text(
        "".join("\t".join(map(str, r)) + "\n" for r in rows)
    )
    return folder


# ---- the shipped samples ------------------------------------------------------------------------


@pytest.mark.parametrize("name,split", SAMPLE_SPLITS)
def test_sample_items(name, split):
    ds = load_dataset(name, split, root="/nonexistent/root/is/ignored")
    info = DATASETS[name]
    assert len(ds) == _manifest()[SAMPLES[name]]["splits"][split]["n"]
    assert ds.x.dtype == torch.uint8 and tuple(ds.x.shape[1:]) == info.input_shape
    assert ds.y.dtype == torch.int64 and 0 <= ds.y.min() and ds.y.max() < info.num_classes
    assert len(set(ds.y.tolist())) == info.num_classes  # every class present
    for i in (0, 17, len(ds) - 1):
        x, y, idx = ds[i]
        assert x.dtype == torch.float32 and tuple(x.shape) == info.input_shape
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert torch.equal(x, ds.x[i].float() / 255)
        assert y.dim() == 0 and int(y) == int(ds.y[i]) and idx.dim() == 0 and int(idx) == i
    assert torch.equal(load_sample(name, split).x, ds.x)  # deterministic


def test_sample_checksums_recorded_and_verified(monkeypatch):
    for filename, rec in _manifest().items():
        data = samples_mod.asset_bytes(filename)
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]
    assert sum(r["bytes"] for r in _manifest().values()) <= 8 * 2**20
    real = samples_mod.asset_bytes

    def tampered(filename):
        data = bytearray(real(filename))
        if filename.endswith(".npz"):
            data[len(data) // 2] ^= 0xFF
        return bytes(data)

    monkeypatch.setattr(samples_mod, "asset_bytes", tampered)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("sample-cifar10", "test")


def test_malformed_sample_with_matching_checksum(monkeypatch):
    junk = b"not a zip archive"
    digest = hashlib.sha256(junk).hexdigest()
    manifest = {"files": {f: {"sha256": digest} for f in SAMPLES.values()}}
    monkeypatch.setattr(samples_mod, "asset_bytes",
                        lambda f: json.dumps(manifest).encode() if f == CHECKSUMS else junk)
    with pytest.raises(DataError, match="malformed sample"):
        load_sample("sample-mnist", "train")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("png", [False, True])
def test_sample_encoding_is_deterministic_and_lossless(channels, png):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, channels, 8, 6), dtype=np.uint8)
    y = rng.integers(0, 10, 5)
    splits = {"train": (x, y), "test": (x[:2], y[:2])}
    data = encode_sample(splits, ["a", "b"], png=png)
    assert data == encode_sample(splits, ["a", "b"], png=png)
    x2, y2, names = decode_sample(data, "train")
    assert np.array_equal(x2, x) and np.array_equal(y2, y) and names == ["a", "b"]
    with pytest.raises(ValueError, match="split"):
        decode_sample(data, "val")


# ---- first_n, DATASETS, check_num_classes, ImageDataset -----------------------------------------


def test_first_n_semantics():
    ds = load_dataset("sample-cifar10", "test")
    sub = first_n(ds, 10)
    assert len(sub) == 10 and torch.equal(sub.x, ds.x[:10]) and torch.equal(sub.y, ds.y[:10])
    assert int(sub[9][2]) == 9
    assert len(first_n(ds, None)) == len(ds)
    with pytest.raises(ValueError, match=r"n=1001.*1000"):
        first_n(ds, 1001)
    with pytest.raises(ValueError, match="n must be"):
        first_n(ds, 0)
    generic = first_n(TensorDataset(torch.arange(5)), 3)
    assert [int(generic[i][0]) for i in range(3)] == [0, 1, 2]


def test_datasets_table_consistent():
    assert set(DATASETS) >= {"mnist", "cifar10", "cifar100", "tinyimagenet", "sample-mnist",
                             "sample-cifar10"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.input_shape[0]
        assert set(info.eps) == {"Linf", "L2"} and all(0 < e for e in info.eps.values())
        if info.class_names is not None:
            assert len(info.class_names) == info.num_classes
    assert DATASETS["mnist"].eps == {"Linf": 0.3, "L2": 2.0}
    assert DATASETS["cifar10"].eps["Linf"] == 8 / 255
    for s in ("mnist", "cifar10"):
        a, b = DATASETS[s], DATASETS[f"sample-{s}"]
        assert (a.num_classes, a.input_shape, a.mean, a.std, a.eps) == (
            b.num_classes, b.input_shape, b.mean, b.std, b.eps)


def test_check_num_classes():
    check_num_classes(10, DATASETS["cifar10"])
    with pytest.raises(ValueError, match=r"100.*'cifar10'.*10 classes"):
        check_num_classes(100, DATASETS["cifar10"])


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ValueError, match="boxes"):
        x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
        ImageDataset(x, torch.zeros(2), boxes=torch.zeros(2, 3))


# ---- readers on fake official layouts -----------------------------------------------------------


@pytest.mark.parametrize("sub,gz", [("MNIST/raw", False), ("", True), ("mnist/MNIST/raw", False)])
def test_mnist_reader_layouts(tmp_path, sub, gz):
    expected = _fake_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    for split, (x, y) in expected.items():
        ds = load_mnist(tmp_path, split)
        assert torch.equal(ds.x[:, 0], torch.from_numpy(x.astype(np.uint8)))
        assert ds.y.tolist() == y.tolist()


def test_mnist_malformed_and_missing(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    _fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match=r"(?s)MNIST.*malformed.*Expected layout.*--download"):
        load_mnist(tmp_path, "test")
    (folder / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte"):
        load_mnist(tmp_path, "train")


@pytest.mark.parametrize("cut", [0, 10, -20])
def test_mnist_truncated_gz_is_a_data_error(tmp_path, cut):
    """A half-downloaded .gz (or an empty one) is a DataError naming the file, not an EOFError."""
    _fake_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*(truncated|not an IDX)"):
        load_mnist(tmp_path, "test")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "tinyimagenet"])
def test_missing_root_names_layout_and_download(tmp_path, name):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        load_dataset(name, "test", root=root)
    text = str(err.value)
    assert str(root) in text and "Expected layout" in text and "--data-root" in text
    assert "--download" in text
    if name == "tinyimagenet":
        assert "no --download" in text
    else:
        assert "add --download" in text


def test_root_defaults_to_env(tmp_path, monkeypatch):
    _fake_mnist(tmp_path / "MNIST" / "raw", n=3)
    monkeypatch.setenv("ROBUSTKIT_DATA", str(tmp_path))
    assert len(load_dataset("mnist", "test")) == 3


@pytest.mark.parametrize("protocol", [2, 5])  # py2-era opcodes; numpy's out-of-band reducer
def test_cifar10_partial_batches_warn_with_count(tmp_path, caplog, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    x, y, xt, yt = _fake_cifar10(folder, sizes=(7, 5), protocol=protocol)
    with caplog.at_level(logging.WARNING, logger="robustkit.data.cifar"):
        ds = load_cifar("cifar10", tmp_path, "train")
    assert len(ds) == 12 and torch.equal(ds.x, torch.from_numpy(x.astype(np.uint8)))
    assert ds.y.tolist() == y.tolist() and ds.class_names[3] == "class3"
    msg = caplog.text
    assert "found 12 of 50,000" in msg and "data_batch_1: 7" in msg and "data_batch_2: 5" in msg
    assert "missing data_batch_3, data_batch_4, data_batch_5" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustkit.data.cifar"):
        test = load_dataset("cifar10", "test", root=tmp_path)
    assert "found 4 of 10,000" in caplog.text
    assert torch.equal(test.x, torch.from_numpy(xt.astype(np.uint8)))
    # channel-major rows: pixel (c, h, w) sits at column c * 1024 + h * 32 + w
    assert int(test.x[1, 2, 5, 7]) == int(xt.reshape(4, -1)[1, 2 * 1024 + 5 * 32 + 7])


def test_cifar_missing_split_and_refused_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar10(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"(?s)no test pickle.*data_batch_1 \.\.\. data_batch_5"):
        load_cifar("cifar10", tmp_path, "test")

    class Evil:  # unpickling would call os.getcwd: the restricted unpickler must refuse it
        def __reduce__(self):
            return (os.getcwd, ())

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load global"):
        load_cifar("cifar10", tmp_path, "test")


def test_cifar100_fine_labels_and_meta(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"  # shared/data's layout
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (6, 3, 32, 32)), rng.integers(0, 100, 6)
    extra = {b"coarse_labels": np.zeros(6, dtype=np.int64)}
    _cifar_batch(folder / "test", x, y, key=b"fine_labels", extra=extra)
    names = [f"c{k}" for k in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}, protocol=2))
    ds = load_dataset("cifar100", "test", root=tmp_path)
    assert ds.y.tolist() == y.tolist() and ds.class_names == names
    assert torch.equal(ds.x, torch.from_numpy(x.astype(np.uint8)))


def test_tiny_imagenet_reader(tmp_path):
    _fake_tiny(tmp_path)
    train = load_tiny_imagenet(tmp_path, "train")
    # labels follow the sorted wnids (n01, n02, n03), not wnids.txt's order
    assert train.y.tolist() == [0, 0, 1, 1] + [2] * 11
    assert train.class_names == ["goldfish", "frog", "cat"]
    assert train.boxes is None  # no *_boxes.txt
    # ImageFolder order within a class: names sorted as strings, so _10 comes after _1
    order = [int(round(float(train.x[i, 0].float().mean()) / 20)) for i in range(4, 15)]
    assert order == [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]
    val = load_dataset("tinyimagenet", "test", root=tmp_path)
    assert tuple(val.x.shape) == (3, 3, 64, 64) and val.y.tolist() == [1, 2, 0]
    assert val.boxes.tolist() == [[1, 2, 30, 40], [0, 0, 63, 63], [5, 6, 7, 8]]
    gray = val.x[2].float()
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # L -> RGB
    assert len(load_tiny_imagenet(tmp_path, "test", limit=2)) == 2


def test_tiny_imagenet_malformed(tmp_path):
    folder = _fake_tiny(tmp_path)
    (folder / "val" / "images" / "val_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"(?s)malformed.*val_annotations.txt"):
        load_tiny_imagenet(tmp_path, "test")
    with pytest.raises(DataError, match="no Tiny-ImageNet downloader"):
        load_tiny_imagenet(tmp_path / "nowhere", "test", download=True)


# ---- transforms and loaders ---------------------------------------------------------------------


def test_train_transform_is_a_padded_crop_and_flip():
    assert train_transform("mnist") is None and train_transform("sample-mnist") is None
    x = torch.rand(3, 32, 32)
    aug = train_transform("cifar10")
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    candidates = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    changed = 0
    for _ in range(20):
        out = aug(x)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        assert any(torch.equal(out, c) for c in candidates)
        changed += not torch.equal(out, x)
    assert changed > 0
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert torch.equal(a, aug(x))  # global torch RNG: a restored state redraws the same crop
    assert train_transform("tinyimagenet")(torch.rand(3, 64, 64)).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="name must be"):
        train_transform("svhn")


def _epoch_indices(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return torch.cat([idx for _, _, idx in loader]).tolist()


def test_build_loaders_splits_and_order():
    loaders = build_loaders("sample-mnist", batch_size=256, holdout=1000, seed=3)
    assert loaders.info is DATASETS["sample-mnist"]
    train_idx = _epoch_indices(loaders.train, 0)
    held_idx = torch.cat([i for _, _, i in loaders.holdout]).tolist()
    assert sorted(train_idx) == list(range(5000))  # every training image once per epoch
    assert held_idx == list(range(5000, 6000))  # the LAST 1,000, in file order
    assert len(loaders.test.dataset) == 1000
    assert torch.cat([i for _, _, i in loaders.test]).tolist() == list(range(1000))
    assert train_idx != list(range(5000))  # shuffled
    epoch1 = _epoch_indices(loaders.train, 1)
    assert epoch1 != train_idx and sorted(epoch1) == sorted(train_idx)
    again = build_loaders("sample-mnist", batch_size=256, holdout=1000, seed=3)
    assert _epoch_indices(again.train, 1) == epoch1  # a pure function of (seed, epoch)
    x, y, idx = next(iter(loaders.train))
    ds = loaders.train.dataset
    assert x.shape == (256, 1, 28, 28) and torch.equal(y, ds.y[idx])
    assert torch.equal(x, ds.x[idx].float() / 255)  # MNIST: no augmentation


def test_build_loaders_augments_only_train():
    loaders = build_loaders("sample-cifar10", batch_size=32, holdout=200, eval_batch_size=50)
    raw = load_dataset("sample-cifar10", "train")
    x, _, idx = next(iter(loaders.train))
    assert 0 <= x.min() and x.max() <= 1 and x.shape == (32, 3, 32, 32)
    assert not torch.equal(x, raw.x[idx].float() / 255)  # 32 unchanged crops: odds 1 in 162^32
    hx, hy, hidx = next(iter(loaders.holdout))
    assert hx.shape[0] == 50 and hidx.tolist() == list(range(800, 850))
    assert torch.equal(hx, raw.x[800:850].float() / 255) and torch.equal(hy, raw.y[800:850])


def test_build_loaders_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 999\]"):
        build_loaders("sample-cifar10")  # 1,000 training images, default holdout 1,000
    with pytest.raises(ValueError, match="name must be"):
        build_loaders("imagenet")
    with pytest.raises(ValueError, match="distributed=True"):
        build_loaders("sample-mnist", distributed=True)
    assert build_loaders("sample-mnist", holdout=0).holdout is None


# ---- ../shared/data ------------------------------------------------------------------------------


def test_shared_mnist_full(shared_data):
    train = load_dataset("mnist", "train", root=shared_data)
    test = load_dataset("mnist", "test", root=shared_data / "mnist")  # MNIST/raw below it
    assert (len(train), len(test)) == (60000, 10000)
    assert int(train.y[0]) == 5 and int(test.y[0]) == 7
    assert torch.bincount(train.y).tolist()[1] == 6742  # the published count of ones
    # The table's mean/std are the training-set pixel statistics (from a histogram: exact, cheap).
    counts = torch.bincount(train.x.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.double) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert mean.item() == pytest.approx(DATASETS["mnist"].mean[0], abs=1e-4)
    assert std.item() == pytest.approx(DATASETS["mnist"].std[0], abs=1e-4)


def test_shared_cifar10_partial(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="robustkit.data.cifar"):
        train = load_dataset("cifar10", "train", root=shared_data)
        test = load_cifar("cifar10", shared_data / "cifar10" / "cifar-10-batches-py", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert "found 4,000 of 50,000" in caplog.text and "found 1,000 of 10,000" in caplog.text
    assert test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert test.class_names == list(DATASETS["cifar10"].class_names)
    # the README's first red row of training image 0
    assert train.x[0, 0, 0, :16].tolist() == [59, 43, 50, 68, 98, 119, 139, 145, 149, 149, 131,
                                              125, 142, 144, 137, 129]


def test_shared_cifar100_has_no_images(shared_data):
    with pytest.raises(DataError, match=r"(?s)no test pickle.*cifar-100-python"):
        load_dataset("cifar100", "test", root=shared_data)


@pytest.mark.parametrize("name,split", SAMPLE_SPLITS)
def test_samples_equal_shared_slices(shared_data, name, split):
    """The provenance behind the recorded sha256: each sample is a prefix of the official file."""
    sample = load_sample(name, split)
    full = load_dataset(name.removeprefix("sample-"), split, root=shared_data)
    n = len(sample)
    assert torch.equal(sample.x, full.x[:n]) and torch.equal(sample.y, full.y[:n])
    assert sample.class_names == full.class_names


def test_shared_tiny_imagenet_quick(shared_data):
    val = load_tiny_imagenet(shared_data, "test", limit=20)
    assert tuple(val.x.shape) == (20, 3, 64, 64) and len(val.class_names) == 200
    assert val.boxes[0].tolist() == [0, 32, 44, 62]  # val_0.JPEG n03444034 0 32 44 62
    wnids = sorted((shared_data / "tiny-imagenet-200" / "wnids.txt").read_text().split())
    assert int(val.y[0]) == wnids.index("n03444034")


@pytest.mark.slow
def test_shared_tiny_imagenet_full(shared_data):
    val = load_dataset("tinyimagenet", "test", root=shared_data)
    assert len(val) == 10000 and torch.bincount(val.y, minlength=200).tolist() == [50] * 200
    b = val.boxes
    assert b.shape == (10000, 4) and (b >= 0).all() and (b <= 63).all()
    assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()
    mean = (val.x.double() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(DATASETS["tinyimagenet"].mean, dtype=torch.double),
                          atol=0.01)
    train = load_dataset("tinyimagenet", "train", root=shared_data)
    assert len(train) == 20000 and torch.bincount(train.y).tolist() == [100] * 200
    assert train.boxes is not None and train.boxes.shape == (20000, 4)


@pytest.mark.slow
def test_shared_cifar10_statistics(shared_data):
    train = load_dataset("cifar10", "train", root=shared_data)
    pixels = train.x.double() / 255
    info = DATASETS["cifar10"]
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(info.mean, dtype=torch.double), atol=0.01)
    assert torch.allclose(std, torch.tensor(info.std, dtype=torch.double), atol=0.01)


def test_build_loaders_limit_trains_on_the_first_images_and_says_so(caplog):
    """#18 j: the log names the training images actually used, not the whole split."""
    with caplog.at_level(logging.INFO, "robustkit.data"):
        loaders = build_loaders("sample-mnist", batch_size=64, holdout=64, limit=100)
    assert len(loaders.train.dataset) == 100 and len(loaders.holdout.dataset) == 64
    idx = torch.cat([b[2] for b in loaders.train])
    assert sorted(idx.tolist()) == list(range(100))
    full = build_loaders("sample-mnist", batch_size=64, holdout=64)
    assert torch.equal(loaders.holdout.dataset[0][0], full.holdout.dataset[0][0])  # unchanged
    assert "sample-mnist: 100 training (the first of 5936: limit 100), 64 held-out" in caplog.text
    assert "5936 training," not in caplog.text.split("limit 100")[0]
    assert len(build_loaders("sample-mnist", holdout=64, limit=10**6).train.dataset) == 5936
    with pytest.raises(ValueError, match="limit must be >= 1"):
        build_loaders("sample-mnist", limit=0)

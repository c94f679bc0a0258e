"""Datasets: the embedded digits and file loaders fed small files written here in the real formats."""

import gzip
import struct

import numpy as np
import pytest
import torch

from geomprobe.data import load_dataset, parse_classes, task_splits
from geomprobe.dataformats import read_idx
from geomprobe.errors import DataError, UsageError


def test_digits_shapes_ranges_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 16, 16)
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    assert float(train.images.max()) == pytest.approx(1.0, abs=0.05)
    # stratified: every class in both splits, proportions within one image of 80/20
    for c in range(10):
        n_tr, n_te = int((train.labels == c).sum()), int((test.labels == c).sum())
        assert n_te > 0 and abs(n_tr / (n_tr + n_te) - 0.8) < 0.02
    # the split is fixed
    assert torch.equal(load_dataset("digits", "test").labels, test.labels)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_sizes(size):
    d = load_dataset("digits", image_size=size)
    assert d.images.shape[-2:] == (size, size)


def test_digits_8px_is_the_raw_data():
    from sklearn.datasets import load_digits

    raw = load_digits()
    d = load_dataset("digits", "train", image_size=8)
    x, y = d.batch([0])
    # find that image in the raw data: reference is the raw 0..16 values scaled to [-1, 1]
    matches = [i for i in range(len(raw.target)) if np.allclose(raw.images[i] / 8.0 - 1.0, x[0, 0].numpy(), atol=1e-6)]
    assert matches and raw.target[matches[0]] == int(y[0])


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader(tmp_path, gz, name):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz)
    d = load_dataset(name, "train", data_root=tmp_path)
    x, y = d.batch(range(7))
    assert x.shape == (7, 1, 32, 32) and y.tolist() == labels.tolist()
    # padded by 2 on each side; values mapped to [-1, 1]
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), imgs / 127.5 - 1.0, atol=1e-6)
    assert float(x[:, :, :2].max()) == -1.0


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", data_root=tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1]))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28) + b"\x00" * 10
    )
    with pytest.raises(DataError, match="data bytes"):
        load_dataset("mnist", "train", data_root=tmp_path)
    with pytest.raises(DataError):
        read_idx(b"garbage!", "x")


def test_cifar10_loader(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    recs = []
    for i in range(1, 6):
        rec = np.zeros((3, 3073), dtype=np.uint8)
        rec[:, 0] = [i % 10, (i + 1) % 10, 9]
        rec[:, 1:] = rng.integers(0, 256, size=(3, 3072))
        rec.tofile(base / f"data_batch_{i}.bin")
        recs.append(rec)
    rec = np.concatenate(recs)
    d = load_dataset("cifar10", "train", data_root=tmp_path)
    x, y = d.batch(range(len(d)))
    assert x.shape == (15, 3, 32, 32) and y.tolist() == rec[:, 0].tolist()
    np.testing.assert_allclose(x[4].numpy(), rec[4, 1:].reshape(3, 32, 32) / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(DataError, match="test_batch.bin"):
        load_dataset("cifar10", "test", data_root=tmp_path)
    (base / "test_batch.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match="3073"):
        load_dataset("cifar10", "test", data_root=tmp_path)


def test_imagenet32_loader(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.array([1, 2, 500, 1000]))
    d = load_dataset("imagenet32", "test", data_root=tmp_path)
    assert d.num_classes == 1000 and d.labels.tolist() == [0, 1, 499, 999]
    assert d.batch([0])[0].shape == (1, 3, 32, 32)
    with pytest.raises(DataError, match="train_data_batch_1.npz"):
        load_dataset("imagenet32", "train", data_root=tmp_path)


def test_dataset_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset"):
        load_dataset("svhn")
    with pytest.raises(UsageError, match="--data-root"):
        load_dataset("mnist")
    with pytest.raises(UsageError):
        load_dataset("digits", image_size=12)
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", data_root=tmp_path / "nope")


def test_task_splits():
    assert task_splits(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    tasks = task_splits(1000, 20)
    assert len(tasks) == 20 and all(len(t) == 50 for t in tasks)
    assert sorted(sum(tasks, [])) == list(range(1000))
    for bad in [(10, 11), (10, 0), (10, 3)]:
        with pytest.raises(UsageError):
            task_splits(*bad)


def test_subset_and_classes():
    d = load_dataset("digits")
    s = d.subset([2, 3])
    assert set(s.labels.tolist()) == {2, 3} and len(s) == int(((d.labels == 2) | (d.labels == 3)).sum())
    assert parse_classes("0..3", 10) == [0, 1, 2, 3]
    assert parse_classes("3,1", 10) == [1, 3]
    assert parse_classes(None, 10) is None
    for bad in ["a", "0,10", "5..2"]:
        with pytest.raises(UsageError):
            parse_classes(bad, 10)

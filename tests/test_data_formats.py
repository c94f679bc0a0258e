"""Dataset file formats: files written here in each real format, hostile pickles, wrong and broken files.

References: loaded pixels are compared with the raw arrays the test wrote (u / 127.5 - 1 for
uint8, 2x - 1 for floats in [0, 1], float64, atol 1e-6), and the CIFAR-10 python reader with
the binary reader fed the same random data.
"""

import gzip
import io
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from geomprobe.data import load_dataset
from geomprobe.dataformats import CIFAR_PICKLE_GLOBALS, CifarUnpickler, _exact_pixels, read_idx
from geomprobe.errors import DataError


def _one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)


# ---------------------------------------------------------------- CIFAR-10 python version


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (SHORT_BINSTRING), as cPickle wrote the CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str8(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("ascii")
        n = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def _py2_pickle(obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_batches(rng, sizes):
    """[(data (n, 3072) uint8, labels (n,) uint8)] random batches of the given sizes."""
    return [(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)) for n in sizes]


def _write_cifar(directory, batches, fmt, style="py2"):
    """The batches as data_batch_1.. (train) + test_batch (last), in the python or binary format."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, len(batches))] + ["test_batch"]
    for name, (data, labels) in zip(names, batches, strict=True):
        if fmt == "bin":
            np.concatenate([labels[:, None], data], axis=1).tofile(directory / f"{name}.bin")
            continue
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
        batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(len(labels))]
        raw = _py2_pickle(batch) if style == "py2" else pickle.dumps(batch, protocol=2)
        (directory / name).write_bytes(raw)


@pytest.mark.parametrize("style", ["py2", "py3-protocol2"])
@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "."])
def test_cifar10_python_version_equals_binary_and_raw(tmp_path, style, layout):
    batches = _cifar_batches(np.random.default_rng(3), [4, 3, 5, 2, 3, 6])
    _write_cifar(tmp_path / "py" / layout, batches, "py", style)
    _write_cifar(tmp_path / "bin" / "cifar-10-batches-bin", batches, "bin")
    for split, rows in (("train", batches[:5]), ("test", batches[5:])):
        py = load_dataset("cifar10", split, data_root=tmp_path / "py")
        ref = load_dataset("cifar10", split, data_root=tmp_path / "bin")
        assert py.images.dtype == ref.images.dtype and np.array_equal(py.images.numpy(), ref.images.numpy())
        assert py.labels.tolist() == ref.labels.tolist() == np.concatenate([r[1] for r in rows]).tolist()
        raw = np.concatenate([r[0] for r in rows]).reshape(-1, 3, 32, 32)
        np.testing.assert_allclose(py.batch(range(len(py)))[0].numpy(), raw / 127.5 - 1.0, atol=1e-6)


def test_cifar10_data_root_is_the_batches_directory(tmp_path):
    batches = _cifar_batches(np.random.default_rng(4), [2] * 6)
    _write_cifar(tmp_path / "cifar-10-batches-bin", batches, "bin")
    _write_cifar(tmp_path / "cifar-10-batches-py", batches, "py")
    for directory in ("cifar-10-batches-bin", "cifar-10-batches-py"):
        d = load_dataset("cifar10", "test", data_root=tmp_path / directory)
        assert np.array_equal(d.images.numpy(), batches[5][0].reshape(-1, 3, 32, 32))


def test_cifar10_neither_version_names_both(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train", data_root=tmp_path)
    _one_line_error(
        excinfo, "python version", "data_batch_1 .. data_batch_5", "binary version", "data_batch_5.bin",
        "cifar-10-batches-py/", "cifar-10-batches-bin/", "cifar-10-python.tar.gz", "extract",
    )  # fmt: skip
    _write_cifar(tmp_path / "cifar-10-batches-py", _cifar_batches(np.random.default_rng(5), [2] * 3), "py")
    with pytest.raises(DataError) as excinfo:  # data_batch_1, _2 and test_batch only
        load_dataset("cifar10", "train", data_root=tmp_path)
    _one_line_error(excinfo, tmp_path / "cifar-10-batches-py" / "data_batch_3")


class _Call:
    """Pickles as a call of ``func(*args)``: what a hostile pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    """(name in the pickle, pickle bytes of a CIFAR-like dict whose b'data' is the payload, wait)."""
    touch = f"touch {marker}"
    calls = {
        "posix.system": (_Call(os.system, touch), None),
        "builtins.eval": (_Call(eval, f"open({str(marker)!r}, 'w').close()"), None),
        "subprocess.Popen": (_Call(subprocess.Popen, ["touch", str(marker)]), lambda p: p.wait()),
    }
    out = []
    for name, (call, wait) in calls.items():
        raw = pickle.dumps({b"data": call, b"labels": [0]}, protocol=2, fix_imports=False)
        out.append((name, raw, wait))
    # the same call spelled os.system (GLOBAL opcode text), as a hand-made pickle would
    out.append(("os.system", out[0][1].replace(b"cposix\nsystem\n", b"cos\nsystem\n"), None))
    return out


@pytest.mark.parametrize("which", range(4))
def test_cifar10_python_hostile_pickle_is_refused_and_never_runs(tmp_path, which):
    marker = tmp_path / "PWNED"
    name, raw, wait = _payloads(marker)[which]
    # control: plain pickle runs the payload, so the marker test below can fail
    loaded = pickle.loads(raw)
    if wait:
        wait(loaded[b"data"])
    assert marker.exists()
    marker.unlink()
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    (directory / "test_batch").write_bytes(raw)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "test", data_root=tmp_path)
    _one_line_error(excinfo, directory / "test_batch", f"refusing to unpickle {name}")
    assert not marker.exists()


def test_cifar_unpickler_admits_exactly_the_numpy_globals():
    assert set(CIFAR_PICKLE_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
    # _codecs.encode is admitted for latin-1 only (how Python 3 pickles bytes at protocol 2)
    raw = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        CifarUnpickler(io.BytesIO(raw), "f").load()


def _batch_pickle(data, labels):
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (_batch_pickle(np.zeros((2, 3072), np.uint8), [0, 1])[:-40], "is not a CIFAR-10 python batch"),
        (b"not a pickle at all", "is not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2], protocol=2), "not a dict"),
        (pickle.dumps({b"data": 1}, protocol=2), "'labels'"),
        (_batch_pickle(np.zeros((2, 3072), np.float32), [0, 1]), "expected uint8 (N, 3072)"),
        (_batch_pickle(np.zeros((2, 1024), np.uint8), [0, 1]), "expected uint8 (N, 3072)"),
        (_batch_pickle(np.zeros((2, 3072), np.uint8), [0]), "expected 2 integers"),
        (_batch_pickle(np.zeros((2, 3072), np.uint8), [0, 10]), "label outside 0..9"),
    ],
)
def test_cifar10_python_malformed_batch(tmp_path, raw, expected):
    (tmp_path / "test_batch").write_bytes(raw)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "test", data_root=tmp_path)
    _one_line_error(excinfo, tmp_path / "test_batch", expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_cifar_unpickler_random_bytes_only_data_errors(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "test_batch"
    path.write_bytes(b"\x80\x02" + raw)
    with pytest.raises(DataError):
        load_dataset("cifar10", "test", data_root=path.parent)


# ---------------------------------------------------------------- ImageNet32 pixel dtypes


def test_imagenet32_uint8_and_float_pixels(tmp_path):
    rng = np.random.default_rng(6)
    u8 = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    labels = np.array([1, 7, 1000])
    unit = rng.random((3, 3072))  # fractional values in [0, 1)
    unit[0, :2] = [0.0, 1.0]
    cases = {
        "uint8": (u8, u8 / 127.5 - 1.0),
        "float32 k/255": ((u8 / 255.0).astype(np.float32), u8 / 127.5 - 1.0),
        "float64 fractional": (unit, 2.0 * unit - 1.0),
        "float32 fractional": (unit.astype(np.float32), 2.0 * unit.astype(np.float32).astype(np.float64) - 1.0),
    }
    for case, (data, reference) in cases.items():
        np.savez(tmp_path / "val_data.npz", data=data, labels=labels)
        d = load_dataset("imagenet32", "test", data_root=tmp_path)
        x, y = d.batch(range(3))
        np.testing.assert_allclose(x.numpy(), reference.reshape(3, 3, 32, 32), atol=1e-6, err_msg=case)
        assert y.tolist() == [0, 6, 999]
        # data that is exactly k/255 is kept as its uint8 pixels (exact, a quarter of the memory)
        assert (d.images.dtype == torch.uint8) == ("fractional" not in case), case


def test_exact_pixels_checks_every_chunk():
    u8 = np.random.default_rng(9).integers(0, 256, (5, 3072), dtype=np.uint8)
    exact = (u8 / 255.0).astype(np.float32)
    assert np.array_equal(_exact_pixels(exact, rows=2), u8)
    exact[4, 7] += 0.3 / 255  # a fractional level in the last chunk only
    assert _exact_pixels(exact, rows=2) is None


def test_imagenet32_mixed_batches(tmp_path):
    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    unit = rng.random((2, 3072))
    for i in range(1, 11):
        data = unit if i == 2 else u8
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=data, labels=np.array([1, 2]))
    x, _ = load_dataset("imagenet32", "train", data_root=tmp_path).batch(range(20))
    np.testing.assert_allclose(x[:2].numpy(), (u8 / 127.5 - 1.0).reshape(2, 3, 32, 32), atol=1e-6)
    np.testing.assert_allclose(x[2:4].numpy(), (2.0 * unit - 1.0).reshape(2, 3, 32, 32), atol=1e-6)


@pytest.mark.parametrize(
    "data, expected",
    [
        (np.full((2, 3072), 200.0, np.float32), "float32 in [200, 200]; expected uint8 0..255 or float in [0, 1]"),
        (np.full((2, 3072), -0.5, np.float32), "float32 in [-0.5, -0.5]"),
        (np.full((2, 3072), np.nan, np.float32), "non-finite"),
        (np.full((2, 3072), 3, np.int64), "int64 in [3, 3]; expected uint8"),
        (np.zeros((2, 3072), bool), "bool"),
    ],
)
def test_imagenet32_other_pixel_dtypes_refused(tmp_path, data, expected):
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.array([1, 2]))
    with pytest.raises(DataError) as excinfo:
        load_dataset("imagenet32", "test", data_root=tmp_path)
    _one_line_error(excinfo, tmp_path / "val_data.npz", expected)


def test_imagenet32_bad_labels_name_the_file(tmp_path):
    for labels in (np.array([0, 5]), np.array([1.5, 2.0])):
        np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=labels)
        with pytest.raises(DataError) as excinfo:
            load_dataset("imagenet32", "test", data_root=tmp_path)
        _one_line_error(excinfo, tmp_path / "val_data.npz", "1..1000")


# ---------------------------------------------------------------- IDX (MNIST)


def _idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory, images, labels, image_name="train-images-idx3-ubyte", gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in ((image_name, images), ("train-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(array)
        (directory / name).write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_images_above_32px_refused(tmp_path):
    _write_mnist(tmp_path, np.zeros((2, 64, 48)), np.array([0, 1]))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(excinfo, tmp_path / "train-images-idx3-ubyte", "64x48", "at most 32x32")


def test_idx_labels_file_in_place_of_images(tmp_path):
    images, labels = np.zeros((2, 28, 28)), np.array([0, 1])
    _write_mnist(tmp_path, labels, labels)  # a labels file under the images name
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(
        excinfo, f"{tmp_path / 'train-images-idx3-ubyte'} is an IDX labels file (1-D), expected images (3-D)"
    )
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(images))  # files swapped: images as labels
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(
        excinfo, f"{tmp_path / 'train-labels-idx1-ubyte'} is an IDX images file (3-D), expected labels (1-D)"
    )


def test_idx_truncated_trailing_and_count_mismatch(tmp_path):
    images, labels = np.zeros((3, 28, 28)), np.array([0, 1, 2])
    path = tmp_path / "train-images-idx3-ubyte"
    _write_mnist(tmp_path, images, labels)
    path.write_bytes(_idx_bytes(images)[:-100])
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(excinfo, path, "is truncated", "(3, 28, 28)", "2352 data bytes", "2252")
    path.write_bytes(_idx_bytes(images)[:10])
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(excinfo, path, "is truncated", "16-byte header")
    path.write_bytes(_idx_bytes(images) + b"\x00" * 5)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(excinfo, path, "5 bytes more")
    _write_mnist(tmp_path, images, labels[:2])
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=tmp_path)
    _one_line_error(excinfo, f"{path} has 3 images but {tmp_path / 'train-labels-idx1-ubyte'} has 2 labels")
    gz = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    _write_mnist(gz.parent, images, labels, gz=True)
    gz.write_bytes(gzip.compress(_idx_bytes(images))[:-30])
    (gz.parent / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train", data_root=gz.parent)
    _one_line_error(excinfo, "corrupt gzip file", gz)


def test_empty_files_refused(tmp_path):
    _write_mnist(tmp_path, np.zeros((0, 28, 28)), np.zeros(0))
    with pytest.raises(DataError, match="hold no images"):
        load_dataset("mnist", "train", data_root=tmp_path)


def test_idx_other_element_type_refused():
    raw = bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + b"\x00" * 8
    with pytest.raises(DataError, match=r"x is an IDX file of float32, expected unsigned bytes"):
        read_idx(raw, "x", ndim=1)


@pytest.mark.parametrize(
    "subdir, image_name, gz",
    [
        (".", "train-images-idx3-ubyte.gz", False),  # a browser unpacked the download and kept the name
        (".", "train-images-idx3-ubyte", True),  # gzip data without the .gz suffix
        (".", "train-images.idx3-ubyte", False),  # the dotted spelling of some archives
        ("MNIST/raw", "train-images-idx3-ubyte", True),  # torchvision's layout
    ],
)
def test_idx_names_and_gzip_by_content(tmp_path, subdir, image_name, gz):
    rng = np.random.default_rng(8)
    images, labels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([3, 1, 4])
    _write_mnist(tmp_path / subdir, images, labels, image_name, gz)
    x, y = load_dataset("mnist", "train", data_root=tmp_path).batch(range(3))
    assert y.tolist() == [3, 1, 4]
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), images / 127.5 - 1.0, atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([None, 1, 3]))
@example(bytes([0, 0, 8, 0]), None)  # no dimensions
@example(bytes([0, 0, 8, 2, 0, 0, 0, 0, 0, 0, 0, 5]), None)  # a zero dimension
def test_read_idx_random_bytes_only_data_errors(raw, ndim):
    try:
        out = read_idx(raw, "x", ndim)
    except DataError as exc:
        assert "\n" not in str(exc)
    else:
        assert out.dtype == np.uint8 and (ndim is None or out.ndim == ndim)

"""Readers of the on-disk dataset formats: IDX (MNIST), CIFAR-10 (binary and python), ImageNet32 npz.

Each reader takes local paths and returns numpy arrays: images (N, C, H, W) uint8 in 0..255 (or
float32 in [-1, 1] where a file stores fractional pixel values) and labels (N,) int64. Every
problem a file can have is a one-line :class:`DataError` naming the file; :mod:`geomprobe.data`
wraps the arrays into datasets. Nothing is downloaded.

The CIFAR-10 python batches are pickles. They are read with :class:`CifarUnpickler`, which
rebuilds numpy arrays and nothing else: any other global a pickle names (``os.system``,
``builtins.eval``, ...) is refused before it is looked up, so a hostile file cannot run code.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError

IDX_MAX_IMAGE_SIZE = 32  # MNIST-format images are zero-padded up to 32x32, never cropped
_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_IDX_KINDS = {1: "labels", 3: "images"}

CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_DIRS = {"bin": "cifar-10-batches-bin", "py": "cifar-10-batches-py"}
CIFAR10_ARCHIVES = ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic number.

    The content decides, not the name: browsers often unpack ``*.gz`` downloads and keep the name.

    Args:
        path: a local file.

    Returns:
        The (decompressed) file contents.

    Raises:
        DataError: the file is gzip data that does not decompress.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt gzip file {path}: {_one_line(exc)}") from exc
    return raw


def find_idx_file(dirs: list[Path], stem: str) -> Path:
    """The first of ``stem``, ``stem.gz`` (also spelled ``train-images.idx3-ubyte``) in ``dirs``.

    Args:
        dirs: directories to look in, in order.
        stem: the canonical file name, e.g. ``train-images-idx3-ubyte``.

    Returns:
        The path found.

    Raises:
        DataError: none of the names is a file in any of the directories.
    """
    names = [stem, stem.replace("-idx", ".idx", 1)]
    for d in dirs:
        for n in names:
            for candidate in (d / n, d / (n + ".gz")):
                if candidate.is_file():
                    return candidate
    raise DataError(f"missing file {dirs[0] / stem} (or {stem}.gz)")


def _idx_kind(ndim: int | None) -> str:
    if ndim is None:
        return "at least one dimension"
    return f"{_IDX_KINDS[ndim]} ({ndim}-D)" if ndim in _IDX_KINDS else f"{ndim}-D data"


def _idx_file_kind(ndim: int) -> str:
    return f"an IDX {_IDX_KINDS[ndim]} file ({ndim}-D)" if ndim in _IDX_KINDS else f"a {ndim}-D IDX file"


def read_idx(raw: bytes, source: str, ndim: int | None = None) -> np.ndarray:
    """Decode an IDX file (the MNIST format): magic 0x0000 08 <ndim>, big-endian uint32 dims, uint8 data.

    Args:
        raw: the (decompressed) file contents.
        source: the file's name, for messages.
        ndim: the number of dimensions expected (3 for images, 1 for labels); None accepts any.

    Returns:
        The data, uint8 of the shape the header gives (a read-only view of ``raw``).

    Raises:
        DataError: not an IDX file, not unsigned bytes, another number of dimensions than
            ``ndim`` (e.g. a labels file given for images), or a size other than the header says.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source} is not an IDX file (its first bytes are {raw[:4].hex() or 'missing'})")
    if raw[2] != 0x08:
        kind = _IDX_TYPES.get(raw[2], f"unknown type 0x{raw[2]:02x}")
        raise DataError(f"{source} is an IDX file of {kind}, expected unsigned bytes (type 0x08)")
    found = raw[3]
    if found == 0 or (ndim is not None and found != ndim):
        raise DataError(f"{source} is {_idx_file_kind(found)}, expected {_idx_kind(ndim)}")
    header = 4 + 4 * found
    if len(raw) < header:
        raise DataError(f"{source} is truncated: {len(raw)} bytes, less than its {header}-byte header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(found))
    count = math.prod(dims)  # Python ints: four uint32 dims overflow int64
    if len(raw) - header < count:
        raise DataError(
            f"{source} is truncated: its header says shape {dims} ({count} data bytes), the file has {len(raw) - header}"
        )
    if len(raw) - header > count:
        raise DataError(f"{source} has {len(raw) - header - count} bytes more than the shape {dims} in its header")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one MNIST-format split, images zero-padded (centred) to 32x32.

    Args:
        image_path: an IDX images file (3-D: N, H, W), optionally gzipped.
        label_path: the matching IDX labels file (1-D: N), optionally gzipped.

    Returns:
        images (N, 1, 32, 32) uint8 in 0..255; labels (N,) int64 in 0..9.

    Raises:
        DataError: either file is malformed (:func:`read_idx`), the counts differ, images are
            larger than 32x32, or a label is above 9.
    """
    images = read_idx(read_maybe_gzip(image_path), str(image_path), ndim=3)
    labels = read_idx(read_maybe_gzip(label_path), str(label_path), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels")
    n, h, w = images.shape
    if h > IDX_MAX_IMAGE_SIZE or w > IDX_MAX_IMAGE_SIZE:
        raise DataError(
            f"{image_path} holds {h}x{w} images; MNIST-format images must be at most "
            f"{IDX_MAX_IMAGE_SIZE}x{IDX_MAX_IMAGE_SIZE} (they are zero-padded to 32x32)"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_path}: label {labels.max()} outside 0..9")
    padded = np.zeros((n, 1, 32, 32), dtype=np.uint8)
    top, left = (32 - h) // 2, (32 - w) // 2
    padded[:, 0, top : top + h, left : left + w] = images
    return padded, labels.astype(np.int64)


# ---------------------------------------------------------------- CIFAR-10


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); no other codec is let in.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a pickled bytes object"
        )
    return text.encode("latin1")


# numpy pickles an array as _reconstruct(ndarray, (0,), b"b") + __setstate__; the function lives
# in numpy.core.multiarray (numpy 1, and the Python 2 pickles of CIFAR-10) or numpy._core.multiarray.
_reconstruct = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]

CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, dicts, lists, tuples, bytes, str and numbers only.

    Containers and scalars need no globals; every global a pickle names must be one of
    :data:`CIFAR_PICKLE_GLOBALS` (keys ``(module, name)``), else it is refused before lookup.

    Args:
        file: a binary file object holding the pickle.
        source: the file's path, for the refusal message.
    """

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="bytes")  # written by Python 2's cPickle: str -> bytes
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise DataError(
                f"{self.source}: refusing to unpickle {module}.{name}; a CIFAR-10 python batch holds only "
                "numpy arrays, lists, bytes and ints (this file is not one, and may be malicious)"
            )
        return CIFAR_PICKLE_GLOBALS[(module, name)]


def _batch_entry(batch: object, key: str, path: Path) -> object:
    """``batch[b"data"]`` (Python 2 pickles) or ``batch["data"]`` (a batch re-saved by Python 3)."""
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch: it holds a {type(batch).__name__}, not a dict")
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path} is not a CIFAR-10 python batch: no {key!r} entry")


def read_cifar10_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (a pickled dict with ``b"data"`` and ``b"labels"``), safely.

    Args:
        path: e.g. ``cifar-10-batches-py/data_batch_1``.

    Returns:
        images (N, 3, 32, 32) uint8 in 0..255 (the 3072 bytes of a row are the R, G, B planes,
        row-major, as in the binary version); labels (N,) int64 in 0..9.

    Raises:
        DataError: the pickle names a global outside :data:`CIFAR_PICKLE_GLOBALS`, does not
            decode, or does not hold uint8 data (N, 3072) with N labels in 0..9.
    """
    try:
        with path.open("rb") as f:
            batch = CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # anything an untrusted pickle makes the decoder raise is the file's fault
        raise DataError(f"{path} is not a CIFAR-10 python batch: {_one_line(exc)}") from exc
    data, labels = _batch_entry(batch, "data", path), _batch_entry(batch, "labels", path)
    try:
        labels = np.asarray(labels)
    except ValueError as exc:  # ragged lists
        raise DataError(f"{path}: 'labels' is not a list of integers: {_one_line(exc)}") from exc
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {found}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' has shape {labels.shape} {labels.dtype}, expected {data.shape[0]} integers")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: label outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes).

    Args:
        path: e.g. ``cifar-10-batches-bin/data_batch_1.bin``.

    Returns:
        images (N, 3, 32, 32) uint8 in 0..255; labels (N,) int64 in 0..9.

    Raises:
        DataError: the size is not a multiple of 3073 bytes or a label is above 9.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073 != 0:
        raise DataError(f"{path} is not a CIFAR-10 binary batch (size {raw.size} is not a multiple of 3073)")
    rec = raw.reshape(-1, 3073)
    if rec[:, 0].max(initial=0) > 9:
        raise DataError(f"{path}: label outside 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def find_cifar10(root: Path, split: str) -> tuple[list[Path], str]:
    """The batch files of ``split`` and their format (``"bin"`` or ``"py"``).

    Looked for in ``root/cifar-10-batches-bin``, ``root/cifar-10-batches-py``, then ``root``
    itself (binary first); the first place holding any of the split's files is used.

    Args:
        root: the ``--data-root`` directory.
        split: ``train`` (``data_batch_1`` .. ``_5``) or ``test`` (``test_batch``).

    Returns:
        (paths, format).

    Raises:
        DataError: some of the split's files are missing, or neither version is present (the
            message names both and the files expected).
    """
    stems = CIFAR10_BATCHES[split]
    places = [(root / CIFAR10_DIRS["bin"], "bin"), (root / CIFAR10_DIRS["py"], "py"), (root, "bin"), (root, "py")]
    for base, fmt in places:
        paths = [base / (s + ".bin" if fmt == "bin" else s) for s in stems]
        if any(p.is_file() for p in paths):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"missing file {missing[0]} (other CIFAR-10 {split} batches are beside it)")
            return paths, fmt
    names = {
        fmt: stems[0] + suf + (f" .. {stems[-1]}{suf}" if len(stems) > 1 else "")
        for fmt, suf in (("py", ""), ("bin", ".bin"))
    }
    archives = [a for a in CIFAR10_ARCHIVES if (root / a).is_file()]
    hint = f"; {root / archives[0]} is the archive: extract it (tar xzf) first" if archives else ""
    raise DataError(
        f"no CIFAR-10 {split} batches in {root}: expected the python version ({names['py']}) or the binary "
        f"version ({names['bin']}), in {CIFAR10_DIRS['py']}/ or {CIFAR10_DIRS['bin']}/ or directly there{hint}"
    )


# ---------------------------------------------------------------- ImageNet32


def _exact_pixels(data: np.ndarray, rows: int = 4096) -> np.ndarray | None:
    """uint8 k where every value of ``data`` (floats in [0, 1]) is k / 255 within 1e-3 / 255, else None.

    Checked ``rows`` rows at a time, so the temporaries stay small next to a 1.5 GB batch.
    """
    out = np.empty(data.shape, dtype=np.uint8)
    for start in range(0, data.shape[0], rows):
        levels = data[start : start + rows] * data.dtype.type(255)
        pixels = np.rint(levels)
        if np.abs(levels - pixels).max(initial=0.0) > 1e-3:
            return None
        out[start : start + rows] = pixels
    return out


def imagenet32_pixels(data: np.ndarray, path: Path) -> np.ndarray:
    """An ImageNet32 ``data`` array (N, 3072) as images (N, 3, 32, 32), by its dtype and range.

    - uint8: pixel values 0..255, kept as they are.
    - float (any width) with every value in [0, 1]: x = pixel / 255. When every x * 255 is an
      integer (within 1e-3) the exact uint8 pixels are returned (a quarter of the memory);
      otherwise float32 2x - 1 in [-1, 1], the scale :meth:`ImageDataset.batch` gives uint8.

    Args:
        data: the npz's ``data`` array, (N, 3072).
        path: the npz file, for messages.

    Returns:
        (N, 3, 32, 32) uint8 in 0..255 or float32 in [-1, 1].

    Raises:
        DataError: any other dtype (including other integers), or float values outside [0, 1]
            or not finite (e.g. float data in 0..255 or already in [-1, 1]).
    """
    if data.dtype == np.uint8:
        return data.reshape(-1, 3, 32, 32)
    if data.dtype.kind == "f":
        if data.size == 0:
            return np.zeros((0, 3, 32, 32), dtype=np.uint8)
        lo, hi = float(data.min()), float(data.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(
                f"{path}: 'data' is {data.dtype} with non-finite values; expected uint8 0..255 or float in [0, 1]"
            )
        if lo >= 0.0 and hi <= 1.0:
            pixels = _exact_pixels(data)
            if pixels is not None:
                return pixels.reshape(-1, 3, 32, 32)
            x = data.astype(np.float32)
            x *= 2.0
            x -= 1.0
            return x.reshape(-1, 3, 32, 32)
        raise DataError(f"{path}: 'data' is {data.dtype} in [{lo:g}, {hi:g}]; expected uint8 0..255 or float in [0, 1]")
    if data.size == 0:
        found = f"{data.dtype}"
    else:
        found = f"{data.dtype} in [{data.min()}, {data.max()}]" if data.dtype.kind in "iub" else f"{data.dtype}"
    raise DataError(f"{path}: 'data' is {found}; expected uint8 0..255 or float in [0, 1]")


def read_imagenet32_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ImageNet32 npz batch (``data`` (N, 3072), ``labels`` (N,) in 1..1000).

    Args:
        path: e.g. ``train_data_batch_1.npz`` or ``val_data.npz``.

    Returns:
        images (N, 3, 32, 32) as :func:`imagenet32_pixels` gives them; labels (N,) int64 in 0..999.

    Raises:
        DataError: not an npz with ``data`` and ``labels``, shapes that do not match, pixel
            values of another dtype or range, or labels that are not integers in 1..1000.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data, labels = z["data"], np.asarray(z["labels"])
    except (KeyError, ValueError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not an ImageNet32 npz with 'data' and 'labels': {_one_line(exc)}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: data shape {data.shape} is not (N, 3072) matching labels {labels.shape}")
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 1 or labels.max() > 1000)):
        numeric = labels.size and labels.dtype.kind in "iuf"
        found = f"{labels.dtype} in [{labels.min()}, {labels.max()}]" if numeric else f"{labels.dtype}"
        raise DataError(f"{path}: labels must be integers in 1..1000, found {found}")
    return imagenet32_pixels(data, path), labels.astype(np.int64) - 1


def concat_images(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate image batches: uint8 when all are, else float32 in [-1, 1] (uint8 u -> u / 127.5 - 1)."""
    if all(p.dtype == np.uint8 for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p.astype(np.float32) / 127.5 - 1.0 if p.dtype == np.uint8 else p for p in parts])

"""Datasets and class-incremental task splits.

Every dataset is an :class:`ImageDataset`: images (N, C, H, W) and labels (N,) int64. Pixel
values come out of :meth:`ImageDataset.batch` as float32 in [-1, 1].

- ``digits``: embedded (scikit-learn's ``load_digits``, 1797 8x8 images, 10 classes), resized
  bilinearly to ``image_size`` (8, 16 or 32), fixed stratified 80/20 train/test split (seed 0).
- ``mnist`` / ``fashion-mnist``: standard IDX files (``train-images-idx3-ubyte[.gz]``, ...)
  in ``--data-root`` (or torchvision's ``MNIST/raw``), zero-padded from 28x28 to 32x32 as in
  the paper; images above 32x32 are refused.
- ``cifar10``: the python version (``data_batch_1`` .. ``data_batch_5``, ``test_batch``; pickles,
  read with a restricted unpickler) or the binary version (the same names + ``.bin``), in
  ``--data-root``, ``--data-root/cifar-10-batches-py`` or ``--data-root/cifar-10-batches-bin``.
- ``imagenet32``: downsampled ImageNet npz files (``train_data_batch_1.npz`` .. ``_10``,
  ``val_data.npz``; uint8 pixels or float pixels in [0, 1]; labels 1..1000 stored, 0..999 returned).

The file formats are decoded in :mod:`geomprobe.dataformats`. There is no download code path:
files the user has not supplied, or that are malformed, are a one-line error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geomprobe.dataformats import (
    concat_images,
    find_cifar10,
    find_idx_file,
    read_cifar10_binary_batch,
    read_cifar10_python_batch,
    read_idx_pair,
    read_imagenet32_batch,
)
from geomprobe.errors import DataError, UsageError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagenet32")
DIGITS_IMAGE_SIZES = (8, 16, 32)


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a dataset without loading it: classes, default image size (px), channels."""

    num_classes: int
    image_size: int
    channels: int


DATASET_FACTS = {
    "digits": DatasetFacts(10, 16, 1),
    "mnist": DatasetFacts(10, 32, 1),
    "fashion-mnist": DatasetFacts(10, 32, 1),
    "cifar10": DatasetFacts(10, 32, 3),
    "imagenet32": DatasetFacts(1000, 32, 3),
}


def dataset_facts(name: str) -> DatasetFacts:
    """The :class:`DatasetFacts` of ``name``; raises :class:`UsageError` for an unknown dataset."""
    if name not in DATASET_FACTS:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASET_FACTS[name]


DEFAULT_TASKS = {"digits": 5, "mnist": 5, "fashion-mnist": 5, "cifar10": 5, "imagenet32": 20}


@dataclass
class ImageDataset:
    """Images with integer labels.

    images: (N, C, H, W), float32 in [-1, 1] or uint8 in [0, 255] (converted per batch).
    labels: (N,) int64 in 0..num_classes-1.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def batch(self, indices: torch.Tensor | np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (B, C, H, W) float32 in [-1, 1], y (B,) int64) for the given row indices."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        x = self.images[idx]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x.float(), self.labels[idx]

    def subset(self, classes: list[int] | tuple[int, ...]) -> ImageDataset:
        """Rows whose label is in ``classes`` (labels keep their original values)."""
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise UsageError(f"class {bad[0]} is outside 0..{self.num_classes - 1} for dataset {self.name}")
        mask = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return ImageDataset(self.name, self.split, self.images[mask], self.labels[mask], self.num_classes)

    def take(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(self.name, self.split, self.images[idx], self.labels[idx], self.num_classes)


def load_dataset(
    name: str, split: str = "train", image_size: int | None = None, data_root: str | Path | None = None
) -> ImageDataset:
    """Load ``name`` (one of :data:`DATASETS`) for ``split`` ``train`` or ``test``.

    Args:
        name: dataset name.
        split: ``train`` or ``test``.
        image_size: px; 8, 16 or 32 for digits, None or 32 for the others.
        data_root: directory with the dataset's files (all but digits); never downloaded into.

    Returns:
        The :class:`ImageDataset` (images uint8, or float32 in [-1, 1]; labels int64).

    Raises:
        UsageError: unknown name or split, a size the dataset does not have, no ``data_root``.
        DataError: the files are missing, malformed, hostile (a pickle naming other globals
            than numpy's) or hold no images; one line naming the file.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; expected train or test")
    if name == "digits":
        return load_digits(split, image_size or 16)
    if image_size not in (None, 32):
        raise UsageError(f"dataset {name} is 32x32; --image-size {image_size} is only for digits")
    if data_root is None:
        raise UsageError(f"dataset {name} is read from local files: pass --data-root DIR (see data/README.md)")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    if name in ("mnist", "fashion-mnist"):
        dataset = load_idx_dataset(name, root, split)
    elif name == "cifar10":
        dataset = load_cifar10(root, split)
    else:
        dataset = load_imagenet32(root, split)
    if len(dataset) == 0:
        raise DataError(f"the {name} {split} files in {root} hold no images")
    return dataset


def load_digits(split: str = "train", image_size: int = 16) -> ImageDataset:
    """scikit-learn digits resized to ``image_size``, [-1, 1], fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if image_size not in DIGITS_IMAGE_SIZES:
        raise UsageError(f"digits image size must be one of {DIGITS_IMAGE_SIZES}, got {image_size}")
    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = (images.clamp(0, 1) * 2.0 - 1.0).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels.numpy()
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ImageDataset("digits", split, images[idx], labels[idx], 10)


def idx_dirs(name: str, root: Path) -> list[Path]:
    """Where MNIST-format files may sit: ``root``, or torchvision's ``root/MNIST/raw`` (``FashionMNIST/raw``)."""
    return [root, root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"]


def load_idx_dataset(name: str, root: Path, split: str) -> ImageDataset:
    """An MNIST-format split (IDX files, each optionally gzipped) zero-padded to 32x32.

    Args:
        name: ``mnist`` or ``fashion-mnist`` (the files look alike; the name only labels the dataset).
        root: directory with ``train-images-idx3-ubyte[.gz]`` etc. (or torchvision's layout, :func:`idx_dirs`).
        split: ``train`` or ``test`` (``t10k-*`` files).

    Returns:
        images (N, 1, 32, 32) uint8, labels (N,) int64 in 0..9.

    Raises:
        DataError: a file is missing, malformed, of the wrong kind (labels for images), truncated,
            with images above 32x32, or the counts differ (:func:`geomprobe.dataformats.read_idx_pair`).
    """
    prefix = "train" if split == "train" else "t10k"
    dirs = idx_dirs(name, root)
    image_path = find_idx_file(dirs, f"{prefix}-images-idx3-ubyte")
    label_path = find_idx_file(dirs, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx_pair(image_path, label_path)
    return ImageDataset(name, split, torch.from_numpy(images), torch.from_numpy(labels), 10)


def load_cifar10(root: Path, split: str) -> ImageDataset:
    """A CIFAR-10 split from the python or binary batches (:func:`geomprobe.dataformats.find_cifar10`).

    Args:
        root: ``--data-root``: holds ``cifar-10-batches-py/`` or ``cifar-10-batches-bin/``, or is one.
        split: ``train`` (5 batches) or ``test``.

    Returns:
        images (N, 3, 32, 32) uint8, labels (N,) int64 in 0..9.

    Raises:
        DataError: neither version found, a batch missing, or a malformed or hostile batch file.
    """
    paths, fmt = find_cifar10(root, split)
    read = read_cifar10_binary_batch if fmt == "bin" else read_cifar10_python_batch
    images, labels = zip(*(read(p) for p in paths), strict=True)
    return ImageDataset(
        "cifar10", split, torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), 10
    )


def load_imagenet32(root: Path, split: str) -> ImageDataset:
    """An ImageNet32 split from its npz batches (:func:`geomprobe.dataformats.read_imagenet32_batch`).

    Args:
        root: holds ``train_data_batch_1.npz`` .. ``_10`` and ``val_data.npz``, directly or in
            ``Imagenet32_train_npz/`` / ``Imagenet32_val_npz/``.
        split: ``train`` or ``test`` (``val_data.npz``).

    Returns:
        images (N, 3, 32, 32) uint8 (or float32 in [-1, 1] when a file stores fractional pixel
        values in [0, 1]); labels (N,) int64, the stored 1..1000 shifted to 0..999.

    Raises:
        DataError: a file is missing or not a valid ImageNet32 batch.
    """
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]
    images, labels = [], []
    for n in names:
        candidates = [root / n, root / "Imagenet32_train_npz" / n, root / "Imagenet32_val_npz" / n]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(f"missing file {root / n}")
        x, y = read_imagenet32_batch(path)
        images.append(x)
        labels.append(y)
    x = torch.from_numpy(concat_images(images))
    return ImageDataset("imagenet32", split, x, torch.from_numpy(np.concatenate(labels)), 1000)


# ---------------------------------------------------------------- bringing images to a model

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def resize_images(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """(B, C, H, W) float images in [-1, 1] brought to (B, ``channels``, ``size``, ``size``).

    Size: bilinear with antialiasing (``torch.nn.functional.interpolate``). Channels: grey to RGB
    by repeating the grey plane, RGB to grey by luminance (BT.601); other conversions are refused.
    """
    c = _check_channels(x.shape[1], channels)
    if c != channels:
        if c == 1:
            x = x.repeat(1, channels, 1, 1)
        else:
            x = (x * torch.tensor(LUMINANCE, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


def _check_channels(c: int, channels: int) -> int:
    """``c`` when c-channel images convert to ``channels`` (equal, grey -> any, RGB -> grey); else UsageError."""
    if c != channels and c != 1 and not (c == 3 and channels == 1):
        raise UsageError(f"cannot convert {c}-channel images to {channels} channels (only grey <-> RGB)")
    return int(c)


@dataclass
class ResizedDataset(ImageDataset):
    """An :class:`ImageDataset` whose batches are resized on the fly (:func:`resize_images`).

    Batches come out as (B, ``target_channels``, ``size``, ``size``); the stored images keep their
    size and dtype (no resized copy of a large dataset is held in memory).
    """

    size: int = 0
    target_channels: int = 0

    @property
    def channels(self) -> int:
        return self.target_channels

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def source_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the stored images."""
        return tuple(int(d) for d in self.images.shape[1:])

    def batch(self, indices: torch.Tensor | np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().batch(indices)
        return resize_images(x, self.size, self.target_channels), y

    def subset(self, classes: list[int] | tuple[int, ...]) -> ResizedDataset:
        return self._like(super().subset(classes))

    def take(self, indices: torch.Tensor | np.ndarray | list[int]) -> ResizedDataset:
        return self._like(super().take(indices))

    def _like(self, base: ImageDataset) -> ResizedDataset:
        return ResizedDataset(
            base.name, base.split, base.images, base.labels, base.num_classes, self.size, self.target_channels
        )


def fit_to_model(dataset: ImageDataset, size: int, channels: int, resize: bool) -> ImageDataset:
    """``dataset`` brought to ``channels`` x ``size`` x ``size`` images, or a one-line DataError.

    Returns ``dataset`` itself when its images already have that shape; with ``resize`` a
    :class:`ResizedDataset`; else the DataError says what differs and that ``--resize`` fixes it.
    """
    have = (dataset.channels, dataset.image_size, int(dataset.images.shape[-2]))
    if have == (channels, size, size):
        return dataset
    if not resize:
        raise DataError(
            f"dataset {dataset.name} has {have[0]}x{have[2]}x{have[1]} images but the model expects "
            f"{channels}x{size}x{size} (channels x height x width); pass --resize to bring them to the model"
        )
    _check_channels(have[0], channels)
    return ResizedDataset(
        dataset.name, dataset.split, dataset.images, dataset.labels, dataset.num_classes, size, channels
    )


def task_splits(num_classes: int, num_tasks: int) -> list[list[int]]:
    """Class-incremental tasks: ``num_tasks`` groups of consecutive classes, in label order.

    Example: ``task_splits(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]``.
    """
    if num_tasks <= 0:
        raise UsageError(f"number of tasks must be positive, got {num_tasks}")
    if num_tasks > num_classes:
        raise UsageError(f"{num_tasks} tasks is more than the {num_classes} classes")
    if num_classes % num_tasks != 0:
        raise UsageError(f"{num_classes} classes cannot be split evenly into {num_tasks} tasks")
    per = num_classes // num_tasks
    return [list(range(k * per, (k + 1) * per)) for k in range(num_tasks)]


def parse_classes(spec: str | None, num_classes: int) -> list[int] | None:
    """``"0,1"`` or ``"0..9"`` (inclusive) to a sorted class list; ``None``/"" means all."""
    if spec is None or spec.strip() == "" or spec.strip() == "all":
        return None
    text = spec.replace(" ", "")
    try:
        if ".." in text:
            a, b = text.split("..")
            classes = list(range(int(a), int(b) + 1))
        else:
            classes = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise UsageError(f"malformed class list {spec!r}; use e.g. '0,1' or '0..9'") from None
    if not classes:
        raise UsageError(f"class list {spec!r} is empty")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"class {bad[0]} is outside 0..{num_classes - 1}")
    return classes

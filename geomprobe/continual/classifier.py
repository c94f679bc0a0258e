"""The FID feature network: a small classifier trained once per dataset and cached.

FID on a 16x16 digit with Inception features means nothing (and Inception weights are not
shipped), so by default FID is computed on the penultimate features of a small CNN trained on
the dataset's training split (all classes). The trained network is cached as safetensors +
JSON (``model.safetensors``, ``classifier.json`` with its held-out accuracy) under
``<cache>/<dataset>-<size>px/`` and identified in metric rows as
``<dataset>-classifier@<checksum>`` (first 12 hex digits of the weights' SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from geomprobe.data import ImageDataset, load_dataset
from geomprobe.errors import DataError
from geomprobe.io import torch_generator

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_META = "classifier.json"


def default_cache_dir() -> Path:
    """``$GEOMPROBE_CACHE`` or ``~/.cache/geomprobe``, plus ``feature-nets``."""
    root = os.environ.get("GEOMPROBE_CACHE") or Path.home() / ".cache" / "geomprobe"
    return Path(root) / "feature-nets"


@dataclass
class ClassifierConfig:
    """Architecture and training of the feature classifier (recorded in ``classifier.json``)."""

    channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


class FeatureClassifier(nn.Module):
    """conv(3x3)-GN-SiLU-pool x 2 -> global pooling -> linear(feature_dim) -> SiLU -> linear(classes).

    Input: (N, C, H, W) float32 in [-1, 1]. :meth:`features`: (N, feature_dim) penultimate
    activations; :meth:`forward`: (N, num_classes) logits. ``num_features`` is what torchmetrics'
    FrechetInceptionDistance reads to size its state.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        w = config.width
        self.config = config
        self.body = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, config.feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.num_features = config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FeatureExtractor(nn.Module):
    """Wraps a classifier so that ``forward`` returns its (N, d) penultimate features (for FID)."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


@dataclass
class CachedClassifier:
    """A trained classifier with its identity and held-out accuracy."""

    model: FeatureClassifier
    name: str  # e.g. "digits-classifier@1a2b3c4d5e6f"
    checksum: str
    test_accuracy: float
    path: Path


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` (N, C, H, W) in [-1, 1] classified as ``labels`` (N,)."""
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        correct += int((model(images[s : s + batch_size].float()).argmax(1) == labels[s : s + batch_size]).sum())
    return correct / len(labels)


def train_classifier(
    train: ImageDataset, test: ImageDataset, config: ClassifierConfig
) -> tuple[FeatureClassifier, float]:
    """Train on ``train`` with light augmentation (random 1-pixel shifts); return (model, test accuracy)."""
    gen = torch_generator(config.seed)
    torch.manual_seed(config.seed)
    model = FeatureClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    model.train()
    for _ in range(config.steps):
        idx = torch.randint(0, len(train), (config.batch_size,), generator=gen)
        x, y = train.batch(idx)
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    x_test, y_test = test.batch(torch.arange(len(test)))
    return model, classifier_accuracy(model, x_test, y_test)


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_or_train_classifier(
    dataset: str,
    image_size: int,
    data_root: str | None = None,
    cache_dir: str | Path | None = None,
    config: ClassifierConfig | None = None,
) -> CachedClassifier:
    """The cached feature classifier for (dataset, image size), training it on first use.

    A cache entry whose JSON does not match the requested config, or whose weights do not
    match the recorded checksum, is retrained (a stale or corrupt cache never feeds FID).
    """
    from safetensors.torch import load_file, save_file

    train = load_dataset(dataset, "train", image_size, data_root)
    test = load_dataset(dataset, "test", image_size, data_root)
    if config is None:
        config = ClassifierConfig(channels=train.channels, image_size=train.image_size, num_classes=train.num_classes)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = directory / f"{dataset}-{train.image_size}px"
    weights, meta = directory / CLASSIFIER_WEIGHTS, directory / CLASSIFIER_META
    if weights.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if info.get("config") == asdict(config) and _checksum(weights) == info.get("checksum"):
                model = FeatureClassifier(config)
                model.load_state_dict(load_file(str(weights)))
                model.eval()
                return CachedClassifier(
                    model,
                    f"{dataset}-classifier@{info['checksum']}",
                    info["checksum"],
                    float(info["test_accuracy"]),
                    directory,
                )
        except (json.JSONDecodeError, KeyError, RuntimeError, OSError):
            pass  # stale or corrupt cache: retrain below
    t0 = time.time()
    model, acc = train_classifier(train, test, config)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CLASSIFIER_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    checksum = _checksum(weights)
    info = {
        "dataset": dataset,
        "image_size": train.image_size,
        "config": asdict(config),
        "checksum": checksum,
        "test_accuracy": acc,
        "n_train": len(train),
        "n_test": len(test),
        "train_seconds": round(time.time() - t0, 2),
    }
    tmp_meta = directory / (CLASSIFIER_META + ".tmp")
    tmp_meta.write_text(json.dumps(info, indent=2))
    os.replace(tmp_meta, meta)
    if not weights.is_file():
        raise DataError(f"could not write the feature classifier to {directory}")
    return CachedClassifier(model, f"{dataset}-classifier@{checksum}", checksum, acc, directory)

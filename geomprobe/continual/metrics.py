"""Continual-learning metrics (docs/design.md §6): FID per task, AFID@k, forgetting, accuracy.

``fid[k][i]`` below is FID_i(m_k): the FID on task i's held-out split of samples from the model
after training task k (0-based, i <= k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from geomprobe.diffusion import ddim_sample
from geomprobe.distributed import my_rows
from geomprobe.errors import UsageError


def frechet_distance(
    real_features: torch.Tensor, fake_features: torch.Tensor, feature_net: nn.Module | None = None
) -> float:
    """FID between two sets of inputs, computed by torchmetrics' FrechetInceptionDistance.

    real_features, fake_features: (N, ...) inputs of ``feature_net`` (default: flatten, so the
    inputs are features (N, d) themselves). Covariances use the unbiased (N - 1) normaliser;
    both sets need N >= 2. Returns ||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in feature units^2.
    Under a torchrun process group every rank must call it with the same inputs: each extracts the
    features of its share (:func:`geomprobe.distributed.my_rows`) and torchmetrics all-reduces the sums.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real_features) < 2 or len(fake_features) < 2:
        raise UsageError("FID needs at least 2 real and 2 generated samples")
    net = feature_net if feature_net is not None else _Flatten(int(real_features[0].numel()))
    metric = FrechetInceptionDistance(feature=net, normalize=False)
    for inputs, real in ((real_features, True), (fake_features, False)):
        rows = my_rows(len(inputs))  # under torchrun each rank adds its share; compute() sums the ranks' states
        for s in range(rows.start, rows.stop, 512):
            metric.update(inputs[s : min(s + 512, rows.stop)], real=real)
    return float(metric.compute().double())


class _Flatten(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def inception_feature_net(weights_path: str):
    """The FID Inception-v3 pool3 features (2048-d) from a local weights file.

    Returns :class:`geomprobe.continual.inception.FIDInceptionV3` (``num_features`` = 2048):
    images (N, 1|3, H, W) in [-1, 1] -> (N, 2048) features, computed the way torch-fidelity does
    for uint8 images (see that module). ``.name`` is ``inception-v3-fid@<sha256[:12]>`` of the file.
    A missing, unreadable or mismatched file raises a one-line UsageError/DataError.
    """
    from geomprobe.continual.inception import load_inception_weights

    if not weights_path:
        raise UsageError("--fid-features inception needs --inception-weights PATH (no weights are downloaded)")
    return load_inception_weights(weights_path)


@dataclass
class TaskEvaluation:
    """FID_i(m_k) and classifier accuracy on the generated samples of task i."""

    fid: float
    accuracy: float
    n_generated: int
    n_reference: int
    samples: torch.Tensor | None = None  # (n_generated, C, H, W) in [-1, 1]
    labels: torch.Tensor | None = None  # (n_generated,)


def evaluate_task(
    unet,
    scheduler,
    classes: list[int],
    reference_images: torch.Tensor,
    feature_net: nn.Module,
    classifier: nn.Module | None,
    n_generated: int,
    generator: torch.Generator,
    sample_steps: int = 50,
) -> TaskEvaluation:
    """Generate ``n_generated`` DDIM samples balanced over ``classes`` and score them.

    reference_images: (R, C, H, W) in [-1, 1], task i's held-out split. Accuracy is the
    fraction of generated images the classifier assigns to the label they were drawn for.
    """
    labels = torch.tensor(classes, dtype=torch.long).repeat((n_generated + len(classes) - 1) // len(classes))[
        :n_generated
    ]
    samples = ddim_sample(unet, scheduler, labels, num_inference_steps=sample_steps, generator=generator)
    fid = frechet_distance(reference_images, samples, feature_net)
    acc = float("nan")
    if classifier is not None:
        from geomprobe.continual.classifier import classifier_accuracy

        acc = classifier_accuracy(classifier, samples, labels)
    return TaskEvaluation(
        fid=fid,
        accuracy=acc,
        n_generated=len(samples),
        n_reference=len(reference_images),
        samples=samples,
        labels=labels,
    )


def afid(fid: dict[int, dict[int, float]]) -> dict[str, float]:
    """AFID@k = mean_{i<=k} FID_i(m_k), keyed by the number of tasks seen ("1".."T")."""
    return {str(k + 1): sum(row.values()) / len(row) for k, row in sorted(fid.items())}


def forgetting(fid: dict[int, dict[int, float]]) -> float:
    """Mean over tasks k of FID_k(m_T) - FID_k(m_k); the last task contributes 0 (docs/design.md §6)."""
    last = max(fid)
    return sum(fid[last][k] - fid[k][k] for k in range(last + 1)) / (last + 1)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """(mean, standard error = sample std / sqrt(n)); the error is NaN for a single value."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)

"""Class-incremental continual learning of diffusion models (paper sections 3.3-4.3, App. E).

    from geomprobe.continual import ContinualConfig, run_continual
    result = run_continual(ContinualConfig(fisher="rank1", gd=True), "runs/cl", seeds=[0, 1, 2])

- :mod:`.runner`      the task loop over ``task_splits`` (built on ``training.training_loop``),
                      resume, seeds, ``run_compare`` (the paper's Table 1 strategies)
- :mod:`.strategies`  EWC penalties on flat parameter views (diag, rank-1, rank-k, full) and
                      generative distillation, as loss terms for the one training loop
- :mod:`.estimate`    a task's Fisher object from the builders of :mod:`geomprobe.fisher`
- :mod:`.metrics`     FID (torchmetrics, custom features), AFID@k, forgetting, mean +- s.e.
- :mod:`.classifier`  the cached feature classifier used for FID and sample accuracy
"""

from geomprobe.continual.classifier import FeatureClassifier, load_or_train_classifier
from geomprobe.continual.metrics import afid, forgetting, frechet_distance, mean_and_stderr
from geomprobe.continual.runner import (
    COMPARE_STRATEGIES,
    FISHER_CHOICES,
    ContinualConfig,
    ContinualResult,
    SeedResult,
    run_compare,
    run_continual,
)
from geomprobe.continual.strategies import (
    DiagonalPenalty,
    DistillationTerm,
    ProjectionPenalty,
    add_fisher_to_penalty,
    flat_parameters,
    make_penalty,
)

__all__ = [
    "ContinualConfig",
    "ContinualResult",
    "SeedResult",
    "run_continual",
    "run_compare",
    "COMPARE_STRATEGIES",
    "FISHER_CHOICES",
    "DiagonalPenalty",
    "ProjectionPenalty",
    "DistillationTerm",
    "add_fisher_to_penalty",
    "flat_parameters",
    "make_penalty",
    "frechet_distance",
    "afid",
    "forgetting",
    "mean_and_stderr",
    "FeatureClassifier",
    "load_or_train_classifier",
]

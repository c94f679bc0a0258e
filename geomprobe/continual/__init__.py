"""Class-incremental continual learning of diffusion models (paper sections 3.3-4.3, App. E).

    from geomprobe.continual import ContinualConfig, run_continual
    result = run_continual(ContinualConfig(fisher="rank1", gd=True), "runs/cl", seeds=[0, 1, 2])

- :mod:`.config`      ContinualConfig: every option, its default and help text, stated once
- :mod:`.runner`      the seed loop over tasks, resume, seeds, ``run_compare`` (the paper's Table 1)
- :mod:`.tasks`       one task as named steps: terms, training, checkpoint, Fisher, evaluation
- :mod:`.replay`      replay pools (real exemplars or generated) and the batches that mix them in
- :mod:`.strategies`  the EWC loss term over :class:`geomprobe.fisher.penalty.StackedPenalty`
- :mod:`.distill`     generative distillation as a loss term
- :mod:`.estimate`    a task's Fisher object from the builders of :mod:`geomprobe.fisher`
- :mod:`.metrics`     FID (torchmetrics, custom features), AFID@k, forgetting, mean +- s.e.
- :mod:`.classifier`  the cached feature classifier used for FID and sample accuracy
"""

from geomprobe.continual.classifier import FeatureClassifier, load_or_train_classifier
from geomprobe.continual.config import COMPARE_STRATEGIES, FISHER_CHOICES, ContinualConfig
from geomprobe.continual.distill import DistillationTerm
from geomprobe.continual.metrics import afid, forgetting, frechet_distance, mean_and_stderr
from geomprobe.continual.runner import ContinualResult, SeedResult, run_compare, run_continual
from geomprobe.continual.strategies import (
    DiagonalPenalty,
    PenaltyTerm,
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
    "PenaltyTerm",
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

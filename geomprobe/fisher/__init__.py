"""Fisher objects: one protocol (:class:`FisherMatrix`), five representations, their builders.

    DenseFisher     (P, P) matrix                        small P only
    DiagonalFisher  diag F (P,)                          classical EWC
    Rank1Fisher     c* mu mu^T                           paper eq. 5-6
    LowRankFisher   top-k eigenpairs                     best rank-k
    GramFisher      G^T G / n held as G (memory/store)   the exact empirical Fisher

All answer mv, quad, trace, frobenius, diag, top_eigen, penalty, save/load (``load_fisher``
dispatches on the file's kind). Builders: :func:`fisher_from_rows` / :func:`fisher_from_store`
(streamed rows) and the model-based ones in :mod:`geomprobe.fisher.model` (no stored G).
This package knows nothing of the continual task loop or the CLI.
"""

from geomprobe.fisher.base import FisherInfo, FisherMatrix, load_fisher
from geomprobe.fisher.builders import (
    FISHER_KINDS,
    column_moments,
    fisher_from_rows,
    fisher_from_store,
    rank1_coefficient,
)
from geomprobe.fisher.explicit import DenseFisher, DiagonalFisher, LowRankFisher, Rank1Fisher
from geomprobe.fisher.gram import GramFisher
from geomprobe.fisher.rows import (
    ConcatRows,
    GramStatistics,
    IterableRows,
    StoreRows,
    TensorRows,
    gram_statistics,
)

_MODEL_BUILDERS = {
    "ModelFisherOperator",
    "diagonal_from_model",
    "lowrank_from_model",
    "power_iteration_from_model",
    "rank1_from_model",
    "stochastic_power_iteration",
    "weighted_gradient",
}


def __getattr__(name: str):
    # the model-based builders pull in torch.func and the probe engine: load them on first use
    if name in _MODEL_BUILDERS:
        from geomprobe.fisher import model

        return getattr(model, name)
    raise AttributeError(f"module 'geomprobe.fisher' has no attribute {name!r}")


__all__ = [
    "FisherInfo",
    "FisherMatrix",
    "DenseFisher",
    "DiagonalFisher",
    "Rank1Fisher",
    "LowRankFisher",
    "GramFisher",
    "load_fisher",
    "FISHER_KINDS",
    "fisher_from_rows",
    "fisher_from_store",
    "column_moments",
    "rank1_coefficient",
    "TensorRows",
    "StoreRows",
    "IterableRows",
    "ConcatRows",
    "GramStatistics",
    "gram_statistics",
    *sorted(_MODEL_BUILDERS),
]

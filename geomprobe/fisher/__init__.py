"""Fisher objects: one protocol (:class:`FisherMatrix`), one file per representation, their builders.

    DenseFisher     (P, P) matrix                             dense.py      small P only
    DiagonalFisher  diag F (P,)                               diagonal.py   classical EWC
    Rank1Fisher     c* mu mu^T                                rank1.py      paper eq. 5-6
    LowRankFisher   top-k eigenpairs                          lowrank.py    best rank-k
    GramFisher      G^T G / n held as the rows G              gram.py       exact, rows stored
    ImplicitFisher  G^T G / n through jvp/vjp products        implicit.py   exact, matrix-free

All answer mv, quad, trace, frobenius, diag, top_eigen, penalty and (all but implicit)
save/load (``load_fisher`` dispatches on the file's kind). The vocabulary of kinds is
:mod:`geomprobe.fisher.kinds`; the spectral formulas (c*, errors, eigensolver) are
:mod:`geomprobe.fisher.spectrum`; the EWC penalty summed over tasks for any kinds is
:class:`~geomprobe.fisher.penalty.StackedPenalty`. Builders: :func:`fisher_from_rows` / :func:`fisher_from_store`
(streamed rows) and the model-based ones of :mod:`geomprobe.fisher.model` (no stored G).
This package knows nothing of the continual task loop or the CLI (docs/design.md §1).
"""

from geomprobe.fisher.base import FisherInfo, FisherMatrix, load_fisher
from geomprobe.fisher.builders import column_moments, fisher_from_rows, fisher_from_store, rank1_coefficient
from geomprobe.fisher.dense import DenseFisher
from geomprobe.fisher.diagonal import DiagonalFisher
from geomprobe.fisher.gram import GramFisher
from geomprobe.fisher.kinds import CLI_ALIASES, FISHER_KINDS, canonical_kind
from geomprobe.fisher.lowrank import LowRankFisher
from geomprobe.fisher.rank1 import Rank1Fisher
from geomprobe.fisher.rows import (
    ConcatRows,
    GramStatistics,
    IterableRows,
    StoreRows,
    TensorRows,
    gram_statistics,
)

_LAZY = {
    # the model-based pieces pull in torch.func and the probe engine: loaded on first use
    "ImplicitFisher": "geomprobe.fisher.implicit",
    "ModelGradients": "geomprobe.fisher.implicit",
    "FunctionGradients": "geomprobe.fisher.implicit",
    "weighted_gradient": "geomprobe.probe",
    "StackedPenalty": "geomprobe.fisher.penalty",
    "ModelFisherOperator": "geomprobe.fisher.model",
    "diagonal_from_model": "geomprobe.fisher.model",
    "lowrank_from_model": "geomprobe.fisher.model",
    "power_iteration_from_model": "geomprobe.fisher.model",
    "rank1_from_model": "geomprobe.fisher.model",
    "stochastic_power_iteration": "geomprobe.fisher.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geomprobe.fisher' has no attribute {name!r}")


__all__ = [
    "CLI_ALIASES",
    "FISHER_KINDS",
    "ConcatRows",
    "DenseFisher",
    "DiagonalFisher",
    "FisherInfo",
    "FisherMatrix",
    "GramFisher",
    "GramStatistics",
    "IterableRows",
    "LowRankFisher",
    "Rank1Fisher",
    "StoreRows",
    "TensorRows",
    "canonical_kind",
    "column_moments",
    "fisher_from_rows",
    "fisher_from_store",
    "gram_statistics",
    "load_fisher",
    "rank1_coefficient",
    *sorted(_LAZY),
]

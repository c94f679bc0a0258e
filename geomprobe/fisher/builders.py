"""Build Fisher objects from per-sample gradient rows: an (n, P) matrix, row blocks or a store.

Every builder streams its source in row blocks (bounded by ``max_memory`` bytes) and follows
docs/design.md §6:

    mu = G^T 1 / n                  diag F = column means of G^2
    c* = mean((G mu)^2) / ||mu||^4  top-k eigenpairs by the Gram trick (K = G G^T / n)

``centered=True`` gives the covariance variants (G - 1 mu^T); for rank-1 the direction stays
mu and c* = mu^T Sigma mu / ||mu||^4 is the least-squares scale of the covariance along it.
"""

from __future__ import annotations

from typing import Any

import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import DENSE_LIMIT, FisherInfo, FisherMatrix
from geomprobe.fisher.dense import DenseFisher
from geomprobe.fisher.diagonal import DiagonalFisher
from geomprobe.fisher.gram import GramFisher
from geomprobe.fisher.kinds import canonical_kind
from geomprobe.fisher.rank1 import Rank1Fisher
from geomprobe.fisher.rows import StoreRows, as_row_source, column_sums, rows_per_block
from geomprobe.fisher.spectrum import rank1_scale
from geomprobe.io import DEFAULT_MAX_MEMORY


def column_moments(rows: Any, max_memory: int = DEFAULT_MAX_MEMORY) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass: (mu (P,), diag of the second moment (P,), n), float64."""
    s, s2, n = column_sums(rows, max_memory)
    return s / n, s2 / n, n


def rank1_coefficient(
    rows: Any, mu: torch.Tensor, centered: bool = False, max_memory: int = DEFAULT_MAX_MEMORY
) -> float:
    """c* = mu^T F mu / ||mu||^4 = mean((G mu)^2) / ||mu||^4 (one pass; paper eq. 6).

    centered: mu^T (F - mu mu^T) mu / ||mu||^4 = c* - 1.
    """
    source = as_row_source(rows)
    mu = mu.double()
    block_rows = min(max(source.n, 1), rows_per_block(source.P, max_memory, 16 * source.P, live_blocks=2))
    total, n = 0.0, 0
    for b in source.blocks(block_rows):
        total += float((b.double() @ mu).pow(2).sum())
        n += b.shape[0]
    c_star = rank1_scale(total / n, float(mu.pow(2).sum()))
    return c_star - 1.0 if centered else c_star


def fisher_from_rows(
    rows: Any,
    kind: str,
    k: int = 5,
    centered: bool = False,
    info: FisherInfo | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> FisherMatrix:
    """A Fisher of ``kind`` (dense | diagonal | rank1 | lowrank | gram, or a CLI alias) from per-sample gradient rows.

    rows: G (n, P) tensor/array, a row source (e.g. ``StoreRows``) or a list of (b, P) blocks.
    k: rank of ``lowrank``. Float64 results except ``gram``, which keeps the rows as given.
    The ``implicit`` kind needs a model, not rows: :meth:`ImplicitFisher.from_model`.
    """
    kind = canonical_kind(kind)
    if kind == "implicit":
        raise UsageError(
            "an implicit Fisher is built from a model and probe data (ImplicitFisher.from_model), not from rows"
        )
    source = as_row_source(rows)
    info = info if info is not None else FisherInfo()
    info.n = source.n
    info.centered = centered
    if kind == "gram":
        return GramFisher(source, centered=centered, info=info, max_memory=max_memory)
    if kind == "lowrank":
        return GramFisher(source, centered=centered, info=info, max_memory=max_memory).to_low_rank(k)
    if kind == "dense":
        if source.P > DENSE_LIMIT:
            raise UsageError(f"dense Fisher limited to P <= {DENSE_LIMIT} (P={source.P}); use gram or lowrank")
        F = torch.zeros(source.P, source.P, dtype=torch.float64)
        block_rows = min(source.n, rows_per_block(source.P, max_memory, 8 * source.P**2, live_blocks=2))
        s = torch.zeros(source.P, dtype=torch.float64)
        for b in source.blocks(block_rows):
            b = b.double()
            F += b.T @ b
            s += b.sum(0)
        F /= source.n
        if centered:
            mu = s / source.n
            F -= torch.outer(mu, mu)
        return DenseFisher(F, info)
    mu, second_moment, _ = column_moments(source, max_memory)
    if kind == "diagonal":
        return DiagonalFisher(second_moment - mu.pow(2) if centered else second_moment, info)
    return Rank1Fisher(mu, rank1_coefficient(source, mu, centered, max_memory), info)


def store_fisher_info(store: Any, t: Any) -> FisherInfo:
    """FisherInfo (t-range, n, checkpoint, parameter names and shapes) of one entry of a gradient store."""
    checkpoint = getattr(store, "checkpoint", {}) or {}
    projection = getattr(store, "projection", None)
    return FisherInfo(
        t_range=str(t),
        n=int(store.n(t)),
        checkpoint=dict(checkpoint),
        param_names=[str(x) for x in getattr(store, "param_names", [])],
        param_shapes=[list(map(int, s)) for s in getattr(store, "param_shapes", [])],
        extra={"store": str(getattr(store, "path", "")), "projection": projection},
    )


def fisher_from_store(
    store: Any,
    t: Any,
    kind: str,
    k: int = 5,
    centered: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> FisherMatrix:
    """A Fisher of ``kind`` from the rows of timestep (or band key) ``t`` of a gradient store, streamed.

    ``store``: a :class:`geomprobe.probe.GradientStore` or a path to one. ``gram`` keeps reading
    the store lazily (the store must stay in place while the object is used).
    """
    if not hasattr(store, "iter_blocks"):
        from geomprobe.probe import GradientStore

        store = GradientStore(store)
    return fisher_from_rows(
        StoreRows(store, t), kind, k=k, centered=centered, info=store_fisher_info(store, t), max_memory=max_memory
    )

"""The one vocabulary of Fisher kinds, and the short CLI aliases mapped onto it in one table.

Kinds (the ``kind`` attribute of every :class:`~geomprobe.fisher.base.FisherMatrix` and of its
HDF5 file):

    dense      the explicit (P, P) matrix (small P only)
    diagonal   diag F (classical EWC)
    rank1      c* mu mu^T (paper eq. 5-6)
    lowrank    top-k eigenpairs (best rank-k)
    gram       G^T G / n held as the rows G (the exact empirical Fisher)
    implicit   F v by jvp/vjp products of the model on probe data (matrix-free, O(P) memory)

``geomprobe continual --fisher`` keeps its short names (``diag``, ``rankk``, ``full``), which
:func:`canonical_kind` maps here.
"""

from __future__ import annotations

from geomprobe.errors import UsageError

FISHER_KINDS = ("dense", "diagonal", "rank1", "lowrank", "gram", "implicit")

CLI_ALIASES = {"diag": "diagonal", "rankk": "lowrank", "full": "gram"}
"""Short names of ``geomprobe continual --fisher`` -> kinds."""

CLI_NAMES = {kind: alias for alias, kind in CLI_ALIASES.items()}
"""Kinds -> the CLI's short name (the kind itself where there is no alias)."""


def canonical_kind(name: str) -> str:
    """The kind for ``name``, a kind or a CLI alias (``diag`` -> ``diagonal``).

    Raises:
        UsageError: ``name`` is neither.
    """
    kind = CLI_ALIASES.get(name, name)
    if kind not in FISHER_KINDS:
        choices = ", ".join(sorted(set(FISHER_KINDS) | set(CLI_ALIASES)))
        raise UsageError(f"unknown Fisher kind {name!r}; expected one of {choices}")
    return kind


def cli_name(kind: str) -> str:
    """The CLI's short name of a kind (``diagonal`` -> ``diag``)."""
    return CLI_NAMES.get(kind, kind)

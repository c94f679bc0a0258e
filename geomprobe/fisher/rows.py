"""Sources of per-sample gradient rows, streamed in blocks, and the statistics one pass gives.

A *row source* is the n x P matrix G of per-sample gradients (row i = g_i) that can be read
block by block, any number of times: an in-memory tensor (:class:`TensorRows`), one timestep of
a gradient store (:class:`StoreRows`), several sources stacked (:class:`ConcatRows`, for SNR bands
pooled from per-t stores), or any re-iterable of (b, P) blocks (:class:`IterableRows`).

:func:`gram_statistics` reads a source once per *block pair* and returns everything the
analysis needs (docs/design.md §6): the Gram matrix K = G G^T / n (n x n, float64), the column
sums (-> mu) and the column sums of squares (-> diag F). Memory is bounded by ``max_memory``:
two row blocks plus K and three (P,) vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from geomprobe.errors import UsageError
from geomprobe.io import DEFAULT_MAX_MEMORY


class RowSource(Protocol):
    """n x P per-sample gradients readable in row blocks, repeatedly, always in the same order."""

    n: int
    P: int

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """Yield consecutive (b, P) float tensors, b <= rows, covering rows 0..n-1 in order."""
        ...


class TensorRows:
    """An in-memory G (n, P) (torch or numpy). Blocks are views, no copy."""

    def __init__(self, G: torch.Tensor | np.ndarray):
        G = G if isinstance(G, torch.Tensor) else torch.from_numpy(np.asarray(G))
        if G.dim() != 2:
            raise UsageError(f"G must be (n, P), got shape {tuple(G.shape)}")
        self.G = G
        self.n, self.P = int(G.shape[0]), int(G.shape[1])

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        rows = max(1, int(rows))
        for a in range(0, self.n, rows):
            yield self.G[a : a + rows]


class StoreRows:
    """One entry (a timestep or a band key) of a gradient store, read with ``store.iter_blocks``."""

    def __init__(self, store: Any, t: Any):
        self.store, self.t = store, t
        self.n, self.P = int(store.n(t)), int(store.P)

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        for block in self.store.iter_blocks(self.t, rows=max(1, int(rows))):
            yield block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))


class IterableRows:
    """Rows from a re-iterable of (b, P) blocks: a list of blocks, or a function returning a fresh iterator.

    Block sizes are those of the iterable (``rows`` is ignored). ``n`` and ``P`` are counted by one
    pass when not given. A one-shot iterator (a generator) is refused, because the Fisher
    statistics need more than one pass; wrap the code that makes it in a function instead.
    """

    def __init__(
        self,
        blocks: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        n: int | None = None,
        P: int | None = None,
    ):
        if callable(blocks):
            self._factory = blocks
        else:
            if iter(blocks) is blocks:
                raise UsageError(
                    "a one-shot iterator of row blocks can be read only once; pass a list of blocks "
                    "or a function that returns a fresh iterator"
                )
            self._factory = lambda: blocks
        if n is None or P is None:
            n_count, P_seen = 0, None
            for b in self._iter():
                n_count += b.shape[0]
                P_seen = b.shape[1]
            if P_seen is None:
                raise UsageError("the row-block source is empty")
            n, P = n_count, P_seen
        self.n, self.P = int(n), int(P)

    def _iter(self) -> Iterator[torch.Tensor]:
        for b in self._factory():
            b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b))
            if b.dim() != 2:
                raise UsageError(f"row blocks must be (b, P), got shape {tuple(b.shape)}")
            yield b

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        return self._iter()


class ConcatRows:
    """Several sources with the same P stacked vertically (e.g. all t of an SNR band)."""

    def __init__(self, sources: Sequence[RowSource]):
        if not sources:
            raise UsageError("ConcatRows needs at least one source")
        Ps = {s.P for s in sources}
        if len(Ps) != 1:
            raise UsageError(f"sources have different P: {sorted(Ps)}")
        self.sources = list(sources)
        self.n, self.P = sum(s.n for s in sources), Ps.pop()

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        for s in self.sources:
            yield from s.blocks(rows)


def as_row_source(obj: Any) -> RowSource:
    """A :class:`RowSource` from a tensor/array (n, P), a list of blocks, a block factory or a source."""
    if hasattr(obj, "blocks") and hasattr(obj, "n") and hasattr(obj, "P"):
        return obj
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return TensorRows(obj)
    return IterableRows(obj)


# --------------------------------------------------------------------------- memory budget


def rows_per_block(P: int, max_memory: int, reserved: int = 0, live_blocks: int = 2, bytes_per_value: int = 4) -> int:
    """Largest block height b such that ``live_blocks`` blocks of (b, P) plus ``reserved`` bytes fit.

    Raises :class:`UsageError` when not even one row fits (the message names the minimum).
    """
    free = int(max_memory) - int(reserved)
    per_row = live_blocks * P * bytes_per_value
    if free < per_row:
        need = reserved + per_row
        raise UsageError(
            f"a memory budget of {max_memory / 2**20:.1f} MiB is too small for rows of P={P:,} values: "
            f"need at least {need / 2**20:.1f} MiB (raise --max-memory)"
        )
    return int(free // per_row)


def gram_reserved_bytes(n: int, P: int) -> int:
    """Bytes held besides the row blocks by :func:`gram_statistics`: K (n, n) and three (P,) float64 vectors."""
    return 8 * n * n + 3 * 8 * P


# --------------------------------------------------------------------------- one-pass statistics


@dataclass
class GramStatistics:
    """What one pass over G gives (float64).

    ``K``: (n, n) Gram matrix G G^T / n; ``column_sum``: (P,) = G^T 1; ``column_sumsq``: (P,) =
    column sums of G^2; ``n``, ``P``. Everything in docs/design.md §6 follows from these.
    """

    K: np.ndarray
    column_sum: np.ndarray
    column_sumsq: np.ndarray
    n: int
    P: int

    @property
    def mu(self) -> np.ndarray:
        """Mean gradient G^T 1 / n, (P,)."""
        return self.column_sum / self.n

    @property
    def diag_fisher(self) -> np.ndarray:
        """Diag F = column means of G^2, (P,)."""
        return self.column_sumsq / self.n


def gram_statistics(
    source: RowSource | Any,
    max_memory: int = DEFAULT_MAX_MEMORY,
    compute_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GramStatistics:
    """K = G G^T / n, G^T 1 and column sums of G^2 from row blocks, in bounded memory.

    Block pairs (I, J) with J <= I are multiplied, so a source larger than the budget is read
    about (number of blocks + 1) / 2 times; when G fits in one block it is read once.
    ``compute_dtype``: dtype of the block products (default: the rows' own dtype), accumulated in
    float64 over column slabs either way (:func:`gram_product`). float64 products of float32 rows
    are exact but cost about 10x the float32 GEMM and hold a float64 copy of each live block
    (accounted in the budget); the slabbed float32 products err by ~3e-5 on lambda_2..lambda_5 of a
    nearly rank-1 K at P = 4M and by ~1e-8 at P = 1e5 (bench/README.md). ``progress(done, total)`` is called after each block pair.
    """
    source = as_row_source(source)
    n, P = source.n, source.P
    # live: the outer block, the inner block (or the outer block squared, for the column sums)
    # float64 products hold a float64 copy of each live block beside the float32 rows
    per_value = 12 if compute_dtype == torch.float64 else 4
    rows = rows_per_block(P, max_memory, gram_reserved_bytes(n, P), live_blocks=2, bytes_per_value=per_value)
    rows = min(rows, n)
    n_blocks = -(-n // rows) if n else 0
    total_pairs = n_blocks * (n_blocks + 1) // 2
    K = np.zeros((n, n), dtype=np.float64)
    column_sum = torch.zeros(P, dtype=torch.float64)
    column_sumsq = torch.zeros(P, dtype=torch.float64)
    done = [0]  # block pairs multiplied (a store may yield more, shorter blocks than planned)

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total_pairs)

    a = 0
    for outer in source.blocks(rows):
        dtype = compute_dtype or (
            outer.dtype if outer.is_floating_point() and outer.dtype != torch.float16 else torch.float32
        )
        Bi = outer.to(dtype)
        bi = Bi.shape[0]
        # column sums as GEMVs in the block's dtype (3x faster than a float64 reduction at P ~ 1e5);
        # BLAS sums pairwise-blocked, so float32 error stays ~1e-7 relative; blocks add in float64
        ones = torch.ones(1, bi, dtype=dtype)
        column_sum += (ones @ Bi)[0].double()
        column_sumsq += (ones @ (Bi * Bi))[0].double()
        K[a : a + bi, a : a + bi] = gram_product(Bi, Bi)
        tick()
        _add_earlier_blocks(source, rows, Bi, a, K, tick)
        a += bi
    if a != n:
        raise UsageError(f"row source announced n={n} rows but yielded {a}")
    K /= max(n, 1)
    return GramStatistics(K=K, column_sum=column_sum.numpy(), column_sumsq=column_sumsq.numpy(), n=n, P=P)


def _add_earlier_blocks(source: RowSource, rows: int, Bi: torch.Tensor, a: int, K: np.ndarray, tick) -> None:
    """K[I, J] and K[J, I] for the outer block I (rows a.., values Bi) and every block J before it."""
    b = 0
    if a == 0:
        return
    for inner in source.blocks(rows):
        if b >= a:
            break
        Bj = inner.to(Bi.dtype)
        bj = Bj.shape[0]
        block = gram_product(Bi, Bj)
        K[a : a + Bi.shape[0], b : b + bj] = block
        K[b : b + bj, a : a + Bi.shape[0]] = block.T
        b += bj
        tick()


GRAM_SLAB = 65_536
"""Columns per product in :func:`gram_product`: float32 sums over at most this many terms, then float64."""


def gram_product(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """A B^T (a, b) as float64, from products over column slabs of ``GRAM_SLAB`` summed in float64.

    A float32 dot product over millions of columns loses the small eigenvalues of a nearly rank-1
    Gram matrix (lambda_2..lambda_5 off by 4-7% at P = 4M, bench/gram_dtype.py); over slabs of
    65,536 columns it errs by ~3e-5 there, at the cost of one float32 GEMM (10x less than float64).
    float64 inputs give float64 products throughout.
    """
    out = np.zeros((A.shape[0], B.shape[0]))
    for c in range(0, A.shape[1], GRAM_SLAB):
        out += (A[:, c : c + GRAM_SLAB] @ B[:, c : c + GRAM_SLAB].T).double().numpy()
    return out


STATS_SLAB_BYTES = 2**19
"""Bytes of the float64 (rows, S) slab :func:`add_column_statistics` sums at once: one that stays in
the CPU cache is 5x faster than converting 65,536 columns or the whole block (n = 64..256, P = 2M)."""


def add_column_statistics(rows: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> None:
    """``total += rows.sum(0)`` and ``total_sq += (rows ** 2).sum(0)`` in float64 (exact squares).

    Args:
        rows: (b, w) float32 or float64, not modified.
        total: (w,) float64, the column sums, updated in place.
        total_sq: (w,) float64, the column sums of squares, updated in place.
    """
    width = max(16, STATS_SLAB_BYTES // (8 * max(rows.shape[0], 1)))
    for c in range(0, rows.shape[1], width):
        part = rows[:, c : c + width].to(torch.float64, copy=True)
        total[c : c + part.shape[1]] += part.sum(0)
        total_sq[c : c + part.shape[1]] += part.mul_(part).sum(0)


def column_sums(
    source: RowSource | Any, max_memory: int = DEFAULT_MAX_MEMORY
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(G^T 1 (P,), column sums of G^2 (P,), n), float64, from one pass over the row blocks.

    Raises:
        UsageError: the source has no rows.
    """
    source = as_row_source(source)
    s = torch.zeros(source.P, dtype=torch.float64)
    s2 = torch.zeros(source.P, dtype=torch.float64)
    n = 0
    rows = min(max(source.n, 1), rows_per_block(source.P, max_memory, 16 * source.P, live_blocks=2))
    for b in source.blocks(rows):
        add_column_statistics(b, s, s2)
        n += b.shape[0]
    if n == 0:
        raise UsageError("no gradient rows")
    return s, s2, n


def transpose_times(
    source: RowSource | Any, weights: torch.Tensor, max_memory: int = DEFAULT_MAX_MEMORY
) -> torch.Tensor:
    """G^T W for W (n,) or (n, m): (P,) or (P, m) float64, one pass."""
    source = as_row_source(source)
    W = weights.double()
    out = torch.zeros((source.P,) + tuple(W.shape[1:]), dtype=torch.float64)
    rows = min(source.n, rows_per_block(source.P, max_memory, 8 * out.numel() * 2, live_blocks=2))
    a = 0
    for b in source.blocks(rows):
        bb = b.shape[0]
        out += b.double().T @ W[a : a + bb]
        a += bb
    return out

"""The exact empirical Fisher held implicitly by its per-sample gradients (docs/design.md §6).

F = G^T G / n (uncentered) or F = (G - 1 mu^T)^T (G - 1 mu^T) / n = G^T G / n - mu mu^T (centered),
with G the n x P matrix of per-sample gradients, in memory or streamed from a gradient store.
F is never formed: F v = G^T (G v) / n; its nonzero spectrum is that of K = G G^T / n (n x n) and
its eigenvectors are v_j = G^T u_j / sqrt(n lambda_j) (the Gram trick).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from geomprobe.errors import DataError
from geomprobe.fisher.base import FisherInfo, FisherMatrix, matrix_free_penalty, promoted
from geomprobe.fisher.rows import (
    GramStatistics,
    RowSource,
    TensorRows,
    as_row_source,
    column_sums,
    gram_statistics,
    rows_per_block,
    transpose_times,
)
from geomprobe.fisher.spectrum import centered_gram, top_eigenpairs
from geomprobe.io import DEFAULT_MAX_MEMORY


class H5Rows:
    """Rows of an (n, P) HDF5 dataset, read lazily in blocks (the file is opened per pass)."""

    def __init__(self, path: str | Path, name: str = "G"):
        self.path, self.name = Path(path), name
        with h5py.File(self.path, "r") as f:
            self.n, self.P = (int(s) for s in f[name].shape)

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        rows = max(1, int(rows))
        with h5py.File(self.path, "r") as f:
            ds = f[self.name]
            for a in range(0, self.n, rows):
                yield torch.from_numpy(ds[a : a + rows])


class GramFisher(FisherMatrix):
    """The exact empirical Fisher F = G^T G / n (or the covariance with ``centered=True``).

    ``rows``: G as an (n, P) tensor/array, a :class:`~geomprobe.fisher.rows.RowSource` (e.g.
    ``StoreRows(store, t)``) or a list of (b, P) blocks. Passes over a streamed source hold at
    most ``max_memory`` bytes. Statistics that need a full pass (K, mu, diag) are cached.
    """

    kind = "gram"

    def __init__(
        self, rows: Any, centered: bool = False, info: FisherInfo | None = None, max_memory: int = DEFAULT_MAX_MEMORY
    ):
        super().__init__(info)
        self.source: RowSource = as_row_source(rows)
        self.centered = bool(centered)
        self.info.centered = self.centered
        if not self.info.n:
            self.info.n = self.source.n
        self.max_memory = int(max_memory)
        self._stats: GramStatistics | None = None
        self._columns: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def P(self) -> int:
        return self.source.P

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def in_memory(self) -> bool:
        return isinstance(self.source, TensorRows)

    # ---- cached statistics
    def gram_statistics(self) -> GramStatistics:
        """K = G G^T / n (uncentered), G^T 1, column sums of G^2 (one bounded-memory pass)."""
        if self._stats is None:
            self._stats = gram_statistics(self.source, self.max_memory)
            self._columns = (torch.from_numpy(self._stats.column_sum), torch.from_numpy(self._stats.column_sumsq))
        return self._stats

    def _column_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G^T 1, column sums of G^2), float64 (cached; from the Gram pass when that came first)."""
        if self._columns is None:
            self._columns = column_sums(self.source, self.max_memory)[:2]
        return self._columns

    def mean(self) -> torch.Tensor:
        """Mu = G^T 1 / n, (P,) float64."""
        return self._column_stats()[0] / self.n

    def kernel(self) -> np.ndarray:
        """The n x n Gram matrix whose nonzero spectrum is F's: K = G G^T / n, or H K H when centered."""
        K = self.gram_statistics().K
        return centered_gram(K) if self.centered else K

    # ---- protocol
    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        if self.in_memory:
            dtype = promoted(v, self.source.G)
            G = self.source.G.to(dtype)
            out = G.T @ (G @ v.to(dtype)) / self.n
        else:
            dtype = torch.promote_types(promoted(v), torch.float32)
            out = torch.zeros(v.shape, dtype=dtype)
            rows = min(self.n, rows_per_block(self.P, self.max_memory, 8 * v.numel() * 3, live_blocks=2))
            vv = v.detach().to(dtype)
            for b in self.source.blocks(rows):
                b = b.to(dtype)
                out += b.T @ (b @ vv)
            out /= self.n
        if self.centered:
            mu = self.mean().to(out.dtype)
            out = out - (mu[:, None] * (mu @ v.to(out.dtype))[None, :] if v.dim() == 2 else mu * (mu @ v.to(out.dtype)))
        return out

    def quad(self, v):
        v = self._check_vector(v)
        if self.in_memory:
            dtype = promoted(v, self.source.G)
            value = (self.source.G.to(dtype) @ v.to(dtype)).pow(2).sum() / self.n
        else:
            dtype = torch.promote_types(promoted(v), torch.float32)
            vv = v.detach().to(dtype)
            value = torch.zeros((), dtype=torch.float64)
            rows = min(self.n, rows_per_block(self.P, self.max_memory, 0, live_blocks=2))
            for b in self.source.blocks(rows):
                value += (b.to(dtype) @ vv).double().pow(2).sum()
            value = (value / self.n).to(dtype)
        if self.centered:
            value = value - (self.mean().to(value.dtype) @ v.to(value.dtype)).pow(2)
        return value

    def trace(self) -> float:
        s, s2 = self._column_stats()
        tr = float(s2.sum()) / self.n
        return tr - float(self.mean().pow(2).sum()) if self.centered else tr

    def frobenius(self) -> float:
        return float(np.linalg.norm(self.kernel()))

    def diag(self) -> torch.Tensor:
        s, s2 = self._column_stats()
        d = s2 / self.n
        return d - self.mean().pow(2) if self.centered else d

    def top_eigen(self, k: int):
        """Top-k eigenpairs by the Gram trick: eigenpairs of K (n x n), then v_j = G^T u_j / sqrt(n lambda_j)."""
        K = self.kernel()
        n = K.shape[0]
        k = min(k, n)
        if k < 1:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(self.P, 0, dtype=torch.float64)
        evals, evecs = top_eigenpairs(K, k)
        keep = evals > max(evals[0], 0.0) * 1e-12 if evals.size else np.zeros(0, bool)
        evals, evecs = evals[keep], evecs[:, keep]
        U = torch.from_numpy(evecs)
        if self.in_memory:
            GtU = self.source.G.double().T @ U
        else:
            GtU = transpose_times(self.source, U, self.max_memory)
        if self.centered:
            GtU = GtU - self.mean()[:, None] * U.sum(0)[None, :]
        lam = torch.from_numpy(evals)
        V = GtU / torch.sqrt(n * lam)[None, :]
        return lam, V

    def penalty(self, theta, theta_star, strength: float = 1.0):
        """strength/2 ||G (theta - theta*)||^2 / n (centered: minus (mu^T d)^2), differentiable in theta."""
        d = self._difference(theta, theta_star)
        if self.in_memory:
            return 0.5 * strength * self.quad(d).to(d.dtype)
        return matrix_free_penalty(self, d, strength)

    def to_low_rank(self, k: int):
        """The best rank-k approximation as a :class:`LowRankFisher` (same info)."""
        from geomprobe.fisher.lowrank import LowRankFisher

        lam, V = self.top_eigen(k)
        return LowRankFisher(lam, V, self.info)

    # ---- storage
    def _tensors(self):
        return (self.source.G,) if self.in_memory else (torch.zeros(0, dtype=torch.float32),)

    def _write(self, f: h5py.File) -> None:
        """Copy the rows into dataset ``G`` (float64 rows stay float64, anything else float32)."""
        f.attrs["centered"] = self.centered
        rows = min(self.n, rows_per_block(self.P, self.max_memory, 0, live_blocks=1))
        chunk_rows = max(1, min(self.n, (1 << 20) // max(1, 4 * self.P)))
        ds, a = None, 0
        for b in self.source.blocks(rows):
            b = b.detach().cpu()
            if ds is None:
                dtype = "float64" if b.dtype == torch.float64 else "float32"
                ds = f.create_dataset(
                    "G", shape=(self.n, self.P), dtype=dtype, chunks=(chunk_rows, self.P), fletcher32=True
                )
            ds[a : a + b.shape[0]] = b.numpy()
            a += b.shape[0]
        if a != self.n:
            raise DataError(f"row source yielded {a} rows, expected {self.n}")

    @classmethod
    def _read(cls, f, info):
        """Rows stay on disk and are streamed (bounded memory); the file must not move."""
        return cls(H5Rows(f.filename, "G"), centered=bool(f.attrs.get("centered", False)), info=info)

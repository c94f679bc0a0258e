"""The dense kind: F as an explicit (P, P) symmetric matrix (small P only; docs/design.md §6)."""

from __future__ import annotations

import h5py
import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import DENSE_LIMIT, FisherInfo, FisherMatrix, as_tensor, promoted, read_tensor, write_tensor


class DenseFisher(FisherMatrix):
    """F as an explicit (P, P) symmetric matrix (small P only)."""

    kind = "dense"

    def __init__(self, matrix: torch.Tensor, info: FisherInfo | None = None):
        super().__init__(info)
        matrix = as_tensor(matrix)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise UsageError(f"DenseFisher needs a square (P, P) matrix, got {tuple(matrix.shape)}")
        if matrix.shape[0] > DENSE_LIMIT:
            raise UsageError(f"DenseFisher limited to P <= {DENSE_LIMIT}; use GramFisher or LowRankFisher")
        self.matrix = matrix

    @property
    def P(self) -> int:
        return self.matrix.shape[0]

    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        dtype = promoted(v, self.matrix)
        return self.matrix.to(dtype) @ v.to(dtype)

    def trace(self) -> float:
        return float(torch.trace(self.matrix))

    def frobenius(self) -> float:
        return float(torch.linalg.matrix_norm(self.matrix.double()))

    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.matrix).clone()

    def top_eigen(self, k: int):
        evals, evecs = torch.linalg.eigh(self.matrix)
        k = min(k, self.P)
        return evals.flip(0)[:k].clone(), evecs.flip(1)[:, :k].clone()

    def penalty(self, theta, theta_star, strength: float = 1.0):
        d = self._difference(theta, theta_star)
        return 0.5 * strength * (d @ (self.matrix.to(d) @ d))

    def _tensors(self):
        return (self.matrix,)

    def _write(self, f: h5py.File) -> None:
        write_tensor(f, "matrix", self.matrix)

    @classmethod
    def _read(cls, f, info):
        return cls(read_tensor(f, "matrix"), info)

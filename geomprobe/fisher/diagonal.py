"""The diagonal kind: F ~ diag(d), the classical EWC approximation (docs/design.md §6)."""

from __future__ import annotations

import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo, FisherMatrix, as_tensor, promoted, read_tensor, write_tensor


class DiagonalFisher(FisherMatrix):
    """F ~ diag(d), d (P,) >= 0: the classical EWC approximation (column means of G^2)."""

    kind = "diagonal"

    def __init__(self, diagonal: torch.Tensor, info: FisherInfo | None = None):
        super().__init__(info)
        diagonal = as_tensor(diagonal)
        if diagonal.dim() != 1:
            raise UsageError(f"DiagonalFisher needs a (P,) vector, got {tuple(diagonal.shape)}")
        self.diagonal = diagonal

    @property
    def P(self) -> int:
        return self.diagonal.shape[0]

    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        dtype = promoted(v, self.diagonal)
        d = self.diagonal.to(dtype)
        return d * v.to(dtype) if v.dim() == 1 else d[:, None] * v.to(dtype)

    def quad(self, v):
        v = self._check_vector(v)
        dtype = promoted(v, self.diagonal)
        return (self.diagonal.to(dtype) * v.to(dtype).pow(2)).sum()

    def trace(self) -> float:
        return float(self.diagonal.double().sum())

    def frobenius(self) -> float:
        return float(self.diagonal.double().norm())

    def diag(self) -> torch.Tensor:
        return self.diagonal.clone()

    def top_eigen(self, k: int):
        k = min(k, self.P)
        values, index = torch.topk(self.diagonal, k)
        vectors = torch.zeros(self.P, k, dtype=self.diagonal.dtype)
        vectors[index, torch.arange(k)] = 1.0
        return values, vectors

    def penalty(self, theta, theta_star, strength: float = 1.0):
        d = self._difference(theta, theta_star)
        return 0.5 * strength * (self.diagonal.to(d) * d.pow(2)).sum()

    def _tensors(self):
        return (self.diagonal,)

    def _write(self, f):
        write_tensor(f, "diagonal", self.diagonal)

    @classmethod
    def _read(cls, f, info):
        return cls(read_tensor(f, "diagonal"), info)

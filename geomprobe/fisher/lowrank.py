"""The low-rank kind: F ~ V diag(lambda) V^T from the top-k eigenpairs (docs/design.md §6)."""

from __future__ import annotations

import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo, FisherMatrix, as_tensor, promoted, read_tensor, write_tensor


class LowRankFisher(FisherMatrix):
    """F ~ V diag(lambda) V^T with eigenvalues (k,) and orthonormal eigenvectors V (P, k).

    With the top-k eigenpairs of F this is the best rank-k approximation (Eckart-Young).
    """

    kind = "lowrank"

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, info: FisherInfo | None = None):
        super().__init__(info)
        eigenvalues, eigenvectors = as_tensor(eigenvalues), as_tensor(eigenvectors)
        if eigenvalues.dim() != 1 or eigenvectors.dim() != 2 or eigenvectors.shape[1] != eigenvalues.shape[0]:
            raise UsageError(
                f"LowRankFisher needs eigenvalues (k,) and eigenvectors (P, k), got {tuple(eigenvalues.shape)} and {tuple(eigenvectors.shape)}"
            )
        order = torch.argsort(eigenvalues, descending=True)
        self.eigenvalues = eigenvalues[order]
        self.eigenvectors = eigenvectors[:, order]

    @property
    def P(self) -> int:
        return self.eigenvectors.shape[0]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        dtype = promoted(v, self.eigenvectors)
        V = self.eigenvectors.to(dtype)
        lam = self.eigenvalues.to(dtype)
        coeff = V.T @ v.to(dtype)  # (k,) or (k, m)
        return V @ (lam * coeff if v.dim() == 1 else lam[:, None] * coeff)

    def quad(self, v):
        v = self._check_vector(v)
        dtype = promoted(v, self.eigenvectors)
        coeff = self.eigenvectors.to(dtype).T @ v.to(dtype)
        return (self.eigenvalues.to(dtype) * coeff.pow(2)).sum()

    def trace(self) -> float:
        return float(self.eigenvalues.double().sum())

    def frobenius(self) -> float:
        return float(self.eigenvalues.double().norm())

    def diag(self) -> torch.Tensor:
        return self.eigenvectors.pow(2) @ self.eigenvalues.to(self.eigenvectors.dtype)

    def top_eigen(self, k: int):
        k = min(k, self.rank)
        return self.eigenvalues[:k].clone(), self.eigenvectors[:, :k].clone()

    def penalty(self, theta, theta_star, strength: float = 1.0):
        d = self._difference(theta, theta_star)
        coeff = self.eigenvectors.to(d).T @ d
        return 0.5 * strength * (self.eigenvalues.to(d) * coeff.pow(2)).sum()

    def _tensors(self):
        return (self.eigenvalues, self.eigenvectors)

    def _write(self, f):
        write_tensor(f, "eigenvalues", self.eigenvalues)
        write_tensor(f, "eigenvectors", self.eigenvectors)

    @classmethod
    def _read(cls, f, info):
        return cls(read_tensor(f, "eigenvalues"), read_tensor(f, "eigenvectors"), info)

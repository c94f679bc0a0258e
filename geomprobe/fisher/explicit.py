"""Fisher representations stored explicitly: dense, diagonal, rank-1 (mu, c*) and low-rank.

Shapes: P = number of parameters. All four implement :class:`geomprobe.fisher.base.FisherMatrix`.
"""

from __future__ import annotations

import h5py
import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import (
    DENSE_LIMIT,
    FisherInfo,
    FisherMatrix,
    as_tensor,
    promoted,
    read_tensor,
    write_tensor,
)


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


class Rank1Fisher(FisherMatrix):
    """F ~ c* mu mu^T (paper eq. 5-6): mu (P,) the mean gradient, c* = mu^T F mu / ||mu||^4.

    c* is the least-squares scale: it minimises ||F - c mu mu^T||_F over c.
    """

    kind = "rank1"

    def __init__(self, mu: torch.Tensor, c_star: float, info: FisherInfo | None = None):
        super().__init__(info)
        mu = as_tensor(mu)
        if mu.dim() != 1:
            raise UsageError(f"Rank1Fisher needs mu of shape (P,), got {tuple(mu.shape)}")
        self.mu = mu
        self.c_star = float(c_star)

    @property
    def P(self) -> int:
        return self.mu.shape[0]

    @property
    def eigenvalue(self) -> float:
        """The only nonzero eigenvalue, c* ||mu||^2."""
        return self.c_star * float(self.mu.double().pow(2).sum())

    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        dtype = promoted(v, self.mu)
        mu = self.mu.to(dtype)
        proj = mu @ v.to(dtype)  # () or (m,)
        return self.c_star * (mu * proj if v.dim() == 1 else mu[:, None] * proj[None, :])

    def quad(self, v):
        v = self._check_vector(v)
        dtype = promoted(v, self.mu)
        return self.c_star * torch.dot(self.mu.to(dtype), v.to(dtype)).pow(2)

    def trace(self) -> float:
        return self.eigenvalue

    def frobenius(self) -> float:
        return abs(self.eigenvalue)

    def diag(self) -> torch.Tensor:
        return self.c_star * self.mu.pow(2)

    def top_eigen(self, k: int):
        norm = self.mu.norm()
        if k < 1 or float(norm) == 0.0:
            return self.mu.new_zeros(0), self.mu.new_zeros(self.P, 0)
        return self.mu.new_tensor([self.eigenvalue]), (self.mu / norm)[:, None]

    def penalty(self, theta, theta_star, strength: float = 1.0):
        d = self._difference(theta, theta_star)
        return 0.5 * strength * self.c_star * torch.dot(self.mu.to(d), d).pow(2)

    def _tensors(self):
        return (self.mu,)

    def _write(self, f):
        write_tensor(f, "mu", self.mu)
        f.attrs["c_star"] = self.c_star

    @classmethod
    def _read(cls, f, info):
        return cls(read_tensor(f, "mu"), float(f.attrs["c_star"]), info)


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

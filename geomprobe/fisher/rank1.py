"""The rank-1 kind: F ~ c* mu mu^T (paper eq. 5-6; docs/design.md §6)."""

from __future__ import annotations

import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo, FisherMatrix, as_tensor, promoted, read_tensor, write_tensor


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

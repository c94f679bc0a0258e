"""A seeded Gaussian random projection R: R^P -> R^K that preserves inner products in expectation.

R has i.i.d. entries N(0, 1/K), so E[(R a)^T (R b)] = a^T b, and for fixed a, b the relative error of
||R a||^2 is about sqrt(2/K) (Johnson-Lindenstrauss). R is never needed as a whole: its columns are
generated in blocks of ``block`` columns, block j from the seed ``(seed, j)``, so every process
(and every torchrun rank) builds the same R whatever the chunking of the rows.
"""

from __future__ import annotations

import torch

from geomprobe.errors import UsageError
from geomprobe.io import torch_generator

DEFAULT_BLOCK = 4096


class RandomProjection:
    """``project(G)``: (B, P) -> (B, K) float32, ``G @ R^T`` with R (K, P) ~ N(0, 1/K) seeded.

    Column blocks of R are cached while their total size stays under ``cache_bytes``.
    """

    def __init__(self, P: int, K: int, seed: int, block: int = DEFAULT_BLOCK, cache_bytes: int = 512 * 2**20):
        if K <= 0:
            raise UsageError(f"--project K must be positive, got {K}")
        if K >= P:
            raise UsageError(f"--project {K} is not smaller than the number of parameters P={P}")
        self.P, self.K, self.seed, self.block = int(P), int(K), int(seed), int(block)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_ok = K * P * 4 <= cache_bytes

    def describe(self) -> dict:
        """What a store records: ``{"kind": "gaussian", "seed", "K", "P", "block"}``."""
        return {"kind": "gaussian", "seed": self.seed, "K": self.K, "P": self.P, "block": self.block}

    def block_matrix(self, j: int) -> torch.Tensor:
        """Columns ``j*block : (j+1)*block`` of R: (K, width) float32 on the CPU."""
        if j in self._cache:
            return self._cache[j]
        start = j * self.block
        width = min(self.block, self.P - start)
        gen = torch_generator(self.seed * 1_000_003 + j)
        r = torch.randn(self.K, width, generator=gen) / self.K**0.5
        if self._cache_ok:
            self._cache[j] = r
        return r

    def matrix(self) -> torch.Tensor:
        """The whole R: (K, P). Only for tests and small P."""
        return torch.cat([self.block_matrix(j) for j in range(self.num_blocks)], dim=1)

    @property
    def num_blocks(self) -> int:
        return (self.P + self.block - 1) // self.block

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, K) float32 on G's device."""
        if G.shape[-1] != self.P:
            raise UsageError(f"rows have {G.shape[-1]} entries, the projection expects P={self.P}")
        out = torch.zeros(G.shape[0], self.K, dtype=torch.float32, device=G.device)
        for j in range(self.num_blocks):
            a = j * self.block
            r = self.block_matrix(j).to(G.device)
            out += G[:, a : a + r.shape[1]].float() @ r.T
        return out

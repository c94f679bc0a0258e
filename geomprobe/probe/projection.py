"""Seeded random projections S: R^P -> R^K that preserve inner products in expectation (``grads --project K``).

Two kinds, both generated in column blocks from the seed, so every process (and every torchrun
rank) applies the same S whatever the chunking of the rows, and neither is ever held whole:

- :class:`CountSketch` (the default): column j goes to one bucket h(j) in 0..K-1 with a sign
  s(j) = +-1, so (S a)_k = sum_{h(j)=k} s(j) a_j. E[(S a)^T (S b)] = a^T b, with variance
  (||a||^2 ||b||^2 + (a^T b)^2 - 2 sum_j a_j^2 b_j^2) / K. Applying it is one scatter-add of the
  rows: about the cost of reading them, whatever K (P log-free, no K x P matrix).
- :class:`RandomProjection` (``gaussian``): i.i.d. N(0, 1/K) entries; relative error of ||S a||^2
  about sqrt(2/K) (Johnson-Lindenstrauss); costs a (B, P) x (P, K) product and K x P draws.
"""

from __future__ import annotations

import torch

from geomprobe.errors import UsageError
from geomprobe.io import derived_seed, torch_generator

DEFAULT_BLOCK = 4096
SKETCH_BLOCK = 1 << 16
PROJECTIONS = ("countsketch", "gaussian")


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


class CountSketch:
    """``project(G)``: (B, P) -> (B, K) float32, the seeded CountSketch of every row (see the module docstring).

    Bucket and sign of column j come from block ``j // block`` of a generator seeded by
    ``derived_seed(seed, 0xC5, block index)``.
    """

    def __init__(self, P: int, K: int, seed: int, block: int = SKETCH_BLOCK):
        if K <= 0:
            raise UsageError(f"--project K must be positive, got {K}")
        if K >= P:
            raise UsageError(f"--project {K} is not smaller than the number of parameters P={P}")
        self.P, self.K, self.seed, self.block = int(P), int(K), int(seed), int(block)

    def describe(self) -> dict:
        """What a store records: ``{"kind": "countsketch", "seed", "K", "P", "block"}``."""
        return {"kind": "countsketch", "seed": self.seed, "K": self.K, "P": self.P, "block": self.block}

    @property
    def num_blocks(self) -> int:
        return (self.P + self.block - 1) // self.block

    def hashes(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets (width,) int64 in 0..K-1, signs (width,) float32 +-1) of the columns of block j."""
        width = min(self.block, self.P - j * self.block)
        gen = torch_generator(derived_seed(self.seed, 0xC5, j))
        buckets = torch.randint(0, self.K, (width,), generator=gen)
        signs = torch.randint(0, 2, (width,), generator=gen).float() * 2 - 1
        return buckets, signs

    def matrix(self) -> torch.Tensor:
        """The whole S: (K, P) with one +-1 per column. Only for tests and small P."""
        S = torch.zeros(self.K, self.P)
        for j in range(self.num_blocks):
            buckets, signs = self.hashes(j)
            S[buckets, torch.arange(j * self.block, j * self.block + len(buckets))] = signs
        return S

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, K) float32 on G's device (one scatter-add per column block)."""
        if G.shape[-1] != self.P:
            raise UsageError(f"rows have {G.shape[-1]} entries, the projection expects P={self.P}")
        out = torch.zeros(G.shape[0], self.K, dtype=torch.float32, device=G.device)
        for j in range(self.num_blocks):
            buckets, signs = self.hashes(j)
            a = j * self.block
            out.index_add_(1, buckets.to(G.device), G[:, a : a + len(buckets)].float() * signs.to(G.device))
        return out


def make_projection(kind: str, P: int, K: int, seed: int) -> CountSketch | RandomProjection:
    """The projection ``kind`` (countsketch | gaussian) of R^P to R^K with ``seed``."""
    if kind == "countsketch":
        return CountSketch(P, K, seed)
    if kind == "gaussian":
        return RandomProjection(P, K, seed)
    raise UsageError(f"unknown --projection {kind!r}; expected one of {', '.join(PROJECTIONS)}")

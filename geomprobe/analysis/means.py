"""Mean gradients mu_t across timesteps, held within a memory budget (for the cosine matrix of Fig. 3a).

A large model's mu_t is P float64 values per t (0.29 GB for the DDPM CIFAR-10 UNet), so keeping
every t's mu in memory breaks ``--max-memory``. :class:`MeanGradients` keeps them in memory while
they fit in a quarter of the budget and otherwise moves them, as float32 (cosines need no more),
to a temporary HDF5 file; the cosine matrix is then formed from column slabs read back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np

from geomprobe.fisher.spectrum import mean_cosine_matrix
from geomprobe.io import DEFAULT_MAX_MEMORY


class MeanGradients:
    """Collects (P,) mean gradients; :meth:`cosine_matrix` gives their (T, T) signed cosines.

    Args:
        max_memory: bytes; the vectors stay in memory while they take at most a quarter of it.
    """

    def __init__(self, max_memory: int = DEFAULT_MAX_MEMORY):
        self.max_memory = int(max_memory)
        self._in_memory: list[np.ndarray] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def _path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "means.h5"

    def add(self, mu: np.ndarray) -> None:
        """Keep one mean gradient (P,)."""
        mu = np.asarray(mu)
        if self._tmp is None and 8 * mu.size * (self._count + 1) > self.max_memory // 4:
            self._spill()
        if self._tmp is None:
            self._in_memory.append(mu.astype(np.float64, copy=False))
        else:
            with h5py.File(self._path, "a") as f:
                f.create_dataset(str(self._count), data=mu.astype(np.float32))
        self._count += 1

    def _spill(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="geomprobe-means-")
        with h5py.File(self._path, "w") as f:
            for i, mu in enumerate(self._in_memory):
                f.create_dataset(str(i), data=mu.astype(np.float32))
        self._in_memory = []

    def cosine_matrix(self) -> np.ndarray:
        """(T, T) signed cos(mu_a, mu_b); read in column slabs when the vectors were spilled."""
        if self._tmp is None:
            return mean_cosine_matrix(self._in_memory) if self._in_memory else np.zeros((0, 0))
        with h5py.File(self._path, "r") as f:
            data = [f[str(i)] for i in range(self._count)]
            P = data[0].shape[0]
            slab = max(1, self.max_memory // (8 * 4 * max(1, self._count)))
            dots = np.zeros((self._count, self._count))
            for a in range(0, P, slab):
                block = np.stack([d[a : a + slab].astype(np.float64) for d in data])
                dots += block @ block.T
        norms = np.sqrt(np.clip(np.diag(dots), 0.0, None))
        norms[norms == 0] = 1.0
        return np.clip(dots / np.outer(norms, norms), -1.0, 1.0)

    def close(self) -> None:
        """Remove the temporary file (also done when the object is collected)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

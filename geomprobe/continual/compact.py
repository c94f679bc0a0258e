"""Compact replay (issue 13, seed 003): exemplars stored as short codes and decoded for replay.

``--replay compact --code pca --budget-bytes N``: each exemplar is stored as its float32
coefficients on the top-k principal components of the earlier tasks' training images, with
k = N // 4 (at most the image dimension D and the number of fitting images). Memory accounting:
``code_bytes`` per exemplar = 4 k (what :attr:`CompactPool.codes` holds per row); the shared basis
(mean and k components, 4 (k + 1) D bytes) is counted separately in ``basis_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geomprobe.continual.config import CODE_CHOICES
from geomprobe.errors import UsageError

COEF_BYTES = 4  # one float32 coefficient


def pca_rank_for_budget(budget_bytes: int, dim: int, n_fit: int) -> int:
    """The PCA rank of a budget: budget_bytes // 4, capped at the dimension and the fitting images."""
    if budget_bytes < COEF_BYTES:
        raise UsageError(
            f"--budget-bytes {budget_bytes} is smaller than one code (a PCA code of one float32 coefficient: "
            f"{COEF_BYTES} bytes)"
        )
    return max(1, min(budget_bytes // COEF_BYTES, dim, n_fit))


@dataclass
class PCACode:
    """A PCA basis: ``mean`` (D,) and orthonormal ``components`` (k, D), both float32; images of ``shape``."""

    mean: torch.Tensor
    components: torch.Tensor
    shape: tuple[int, ...]

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> PCACode:
        """The top-k principal components of images ``x`` (n, C, H, W) (SVD of the centred data, float64)."""
        if len(x) == 0:
            raise UsageError("a PCA code needs at least one fitting image")
        flat = x.flatten(1).double()
        mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        k = min(k, vh.shape[0])
        return cls(mean.float(), vh[:k].float().contiguous(), tuple(x.shape[1:]))

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def code_bytes(self) -> int:
        """Bytes of one exemplar's code."""
        return self.k * COEF_BYTES

    @property
    def basis_bytes(self) -> int:
        """Bytes of the shared basis (mean + components)."""
        return (self.mean.numel() + self.components.numel()) * COEF_BYTES

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (n, k) float32: coefficients of x - mean on the components."""
        return ((x.flatten(1).float() - self.mean) @ self.components.T).contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (n, *shape): mean + codes @ components (the projection onto the top-k subspace; no clamping)."""
        return (self.mean + codes.float() @ self.components).view(len(codes), *self.shape)


@dataclass
class CompactPool:
    """Stored replay exemplars: ``codes`` (M, k) float32, ``labels`` (M,), and the basis that decodes them."""

    code: PCACode
    codes: torch.Tensor
    labels: torch.Tensor

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored codes (excluding labels and the shared basis)."""
        return self.codes.numel() * self.codes.element_size()

    def images(self) -> torch.Tensor:
        """Decoded replay images in [-1, 1]."""
        return self.code.decode(self.codes).clamp(-1.0, 1.0)


def compact_pool(
    fit_images: torch.Tensor, exemplars: torch.Tensor, labels: torch.Tensor, budget_bytes: int, code: str = "pca"
) -> CompactPool:
    """Fit the code on ``fit_images`` (the earlier tasks' training images) and store ``exemplars`` as codes."""
    if code not in CODE_CHOICES:
        raise UsageError(f"unknown --code {code!r}; expected one of {', '.join(CODE_CHOICES)}")
    k = pca_rank_for_budget(budget_bytes, fit_images[0].numel() if len(fit_images) else 1, len(fit_images))
    basis = PCACode.fit(fit_images, k)
    return CompactPool(basis, basis.encode(exemplars), labels.clone())

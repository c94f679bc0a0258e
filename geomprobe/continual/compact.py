"""Compact replay (issue 13, seed 003): exemplars stored as short codes and decoded for replay.

``--replay compact --code CODE --budget-bytes N`` stores each exemplar in at most N bytes:

- ``pca``: float32 coefficients on the top-k principal components of the earlier tasks' training
  images, k = N // 4 (at most the image dimension D and the number of fitting images). The shared
  basis (mean and k components, 4 (k + 1) D bytes) is counted separately in ``basis_bytes``.
- ``lowres``: an r x r uint8 thumbnail per channel, r = floor(sqrt(N / C)) (at most the image
  side), made by area averaging; decoded by bilinear upsampling (a decoder that knows nothing).
- ``lowres-unet``: the same thumbnail, decoded by the model itself: the upsampled thumbnail is
  noised to the first DDIM timestep <= :data:`UNET_DECODE_T` (300 with 50 steps) and denoised by
  DDIM with the exemplar's label
  (:func:`geomprobe.diffusion.ddim_refine`, SDEdit), using the model at the end of the previous
  task. This is seed 003's idea (store little, let the generative model's own representation
  carry the rest) in a pixel-space UNet, where a latent cannot be stored: the bottleneck is not
  decodable without the skip activations, and those hold more numbers than the image.

Memory accounting: ``code_bytes`` per exemplar is what :attr:`CompactPool.codes` holds per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from geomprobe.continual.config import CODE_CHOICES
from geomprobe.errors import UsageError

COEF_BYTES = 4  # one float32 coefficient
UNET_DECODE_T = 300  # lowres-unet: the SDEdit timestep (of 1000); the thumbnail's detail below it is the model's


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


def min_code_bytes(code: str, channels: int) -> int:
    """The bytes of the smallest code: one float32 coefficient (pca) or one uint8 pixel per channel (lowres)."""
    return COEF_BYTES if code == "pca" else channels


@dataclass
class LowResCode:
    """Thumbnails of ``side`` x ``side`` uint8 pixels per channel for images of ``shape`` (C, H, W)."""

    side: int
    shape: tuple[int, ...]

    @classmethod
    def for_budget(cls, budget_bytes: int, shape: tuple[int, ...]) -> LowResCode:
        """The largest side r with C r^2 <= budget_bytes (at most the image side)."""
        channels, height = shape[0], shape[1]
        if budget_bytes < channels:
            raise UsageError(
                f"--budget-bytes {budget_bytes} is smaller than one code (lowres: one uint8 pixel per channel, "
                f"{channels} bytes)"
            )
        return cls(min(height, math.isqrt(budget_bytes // channels)), tuple(shape))

    @property
    def code_bytes(self) -> int:
        """Bytes of one exemplar's code: C r^2."""
        return self.shape[0] * self.side**2

    @property
    def basis_bytes(self) -> int:
        """Nothing is shared between codes."""
        return 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (n, C, r, r) uint8: area-averaged images in [-1, 1] mapped to 0..255 and rounded."""
        small = F.interpolate(x.float(), size=(self.side, self.side), mode="area")
        return ((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (n, C, H, W) float32: the thumbnails back in [-1, 1], bilinearly upsampled."""
        small = codes.float() / 127.5 - 1.0
        return F.interpolate(small, size=tuple(self.shape[1:]), mode="bilinear", align_corners=False)


@dataclass
class CompactPool:
    """Stored replay exemplars: ``codes`` (M, ...) , ``labels`` (M,), and the code that decodes them."""

    code: PCACode | LowResCode
    codes: torch.Tensor
    labels: torch.Tensor

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored codes (excluding labels and the shared basis)."""
        return self.codes.numel() * self.codes.element_size()

    def images(self, refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Decoded replay images (M, C, H, W) in [-1, 1]; ``refine(images, labels)`` (lowres-unet) after decoding."""
        x = self.code.decode(self.codes).clamp(-1.0, 1.0)
        return x if refine is None else refine(x, self.labels)


def compact_pool(
    fit_images: torch.Tensor, exemplars: torch.Tensor, labels: torch.Tensor, budget_bytes: int, code: str = "pca"
) -> CompactPool:
    """``exemplars`` (M, C, H, W) stored as codes of at most ``budget_bytes`` each, with their ``labels``.

    The pca basis is fitted on ``fit_images`` (the earlier tasks' training images); the lowres codes
    need no fitting. ``lowres`` and ``lowres-unet`` store the same codes (they differ in decoding).
    """
    if code not in CODE_CHOICES:
        raise UsageError(f"unknown --code {code!r}; expected one of {', '.join(CODE_CHOICES)}")
    if code == "pca":
        k = pca_rank_for_budget(budget_bytes, fit_images[0].numel() if len(fit_images) else 1, len(fit_images))
        basis = PCACode.fit(fit_images, k)
    else:
        basis = LowResCode.for_budget(budget_bytes, tuple(exemplars.shape[1:]))
    return CompactPool(basis, basis.encode(exemplars), labels.clone())

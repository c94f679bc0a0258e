"""Image grids: turn (B, C, H, W) tensors in [-1, 1] into PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geomprobe.io import atomic_path


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into a (rows*(H+pad)+pad, ...) uint8 array.

    ``nrow`` images per row. Grey images give (H', W'), colour images (H', W', 3).
    ``scale`` enlarges every pixel to a scale x scale block (nearest neighbour).
    """
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    b, c, h, w = x.shape
    rows = (b + nrow - 1) // nrow
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if c == 1 else np.transpose(grid, (1, 2, 0))


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 grid array as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path

"""Class-conditional sample grids from a checkpoint (``geomprobe sample``)."""

from __future__ import annotations

from pathlib import Path

import torch

from geomprobe.diffusion import ddim_sample
from geomprobe.errors import UsageError
from geomprobe.images import image_grid, save_png
from geomprobe.models import load_checkpoint, resolve_device


def sample_grid(
    ckpt: str | Path,
    classes: list[int],
    n_per_class: int,
    out: str | Path,
    steps: int = 50,
    seed: int = 0,
    device: str = "auto",
    scale: int = 4,
) -> tuple[Path, torch.Tensor]:
    """DDIM samples, one row per class, written as a PNG grid; returns (path, samples (B, C, H, W))."""
    if n_per_class <= 0:
        raise UsageError(f"--n must be positive, got {n_per_class}")
    if steps <= 0:
        raise UsageError(f"--steps must be positive, got {steps}")
    c = load_checkpoint(ckpt, resolve_device(device))
    bad = [k for k in classes if not 0 <= k < c.info.num_classes]
    if bad:
        raise UsageError(f"class {bad[0]} is outside 0..{c.info.num_classes - 1} for this checkpoint")
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed)
    samples = ddim_sample(c.unet, c.scheduler, labels, num_inference_steps=steps, generator=gen)
    path = save_png(image_grid(samples, nrow=n_per_class, scale=scale), out)
    return path, samples

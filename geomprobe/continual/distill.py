"""Generative distillation (paper section 3.4) as a loss term for the one training loop."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from geomprobe.diffusion import add_noise, denoising_loss, predict_noise
from geomprobe.distributed import group_rank, group_world, rank_slice
from geomprobe.errors import DataError


class DistillationTerm:
    """gd_weight * mean_i 1/2 ||eps_theta - eps_teacher||^2 on noised replay images.

    Each step draws ``batch_size`` replay images from the pool (images (M, C, H, W) in [-1, 1],
    labels (M,)), t uniform in 0..N-1 and noise, all from ``generator`` (so a run is
    reproducible), noises them and regresses the student on the frozen teacher's prediction with
    the DDPM loss (:func:`geomprobe.diffusion.denoising_loss`, summed over pixels). Labels are
    ignored by unconditional UNets.
    """

    name = "distill"

    def __init__(
        self,
        teacher: UNet2DModel,
        images: torch.Tensor,
        labels: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        batch_size: int,
        weight: float,
        generator: torch.Generator,
    ):
        if len(labels) == 0:
            raise DataError("generative distillation needs a non-empty replay pool")
        self.teacher = teacher.eval().requires_grad_(False)
        self.images, self.labels = images, labels
        self.alphas_cumprod = alphas_cumprod
        self.batch_size, self.weight, self.generator = int(batch_size), float(weight), generator

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        device = next(unet.parameters()).device
        idx = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        x0, y = self.images[idx].float(), self.labels[idx]
        t = torch.randint(0, len(self.alphas_cumprod), (self.batch_size,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        # under torchrun every rank draws the same replay batch and keeps rows [rank::world] (DDP averages)
        x0, y, t, noise = rank_slice((x0, y, t, noise), group_rank(), group_world())
        x0, y, t, noise = x0.to(device), y.to(device), t.to(device), noise.to(device)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod.to(device))
        with torch.no_grad():
            target = predict_noise(self.teacher, x_t, t, y)
        eps = predict_noise(unet, x_t, t, y)
        return {self.name: self.weight * denoising_loss(eps, target).mean()}

"""The probe's inputs and its per-sample loss with substituted parameters.

The loss itself is :func:`geomprobe.diffusion.denoising_loss` and the conditioning check
:func:`geomprobe.diffusion.conditioning`; this module only moves the probe inputs to the model and
runs the model with some parameters replaced (:func:`torch.func.functional_call`).

Shapes: x0, noise, target, x_t (B, C, H, W) float32; t, y (B,) int64; alphas_cumprod (N,).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import functional_call

from geomprobe.diffusion import add_noise, conditioning, denoising_loss
from geomprobe.probe.params import device_of


def on_device(unet: torch.nn.Module, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` moved to the model's device (``None`` stays ``None``)."""
    device = device_of(unet)
    return [None if v is None else v.to(device) for v in tensors]


class NoisedBatch(NamedTuple):
    """What the model sees: x_t and target (B, C, H, W), detached; t and y (B,) (y may be None)."""

    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None
    target: torch.Tensor

    @property
    def n(self) -> int:
        """B, the number of samples."""
        return int(self.x_t.shape[0])

    def rows(self, a: int, b: int) -> NoisedBatch:
        """Rows ``a:b`` (views)."""
        return NoisedBatch(self.x_t[a:b], self.t[a:b], None if self.y is None else self.y[a:b], self.target[a:b])


def probe_inputs(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
) -> NoisedBatch:
    """(x_t, t, y, target) on the model's device; x_t and target detached, target = noise when None."""
    x0, noise, t, y, target, alphas_cumprod = on_device(unet, x0, noise, t, y, target, alphas_cumprod)
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    tgt = noise if target is None else target
    return NoisedBatch(x_t.detach(), t, y, tgt.detach())


def functional_losses(
    unet: torch.nn.Module, params: dict[str, torch.Tensor], constants: dict[str, torch.Tensor], batch: NoisedBatch
) -> torch.Tensor:
    """(B,) per-sample losses with ``params`` substituted (one batched forward)."""
    out = functional_call(unet, (params, constants), (batch.x_t, batch.t), conditioning(unet, batch.y))
    eps_hat = out.sample if hasattr(out, "sample") else out[0]
    return denoising_loss(eps_hat, batch.target)

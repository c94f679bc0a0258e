"""DDPM noising, the per-sample denoising loss and DDIM sampling.

Shapes: x0, noise, x_t are (B, C, H, W) float32; t is (B,) int64 scheduler indices in
0..N-1; y is (B,) int64 class labels; alphas_cumprod is (N,) float32.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from geomprobe.models import ddim_from


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t for each t, shaped (B, 1, 1, 1) to broadcast over images."""
    return alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (the DDPM forward process)."""
    a = alpha_bar(alphas_cumprod, t)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def is_label_conditioned(unet: torch.nn.Module) -> bool:
    """True when the UNet takes class labels (``num_class_embeds`` or a class embedding in its config).

    The one conditioning check: an unconditional model ignores labels everywhere. A
    DistributedDataParallel wrapper (``train`` under torchrun) is looked through to its module.
    """
    config = getattr(getattr(unet, "module", unet), "config", None)
    return bool(getattr(config, "num_class_embeds", None)) or getattr(config, "class_embed_type", None) is not None


def conditioning(unet: torch.nn.Module, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Keyword arguments of the UNet call for labels ``y`` (B,): ``{"class_labels": y}`` or ``{}``."""
    return {"class_labels": y} if y is not None and is_label_conditioned(unet) else {}


def predict_noise(unet: UNet2DModel, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """eps_theta(x_t, t, y): (B, C, H, W); ``y`` is ignored by an unconditional model."""
    return unet(x_t, t, **conditioning(unet, y)).sample


def denoising_loss(eps_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The per-sample DDPM loss 1/2 ||target - eps_hat||^2 summed over pixels (paper eq. 2): (B,).

    The one place the loss is written; every route (training, probes, Fisher products,
    distillation) calls it. eps_hat, target: (B, C, H, W).
    """
    return 0.5 * (target - eps_hat).pow(2).flatten(1).sum(1)


def per_sample_loss(
    unet: UNet2DModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample DDPM loss 1/2 ||eps - eps_theta(x_t, t, y)||^2, summed over pixels (paper eq. 2).

    Returns (B,) float32. ``target`` replaces eps as the regression target (used for the
    "true Fisher" probe, where target = eps_theta(x_t).detach() + xi); x_t is always built
    from ``noise``.
    """
    x_t = add_noise(x0, noise, t, alphas_cumprod)
    return denoising_loss(predict_noise(unet, x_t, t, y), noise if target is None else target)


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    labels: torch.Tensor,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """DDIM samples (eta = 0) for ``labels`` (B,), returned as (B, C, H, W) float32 in [-1, 1] on CPU.

    Initial noise comes from ``generator`` on the CPU, so samples are the same on CPU and CUDA.
    Under a torchrun process group every rank draws all the noise and denoises its contiguous
    share of the rows (:func:`geomprobe.distributed.my_rows`); the shares are gathered on every rank.
    """
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    noise = [
        torch.randn(len(labels[s : s + batch_size]), cfg.in_channels, size, size, generator=generator)
        for s in range(0, len(labels), batch_size)
    ]
    noise = torch.cat(noise) if noise else torch.empty(0, cfg.in_channels, size, size)
    return _sharded_denoise(unet, scheduler, noise, None, labels, num_inference_steps, None, batch_size)


@torch.no_grad()
def ddim_refine(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    t_start: int,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """SDEdit: images ``x0`` (B, C, H, W) in [-1, 1] noised to a timestep and denoised by DDIM (eta = 0).

    The DDIM schedule of ``num_inference_steps`` steps is cut to its timesteps <= ``t_start``; x0 is
    noised to the first of them, t0, as x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps with eps from
    ``generator`` (CPU), and the model denoises from there with labels ``labels`` (B,). Returns
    (B, C, H, W) float32 in [-1, 1] on CPU: the model's reading of x0 (detail from its learned prior).
    Sharded over torchrun ranks like :func:`ddim_sample`.
    """
    eps = torch.randn(x0.shape, generator=generator)
    return _sharded_denoise(unet, scheduler, eps, x0.float().cpu(), labels, num_inference_steps, t_start, batch_size)


def _sharded_denoise(unet, scheduler, noise, x0, labels, steps: int, t_start: int | None, batch_size: int):
    """This rank's rows of ``noise`` (and ``x0``) denoised in batches, gathered over ranks: (B, C, H, W)."""
    from geomprobe.distributed import gather_rows, my_rows

    rows = my_rows(len(labels))
    out = []
    for s in range(rows.start, rows.stop, batch_size):
        e = min(s + batch_size, rows.stop)
        x = noise[s:e] if x0 is None else (x0[s:e], noise[s:e])
        out.append(_ddim_denoise(unet, scheduler, x, labels[s:e], steps, t_start))
    mine = torch.cat(out) if out else noise[:0].clone()
    return gather_rows(mine, len(labels))


def _ddim_denoise(unet, scheduler, x, labels: torch.Tensor, steps: int, t_start: int | None) -> torch.Tensor:
    """The DDIM loop from pure noise ``x`` (t_start None) or from ``x = (x0, eps)`` noised to the first t <= t_start."""
    device = next(unet.parameters()).device
    ddim = ddim_from(scheduler)
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps if t_start is None else ddim.timesteps[ddim.timesteps <= t_start]
    if t_start is not None:
        if len(timesteps) == 0:
            raise ValueError(f"no DDIM timestep <= {t_start} with {steps} steps")
        x = add_noise(x[0], x[1], timesteps[:1].expand(len(x[0])), scheduler.alphas_cumprod)
    was_training = unet.training
    unet.eval()
    x, y = x.to(device), labels.to(device)
    for t in timesteps:
        eps = predict_noise(unet, x, t.to(device).expand(len(y)), y)
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1).cpu()

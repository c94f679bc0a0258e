"""The scaled-identity check of paper Fig. 1 (Proposition 1).

By Tweedie, the network's estimate of its own input is x_hat_t = sqrt(1 - alpha_bar_t) eps_hat with
eps_hat = eps_theta(x_t, t, y). At low SNR the denoiser becomes a scaled identity map, so
x_hat_t -> x_t and the error goes to 0. The paper plots "the mean-square error between input x_t
and prediction x_hat_t"; we report it per pixel:

    scaled_identity_mse(t) = mean over samples i and the C*H*W pixels of (x_t - sqrt(1 - alpha_bar_t) eps_hat)^2

Units: squared data units per pixel (images scaled to [-1, 1]); multiply by C*H*W for the mean
squared norm mean_i ||x_t - x_hat_t||^2. Since x_t - x_hat_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) (eps - eps_hat), it is about alpha_bar_t * E[x0^2] plus the weighted
denoising error.
"""

from __future__ import annotations

import torch

from geomprobe.diffusion import add_noise, alpha_bar, predict_noise


@torch.no_grad()
def scaled_identity_mse(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Per-pixel mean of (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t, y))^2 over the samples.

    x0, noise: (n, C, H, W); t, y: (n,) int64 (t may differ per row, e.g. for a band).
    """
    device = next(unet.parameters()).device
    ac = alphas_cumprod.to(device)
    total, count = 0.0, 0
    for a in range(0, x0.shape[0], batch_size):
        bx0, bnoise = x0[a : a + batch_size].to(device), noise[a : a + batch_size].to(device)
        bt, by = t[a : a + batch_size].to(device), y[a : a + batch_size].to(device)
        x_t = add_noise(bx0, bnoise, bt, ac)
        eps_hat = predict_noise(unet, x_t, bt, by)
        x_hat = (1.0 - alpha_bar(ac, bt)).sqrt() * eps_hat
        total += float((x_t - x_hat).double().pow(2).sum())
        count += x_t.numel()
    return total / max(count, 1)

"""UNet2DModel presets, the DDPM/DDIM schedulers and the device choice (docs/design.md §8).

Checkpoints (saving, the three directory layouts :func:`geomprobe.checkpoints.load_model` reads,
and their checks) live in :mod:`geomprobe.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from geomprobe.errors import UsageError

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Preset:
    """A UNet architecture: block widths, ResNet layers per block, attention."""

    name: str
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    attention: bool  # attention in the down/up blocks (and the mid block)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "small1": Preset("small1", (16,), 1, 8, False, "one block of 16 channels, 1 layer (paper App. D)"),
    "small3": Preset("small3", (16, 16, 16), 1, 8, False, "three blocks of 16 channels, 1 layer (paper App. D)"),
    "base": Preset("base", (16, 16, 16), 2, 8, False, "three blocks of 16 channels, 2 layers (paper App. D)"),
    "cl": Preset("cl", (128, 256, 256, 256), 2, 32, True, "the continual-learning UNet (paper App. E.2); GPU"),
}


def get_preset(name: str) -> Preset:
    """The UNet preset ``name`` (small1, small3, base, cl); UsageError for another name."""
    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_unet(preset: str, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    """A label-conditioned UNet2DModel for ``preset``.

    Input/output: (B, channels, image_size, image_size); ``class_labels``: (B,) int64 in
    ``0..num_classes-1``. Small presets have no attention anywhere (the paper's small models
    have none, and diffusers' attention blocks slow down ``torch.func.vmap`` on CPU).
    """
    p = get_preset(preset)
    n_blocks = len(p.block_out_channels)
    if image_size % (2 ** (n_blocks - 1)) != 0:
        raise UsageError(
            f"image size {image_size} is not divisible by {2 ** (n_blocks - 1)} (preset {preset!r} downsamples {n_blocks - 1} times)"
        )
    if p.attention:
        down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (n_blocks - 1)
        up = ("AttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",)
    else:
        down = ("DownBlock2D",) * n_blocks
        up = ("UpBlock2D",) * n_blocks
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        add_attention=p.attention,
        num_class_embeds=num_classes,
    )


def build_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDPMScheduler:
    """DDPM linear betas 1e-4..0.02 over ``num_train_timesteps`` steps (paper and docs/design.md §4)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
    )


def ddim_from(scheduler: DDPMScheduler) -> DDIMScheduler:
    """The DDIM sampler that shares the training scheduler's noise schedule."""
    return DDIMScheduler.from_config(scheduler.config)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter values of ``model``."""
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, otherwise CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda requested but no CUDA device is available")
        return torch.device(device)
    raise UsageError(f"unknown device {device!r}; expected auto, cpu or cuda")

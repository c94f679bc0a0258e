"""UNet2DModel presets, the DDPM/DDIM schedulers and checkpoints (DESIGN section 8).

A checkpoint is a directory::

    unet/                 diffusers save_pretrained (config.json + diffusion_pytorch_model.safetensors)
    scheduler/            DDPMScheduler config (scheduler_config.json)
    geomprobe.json        preset, dataset, image size, channels, classes, seed, step, version
    optimizer.safetensors optional: Adam state for resumable training
    train_state.json      optional: RNG states and step for resumable training

Nothing is ever unpickled: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from geomprobe.errors import DataError, UsageError
from geomprobe.io import CHECKPOINT_META, TRAIN_STATE

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
    """DDPM linear betas 1e-4..0.02 over ``num_train_timesteps`` steps (paper and DESIGN §4)."""
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


@dataclass
class ModelInfo:
    """What ``geomprobe.json`` records about a checkpoint."""

    preset: str
    dataset: str
    image_size: int
    channels: int
    num_classes: int
    seed: int
    step: int
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its scheduler and its metadata."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    info: ModelInfo
    path: Path | None = None


STAGING = ".staging"
STAGING_COMPLETE = "COMPLETE"


def save_checkpoint(
    directory: str | Path,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    info: ModelInfo,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` so that a crash never leaves a mixed state.

    Everything is first written to ``directory/.staging/``; a ``COMPLETE`` marker then commits
    it and the entries are moved into place. A reader finishes a committed staging area
    (roll forward) and discards an uncommitted one. Other files in ``directory`` (the
    training log, gradient stores) are left alone.
    """
    from geomprobe import __version__
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    scheduler.save_pretrained(staging / "scheduler")
    info.version = __version__
    (staging / CHECKPOINT_META).write_text(json.dumps(asdict(info), indent=2))
    if optimizer_state is not None:
        save_file({k: v.contiguous().cpu() for k, v in optimizer_state.items()}, str(staging / "optimizer.safetensors"))
    if train_state is not None:
        (staging / TRAIN_STATE).write_text(json.dumps(train_state))
    (staging / STAGING_COMPLETE).write_text("")
    finish_staged_checkpoint(directory)
    return directory


def finish_staged_checkpoint(directory: str | Path) -> None:
    """Move a committed ``.staging`` area into place; drop an uncommitted one."""
    directory = Path(directory)
    staging = directory / STAGING
    if not staging.is_dir():
        return
    if not (staging / STAGING_COMPLETE).is_file():
        shutil.rmtree(staging)
        return
    for entry in sorted(staging.iterdir()):
        if entry.name == STAGING_COMPLETE:
            continue
        target = directory / entry.name
        old = directory / (entry.name + ".old")
        if old.exists():  # left by a crash in the middle of an earlier swap
            shutil.rmtree(old)
        if target.is_dir():
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)
    shutil.rmtree(staging)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory (safetensors + JSON only). Raises DataError if malformed."""
    directory = Path(directory)
    meta = directory / CHECKPOINT_META
    if not directory.is_dir():
        raise DataError(f"checkpoint directory not found: {directory}")
    finish_staged_checkpoint(directory)
    if not meta.is_file() or not (directory / "unet" / "config.json").is_file():
        raise DataError(f"not a geomprobe checkpoint (expected {meta} and unet/config.json): {directory}")
    try:
        info = ModelInfo(**json.loads(meta.read_text()))
        unet = UNet2DModel.from_pretrained(directory / "unet", use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot load checkpoint {directory}: {str(exc).splitlines()[0]}") from exc
    unet.to(resolve_device(device) if isinstance(device, str) else device)
    unet.eval()
    return Checkpoint(unet=unet, scheduler=scheduler, info=info, path=directory)


def load_optimizer_state(directory: str | Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = Path(directory) / "optimizer.safetensors"
    return load_file(str(path)) if path.is_file() else None


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAIN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_checksum(directory: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the UNet weights file: identifies the model."""
    import hashlib

    path = Path(directory) / "unet" / "diffusion_pytorch_model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]

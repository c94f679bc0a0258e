"""Shared fixtures: tiny models and data so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs next to other work; an explicit
# OMP_NUM_THREADS wins (two threads sharing a busy core slow FID's eigvals 10-20x).
_threads = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_unet():
    """small1 at 8 px, 1 channel, 10 classes (about 40k parameters), fixed seed."""
    from geomprobe.models import build_unet

    torch.manual_seed(0)
    return build_unet("small1", 8, 1, 10)


def micro_unet(num_classes: int | None = 10, attention: bool = False):
    """A UNet2DModel of a few thousand parameters at 8 px, 1 channel (fixed seed): blocks of 4 and 8
    channels, ``num_classes`` class embeddings (None: unconditional), attention in the second block."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        **({"attention_head_dim": 4} if attention else {"add_attention": False}),
        num_class_embeds=num_classes,
    )


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """A geomprobe checkpoint of :func:`micro_unet` (one per test module: tests may damage theirs)."""
    from geomprobe.checkpoints import ModelInfo, save_checkpoint
    from geomprobe.models import build_scheduler

    path = tmp_path_factory.mktemp("ckpt") / "micro"
    save_checkpoint(path, micro_unet(), build_scheduler(), ModelInfo("micro", "digits", 8, 1, 10, 0, 0))
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (two OpenMP threads spin against other jobs on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Replay for the continual runner: pools of earlier classes' images and the batches that mix them in.

``replay real``: exemplars of the training set; ``replay generative``: DDIM samples of the
previous task's model. Without distillation the pool joins each training batch with the ordinary
DDPM loss; with ``--gd`` it feeds :class:`geomprobe.continual.distill.DistillationTerm` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from geomprobe.continual.config import ContinualConfig
from geomprobe.data import ImageDataset
from geomprobe.diffusion import ddim_sample
from geomprobe.training import sample_training_batch

Pool = tuple[torch.Tensor, torch.Tensor]  # images (M, C, H, W) in [-1, 1], labels (M,)


def replay_pool_real(train: ImageDataset, classes: list[int], per_class: int, gen: torch.Generator) -> Pool:
    """``per_class`` real exemplars of each class."""
    xs, ys = [], []
    for c in classes:
        idx = torch.nonzero(train.labels == c).flatten()
        pick = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        x, y = train.batch(pick)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def replay_pool_generated(
    teacher, scheduler, classes: list[int], per_class: int, steps: int, gen: torch.Generator
) -> Pool:
    """``per_class`` DDIM samples of each earlier class from the teacher."""
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    return ddim_sample(teacher, scheduler, labels, num_inference_steps=steps, generator=gen), labels


def replay_pool(
    config: ContinualConfig, train: ImageDataset, unet, scheduler, earlier: list[int], gen: torch.Generator
) -> Pool | None:
    """The replay pool of a task whose earlier classes are ``earlier`` (None without replay or on task 0)."""
    if config.replay_source == "none" or not earlier:
        return None
    if config.replay_source == "real":
        return replay_pool_real(train, earlier, config.replay_per_class, gen)
    return replay_pool_generated(unet, scheduler, earlier, config.replay_per_class, config.sample_steps, gen)


def batch_sampler(
    config: ContinualConfig, data: ImageDataset, replay: Pool | None, num_train_timesteps: int, gen: torch.Generator
) -> Callable[[], tuple]:
    """``next_batch()`` for the training loop: task data, plus replay images when replay is not distilled."""
    mix = replay is not None and not config.gd

    def next_batch():
        x0, y, t, noise = sample_training_batch(data, config.batch_size, num_train_timesteps, gen)
        if not mix:
            return x0, y, t, noise
        idx = torch.randint(0, len(replay[1]), (config.replay_batch,), generator=gen)
        tr = torch.randint(0, num_train_timesteps, (config.replay_batch,), generator=gen)
        nr = torch.randn((config.replay_batch, *x0.shape[1:]), generator=gen)
        return (
            torch.cat([x0, replay[0][idx]]),
            torch.cat([y, replay[1][idx]]),
            torch.cat([t, tr]),
            torch.cat([noise, nr]),
        )

    return next_batch

"""Replay for the continual runner: pools of earlier classes' images and the batches that mix them in.

``replay real``: exemplars of the training set; ``replay generative``: DDIM samples of the
previous task's model. Without distillation the pool joins each training batch with the ordinary
DDPM loss; with ``--gd`` it feeds :class:`geomprobe.continual.distill.DistillationTerm` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from geomprobe.continual.config import SELECT_CHOICES, ContinualConfig
from geomprobe.data import ImageDataset
from geomprobe.diffusion import ddim_refine, ddim_sample
from geomprobe.errors import UsageError
from geomprobe.training import sample_training_batch

Pool = tuple[torch.Tensor, torch.Tensor]  # images (M, C, H, W) in [-1, 1], labels (M,)


def select_exemplars(
    rule: str,
    labels: torch.Tensor,
    classes: list[int],
    per_class: int,
    gen: torch.Generator | None = None,
    energy: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row indices (int64) of ``per_class`` exemplars of each class in ``classes``, class by class.

    Rules (a class with fewer than ``per_class`` rows gives all of them):

    - ``random``: ``torch.randperm`` of the class's rows from ``gen`` (the replay of runs made before
      ``--replay-select`` existed, draw for draw);
    - ``high-energy`` / ``low-energy``: the class's ``per_class`` rows of largest / smallest ``energy``
      (ties: lower row first);
    - ``stratified``: the rows sorted by energy, cut into ``per_class`` equal quantile bins; the
      middle row of each bin (position floor((j + 1/2) m / per_class) of the m sorted rows);
    - ``similarity``: the rows nearest (Euclidean) to the class mean of ``features`` (N, F).
    """
    if rule not in SELECT_CHOICES:
        raise UsageError(f"unknown --replay-select {rule!r}; expected one of {', '.join(SELECT_CHOICES)}")
    needs = {"random": gen, "similarity": features}.get(rule, energy)
    if needs is None:
        what = {"random": "a generator", "similarity": "features"}.get(rule, "energies")
        raise UsageError(f"--replay-select {rule} needs {what}")
    for name, values in (("energy", energy), ("features", features)):
        if values is not None and len(values) != len(labels):
            raise UsageError(f"{len(values)} {name} rows for {len(labels)} samples (energies of another dataset?)")
    picks = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        if rule == "random":
            picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
            continue
        k = min(per_class, len(idx))
        if rule == "similarity":
            f = features[idx].double().flatten(1)
            score = (f - f.mean(0)).pow(2).sum(1)
            picks.append(idx[_stable_argsort(score)[:k]])
            continue
        order = _stable_argsort(energy[idx].double())
        if rule == "high-energy":
            order = _stable_argsort(-energy[idx].double())
        elif rule == "stratified":
            m = len(idx)
            order = order[[int((j + 0.5) * m / k) for j in range(k)]] if k else order[:0]
        picks.append(idx[order[:k]])
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def _stable_argsort(values: torch.Tensor) -> torch.Tensor:
    """Ascending order; ties keep the original (row) order."""
    return torch.sort(values, stable=True).indices


def replay_pool_real(
    train: ImageDataset,
    classes: list[int],
    per_class: int,
    gen: torch.Generator,
    select: str = "random",
    unet=None,
    scheduler=None,
) -> Pool:
    """``per_class`` real exemplars of each class, chosen by ``select`` (:func:`select_exemplars`).

    Energy rules score the classes' training images with ``unet`` (the model at the end of the
    previous task) by :func:`geomprobe.energy.sample_energy` (default timesteps and draws, noise
    seed drawn from ``gen``); ``similarity`` uses the images' pixels as features.
    """
    if select == "random":  # as before --replay-select: one randperm per class from gen, one batch per class
        xs, ys = [], []
        for c in classes:
            x, y = train.batch(select_exemplars("random", train.labels, [c], per_class, gen))
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)
    rows = torch.nonzero(torch.isin(train.labels, torch.tensor(classes))).flatten()
    x_all, y_all = train.batch(rows)
    energy = features = None
    if select == "similarity":
        features = x_all.flatten(1)
    else:
        from geomprobe.energy import sample_energy

        if unet is None or scheduler is None:
            raise UsageError(f"--replay-select {select} needs the previous task's model")
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        energy, _ = sample_energy(unet, x_all, y_all, scheduler.alphas_cumprod, seed=seed, sample_index=rows.numpy())
    pick = select_exemplars(select, y_all, classes, per_class, gen, energy=energy, features=features)
    return x_all[pick], y_all[pick]


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
        return replay_pool_real(train, earlier, config.replay_per_class, gen, config.replay_select, unet, scheduler)
    if config.replay_source == "compact":
        from geomprobe.continual.compact import compact_pool

        x, y = replay_pool_real(train, earlier, config.replay_per_class, gen, config.replay_select, unet, scheduler)
        fit = x[:0]  # the pca basis is fitted on the earlier tasks' training images; lowres codes fit nothing
        if config.replay_code == "pca":
            fit, _ = train.batch(torch.nonzero(torch.isin(train.labels, torch.tensor(earlier))).flatten())
        pool = compact_pool(fit, x, y, config.budget_bytes, config.replay_code)
        return pool.images(_unet_decoder(config, unet, scheduler, gen)), y
    return replay_pool_generated(unet, scheduler, earlier, config.replay_per_class, config.sample_steps, gen)


def _unet_decoder(config: ContinualConfig, unet, scheduler, gen: torch.Generator):
    """``refine(images, labels)`` for ``--code lowres-unet``: SDEdit through the current model; else None."""
    if config.replay_code != "lowres-unet":
        return None
    from geomprobe.continual.compact import UNET_DECODE_T

    return lambda x, y: ddim_refine(unet, scheduler, x, y, UNET_DECODE_T, config.sample_steps, gen)


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

"""One task of a continual seed, as named steps: terms, training, checkpoint, Fisher, evaluation, logs.

:func:`run_task` runs task k on a :class:`SeedRun` (the state one seed carries from task to
task: the model, the EWC term of the earlier tasks, the FID and accuracy matrices). Every random
draw of task k comes from generators seeded by ``task_seed(seed, k, stream)``: 0 training
batches (and distillation), 1 replay pool, 2 Fisher probe data, 3 + i evaluation of task i.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from geomprobe.checkpoints import ModelInfo, checkpoint_checksum, save_checkpoint
from geomprobe.continual.config import ContinualConfig
from geomprobe.continual.distill import DistillationTerm
from geomprobe.continual.metrics import evaluate_task
from geomprobe.continual.replay import Pool, batch_sampler, replay_pool
from geomprobe.continual.strategies import PenaltyTerm, combine_terms, flat_parameters, parameter_shapes
from geomprobe.data import ImageDataset
from geomprobe.distributed import any_rank, mean_over_ranks, on_every_rank, rank_slice
from geomprobe.errors import DataError
from geomprobe.io import (
    DEFAULT_MAX_MEMORY,
    METRICS,
    SAMPLES,
    STATE,
    TIMINGS,
    TRAIN_LOG,
    interrupt_requested,
    task_seed,
    torch_generator,
    write_json,
)
from geomprobe.timesteps import TimestepSpec
from geomprobe.training import PRECISIONS, training_loop

Progress = Callable[[int, dict], None]  # (global steps done, fields)


@dataclass
class SeedRun:
    """What one seed carries across its tasks (built by :func:`geomprobe.continual.runner.run_seed`)."""

    config: ContinualConfig
    seed: int
    out: Path
    features: object  # FeatureNet: .extractor, .classifier, .name
    train: ImageDataset
    tasks: list[list[int]]
    references: list[torch.Tensor]  # test images of each task
    scheduler: object
    spec: TimestepSpec  # the Fisher's timesteps, parsed once with the run's scheduler
    names: list[str]
    unet: torch.nn.Module
    penalty: PenaltyTerm | None
    device: torch.device
    max_memory: int = DEFAULT_MAX_MEMORY
    progress: Progress | None = None
    step_offset: int = 0
    rank: int = 0  # under torchrun: this process's rank (rank 0 alone writes files) and the world size
    world: int = 1
    fid: dict[int, dict[int, float]] = field(default_factory=dict)
    accuracy: dict[int, dict[int, float]] = field(default_factory=dict)

    @property
    def writer(self) -> bool:
        """True on the one process that writes the run's files (rank 0)."""
        return self.rank == 0

    def report(self, steps_done: int, fields: dict) -> None:
        if self.progress is not None:
            self.progress(self.step_offset + steps_done, fields)


def run_task(run: SeedRun, k: int) -> None:
    """Task k: train on its data with the strategy's terms, save m_k and F_k, evaluate tasks 0..k."""
    clock: dict = {"task": k}
    start = time.time()
    gen = torch_generator(task_seed(run.seed, k, 0))
    earlier = [c for task in run.tasks[:k] for c in task]
    replay = replay_pool(
        run.config, run.train, run.unet, run.scheduler, earlier, torch_generator(task_seed(run.seed, k, 1))
    )
    before = earlier_energies(run, earlier, k) if run.config.energy_records and earlier else None
    terms = task_terms(run, replay, gen)
    clock["replay_s"] = time.time() - start
    start = time.time()
    log_rows = train_task(
        run,
        k,
        terms,
        batch_sampler(run.config, task_data(run, k), replay, run.scheduler.config.num_train_timesteps, gen),
    )
    clock["train_s"] = time.time() - start
    start = time.time()
    rank0_writes(run, lambda: save_task_checkpoint(run, k), f"the checkpoint task-{k}")
    ckpt_dir = run.out / f"task-{k}"
    if run.penalty is not None:
        add_task_fisher(run, k, ckpt_dir)
    clock["fisher_s"] = time.time() - start
    start = time.time()
    rows = evaluate_after_task(run, k)
    clock["eval_s"] = time.time() - start
    if before is not None:
        start = time.time()
        after = earlier_energies(run, earlier, k)
        rank0_writes(run, lambda: write_energy_records(run, k, before, after), f"the energy records of task {k}")
        clock["energy_s"] = time.time() - start
    rank0_writes(run, lambda: append_task_records(run, k, log_rows, clock, rows), f"the records of task {k}")
    run.unet.train()


def rank0_writes(run: SeedRun, write: Callable[[], object], what: str) -> None:
    """``write()`` on rank 0 alone; under torchrun every rank waits for it and raises if it failed.

    :func:`geomprobe.distributed.on_every_rank` is the sync point, so no rank waits at a barrier for
    a rank 0 that died of a full disk.
    """
    on_every_rank(run.world, write if run.writer else (lambda: None), f"rank 0 could not write {what}")


INTRINSIC_FORGETTING = "intrinsic_forgetting.jsonl"


def earlier_energies(run: SeedRun, earlier: list[int], k: int) -> tuple:
    """(rows, labels, energy) of every training image of the classes ``earlier`` under ``run.unet``.

    The noise seed is ``derived_seed(seed, 0xE4E, k)``: the before and after energies of task change k
    use the same draws, so their difference is the model's change alone.
    """
    from geomprobe.energy import ENERGY_STREAM, sample_energy
    from geomprobe.io import derived_seed

    rows = torch.nonzero(torch.isin(run.train.labels, torch.tensor(earlier))).flatten()
    x, y = run.train.batch(rows)
    energy, _ = sample_energy(
        run.unet,
        x,
        y,
        run.scheduler.alphas_cumprod,
        seed=derived_seed(run.seed, ENERGY_STREAM, k),
        sample_index=rows.numpy(),
    )
    return rows.numpy(), y.numpy(), energy.numpy()


def write_energy_records(run: SeedRun, k: int, before: tuple, after: tuple) -> None:
    """The records of task change k: ``energy-task{k}.h5`` and a line of ``intrinsic_forgetting.jsonl``.

    The file holds sample_index, labels, energy_before, energy_after; the line is
    :func:`geomprobe.energy.energy_change_summary` of them.
    """
    import h5py

    from geomprobe.energy import energy_change_summary
    from geomprobe.io import atomic_path, derived_seed

    rows, labels, e0 = before
    e1 = after[2]
    with atomic_path(run.out / f"energy-task{k}.h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("sample_index", data=rows)
        f.create_dataset("labels", data=labels)
        f.create_dataset("energy_before", data=e0)
        f.create_dataset("energy_after", data=e1)
        f.attrs["description"] = f"energies of tasks 0..{k - 1}'s training images under m_{k - 1} and m_{k}"
    summary = energy_change_summary(e0, e1, seed=derived_seed(run.seed, 0x5BE, k))
    line = {"seed": run.seed, "strategy": run.config.strategy, "after_task": k, **summary}
    with open(run.out / INTRINSIC_FORGETTING, "a") as f:
        f.write(json.dumps(line) + "\n")


def task_data(run: SeedRun, k: int) -> ImageDataset:
    """Task k's training images (``non_continual``: the union of tasks 0..k)."""
    seen = [c for task in run.tasks[: k + 1] for c in task]
    return run.train.subset(seen if run.config.non_continual else run.tasks[k])


def task_terms(run: SeedRun, replay: Pool | None, gen: torch.Generator) -> list:
    """The loss terms of a task: the EWC penalty of earlier tasks, distillation from m_{k-1}."""
    terms: list = []
    if run.penalty is not None and run.penalty.num_tasks > 0:
        terms.append(run.penalty)
    if run.config.gd and replay is not None:
        teacher = copy.deepcopy(run.unet)
        terms.append(
            DistillationTerm(
                teacher,
                replay[0],
                replay[1],
                run.scheduler.alphas_cumprod,
                run.config.replay_batch,
                run.config.gd_weight,
                gen,
            )
        )
    return terms


def train_task(run: SeedRun, k: int, terms: list, next_batch) -> list[dict]:
    """``steps_per_task`` steps of the training loop (Adam restarted); returns the train-log rows."""
    steps = run.config.steps_per_task
    log_rows: list[dict] = []

    def on_log(step: int, values: dict) -> None:
        log_rows.append({"task": k, "step": step, **values})

    def on_step(step: int, loss: float) -> None:
        run.report(k * steps + step, {"task": k, "loss": loss})

    optimizer = torch.optim.Adam(run.unet.parameters(), lr=run.config.lr)
    model = run.unet
    if run.world > 1:  # DDP averages the gradients of each rank's rows [rank::world] of the global batch
        from torch.nn.parallel import DistributedDataParallel

        dev = run.device
        model = DistributedDataParallel(run.unet, device_ids=[dev.index] if dev.type == "cuda" else None)
    training_loop(
        model,
        run.scheduler,
        optimizer,
        lambda: rank_slice(next_batch(), run.rank, run.world),
        0,
        steps,
        extra_loss=combine_terms(terms),
        on_log=lambda step, values: on_log(step, mean_over_ranks(run.world, values)),
        log_every=10,
        progress=on_step,
        stop_requested=lambda: any_rank(run.world, interrupt_requested()),
        autocast=PRECISIONS[run.config.precision],
    )
    run.unet.eval()
    return log_rows


def save_task_checkpoint(run: SeedRun, k: int) -> Path:
    """The checkpoint ``task-{k}/`` of m_k (docs/design.md §8)."""
    config, train = run.config, run.train
    ckpt_dir = run.out / f"task-{k}"
    info = ModelInfo(
        preset=config.model,
        dataset=config.dataset,
        image_size=train.image_size,
        channels=train.channels,
        num_classes=train.num_classes,
        seed=run.seed,
        step=(k + 1) * config.steps_per_task,
        extra={"continual_config": asdict(config), "task": k, "classes": run.tasks[k], "strategy": config.strategy},
    )
    save_checkpoint(ckpt_dir, run.unet, run.scheduler, info)
    return ckpt_dir


def add_task_fisher(run: SeedRun, k: int, ckpt_dir: Path) -> None:
    """Estimate F_k at theta*_k, save ``fisher-task{k}.h5`` and add it to the penalty from the file."""
    from geomprobe.continual.estimate import estimate_task_fisher
    from geomprobe.fisher import load_fisher

    config = run.config
    run.report((k + 1) * config.steps_per_task, {"task": k, "stage": "fisher"})
    fisher = estimate_task_fisher(
        config.fisher,
        run.unet,
        run.names,
        run.train.subset(run.tasks[k]),
        run.scheduler.alphas_cumprod,
        run.spec,
        config.fisher_samples,
        torch_generator(task_seed(run.seed, k, 2)),
        rank=config.rank,
        method=config.rankk_method,
        max_memory=run.max_memory,
    )
    checksum, shapes = checkpoint_checksum(ckpt_dir), parameter_shapes(run.unet, run.names)
    fisher.info.checkpoint = {"path": str(ckpt_dir), "checksum": checksum}
    fisher.info.param_names, fisher.info.param_shapes = list(run.names), shapes
    fisher.info.extra = {**fisher.info.extra, "task": k, "classes": run.tasks[k], "seed": run.seed}
    path = run.out / f"fisher-task{k}.h5"
    rank0_writes(run, lambda: fisher.save(path), path.name)
    # the penalty is built from the file, exactly as a resumed run builds it (with the same checks)
    run.penalty.add(load_fisher(path, checksum, run.names, shapes), flat_parameters(run.unet, run.names).detach())
    run.penalty.to(run.device)


def evaluate_after_task(run: SeedRun, k: int) -> list[dict]:
    """FID_i(m_k) and accuracy for every i <= k; stores the samples; returns the metric rows."""
    config, features = run.config, run.features
    run.report((k + 1) * config.steps_per_task, {"task": k, "stage": "eval"})
    rows, images, labels = [], [], []
    for i in range(k + 1):
        ev = evaluate_task(
            run.unet,
            run.scheduler,
            run.tasks[i],
            run.references[i],
            features.extractor,
            features.classifier,
            config.n_generated,
            torch_generator(task_seed(run.seed, k, 3 + i)),
            config.sample_steps,
        )
        run.fid.setdefault(k, {})[i] = ev.fid
        run.accuracy.setdefault(k, {})[i] = ev.accuracy
        images.append(ev.samples)
        labels.append(ev.labels)
        rows.append(
            {
                "seed": run.seed,
                "strategy": config.strategy,
                "after_task": k,
                "task": i,
                "fid": ev.fid,
                "accuracy": ev.accuracy,
                "n_generated": ev.n_generated,
                "n_reference": ev.n_reference,
                "feature_net": features.name,
                "reference_split": "test",
            }
        )
    rank0_writes(run, lambda: store_samples(run.out / SAMPLES, k, torch.cat(images), torch.cat(labels)), SAMPLES)
    return rows


def append_task_records(run: SeedRun, k: int, log_rows: list[dict], clock: dict, rows: list[dict]) -> None:
    """Append the task's train log, timings and metric rows, then mark it completed in ``state.json``."""
    timing = {key: round(v, 2) if isinstance(v, float) else v for key, v in clock.items()}
    for name, lines in ((TRAIN_LOG, log_rows), (TIMINGS, [timing]), (METRICS, rows)):
        with open(run.out / name, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    write_json(run.out / STATE, task_state(run, k))


def task_state(run: SeedRun, k: int) -> dict:
    """``state.json`` after task k: the last completed task, how many of how many tasks finished, complete.

    ``completed_task`` is what a resume reads; ``tasks_completed``/``tasks``/``complete`` let readers
    (figures) tell a finished run from one stopped or rolled back early (docs/design.md §9).
    """
    return {
        "completed_task": k,
        "tasks_completed": k + 1,
        "tasks": len(run.tasks),
        "complete": k + 1 == len(run.tasks),
        "strategy": run.config.strategy,
        "seed": run.seed,
    }


def edit_samples(path: Path, edit: Callable) -> None:
    """Apply ``edit(h5py.File)`` to a copy of ``samples.h5`` (a new file when absent) and rename it onto ``path``.

    HDF5 files edited in place are corrupt after a kill in the middle of a write; a copy renamed
    when closed leaves the old file or the new one (the ``.tmp`` is rewritten by the next attempt).
    """
    import shutil

    import h5py

    from geomprobe.io import atomic_path

    with atomic_path(path) as tmp:
        if path.exists():
            shutil.copyfile(path, tmp)
        try:
            with h5py.File(tmp, "a") as f:
                edit(f)
        except OSError as exc:
            raise DataError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


def store_samples(path: Path, k: int, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep the evaluation samples of model m_k (for figures): group ``after_task{k}`` of ``samples.h5``.

    Args:
        path: ``samples.h5``.
        k: the task after which the samples were drawn.
        images: (n, C, H, W) in [-1, 1].
        labels: (n,) int64.
    """

    def add(f) -> None:
        if f"after_task{k}" in f:
            del f[f"after_task{k}"]
        g = f.create_group(f"after_task{k}")
        g.create_dataset("images", data=images.float().numpy(), compression="gzip")
        g.create_dataset("labels", data=labels.numpy())

    edit_samples(path, add)

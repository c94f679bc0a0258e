"""``geomprobe train`` and ``geomprobe sample``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    console,
    num_train_timesteps_of,
    progress_bar,
    threads_option,
)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write"),
    dataset: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | imagenet32"),
    model: str = typer.Option("small3", help="UNet preset: small1 | small3 | base | cl"),
    steps: int = typer.Option(3000, help="optimiser steps (the quick preset: 3000, about 4 minutes on 2 CPU cores)"),
    batch_size: int = typer.Option(128, help="images per step"),
    lr: float = typer.Option(1e-3, help="Adam learning rate (the paper uses 2e-4 with 200 epochs)"),
    image_size: int | None = typer.Option(None, help="digits only: 8, 16 (default) or 32"),
    classes: str | None = typer.Option(None, help="train on these classes only, e.g. '0,1' or '0..4'"),
    data_root: Path | None = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    checkpoint_every: int = typer.Option(500, help="save a resumable checkpoint every N steps"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    seed: int = typer.Option(0, help="random seed (weights, batches, noise)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (bf16 autocast of the forward; weights stay float32)"),
    threads: int | None = threads_option(),
) -> None:
    """Train a label-conditioned UNet2DModel with the DDPM loss.

    Under ``torchrun --nproc-per-node K`` with DistributedDataParallel (K must divide --batch-size).
    """
    from geomprobe.io import check_classes, check_count, check_output, check_seed

    check_seed(seed)
    check_count(batch_size, "--batch-size")
    check_count(steps, "--steps", 0, 2**40)
    check_count(checkpoint_every, "--checkpoint-every")
    check_classes(classes)
    check_output(out, "dir")

    from geomprobe.distributed import dist_info
    from geomprobe.training import TrainConfig
    from geomprobe.training import train as run_train

    config = TrainConfig(
        dataset=dataset,
        model=model,
        image_size=image_size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        classes=classes,
        data_root=str(data_root) if data_root else None,
        checkpoint_every=checkpoint_every,
        device=device,
        precision=precision,
    )
    config.validate()
    _check_batch_fits(config)
    quiet = quiet or dist_info()[0] != 0  # under torchrun rank 0 alone prints
    with progress_bar("train", steps, quiet) as update:
        result = run_train(config, out, resume=resume, progress=lambda s, loss: update(s, loss=loss))
    table = Table(title=f"trained {model} on {dataset}")
    for col in ("steps", "parameters", "final loss", "seconds", "checkpoint"):
        table.add_column(col)
    table.add_row(
        str(result.steps),
        f"{result.num_parameters:,}",
        f"{result.final_loss:.4f}",
        f"{result.seconds:.1f}",
        str(result.out),
    )
    console(quiet).print(table)


def _check_batch_fits(config) -> None:
    """Refuse a --batch-size whose first UNet block alone cannot fit in RAM (input, activations, gradients).

    A lower bound: per image 4 bytes x H x W x (channels + 2 x the first block's channels), the input and
    the first block's activation and its gradient; the whole UNet needs many times more.
    """
    from geomprobe.data import dataset_facts
    from geomprobe.io import check_fits_in_memory
    from geomprobe.models import get_preset

    facts = dataset_facts(config.dataset)
    size = config.image_size or facts.image_size
    first = get_preset(config.model).block_out_channels[0]
    each = 4 * size * size * (facts.channels + 2 * first)
    check_fits_in_memory(config.batch_size, each, "--batch-size", f"{config.model}'s activations at {size} px")


@app.command()
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="geomprobe checkpoint, diffusers pipeline or UNet2DModel directory"),
    out: Path = typer.Option(..., "--out", help="PNG file to write"),
    classes: str | None = typer.Option(
        None, help="class-conditional models: one grid row per class, '0..9', '0,3,7' or 'all' (default: the first 10)"
    ),
    n: int = typer.Option(8, "--n", help="samples per row"),
    rows: int | None = typer.Option(None, "--rows", help="unconditional models: rows of --n samples (default 8)"),
    steps: int = typer.Option(50, help="DDIM steps"),
    scale: int = typer.Option(4, help="enlarge each pixel to scale x scale in the PNG"),
    seed: int = typer.Option(0, help="random seed of the initial noise"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet"),
    threads: int | None = threads_option(),
) -> None:
    """Write a PNG grid of DDIM samples: one row per class, or --rows rows for an unconditional model."""
    from geomprobe.io import check_classes, check_count, check_output, check_seed

    check_seed(seed)
    check_count(n, "--n", 1, 4096)
    check_count(steps, "--steps", 1, num_train_timesteps_of(ckpt))
    check_count(scale, "--scale", 1, 64)
    if rows is not None:
        check_count(rows, "--rows", 1, 4096)
    check_classes(classes)
    check_output(out, "file")

    from geomprobe.sampling import sample_grid

    grid = sample_grid(ckpt, classes, n, out, steps=steps, seed=seed, device=device, scale=scale, rows=rows)
    for note in grid.notes:  # even with --quiet: the note says what was assumed
        console().print(f"note: {note}", highlight=False, soft_wrap=True)
    what = (
        f"{len(grid.classes)} classes x {n}" if grid.classes is not None else f"unconditional, {grid.rows} rows x {n}"
    )
    console(quiet).print(f"wrote {grid.path} ({len(grid.samples)} samples, {what})", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- energy (which samples are forgotten)

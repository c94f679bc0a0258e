"""The ``geomprobe`` command line: a thin layer over the library.

Each command validates its options, calls one library function and prints the result with
rich (``--json`` prints JSON on stdout instead). Errors a user can cause are
:class:`geomprobe.errors.GeomprobeError`; they are turned into a one-line message and an
exit code in one place, :class:`_GeomprobeGroup.invoke`.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from geomprobe.errors import GeomprobeError


class _GeomprobeGroup(TyperGroup):
    """Turns project errors into one line on stderr and a non-zero exit (never a traceback)."""

    def invoke(self, ctx):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except GeomprobeError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("interrupted; rerun the same command to resume", highlight=False)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_GeomprobeGroup,
    help="Gradient geometry of diffusion models: per-sample gradients, Fisher spectra, rank-1 EWC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


def console(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet)


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False, unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(completed, **fields)``.

    ``fields`` (e.g. ``loss=1.23``) are shown after the bar.
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console(quiet), disable=quiet, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(completed: int, **fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            prog.update(task, completed=completed, info=info + (f" {unit}" if unit and info else ""))

        yield update


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- train / sample (foundation)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write"),
    dataset: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | imagenet32"),
    model: str = typer.Option("small3", help="UNet preset: small1 | small3 | base | cl"),
    steps: int = typer.Option(3000, help="optimiser steps (the quick preset: 3000, about 4 minutes on 2 CPU cores)"),
    batch_size: int = typer.Option(128, help="images per step"),
    lr: float = typer.Option(1e-3, help="Adam learning rate (the paper uses 2e-4 with 200 epochs)"),
    image_size: Optional[int] = typer.Option(None, help="digits only: 8, 16 (default) or 32"),
    classes: Optional[str] = typer.Option(None, help="train on these classes only, e.g. '0,1' or '0..4'"),
    data_root: Optional[Path] = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    checkpoint_every: int = typer.Option(500, help="save a resumable checkpoint every N steps"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    seed: int = typer.Option(0, help="random seed (weights, batches, noise)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
) -> None:
    """Train a label-conditioned UNet2DModel with the DDPM loss."""
    from geomprobe.training import TrainConfig, train as run_train

    size = image_size if image_size is not None else (16 if dataset == "digits" else 32)
    config = TrainConfig(
        dataset=dataset, model=model, image_size=size, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        classes=classes, data_root=str(data_root) if data_root else None, checkpoint_every=checkpoint_every,
        device=device,
    )
    config.validate()
    with progress_bar("train", steps, quiet) as update:
        result = run_train(config, out, resume=resume, progress=lambda s, loss: update(s, loss=loss))
    table = Table(title=f"trained {model} on {dataset}")
    for col in ("steps", "parameters", "final loss", "seconds", "checkpoint"):
        table.add_column(col)
    table.add_row(str(result.steps), f"{result.num_parameters:,}", f"{result.final_loss:.4f}", f"{result.seconds:.1f}", str(result.out))
    console(quiet).print(table)


@app.command()
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="checkpoint directory"),
    out: Path = typer.Option(..., "--out", help="PNG file to write"),
    classes: str = typer.Option("0..9", help="one grid row per class: '0..9' or '0,3,7'"),
    n: int = typer.Option(8, "--n", help="samples per class"),
    steps: int = typer.Option(50, help="DDIM steps"),
    scale: int = typer.Option(4, help="enlarge each pixel to scale x scale in the PNG"),
    seed: int = typer.Option(0, help="random seed of the initial noise"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Write a PNG grid of DDIM samples, one row per class."""
    from geomprobe.data import parse_classes
    from geomprobe.models import load_checkpoint
    from geomprobe.sampling import sample_grid

    num_classes = load_checkpoint(ckpt).info.num_classes
    class_list = parse_classes(classes, num_classes) or list(range(num_classes))
    path, samples = sample_grid(ckpt, class_list, n, out, steps=steps, seed=seed, device=device, scale=scale)
    console(quiet).print(f"wrote {path} ({len(samples)} samples, {len(class_list)} classes x {n})")


# ---------------------------------------------------------------- entry point


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The ``geomprobe`` command line: a thin layer over the library.

Each command validates its options, calls one library function and prints the result with
rich (``--json`` prints JSON on stdout instead). Errors a user can cause are
:class:`geomprobe.errors.GeomprobeError`; they are turned into a one-line message and an
exit code in one place, :class:`_GeomprobeGroup.invoke`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from geomprobe.allocator import retain_freed_memory

try:  # typer >= 0.29 carries its own copy of click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException as _ClickException
from geomprobe.errors import GeomprobeError


def _flags_without_value_type(params: list) -> list:
    """Blank the value column of flags in ``--help`` (typer 0.29 labels every option, flags too, ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # display_type_rich shows a metavar as given; "" shows nothing
    return params


def _is_path(param) -> bool:
    """True for a ``Path`` or ``list[Path]`` parameter."""
    from typing import get_args

    desc = param.type_descriptor
    inner = get_args(desc.annotation)[:1] if desc.is_list else ()
    return desc.is_path or any(isinstance(a, type) and issubclass(a, Path) for a in inner)


def _refuse_empty_paths(command, args: list[str]) -> None:
    """A path option or argument given as ``''`` is a UsageError (``Path('')`` would silently be the cwd)."""
    from geomprobe.errors import UsageError

    takes_value, path_options = set(), set()
    for param in command.params:
        names = [*param.opts, *getattr(param, "secondary_opts", [])]
        if param.param_type_name == "option" and not param.is_flag:
            takes_value.update(names)
            if _is_path(param):
                path_options.update(names)
    path_argument = any(p.param_type_name == "argument" and _is_path(p) for p in command.params)
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, value = token.partition("=")
        if name in path_options and (value == "" if eq else i + 1 < len(args) and args[i + 1] == ""):
            raise UsageError(f"{name} is empty; give a path ('.' for the current directory)")
        if token in takes_value:
            i += 1  # skip the option's value
        elif token == "" and path_argument:
            raise UsageError("an empty path was given; give a path ('.' for the current directory)")
        i += 1


class _GeomprobeCommand(TyperCommand):
    """Every command: flags without a value type in ``--help``; empty paths refused before parsing."""

    def get_params(self, ctx):  # noqa: D102 - click API
        return _flags_without_value_type(super().get_params(ctx))

    def parse_args(self, ctx, args):  # noqa: D102 - click API
        _refuse_empty_paths(self, args)
        return super().parse_args(ctx, args)


class _GeomprobeGroup(TyperGroup):
    """Turns project errors into one line on stderr and a non-zero exit (never a traceback).

    Also the process set-up that must precede torch: OMP_WAIT_POLICY (:func:`_prepare_process`) and the
    SIGINT handler that makes Ctrl-C stop every command with exit 130 (geomprobe/io.py, "interrupts").
    """

    def main(self, *args, **kwargs):  # noqa: D401 - click API
        import signal

        previous = signal.getsignal(signal.SIGINT)
        installed = _prepare_process()
        try:
            return super().main(*args, **kwargs)
        finally:
            if "torch.distributed" in sys.modules:  # never import torch just to exit
                from geomprobe.distributed import close_dist

                close_dist()  # grads / spectrum --ckpt under torchrun keep the group to the command's end
            if installed:
                signal.signal(signal.SIGINT, previous)

    def get_params(self, ctx):  # noqa: D102 - click API
        return _flags_without_value_type(super().get_params(ctx))

    def invoke(self, ctx):  # noqa: D401 - click API
        from geomprobe.io import raise_if_interrupted

        retain_freed_memory()  # fewer page faults for per-batch temporaries (geomprobe/allocator.py)
        try:
            result = super().invoke(ctx)
            raise_if_interrupted()  # a Ctrl-C swallowed by a finaliser still ends the command with 130
            return result
        except GeomprobeError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except _ClickException as exc:  # an unknown option, a value of the wrong type: click's, in one line
            from rich.markup import escape

            where = getattr(exc, "ctx", None) or ctx
            message = " ".join(exc.format_message().split()).rstrip(".")
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(message)}; see {escape(where.command_path)} --help",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # under torchrun every rank stops; rank 0 alone says so
            Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0").print(
                _interrupt_message(ctx, exc), highlight=False, soft_wrap=True
            )
            raise typer.Exit(130) from None
        except MemoryError:  # an allocation the checks could not foresee (they refuse what cannot fit)
            Console(stderr=True).print(
                "[bold red]error:[/] out of memory; use smaller sizes (--batch-size, --samples, --n, --max-memory)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk, a read-only or vanished directory: the system's one line
            where = f": {exc.filename}" if exc.filename else ""
            what = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
            Console(stderr=True).print(f"[bold red]error:[/] {what}{where}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


# Commands whose work survives an interrupt and that continue it only with --resume; the others
# (grads, reproduce) continue when rerun as they were, or (sample, spectrum, figures) start again.
_RESUME_FLAG = {"train", "continual"}


def _interrupt_message(ctx, exc: BaseException) -> str:
    """One line: what was kept and the exact command that continues (the original argv, + --resume)."""
    from geomprobe.io import resume_command

    name = ctx.invoked_subcommand or ""
    step = getattr(exc, "step", None)
    kept = f" at step {step} (checkpoint saved)" if step is not None else ""
    if name in _RESUME_FLAG:
        return f"interrupted{kept}; resume with: {resume_command(add_resume=True)}"
    if name in ("grads", "reproduce"):
        return f"interrupted{kept}; finished parts are kept, rerun to continue: {resume_command()}"
    return f"interrupted{kept}; rerun with: {resume_command()}"


def _prepare_process() -> bool:
    """Before torch loads: OpenMP threads that sleep instead of spin when idle, and the SIGINT handler.

    ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it (see ``threads_option``); libgomp reads it once,
    when torch loads it, so it is set here, before any command imports torch. Returns True when the
    SIGINT handler was installed (main thread).
    """
    from geomprobe.io import install_interrupt_handler

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return install_interrupt_handler()


class _Typer(typer.Typer):
    """``@app.command()`` builds a :class:`_GeomprobeCommand` unless told otherwise."""

    def command(self, *args, cls=None, **kwargs):  # noqa: D102 - typer API
        return super().command(*args, cls=cls or _GeomprobeCommand, **kwargs)


app = _Typer(
    cls=_GeomprobeGroup,
    help="Gradient geometry of diffusion models: per-sample gradients, Fisher spectra, rank-1 EWC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEVICE_HELP = "auto (CUDA when available), cpu or cuda"


def memory_option(what: str):
    """The one ``--max-memory`` option: parsed once here into bytes (geomprobe.io.parse_memory)."""
    from geomprobe.io import DEFAULT_MAX_MEMORY, parse_memory

    return typer.Option(
        f"{DEFAULT_MAX_MEMORY // 2**30}G",
        "--max-memory",
        parser=parse_memory,
        metavar="SIZE",
        help=f"memory budget for {what}, e.g. 512M or 4G",
    )


MAX_THREADS = 4096
"""The most ``--threads`` accepted (torch takes a C int; more threads than this is a typo)."""


def default_threads() -> int:
    """Torch/OpenMP threads without ``--threads``: ``OMP_NUM_THREADS`` when set, else the usable cores.

    Usable cores: the CPUs this process may run on (``os.sched_getaffinity``), i.e. a fixed number per
    machine, never the current load (results must not depend on what else runs). With the threads
    sleeping when idle (``OMP_WAIT_POLICY=PASSIVE``, set by the CLI) this does not collapse when other
    jobs share the cores; README "Threads" has the measurements.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and 0 < int(env) <= MAX_THREADS:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _apply_threads(value: int | None) -> int | None:
    """``--threads`` callback: runs while the options are parsed, before the command imports torch."""
    if value is not None:
        from geomprobe.io import check_count

        check_count(value, "--threads", 1, MAX_THREADS)
    n = value if value is not None else default_threads()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # read when torch loads
    if "torch" in sys.modules:  # already loaded (library use, tests): set it directly
        sys.modules["torch"].set_num_threads(n)
    return value


def threads_option():
    """The one ``--threads`` option of every command (applied by its callback; the command ignores the value)."""
    return typer.Option(
        None,
        "--threads",
        callback=_apply_threads,
        metavar="N",
        help="torch/OpenMP threads (default: OMP_NUM_THREADS if set, else the usable CPU cores)",
    )


def console(quiet: bool = False) -> Console:
    """The stderr console (silent with ``quiet``)."""
    return Console(stderr=True, quiet=quiet)


PROGRESS_SECONDS = 30.0
"""Off a terminal, ``progress_bar`` prints a plain line at every 10% and at least every this many seconds."""


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False, unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(completed, **fields)``.

    The bar appears at the first update, so input errors raised before any work starts print
    as a single line. ``fields`` (e.g. ``loss=1.23``) are shown after the bar. When stderr is not a
    terminal (redirected to a file), plain lines ``description: done/total (pct%) fields, elapsed``
    are printed instead, at every 10% and every :data:`PROGRESS_SECONDS` (``GEOMPROBE_PROGRESS_SECONDS``).
    Every update is also a safe point for Ctrl-C (geomprobe/io.py, "interrupts").
    """
    import time

    from geomprobe.io import raise_if_interrupted

    con = console(quiet)
    plain = not quiet and not con.is_terminal
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=con, disable=quiet or plain, transient=False)
    task = prog.add_task(description, total=total, info="")
    started = False
    every = float(os.environ.get("GEOMPROBE_PROGRESS_SECONDS", PROGRESS_SECONDS))
    t0 = time.monotonic()
    last = {"time": t0, "tenth": 0, "line": ""}

    def plain_line(completed: int, total: int | None, info: str) -> None:
        now = time.monotonic()
        tenth = int(10 * completed / total) if total else 0
        if tenth <= last["tenth"] and now - last["time"] < every:
            return
        last.update(time=now, tenth=max(tenth, last["tenth"]))
        pct = f" ({100 * completed / total:.0f}%)" if total else ""
        line = (
            f"{description}: {completed}/{total if total else '?'}{pct}{' ' + info if info else ''}, {now - t0:.0f} s"
        )
        last["line"] = line
        con.print(line, highlight=False, soft_wrap=True, markup=False)

    def update(completed: int, total: int | None = None, **fields: float) -> None:
        nonlocal started
        raise_if_interrupted()
        if not started:
            prog.start()
            started = True
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        info += f" {unit}" if unit and info else ""
        prog.update(task, completed=completed, total=total, info=info)
        if plain:
            plain_line(completed, prog.tasks[0].total, info)

    try:
        yield update
    finally:
        if started:
            prog.stop()


def _num_train_timesteps(ckpt: Path) -> int:
    """The model's ``num_train_timesteps`` from ``scheduler/scheduler_config.json`` (JSON only: no torch).

    1000 (the default scheduler's) when the file is absent or unreadable; loading the model reports that.
    """
    try:
        value = json.loads((Path(ckpt) / "scheduler" / "scheduler_config.json").read_text()).get(
            "num_train_timesteps", 1000
        )
    except (OSError, ValueError, AttributeError):
        return 1000
    return value if isinstance(value, int) and value > 0 else 1000


def print_json(obj) -> None:
    """``obj`` as indented JSON on stdout."""
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
    check_count(steps, "--steps", 1, _num_train_timesteps(ckpt))
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


@app.command()
def energy(
    ckpt: Path = typer.Option(..., "--ckpt", help="geomprobe checkpoint, diffusers pipeline or UNet2DModel directory"),
    out: Path = typer.Option(..., "--out", help="HDF5 file to write (sample index, label, energy, per-t losses)"),
    dataset: str | None = typer.Option(None, help="digits | mnist | ... (default: the checkpoint's)"),
    split: str = typer.Option("train", help="train | test"),
    classes: str | None = typer.Option(None, help="only these classes, e.g. '0,1' or '0..4' (default: all)"),
    t: str = typer.Option(
        "50,150,250,350,450,550,650,750,850,950", "--t", help="comma-separated timesteps of the energy"
    ),
    draws: int = typer.Option(4, help="noise draws per sample and timestep"),
    alignment_t: str | None = typer.Option(
        None, "--alignment-t", help="also |cos(g_i, mu_t)| at these timesteps, e.g. 100,500,900 (per-sample gradients)"
    ),
    data_root: Path | None = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    seed: int = typer.Option(0, help="seed of the noise draws"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the per-class summary as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet"),
    threads: int | None = threads_option(),
) -> None:
    """Per-sample energy (denoising loss averaged over fixed timesteps and seeded noise draws; seed 004)."""
    from geomprobe.io import check_classes, check_count, check_output, check_seed

    check_seed(seed)
    check_count(draws, "--draws", 1, 10_000)
    check_classes(classes)
    check_output(out, "file")
    timesteps = _timestep_list(t, "--t", ckpt)
    aligned = _timestep_list(alignment_t, "--alignment-t", ckpt) if alignment_t else []

    from geomprobe.energy import compute_energies, write_energy

    with progress_bar("energy", 0, quiet, unit="images") as update:
        result = compute_energies(
            ckpt,
            dataset,
            split,
            classes,
            timesteps,
            draws,
            seed,
            data_root=str(data_root) if data_root else None,
            device=device,
            progress=lambda done, total: update(done, total=total),
            alignment_t=aligned,
        )
    write_energy(out, result)
    summary, alignment = result.class_summary(), result.alignment_summary()
    if json_out:
        print_json(
            {"out": str(out), "timesteps": timesteps, "draws": draws, "classes": summary, "alignment": alignment}
        )
        return
    table = Table(title=f"energy per class ({result.attrs['dataset']} {split}, {len(result.energy)} images)")
    for col in ("class", "n", "mean", "median", "std", "min", "max"):
        table.add_column(col, justify="right")
    for row in summary:
        table.add_row(
            str(row["label"]), str(row["n"]), *[f"{row[k]:.2f}" for k in ("mean", "median", "std", "min", "max")]
        )
    console(quiet).print(table)
    for row in alignment:
        lo, hi = row["ci"]
        console(quiet).print(
            f"t={row['t']}: Spearman(energy, |cos(g_i, mu)|) = {row['spearman']:.3f} [{lo:.3f}, {hi:.3f}]",
            highlight=False,
        )
    console(quiet).print(f"wrote {out}", highlight=False, soft_wrap=True)


def _timestep_list(text: str, option: str, ckpt: Path) -> list[int]:
    """Comma-separated timesteps in 0..N-1 of the model's schedule (one-line UsageError otherwise)."""
    from geomprobe.errors import UsageError

    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated integer timesteps, e.g. 50,150,250") from None
    if not values:
        raise UsageError(f"{option} is empty")
    limit = _num_train_timesteps(ckpt)
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise UsageError(f"{option} {bad[0]} is outside 0..{limit - 1}")
    return values


# ---------------------------------------------------------------- grads (probe engine)


@app.command()
def grads(
    ckpt: Path = typer.Option(..., "--ckpt", help="geomprobe checkpoint, diffusers pipeline or UNet2DModel directory"),
    t_range: str = typer.Option(
        ..., "--t", "--t-range", help="t-spec: '100..900', '100..900:50', '100,300' or a band 'low-snr'"
    ),
    out: Path = typer.Option(..., "--out", help="gradient store directory to write (or resume)"),
    samples: int = typer.Option(1024, help="samples per timestep (the same samples at every t)"),
    classes: str | None = typer.Option(None, help="only these classes, e.g. '0,1' or '0..4'"),
    split: str = typer.Option("train", help="train | test"),
    params: str | None = typer.Option(None, help="regex on parameter names (default: all parameters)"),
    target: str = typer.Option("empirical", help="empirical (eps) | true (eps_theta(x_t).detach() + xi)"),
    project: int | None = typer.Option(None, help="store a seeded random projection of the rows to K dims"),
    projection: str = typer.Option(
        "countsketch",
        help="with --project: countsketch (never materialised, about the cost of writing the rows) | gaussian",
    ),
    dtype: str = typer.Option("float32", help="storage dtype: float32 | float16"),
    max_memory: int = memory_option("one chunk of per-sample gradients"),
    shard_rows: int = typer.Option(256, help="samples per shard (the unit of resume and of torchrun work)"),
    dataset: str | None = typer.Option(
        None, help="digits | mnist | fashion-mnist | cifar10 | imagenet32 (default: the checkpoint's)"
    ),
    resize: bool = typer.Option(
        False, "--resize", help="bring the dataset's images to the model's size (bilinear) and channels"
    ),
    data_root: Path | None = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a store made by a different command"),
    seed: int = typer.Option(0, help="random seed (sample choice, noise, band timesteps, projection)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
    threads: int | None = threads_option(),
) -> None:
    """Per-sample gradients at chosen timesteps into an HDF5 gradient store (resumable, torchrun-aware)."""
    from geomprobe.io import check_classes, check_count, check_output, check_seed
    from geomprobe.timesteps import BAND_NAMES, parse_timesteps

    check_seed(seed)
    check_count(samples, "--samples")
    check_classes(classes)
    check_count(shard_rows, "--shard-rows")
    if project is not None:
        check_count(project, "--project")
    if t_range.strip().lower() not in BAND_NAMES:  # bands need the model's betas: checked when it is loaded
        parse_timesteps(t_range, _num_train_timesteps(ckpt))  # the model's schedule, read as JSON: no torch yet
    check_output(out, "dir")

    from geomprobe.distributed import dist_info
    from geomprobe.probe import ExtractConfig, extract_gradients

    config = ExtractConfig(
        ckpt=str(ckpt),
        t_range=t_range,
        samples=samples,
        classes=classes,
        split=split,
        params=params,
        target=target,
        project=project,
        projection=projection,
        dtype=dtype,
        seed=seed,
        data_root=str(data_root) if data_root else None,
        shard_rows=shard_rows,
        dataset=dataset,
        resize=resize,
    )
    config.validate()
    other_rank = dist_info()[0] != 0
    quiet = quiet or other_rank
    with progress_bar("grads", 1, quiet) as update:
        result = extract_gradients(
            config,
            out,
            overwrite=overwrite,
            device=device,
            max_memory=max_memory,
            command=list(sys.argv),
            progress=lambda done, total, **f: update(done, total=total, **{k: v for k, v in f.items() if k != "key"}),
            on_note=lambda note: console(other_rank).print(
                f"note: {note}", highlight=False, soft_wrap=True
            ),  # even --quiet
        )
    table = Table(title=f"gradient store {result.out} ({result.n} samples, {result.num_params:,} parameters)")
    for col in ("t", "rows written", "P", "bytes", "seconds", "shards skipped"):
        table.add_column(col)
    for k in result.keys:
        table.add_row(str(k.t), str(k.n), f"{k.P:,}", f"{k.bytes:,}", f"{k.seconds:.1f}", str(k.skipped_shards))
    console(quiet).print(table)


# ---------------------------------------------------------------- figures / reproduce


@app.command()
def figures(
    from_dirs: list[Path] = typer.Option(
        ..., "--from", help="run directories to search for spectrum.json, metrics.jsonl, ... (repeat or list)"
    ),
    more_dirs: list[Path] | None = typer.Argument(
        None, help="further run directories (so '--from a b c' works)", show_default=False
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="directory for the PNG/PDF figures, captions and tables (default: <run>/figures; needed with several runs)",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="print what was written and skipped as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet", help="no table"),
    threads: int | None = threads_option(),
) -> None:
    """Every paper figure and table that the stored results allow (reads results, recomputes nothing).

    One run per --from: a directory holding several runs is refused (name the one to draw).
    """
    from geomprobe.io import check_output

    run_dirs = list(from_dirs) + list(more_dirs or [])
    out = _figures_dir(run_dirs, out)
    check_output(out, "dir")

    from geomprobe.figures import make_figures
    from geomprobe.figures.runs import check_one_run_each

    check_one_run_each(run_dirs)
    report = make_figures(run_dirs, out)
    if json_out:
        print_json(
            {
                "out": str(report.out_dir),
                "figures": {f.name: [str(p) for p in f.files] for f in report.made},
                "skipped": dict(report.skipped),
            }
        )
        return
    table = Table(title=f"figures in {report.out_dir}")
    table.add_column("figure")
    table.add_column("files / why not")
    for fig in report.made:
        table.add_row(fig.name, " ".join(p.suffix.lstrip(".") for p in fig.files))
    for name, why in report.skipped:
        table.add_row(f"[dim]{name}[/]", f"[dim]skipped: {why}[/]")
    console(quiet).print(table)


def _figures_dir(run_dirs: list[Path], out: Path | None) -> Path:
    """``--out`` of ``figures``, by default ``<run>/figures`` of the one run directory (never the cwd's figures/)."""
    from geomprobe.errors import UsageError

    if out is not None:
        return out
    if len(run_dirs) != 1:
        raise UsageError(f"{len(run_dirs)} run directories given: pass --out DIR for their figures")
    run = run_dirs[0]
    return (run.parent if run.is_file() else run) / "figures"


@app.command()
def reproduce(
    preset: str = typer.Option(
        "quick", help="quick (digits, Small-3, minutes on CPU) | paper (MNIST, base + Small-1/3, GPU)"
    ),
    out: Path | None = typer.Option(None, "--out", help="run directory (default runs/<preset>)"),
    with_continual: bool = typer.Option(
        False, "--with-continual", help="also run the continual-learning comparison (Fig. 4, Tables)"
    ),
    data_root: Path | None = typer.Option(None, help="dataset files for the paper preset (MNIST IDX files)"),
    steps: int | None = typer.Option(None, help="override the preset's training steps (quick: 3000)"),
    samples: int | None = typer.Option(None, help="override the preset's samples per timestep (quick: 1024)"),
    models: str | None = typer.Option(
        None, help="override the preset's UNets, e.g. small1,small3,base (Fig. 6 compares sizes)"
    ),
    seed: int = typer.Option(0, help="random seed of training, probing and continual runs"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display or table"),
    threads: int | None = threads_option(),
) -> None:
    """Train -> grads -> spectrum -> figures (-> continual) in one resumable command."""
    from geomprobe.io import check_count, check_output, check_seed

    check_seed(seed)
    if steps is not None:
        check_count(steps, "--steps", 1, 2**40)
    if samples is not None:
        check_count(samples, "--samples")
    check_output(out or Path("runs") / preset, "dir")
    from rich.progress import Progress, SpinnerColumn

    from geomprobe.reproduce import get_preset, resolve_preset, stage_keys
    from geomprobe.reproduce import reproduce as run_reproduce

    chosen = get_preset(preset)
    if models:
        import dataclasses

        from geomprobe.models import get_preset as get_model_preset

        names = tuple(m.strip() for m in models.split(",") if m.strip())
        for name in names:
            get_model_preset(name)
        chosen = dataclasses.replace(chosen, models=names)
    overrides = {k: v for k, v in (("train_steps", steps), ("samples", samples)) if v is not None}
    chosen = resolve_preset(chosen, overrides, str(data_root) if data_root else None)  # refusals before the display
    out = out or Path("runs") / chosen.name
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    con = console(quiet)
    plain = not quiet and not con.is_terminal  # redirected: one plain line per finished stage, no bars
    with Progress(*columns, console=con, disable=quiet or plain) as prog:
        tasks = {
            key: prog.add_task(label, total=None, info="[dim]waiting[/]", start=False)
            for key, label in stage_keys(chosen, with_continual)
        }

        class _Display:
            def start(self, stage: str, label: str, total: int) -> None:
                prog.start_task(tasks[stage])
                prog.update(tasks[stage], total=total, info="")

            def update(self, stage: str, done: int, total: int | None = None, info: str = "") -> None:
                prog.update(tasks[stage], completed=done, info=info, **({"total": total} if total is not None else {}))

            def finish(self, stage: str, status: str) -> None:
                task = prog.tasks[[t.id for t in prog.tasks].index(tasks[stage])]
                prog.update(tasks[stage], total=task.total or 1, completed=task.total or 1, info=status)
                prog.stop_task(tasks[stage])
                if plain:
                    con.print(f"{task.description}: {status}", highlight=False, soft_wrap=True)

        result = run_reproduce(
            chosen,
            out,
            with_continual=with_continual,
            seed=seed,
            device=device,
            data_root=str(data_root) if data_root else None,
            progress=_Display(),
        )
    table = Table(title=f"reproduce --preset {chosen.name}: {result.out} ({result.seconds:.0f} s)")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for s in result.stages:
        table.add_row(s.stage, s.status, f"{s.seconds:.1f}", str(s.output))
    console(quiet).print(table)
    console(quiet).print(
        f"{len(result.figures)} figure files in {out / 'figures'}"
        + (f"; not made: {', '.join(n for n, _ in result.skipped_figures)}" if result.skipped_figures else "")
    )


# ---------------------------------------------------------------- continual (continual learning)


def _parse_seeds(text: str) -> list[int]:
    from geomprobe.errors import UsageError

    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise UsageError(f"malformed --seeds {text!r}; use e.g. '0,1,2'") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    from geomprobe.io import check_seed

    return [check_seed(s, "--seeds") for s in seeds]


def _fmt_ms(mean: float, err: float) -> str:
    return f"{mean:.1f}" if err != err else f"{mean:.1f} ± {err:.1f}"


def _continual_config_module():
    """``geomprobe.continual.config`` without running ``geomprobe/continual/__init__.py``.

    That package imports torch and diffusers (5-20 s), and the options of ``continual`` are built from
    its config module when the CLI is imported; loading the module file alone keeps ``geomprobe --help``
    and argument errors fast. The module is registered under its own name, so later imports (the package
    itself included) share it.
    """
    import importlib.util

    name = "geomprobe.continual.config"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "continual" / "config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _config_option(name: str, *decls: str):
    """The typer option of ContinualConfig field ``name``: its default and help text come from the dataclass."""
    f = _continual_config_module().config_field(name)
    return typer.Option(f.default, *decls, help=f.metadata["help"])


@app.command()
def continual(
    out: Path = typer.Option(..., "--out", help="output directory (one per strategy with --compare)"),
    dataset: str = _config_option("dataset"),
    model: str = _config_option("model"),
    image_size: int | None = _config_option("image_size"),
    tasks: int = _config_option("tasks"),
    steps_per_task: int = _config_option("steps_per_task", "--steps"),
    batch_size: int = _config_option("batch_size"),
    lr: float = _config_option("lr"),
    fisher: str = _config_option("fisher"),
    gd: bool = _config_option("gd", "--gd/--no-gd"),
    non_continual: bool = _config_option("non_continual", "--non-continual"),
    lam: float = _config_option("lam", "--lambda"),
    lambda_units: str = _config_option("lambda_units"),
    rank: int = _config_option("rank"),
    rankk_method: str = _config_option("rankk_method"),
    fisher_samples: int = _config_option("fisher_samples"),
    t_range: str = _config_option("t_range", "--t", "--t-range"),
    replay: str = _config_option("replay"),
    replay_per_class: int = _config_option("replay_per_class"),
    replay_select: str = _config_option("replay_select"),
    replay_code: str = _config_option("replay_code", "--code"),
    budget_bytes: int = _config_option("budget_bytes"),
    replay_batch: int = _config_option("replay_batch"),
    energy_records: bool = _config_option("energy_records", "--energy-records/--no-energy-records"),
    gd_weight: float = _config_option("gd_weight"),
    fid_features: str = _config_option("fid_features"),
    inception_weights: str | None = _config_option("inception_weights"),
    n_generated: int = _config_option("n_generated"),
    sample_steps: int = _config_option("sample_steps"),
    classifier_steps: int = _config_option("classifier_steps"),
    data_root: str | None = _config_option("data_root"),
    seeds: str = typer.Option("0", help="comma-separated seeds, e.g. 0,1,2 (mean ± standard error)"),
    compare: bool = typer.Option(
        False, "--compare", help="finetune, diag, rank1, gd, diag+gd, rank1+gd, non-continual"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last completed task"),
    max_memory: int = memory_option(
        "the Fisher estimate's per-sample gradients (not part of the run's identity; may change float rounding)"
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet"),
    threads: int | None = threads_option(),
) -> None:
    """Class-incremental continual learning: EWC (diag/rank-1/rank-k/full), distillation, FID and forgetting."""
    from dataclasses import fields

    from geomprobe.continual.runner import (
        ContinualConfig,
        check_world,
        run_compare,
        run_continual,
        summary_dict,
        total_steps,
    )

    options = locals()
    from geomprobe.io import check_output

    check_output(out, "dir")
    config = ContinualConfig(**{f.name: options[f.name] for f in fields(ContinualConfig)})
    from geomprobe.distributed import dist_info, init_dist
    from geomprobe.models import resolve_device

    memory = max_memory
    seed_list = _parse_seeds(seeds)
    if not compare:
        config.validate()
    rank, world = dist_info()
    check_world(config, world, every_strategy=compare)
    quiet = quiet or rank != 0  # under torchrun rank 0 alone prints
    init_dist(world, resolve_device(device))  # one process group for every run of --compare (closed at exit)
    total = total_steps(config, seed_list) * (7 if compare else 1)
    with progress_bar("continual", total, quiet) as update:
        progress = lambda done, fields: update(done, **fields)  # noqa: E731
        if compare:
            results = run_compare(
                config, out, seed_list, resume=resume, progress=progress, device=device, max_memory=memory
            )
        else:
            results = [
                run_continual(
                    config, out, seed_list, resume=resume, progress=progress, device=device, max_memory=memory
                )
            ]
    if json_out:
        if rank == 0:
            print_json([summary_dict(r) for r in results])
        return
    T = str(config.tasks)
    table = Table(
        title=f"{dataset}: AFID@{T} and forgetting (↓), {len(seed_list)} seed(s), features {results[0].feature_net}"
    )
    for col in ("method", "AFID", "F", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(
            r.strategy,
            _fmt_ms(*r.afid[T]),
            _fmt_ms(*r.forgetting),
            _fmt_ms(100 * r.final_accuracy[0], 100 * r.final_accuracy[1]) + "%",
            f"{r.seconds:.0f}",
        )
    console(quiet).print(table)
    if not compare:
        res = results[0]
        grid = Table(title=f"FID_i(m_k), seed {res.seeds[0].seed} (rows: after task k; columns: task i)")
        grid.add_column("k")
        for i in range(config.tasks):
            grid.add_column(str(i), justify="right")
        grid.add_column("AFID@k", justify="right")
        for k, row in sorted(res.seeds[0].fid.items()):
            grid.add_row(
                str(k),
                *[f"{row[i]:.1f}" if i in row else "" for i in range(config.tasks)],
                f"{res.seeds[0].afid[str(k + 1)]:.1f}",
            )
        console(quiet).print(grid)
    console(quiet).print(f"wrote {out}/metrics.jsonl")


# ---------------------------------------------------------------- spectrum (analysis)


@app.command()
def spectrum(
    grads_store: Path | None = typer.Option(
        None, "--grads", help="gradient store directory (written by `geomprobe grads`)"
    ),
    ckpt: Path | None = typer.Option(
        None, "--ckpt", help="a model instead of a store: exact Gram matrix over parameter blocks, no stored G"
    ),
    t_range: str | None = typer.Option(
        None, "--t", "--t-range", help="t-spec or band (default with --grads: every key of the store)"
    ),
    samples: int = typer.Option(1024, help="with --ckpt: samples per t (the rows `grads` would store)"),
    classes: str | None = typer.Option(None, help="with --ckpt: only these classes, e.g. '0,1'"),
    split: str = typer.Option("train", help="with --ckpt: train | test"),
    params: str | None = typer.Option(None, help="with --ckpt: regex on parameter names (default: all)"),
    target: str = typer.Option("empirical", help="with --ckpt: empirical | true"),
    seed: int = typer.Option(0, help="with --ckpt: random seed of the rows (as for `grads`)"),
    data_root: Path | None = typer.Option(None, help="with --ckpt: directory with the dataset's files"),
    dataset: str | None = typer.Option(None, help="with --ckpt: the images to probe with (default: the checkpoint's)"),
    resize: bool = typer.Option(
        False, "--resize", help="with --ckpt: bring the dataset's images to the model's size and channels"
    ),
    top_k: int = typer.Option(5, "--top-k", help="eigenvalues per t, and the rank of the best rank-k error"),
    as_json: bool = typer.Option(False, "--json", help="print spectrum.json to stdout instead of the table"),
    centered: bool = typer.Option(False, "--centered", help="covariance (G - 1 mu^T) instead of the second moment"),
    max_memory: int = memory_option("one t: row blocks (or one parameter block of all rows) + the n x n Gram matrix"),
    out: Path | None = typer.Option(
        None, "--out", help="directory for spectrum.json and cosine_maps.h5 (default: the store)"
    ),
    model: bool = typer.Option(
        True, "--model/--no-model", help="with --grads: the scaled-identity MSE from the store's checkpoint"
    ),
    gram_dtype: str = typer.Option(
        "float64",
        help="with --grads: float64 | float32 products for the Gram matrix (float32: 2x faster, small eigenvalues less exact)",
    ),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
    bootstrap: int = typer.Option(
        0,
        "--bootstrap",
        metavar="B",
        help="with --grads: 95% percentile intervals over B row resamples (e.g. 200; 0 = off)",
    ),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="seed of the resamples and of the n-sweep null"),
    n_sweep: str | None = typer.Option(
        None, "--n-sweep", help="with --grads: statistics on the first m rows, e.g. 64,128,256,512,1024"
    ),
    shares: bool = typer.Option(
        False, "--shares", help="with --grads: shares of ||mu||^2, ||v1||^2, tr F per UNet block and tensor"
    ),
    from_spectra: list[Path] | None = typer.Option(
        None, "--from", help="summarise spectrum.json of several stores (mean ± s.e.); repeat"
    ),
    threads: int | None = threads_option(),
) -> None:
    """Fisher spectra per t from a gradient store (--grads) or a model (--ckpt): gaps, errors, intervals, cosine maps."""
    from geomprobe.errors import UsageError
    from geomprobe.io import check_classes, check_count, check_output, check_seed

    if out is not None:
        check_output(out, "dir")
    if from_spectra:
        return _spread_of_spectra(from_spectra, out, as_json, quiet)
    if (grads_store is None) == (ckpt is None):
        raise UsageError("give either --grads STORE or --ckpt MODEL (or --from SPECTRUM ... to summarise several)")
    if ckpt is not None and out is None:
        raise UsageError("--ckpt needs --out DIR for spectrum.json (the model directory is not written to)")
    check_seed(seed)
    check_seed(bootstrap_seed, "--bootstrap-seed")
    check_count(samples, "--samples", 1, MAX_GRAM_ROWS)
    check_count(top_k, "--top-k")
    check_count(bootstrap, "--bootstrap", 0, 100_000)
    check_classes(classes)

    from geomprobe.analysis import write_spectrum
    from geomprobe.analysis.uncertainty import UncertaintyOptions, parse_sizes
    from geomprobe.models import resolve_device

    options = UncertaintyOptions(bootstrap=bootstrap, seed=bootstrap_seed, n_sweep=parse_sizes(n_sweep), shares=shares)
    if ckpt is not None and options.active:
        raise UsageError("--bootstrap, --n-sweep and --shares need the stored rows: use them with --grads")
    dev = str(resolve_device(device))
    rank = int(os.environ.get("RANK", "0"))  # under torchrun (spectrum --ckpt) rank 0 alone writes and prints
    quiet = quiet or rank != 0
    with progress_bar("spectrum", 1, quiet or as_json) as update:
        if ckpt is not None:
            from geomprobe.probe import ExtractConfig

            config = ExtractConfig(
                ckpt=str(ckpt),
                t_range=t_range or "",
                samples=samples,
                classes=classes,
                split=split,
                params=params,
                target=target,
                seed=seed,
                data_root=str(data_root) if data_root else None,
                dataset=dataset,
                resize=resize,
            )
            result = _spectrum_of_model(config, top_k, centered, max_memory, dev, update)
        else:
            result = _spectrum_of_store(
                grads_store, t_range, top_k, centered, max_memory, model, dev, update, gram_dtype, options
            )
    if rank != 0:
        return
    json_path, maps_path = write_spectrum(result, None, out)
    if as_json:
        print_json(result.to_json())
        return
    _print_spectrum(result, top_k, centered, quiet)
    console(quiet).print(f"wrote {json_path} and {maps_path}")


MAX_GRAM_ROWS = 2**17
"""``spectrum --ckpt --samples``: at most this many rows (the n x n float64 Gram matrix is then 128 GiB)."""


def _spread_of_spectra(paths, out, as_json: bool, quiet: bool) -> None:
    """``spectrum --from``: mean ± standard error of every number over several spectrum.json."""
    from geomprobe.analysis.uncertainty import write_spread

    summary, path = write_spread(paths, out)
    if as_json:
        print_json(summary)
    for row in [] if as_json else summary["rows"]:
        m, e = row["mean"].get("lambda2_over_lambda1"), row["se"].get("lambda2_over_lambda1")
        console(quiet).print(
            f"t={row['t']}: λ2/λ1 = {m:.3g} ± {e if e is None else format(e, '.2g')} ({row['count']} stores)"
        )
    console(quiet or as_json).print(f"wrote {path}")


def _spectrum_of_store(path, t_range, top_k, centered, max_memory, with_model, device, update, gram_dtype, options):
    """analyze_store with a progress bar counting finished keys."""
    from geomprobe.analysis import analyze_store, select_entries
    from geomprobe.probe import GradientStore

    store = GradientStore(path)
    total = len(select_entries(store, t_range))
    finished: set[str] = set()

    def on_block(name: str, done: int, pairs: int) -> None:
        if done == pairs:
            finished.add(name)
        update(len(finished), total=total, key=name)

    return analyze_store(
        store,
        t_range=t_range,
        top_k=top_k,
        centered=centered,
        max_memory=max_memory,
        with_model=with_model,
        progress=on_block,
        device=device,
        gram_dtype=gram_dtype,
        uncertainty=options,
    )


def _spectrum_of_model(config, top_k, centered, max_memory, device, update):
    """analyze_model with a progress bar counting parameter blocks over all keys."""
    from geomprobe.analysis.model_spectrum import analyze_model

    if not config.t_range:
        from geomprobe.errors import UsageError

        raise UsageError("--ckpt needs --t (e.g. 100..900)")
    done_keys: list[str] = []

    def on_block(key: str, done: int, blocks: int) -> None:
        if done == blocks:
            done_keys.append(key)
        update(len(done_keys), total=len(done_keys) + (0 if done == blocks else 1), key=key, blocks=f"{done}/{blocks}")

    return analyze_model(
        config, top_k=top_k, centered=centered, max_memory=max_memory, progress=on_block, device=device
    )


def _print_spectrum(result, top_k: int, centered: bool, quiet: bool) -> None:
    """The spectrum table (one row per t or band), interval / n-sweep / share tables, notes, on stderr."""
    from geomprobe.analysis.uncertainty import summary_tables

    report = result.to_json()
    con = console(quiet)
    if not con.is_terminal:  # rich assumes 80 columns off a terminal; the table has up to 17
        con = Console(stderr=True, quiet=quiet, width=170)
    kind = "covariance" if centered else "empirical Fisher"
    P = report["rows"][0]["P"] if report["rows"] else 0
    table = Table(title=f"{kind} spectrum of {result.store} (P={P:,})")
    k = min(top_k, max((len(row["eigenvalues"]) for row in report["rows"]), default=top_k))  # at most n exist
    for col in (
        "t",
        "SNR",
        "n",
        *[f"λ{j + 1}" for j in range(k)],
        "λ2/λ1",
        "λ1/Σλ",
        "err_diag",
        "err_rank1",
        f"err_rank{k}",
        "med |cos|",
        "cos(v1,μ)",
        "id-MSE",
    ):
        table.add_column(col, justify="right")

    def fmt(x, spec=".3g"):
        return "–" if x is None else format(x, spec)

    for row in report["rows"]:
        eig = row["eigenvalues"] + [None] * (k - len(row["eigenvalues"]))
        table.add_row(
            str(row["t"]),
            fmt(row["snr"]),
            str(row["n"]),
            *[fmt(e) for e in eig[:k]],
            fmt(row["lambda2_over_lambda1"]),
            fmt(row["lambda1_over_trace"]),
            fmt(row["rel_err_diag"]),
            fmt(row["rel_err_rank1"]),
            fmt(next(iter(row["rel_err_rankk"].values()), None)),
            fmt(row["cos_to_mean"]["median"]),
            fmt(row["cos_v1_mu"]),
            fmt(row["scaled_identity_mse"]),
        )
    con.print(table)
    for title, header, lines in summary_tables(report):  # intervals, n-sweep, block shares when computed
        extra = Table(title=title)
        for col in header:
            extra.add_column(col, justify="right")
        for line in lines:
            extra.add_row(*line)
        con.print(extra)
    for note in result.notes:
        con.print(f"note: {note}")


# ---------------------------------------------------------------- audit (the critique's checks)


@app.command()
def audit(
    ckpt: str = typer.Option(
        ..., "--ckpt", help="model directory (geomprobe checkpoint, diffusers pipeline or bare UNet)"
    ),
    checks: str = typer.Option(
        "1,2,3", "--checks", help="1 task dependence, 2 true vs empirical Fisher, 3 stability, 4 band EWC (trains)"
    ),
    t_range: str = typer.Option("100..900", "--t", "--t-range", help="timesteps of checks 1-3 (e.g. 100..900:200)"),
    samples: int = typer.Option(256, "--samples", help="rows per store (check 1: samples // tasks per task)"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="noise draws of checks 1-3 and training seeds of check 4"),
    out: Path = typer.Option(Path("audit"), "--out", help="output directory (rerun to resume)"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset (default: the checkpoint's)"),
    data_root: str | None = _config_option("data_root"),
    bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates per statistic"),
    tasks: int = _config_option("tasks"),
    model: str = _config_option("model"),
    image_size: int | None = _config_option("image_size"),
    steps_per_task: int = _config_option("steps_per_task", "--steps"),
    fisher_samples: int = _config_option("fisher_samples"),
    lam: float = _config_option("lam", "--lambda"),
    n_generated: int = _config_option("n_generated"),
    replay_per_class: int = _config_option("replay_per_class"),
    sample_steps: int = _config_option("sample_steps"),
    classifier_steps: int = _config_option("classifier_steps"),
    max_memory: int = memory_option("per-sample gradients and Gram matrices"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print audit.json on stdout"),
    quiet: bool = typer.Option(False, "--quiet"),
    threads: int | None = threads_option(),
) -> None:
    """The critique's four checks of the rank-1 claim, measured: verdict table and audit.json."""
    from geomprobe.io import check_output

    check_output(out, "dir")
    seed_list = _parse_seeds(seeds)
    from geomprobe.audit import AuditConfig, parse_checks, run_audit
    from geomprobe.continual.config import ContinualConfig

    check_list = parse_checks(checks)
    continual_config = None
    if 4 in check_list:
        continual_config = ContinualConfig(
            dataset=dataset or "digits",
            model=model,
            image_size=image_size,
            tasks=tasks,
            steps_per_task=steps_per_task,
            fisher="rank1",
            gd=True,
            lam=lam,
            fisher_samples=fisher_samples,
            n_generated=n_generated,
            replay_per_class=replay_per_class,
            sample_steps=sample_steps,
            classifier_steps=classifier_steps,
            data_root=data_root,
        )
        continual_config.validate()
    config = AuditConfig(
        ckpt=ckpt,
        checks=check_list,
        t_range=t_range,
        samples=samples,
        seeds=tuple(seed_list),
        dataset=dataset,
        data_root=data_root,
        tasks=tasks,
        bootstrap=bootstrap,
        continual=continual_config,
    )
    con = console(quiet)
    doc = run_audit(config, out, device=device, max_memory=max_memory, progress=lambda s: None if quiet else con.log(s))
    if json_out:
        print_json(doc)
        return
    _print_verdicts(doc, con)
    con.print(f"wrote {out}/audit.json (figures: geomprobe figures --from {out})")


def _print_verdicts(doc: dict, con: Console) -> None:
    table = Table(title=f"audit of {doc['checkpoint']['path']}: t={doc['t']}, n={doc['samples']}, seeds={doc['seeds']}")
    for col in ("claim", "measured", "supports"):
        table.add_column(col)
    for v in doc["verdicts"]:
        table.add_row(v["claim"], v["measurement"], v["supports"])
    con.print(table)


# ---------------------------------------------------------------- entry point


def main() -> None:
    """Run the ``geomprobe`` command line."""
    app()


if __name__ == "__main__":
    main()

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

from geomprobe.allocator import retain_freed_memory
from geomprobe.errors import GeomprobeError


class _GeomprobeGroup(TyperGroup):
    """Turns project errors into one line on stderr and a non-zero exit (never a traceback)."""

    def invoke(self, ctx):  # noqa: D401 - click API
        retain_freed_memory()  # fewer page faults for per-batch temporaries (geomprobe/allocator.py)
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


def memory_option(what: str):
    """The one ``--max-memory`` option: parsed once here into bytes (geomprobe.io.parse_memory)."""
    from geomprobe.io import DEFAULT_MAX_MEMORY, parse_memory

    return typer.Option(
        f"{DEFAULT_MAX_MEMORY // 2**30}G", "--max-memory", parser=parse_memory, metavar="SIZE",
        help=f"memory budget for {what}, e.g. 512M or 4G",
    )


def console(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet)


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False, unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``update(completed, **fields)``.

    The bar appears at the first update, so input errors raised before any work starts print
    as a single line. ``fields`` (e.g. ``loss=1.23``) are shown after the bar.
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    prog = Progress(*columns, console=console(quiet), disable=quiet, transient=False)
    task = prog.add_task(description, total=total, info="")
    started = False

    def update(completed: int, total: int | None = None, **fields: float) -> None:
        nonlocal started
        if not started:
            prog.start()
            started = True
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        prog.update(task, completed=completed, total=total, info=info + (f" {unit}" if unit and info else ""))

    try:
        yield update
    finally:
        if started:
            prog.stop()


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


# ---------------------------------------------------------------- grads (probe engine)


@app.command()
def grads(
    ckpt: Path = typer.Option(..., "--ckpt", help="checkpoint directory"),
    t: str = typer.Option(..., "--t", help="t-spec: '100..900', '100..900:50', '100,300' or a band 'low-snr'"),
    out: Path = typer.Option(..., "--out", help="gradient store directory to write (or resume)"),
    samples: int = typer.Option(1024, help="samples per timestep (the same samples at every t)"),
    classes: Optional[str] = typer.Option(None, help="only these classes, e.g. '0,1' or '0..4'"),
    split: str = typer.Option("train", help="train | test"),
    params: Optional[str] = typer.Option(None, help="regex on parameter names (default: all parameters)"),
    target: str = typer.Option("empirical", help="empirical (eps) | true (eps_theta(x_t).detach() + xi)"),
    project: Optional[int] = typer.Option(None, help="store a seeded random projection of the rows to K dims"),
    dtype: str = typer.Option("float32", help="storage dtype: float32 | float16"),
    max_memory: int = memory_option("one chunk of per-sample gradients"),
    shard_rows: int = typer.Option(256, help="samples per shard (the unit of resume and of torchrun work)"),
    data_root: Optional[Path] = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a store made by a different command"),
    seed: int = typer.Option(0, help="random seed (sample choice, noise, band timesteps, projection)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
) -> None:
    """Per-sample gradients at chosen timesteps into an HDF5 gradient store (resumable, torchrun-aware)."""
    from geomprobe.probe import ExtractConfig, extract_gradients
    from geomprobe.probe.extract import dist_info

    config = ExtractConfig(
        ckpt=str(ckpt), t=t, samples=samples, classes=classes, split=split, params=params, target=target,
        project=project, dtype=dtype, seed=seed, data_root=str(data_root) if data_root else None, shard_rows=shard_rows,
    )
    config.validate()
    quiet = quiet or dist_info()[0] != 0
    with progress_bar("grads", 1, quiet) as update:
        result = extract_gradients(
            config, out, overwrite=overwrite, device=device, max_memory=max_memory, command=list(sys.argv),
            progress=lambda done, total, **f: update(done, total=total, **{k: v for k, v in f.items() if k != "key"}),
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
    from_dirs: list[Path] = typer.Option(..., "--from", help="run directories to search for spectrum.json, metrics.jsonl, ... (repeat or list)"),
    more_dirs: Optional[list[Path]] = typer.Argument(None, help="further run directories (so '--from a b c' works)", show_default=False),
    out: Path = typer.Option(Path("figures"), "--out", help="directory for the PNG/PDF figures, captions and tables"),
    json_out: bool = typer.Option(False, "--json", help="print what was written and skipped as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet", help="no table"),
) -> None:
    """Every paper figure and table that the stored results allow (reads results, recomputes nothing)."""
    from geomprobe.figures import make_figures

    run_dirs = list(from_dirs) + list(more_dirs or [])
    report = make_figures(run_dirs, out)
    if json_out:
        print_json({"out": str(report.out_dir), "figures": {f.name: [str(p) for p in f.files] for f in report.made},
                    "skipped": dict(report.skipped)})
        return
    table = Table(title=f"figures in {report.out_dir}")
    table.add_column("figure")
    table.add_column("files / why not")
    for fig in report.made:
        table.add_row(fig.name, " ".join(p.suffix.lstrip(".") for p in fig.files))
    for name, why in report.skipped:
        table.add_row(f"[dim]{name}[/]", f"[dim]skipped: {why}[/]")
    console(quiet).print(table)


@app.command()
def reproduce(
    preset: str = typer.Option("quick", help="quick (digits, Small-3, minutes on CPU) | paper (MNIST, base + Small-1/3, GPU)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<preset>)"),
    with_continual: bool = typer.Option(False, "--with-continual", help="also run the continual-learning comparison (Fig. 4, Tables)"),
    data_root: Optional[Path] = typer.Option(None, help="dataset files for the paper preset (MNIST IDX files)"),
    steps: Optional[int] = typer.Option(None, help="override the preset's training steps (quick: 3000)"),
    samples: Optional[int] = typer.Option(None, help="override the preset's samples per timestep (quick: 1024)"),
    models: Optional[str] = typer.Option(None, help="override the preset's UNets, e.g. small1,small3,base (Fig. 6 compares sizes)"),
    seed: int = typer.Option(0, help="random seed of training, probing and continual runs"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display or table"),
) -> None:
    """Train -> grads -> spectrum -> figures (-> continual) in one resumable command."""
    from rich.progress import Progress, SpinnerColumn

    from geomprobe.reproduce import get_preset, reproduce as run_reproduce, stage_keys

    chosen = get_preset(preset)
    if models:
        import dataclasses

        from geomprobe.models import get_preset as get_model_preset

        names = tuple(m.strip() for m in models.split(",") if m.strip())
        for name in names:
            get_model_preset(name)
        chosen = dataclasses.replace(chosen, models=names)
    out = out or Path("runs") / chosen.name
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console(quiet), disable=quiet) as prog:
        tasks = {key: prog.add_task(label, total=None, info="[dim]waiting[/]", start=False)
                 for key, label in stage_keys(chosen, with_continual)}

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

        overrides = {k: v for k, v in (("train_steps", steps), ("samples", samples)) if v is not None}
        result = run_reproduce(chosen, out, with_continual=with_continual, seed=seed, device=device,
                               data_root=str(data_root) if data_root else None, progress=_Display(), **overrides)
    table = Table(title=f"reproduce --preset {chosen.name}: {result.out} ({result.seconds:.0f} s)")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for s in result.stages:
        table.add_row(s.stage, s.status, f"{s.seconds:.1f}", str(s.output))
    console(quiet).print(table)
    console(quiet).print(f"{len(result.figures)} figure files in {out / 'figures'}"
                         + (f"; not made: {', '.join(n for n, _ in result.skipped_figures)}" if result.skipped_figures else ""))


# ---------------------------------------------------------------- continual (continual learning)


def _parse_seeds(text: str) -> list[int]:
    from geomprobe.errors import UsageError

    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise UsageError(f"malformed --seeds {text!r}; use e.g. '0,1,2'") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    return seeds


def _fmt_ms(mean: float, err: float) -> str:
    return f"{mean:.1f}" if err != err else f"{mean:.1f} ± {err:.1f}"


@app.command()
def continual(
    out: Path = typer.Option(..., "--out", help="output directory (one per strategy with --compare)"),
    dataset: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | imagenet32"),
    model: str = typer.Option("small3", help="UNet preset"),
    image_size: Optional[int] = typer.Option(None, help="digits only: 8, 16 (default) or 32"),
    tasks: int = typer.Option(5, help="number of class-incremental tasks"),
    steps: int = typer.Option(500, help="optimiser steps per task (quick preset: 500)"),
    batch_size: int = typer.Option(128, help="images of the current task per step"),
    lr: float = typer.Option(1e-3, help="Adam learning rate (restarted at each task)"),
    fisher: str = typer.Option("none", help="EWC Fisher: none | diag | rank1 | rankk | full"),
    gd: bool = typer.Option(False, "--gd/--no-gd", help="generative distillation from the previous task's model"),
    non_continual: bool = typer.Option(False, "--non-continual", help="train on all tasks seen so far (upper bound)"),
    lam: float = typer.Option(15000.0, "--lambda", help="EWC penalty weight lambda (paper: 15000; see --lambda-units)"),
    lambda_units: str = typer.Option("paper", help="paper: lambda weighs the per-pixel-mean MSE Fisher as in the paper (applied as 2*lambda/D for our summed loss) | raw: used as is"),
    rank: int = typer.Option(5, help="rank k of --fisher rankk"),
    rankk_method: str = typer.Option("power", help="rank-k estimate: power (stochastic power iteration) | lanczos"),
    fisher_samples: int = typer.Option(256, help="probe samples per task for the Fisher estimate"),
    t_range: str = typer.Option("all", help="timesteps of the Fisher estimate: all | low-snr | mid-snr | high-snr | 100..900 ..."),
    replay: str = typer.Option("auto", help="replay images: generative | real | none (auto: generative with --gd)"),
    replay_per_class: int = typer.Option(64, help="replay images per earlier class (paper: 5000)"),
    replay_batch: int = typer.Option(64, help="replay images per step"),
    gd_weight: float = typer.Option(1.0, help="weight of the distillation loss"),
    fid_features: str = typer.Option("classifier", help="classifier (cached small CNN) | inception"),
    inception_weights: Optional[Path] = typer.Option(None, help="local Inception weights for --fid-features inception"),
    n_generated: int = typer.Option(128, help="generated samples per task for FID"),
    sample_steps: int = typer.Option(50, help="DDIM steps for evaluation and replay"),
    seeds: str = typer.Option("0", help="comma-separated seeds, e.g. 0,1,2 (mean ± standard error)"),
    compare: bool = typer.Option(False, "--compare", help="finetune, diag, rank1, gd, diag+gd, rank1+gd, non-continual"),
    data_root: Optional[Path] = typer.Option(None, help="directory with the dataset's files (all but digits)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last completed task"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Class-incremental continual learning: EWC (diag/rank-1/rank-k/full), distillation, FID and forgetting."""
    from geomprobe.continual.runner import ContinualConfig, run_compare, run_continual, summary_dict, total_steps

    config = ContinualConfig(
        dataset=dataset, model=model, image_size=image_size if image_size is not None else (16 if dataset == "digits" else 32),
        tasks=tasks, steps_per_task=steps, batch_size=batch_size, lr=lr, fisher=fisher, gd=gd, non_continual=non_continual,
        lam=lam, lambda_units=lambda_units, rank=rank, rankk_method=rankk_method, fisher_samples=fisher_samples, t_range=t_range, replay=replay,
        replay_per_class=replay_per_class, replay_batch=replay_batch, gd_weight=gd_weight, fid_features=fid_features,
        inception_weights=str(inception_weights) if inception_weights else None, n_generated=n_generated,
        sample_steps=sample_steps, data_root=str(data_root) if data_root else None,
    )
    seed_list = _parse_seeds(seeds)
    if not compare:
        config.validate()
    total = total_steps(config, seed_list) * (7 if compare else 1)
    with progress_bar("continual", total, quiet) as update:
        progress = lambda done, fields: update(done, **fields)  # noqa: E731
        if compare:
            results = run_compare(config, out, seed_list, resume=resume, progress=progress, device=device)
        else:
            results = [run_continual(config, out, seed_list, resume=resume, progress=progress, device=device)]
    if json_out:
        print_json([summary_dict(r) for r in results])
        return
    T = str(config.tasks)
    table = Table(title=f"{dataset}: AFID@{T} and forgetting (↓), {len(seed_list)} seed(s), features {results[0].feature_net}")
    for col in ("method", "AFID", "F", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(r.strategy, _fmt_ms(*r.afid[T]), _fmt_ms(*r.forgetting), _fmt_ms(100 * r.final_accuracy[0], 100 * r.final_accuracy[1]) + "%",
                      f"{r.seconds:.0f}")
    console(quiet).print(table)
    if not compare:
        res = results[0]
        grid = Table(title=f"FID_i(m_k), seed {res.seeds[0].seed} (rows: after task k; columns: task i)")
        grid.add_column("k")
        for i in range(config.tasks):
            grid.add_column(str(i), justify="right")
        grid.add_column("AFID@k", justify="right")
        for k, row in sorted(res.seeds[0].fid.items()):
            grid.add_row(str(k), *[f"{row[i]:.1f}" if i in row else "" for i in range(config.tasks)], f"{res.seeds[0].afid[str(k + 1)]:.1f}")
        console(quiet).print(grid)
    console(quiet).print(f"wrote {out}/metrics.jsonl")


# ---------------------------------------------------------------- spectrum (analysis)


@app.command()
def spectrum(
    grads_store: Path | None = typer.Option(None, "--grads", help="gradient store directory (written by `geomprobe grads`)"),
    t_range: Optional[str] = typer.Option(None, "--t-range", help="t-spec or band to analyse (default: every key of the store)"),
    top_k: int = typer.Option(5, "--top-k", help="eigenvalues per t, and the rank of the best rank-k error"),
    as_json: bool = typer.Option(False, "--json", help="print spectrum.json to stdout instead of the table"),
    centered: bool = typer.Option(False, "--centered", help="covariance (G - 1 mu^T) instead of the second moment"),
    max_memory: int = memory_option("one t: two row blocks + the n x n Gram matrix"),
    out: Optional[Path] = typer.Option(None, "--out", help="directory for spectrum.json and cosine_maps.h5 (default: the store)"),
    model: bool = typer.Option(True, "--model/--no-model", help="compute the scaled-identity MSE with the store's checkpoint"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or table"),
    bootstrap: int = typer.Option(0, "--bootstrap", metavar="B", help="95% percentile intervals over B row resamples (e.g. 200; 0 = off)"),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="seed of the resamples and of the n-sweep null"),
    n_sweep: str | None = typer.Option(None, "--n-sweep", help="statistics on the first m rows, e.g. 64,128,256,512,1024"),
    shares: bool = typer.Option(False, "--shares", help="shares of ||mu||^2, ||v1||^2, tr F per UNet block and tensor"),
    from_spectra: list[Path] | None = typer.Option(None, "--from", help="summarise spectrum.json of several stores (mean ± s.e.); repeat"),
) -> None:
    """Fisher spectra per t from a gradient store: gaps, rank-1/diag/rank-k errors, cosine maps."""
    from geomprobe.analysis import analyze_store, select_entries, write_spectrum
    from geomprobe.analysis.uncertainty import UncertaintyOptions, parse_sizes, summary_tables, write_spread
    from geomprobe.errors import UsageError
    from geomprobe.models import resolve_device
    from geomprobe.probe import GradientStore

    if from_spectra:
        summary, path = write_spread(from_spectra, out)
        if as_json:
            print_json(summary)
        for row in [] if as_json else summary["rows"]:
            m, e = row["mean"].get("lambda2_over_lambda1"), row["se"].get("lambda2_over_lambda1")
            console(quiet).print(f"t={row['t']}: λ2/λ1 = {m:.3g} ± {e if e is None else format(e, '.2g')} ({row['count']} stores)")
        console(quiet or as_json).print(f"wrote {path}")
        return
    if grads_store is None:
        raise UsageError("give --grads STORE (or --from SPECTRUM ... to summarise several spectra)")
    options = UncertaintyOptions(bootstrap=bootstrap, seed=bootstrap_seed, n_sweep=parse_sizes(n_sweep), shares=shares)
    store = GradientStore(grads_store)
    total = len(select_entries(store, t_range))
    finished: set[str] = set()
    with progress_bar("spectrum", total, quiet or as_json) as update:

        def on_block(name: str, done: int, pairs: int) -> None:
            if done == pairs:
                finished.add(name)
            update(len(finished), key=name)

        result = analyze_store(
            store, t_range=t_range, top_k=top_k, centered=centered, max_memory=max_memory, with_model=model,
            progress=on_block, device=str(resolve_device(device)), uncertainty=options,
        )
    json_path, maps_path = write_spectrum(result, store, out)
    report = result.to_json()
    if as_json:
        print_json(report)
        return
    con = console(quiet)
    if not con.is_terminal:  # rich assumes 80 columns off a terminal; the table has up to 17
        con = Console(stderr=True, quiet=quiet, width=170)
    kind = "covariance" if centered else "empirical Fisher"
    table = Table(title=f"{kind} spectrum of {store.path} (P={store.P:,})")
    k = top_k
    for col in ("t", "SNR", "n", *[f"λ{j + 1}" for j in range(k)], "λ2/λ1", "λ1/Σλ", "err_diag", "err_rank1", f"err_rank{k}", "med |cos|", "cos(v1,μ)", "id-MSE"):
        table.add_column(col, justify="right")

    def fmt(x, spec=".3g"):
        return "–" if x is None else format(x, spec)

    for row in report["rows"]:
        eig = row["eigenvalues"] + [None] * (k - len(row["eigenvalues"]))
        table.add_row(
            str(row["t"]), fmt(row["snr"]), str(row["n"]), *[fmt(e) for e in eig[:k]],
            fmt(row["lambda2_over_lambda1"]), fmt(row["lambda1_over_trace"]), fmt(row["rel_err_diag"]),
            fmt(row["rel_err_rank1"]), fmt(row["rel_err_rankk"][str(k)]), fmt(row["cos_to_mean"]["median"]),
            fmt(row["cos_v1_mu"]), fmt(row["scaled_identity_mse"]),
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
    con.print(f"wrote {json_path} and {maps_path}")


# ---------------------------------------------------------------- entry point


def main() -> None:
    app()


if __name__ == "__main__":
    main()

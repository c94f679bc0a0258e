"""``geomprobe figures`` and ``geomprobe reproduce``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    console,
    print_json,
    threads_option,
)


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

"""``geomprobe continual``: class-incremental training with EWC, distillation and replay."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    config_option,
    console,
    mean_pm,
    memory_option,
    parse_seeds,
    print_json,
    progress_bar,
    threads_option,
)


@app.command()
def continual(
    out: Path = typer.Option(..., "--out", help="output directory (one per strategy with --compare)"),
    dataset: str = config_option("dataset"),
    model: str = config_option("model"),
    image_size: int | None = config_option("image_size"),
    tasks: int = config_option("tasks"),
    steps_per_task: int = config_option("steps_per_task", "--steps"),
    batch_size: int = config_option("batch_size"),
    lr: float = config_option("lr"),
    precision: str = config_option("precision"),
    fisher: str = config_option("fisher"),
    gd: bool = config_option("gd", "--gd/--no-gd"),
    non_continual: bool = config_option("non_continual", "--non-continual"),
    lam: float = config_option("lam", "--lambda"),
    lambda_units: str = config_option("lambda_units"),
    rank: int = config_option("rank"),
    rankk_method: str = config_option("rankk_method"),
    fisher_samples: int = config_option("fisher_samples"),
    t_range: str = config_option("t_range", "--t", "--t-range"),
    replay: str = config_option("replay"),
    replay_per_class: int = config_option("replay_per_class"),
    replay_select: str = config_option("replay_select"),
    replay_code: str = config_option("replay_code", "--code"),
    budget_bytes: int = config_option("budget_bytes"),
    replay_batch: int = config_option("replay_batch"),
    energy_records: bool = config_option("energy_records", "--energy-records/--no-energy-records"),
    gd_weight: float = config_option("gd_weight"),
    fid_features: str = config_option("fid_features"),
    inception_weights: str | None = config_option("inception_weights"),
    n_generated: int = config_option("n_generated"),
    sample_steps: int = config_option("sample_steps"),
    classifier_steps: int = config_option("classifier_steps"),
    data_root: str | None = config_option("data_root"),
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
    seed_list = parse_seeds(seeds)
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
    con = console(quiet)
    con.print(_summary_table(results, dataset, config.tasks, len(seed_list)))
    if not compare:
        con.print(_fid_grid(results[0], config.tasks))
    con.print(f"wrote {out}/metrics.jsonl")


def _summary_table(results: list, dataset: str, tasks: int, seeds: int) -> Table:
    """AFID@T, forgetting, final accuracy and seconds of each strategy (mean ± standard error over seeds)."""
    T = str(tasks)
    table = Table(title=f"{dataset}: AFID@{T} and forgetting (↓), {seeds} seed(s), features {results[0].feature_net}")
    for col in ("method", "AFID", "F", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(
            r.strategy,
            mean_pm(*r.afid[T]),
            mean_pm(*r.forgetting),
            mean_pm(100 * r.final_accuracy[0], 100 * r.final_accuracy[1]) + "%",
            f"{r.seconds:.0f}",
        )
    return table


def _fid_grid(result, tasks: int) -> Table:
    """FID_i(m_k) of the first seed: rows after task k, columns task i, and AFID@k."""
    first = result.seeds[0]
    grid = Table(title=f"FID_i(m_k), seed {first.seed} (rows: after task k; columns: task i)")
    grid.add_column("k")
    for i in range(tasks):
        grid.add_column(str(i), justify="right")
    grid.add_column("AFID@k", justify="right")
    for k, row in sorted(first.fid.items()):
        grid.add_row(
            str(k), *[f"{row[i]:.1f}" if i in row else "" for i in range(tasks)], f"{first.afid[str(k + 1)]:.1f}"
        )
    return grid


# ---------------------------------------------------------------- spectrum (analysis)

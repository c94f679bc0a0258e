"""``geomprobe energy`` and ``geomprobe grads``: per-sample quantities of a model written to files."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    console,
    memory_option,
    num_train_timesteps_of,
    print_json,
    progress_bar,
    threads_option,
)


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
    limit = num_train_timesteps_of(ckpt)
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
        parse_timesteps(t_range, num_train_timesteps_of(ckpt))  # the model's schedule, read as JSON: no torch yet
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

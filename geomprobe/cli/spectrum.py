"""``geomprobe spectrum``: every spectrum number of a gradient store or of a model, with uncertainty."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    console,
    memory_option,
    print_json,
    progress_bar,
    threads_option,
)


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

"""``geomprobe audit``: the critique's four checks, measured."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from geomprobe.cli.app import (
    DEVICE_HELP,
    app,
    config_option,
    console,
    memory_option,
    parse_seeds,
    print_json,
    threads_option,
)


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
    data_root: str | None = config_option("data_root"),
    bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates per statistic"),
    tasks: int = config_option("tasks"),
    model: str = config_option("model"),
    image_size: int | None = config_option("image_size"),
    steps_per_task: int = config_option("steps_per_task", "--steps"),
    fisher_samples: int = config_option("fisher_samples"),
    lam: float = config_option("lam", "--lambda"),
    n_generated: int = config_option("n_generated"),
    replay_per_class: int = config_option("replay_per_class"),
    sample_steps: int = config_option("sample_steps"),
    classifier_steps: int = config_option("classifier_steps"),
    max_memory: int = memory_option("per-sample gradients and Gram matrices"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print audit.json on stdout"),
    quiet: bool = typer.Option(False, "--quiet"),
    threads: int | None = threads_option(),
) -> None:
    """The critique's four checks of the rank-1 claim, measured: verdict table and audit.json."""
    from geomprobe.io import check_output

    check_output(out, "dir")
    seed_list = parse_seeds(seeds)
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

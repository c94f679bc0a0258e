"""Which samples are forgotten (issue 13): energy before a task change against its increase.

Reads ``intrinsic_forgetting.jsonl`` and ``energy-task{k}.h5`` of a continual seed directory (written
by ``geomprobe continual --energy-records``); recomputes nothing but the plotted differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.style import FigureOutput, new_figure, save_figure, series_style, write_caption
from geomprobe.io import read_jsonl

INTRINSIC_FORGETTING = "intrinsic_forgetting.jsonl"
PRODUCER = "geomprobe continual --replay ... --energy-records --out RUN"


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _energy_files(seed_dir: Path) -> list[tuple[int, Path]]:
    files = sorted((int(p.stem.removeprefix("energy-task")), p) for p in seed_dir.glob("energy-task*.h5"))
    if not files:
        raise DataError(f"no energy-task*.h5 in {seed_dir}; run `{PRODUCER}`")
    return files


def fig_energy_scatter(path: str | Path, out_dir: str | Path, stem: str = "fig_energy_forgetting") -> FigureOutput:
    """One panel per task change k: each earlier-task image's energy under m_{k-1} against its increase."""
    import h5py

    path, out_dir = Path(path), Path(out_dir)
    rows = {r["after_task"]: r for r in read_jsonl(path)}
    files = _energy_files(path.parent)
    fig, axes = new_figure(3.0 * len(files), 3.0, ncols=len(files))
    for ax, (k, h5) in zip(axes[0], files, strict=True):
        with h5py.File(h5, "r") as f:
            before, after = f["energy_before"][()].astype(np.float64), f["energy_after"][()].astype(np.float64)
        ax.scatter(before, after - before, s=4, alpha=0.5, color=series_style(0)["color"], linewidths=0)
        ax.axhline(0.0, lw=0.8, color="0.5")
        r = rows.get(k, {})
        lo, hi = (r.get("spearman_ci") or [None, None])[:2]
        ax.set_title(f"after task {k}: ρ = {_num(r.get('spearman')):.2f} [{_num(lo):.2f}, {_num(hi):.2f}]")
        ax.set_xlabel(f"energy under m_{k - 1}")
    axes[0, 0].set_ylabel("energy increase")
    sources = [path, *(p for _, p in files)]
    return _finish(fig, out_dir, stem, "Energy before a task change against its increase", SCATTER_CAPTION, sources)


def fig_energy_correlation(
    paths: list[Path], out_dir: str | Path, stem: str = "fig_energy_correlation"
) -> FigureOutput:
    """Spearman's rho (energy before, increase) per task change with its interval; one series per run and seed."""
    out_dir = Path(out_dir)
    if not paths:
        raise DataError(f"no {INTRINSIC_FORGETTING}; run `{PRODUCER}`")
    fig, axes = new_figure(4.5, 3.2)
    ax = axes[0, 0]
    for i, path in enumerate(paths):
        rows = sorted(read_jsonl(path), key=lambda r: r["after_task"])
        k = np.array([r["after_task"] for r in rows])
        rho = np.array([_num(r["spearman"]) for r in rows])
        ci = np.array([[_num(v) for v in (r.get("spearman_ci") or [None, None])] for r in rows])
        label = f"{rows[0]['strategy']} seed {rows[0]['seed']}" if rows else path.parent.name
        ax.errorbar(k + 0.05 * i, rho, yerr=[rho - ci[:, 0], ci[:, 1] - rho], lw=1.0, capsize=2, label=label,
                    **series_style(i))  # fmt: skip
    ax.axhline(0.0, lw=0.8, color="0.5")
    ax.set(xlabel="task change k (after task k)", ylabel="Spearman ρ(energy before, increase)")
    ax.legend(frameon=False, loc="best")
    return _finish(fig, out_dir, stem, "Do high-energy samples forget more?", CORRELATION_CAPTION, list(paths))


CORRELATION_CAPTION = (
    "Spearman's rank correlation between an earlier-task image's energy before a task change and its energy "
    "increase, per task change, with 95% percentile bootstrap intervals (1000 replicates). Positive: the "
    "high-energy (outlier-like) images are forgotten more, as seed 004 predicts."
)
SCATTER_CAPTION = (
    "Intrinsic forgetting (seed 004): for each task change k, every earlier-task training image's energy "
    "(denoising loss averaged over t = 50..950 and 4 noise draws) under the model before the change against "
    "its increase under the model after it. Titles: Spearman's rho with a 95% percentile bootstrap interval."
)


def _finish(fig, out_dir: Path, stem: str, title: str, body: str, sources: list[Path]) -> FigureOutput:
    """Save the figure (PNG, PDF) and its caption."""
    files = save_figure(fig, out_dir, stem)
    return FigureOutput(stem, files + [write_caption(out_dir, stem, title, body, sources, [])], sources)

"""Continual-learning figures and tables (paper Fig. 4, Fig. 7-14, Tables 1, 5, 6) from ``metrics.jsonl``.

Numbers are read from the runner's rows (docs/design.md §9): AFID@k and forgetting from the
summary rows, FID_i(m_k) from the per-task rows. Across seeds we show the mean and the
standard error (sample standard deviation / sqrt(number of seeds)); with one seed there is
no error band and the caption says so.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.results import (
    CONTINUAL_COMMAND,
    ContinualRuns,
    mean_and_standard_error,
    order_strategies,
)
from geomprobe.figures.style import (
    FigureOutput,
    new_figure,
    save_figure,
    series_style,
    write_caption,
    write_output_text,
)

AFID_PANEL_SIZE = (4.8, 4.0)  # inches per dataset panel of Fig. 4
LEGEND_WIDTH = 1.8
TASK_PANEL_SIZE = (3.0, 2.8)  # inches per task panel of the per-task FID figure
TASK_PANEL_COLUMNS = 5


#: Fixed palette slot per strategy, so a strategy has the same colour and marker in every figure
#: (rank1+gd, the paper's method, in vermillion; yellow, hard to see on white, only for "full").
STRATEGY_STYLE_SLOT = {
    "diag+gd": 0,
    "rank1+gd": 1,
    "diag": 2,
    "rank1": 3,
    "gd": 4,
    "finetune": 5,
    "non-continual": 6,
    "full": 7,
}


def _strategy_styles(strategies: Iterable[str]) -> dict[str, dict]:
    """Colour and marker per strategy: fixed for the paper's strategies, then free slots for others (rank5+gd, ...)."""
    strategies = set(strategies)
    styles = {}
    others = [s for s in order_strategies(strategies) if s not in STRATEGY_STYLE_SLOT]
    for name in strategies:
        if name in STRATEGY_STYLE_SLOT:
            styles[name] = series_style(STRATEGY_STYLE_SLOT[name])
    for i, name in enumerate(others):
        styles[name] = {**series_style(len(STRATEGY_STYLE_SLOT) + i), "linestyle": "--"}  # dashed: colours repeat
    return styles


def _seed_note(seeds: Sequence[int]) -> str:
    if len(seeds) < 2:
        return f"one seed ({', '.join(map(str, seeds)) or 'none'}): no standard-error band"
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): bands are +- one standard error"


def _runs_details(runs: Sequence[ContinualRuns]) -> list[str]:
    lines = []
    for run in runs:
        nets = ", ".join(sorted(run.feature_nets)) or "unknown"
        gen = ", ".join(str(n) for n in sorted(run.n_generated)) or "unknown"
        models = ", ".join(sorted(run.models)) or "unknown (no manifest.json with the runner's config)"
        lines += [
            f"model: [{run.dataset}] {models}",
            f"[{run.dataset}] strategies: {', '.join(run.strategies)}; tasks: {run.num_tasks}",
            f"seeds: [{run.dataset}] {', '.join(map(str, run.seeds))}; FID feature network: {nets}; n generated per task: {gen}",
        ]
    return lines


def _as_run_list(runs) -> list[ContinualRuns]:
    if isinstance(runs, ContinualRuns):
        return [runs]
    if isinstance(runs, dict):
        return list(runs.values())
    return list(runs)


def _standard_error_band(ax, x: np.ndarray, mean: np.ndarray, se: np.ndarray, color: str) -> None:
    """A translucent +- one standard error band (an error bar where the curve has a single point)."""
    if not np.isfinite(se).any():
        return
    if x.size == 1:
        ax.errorbar(x, mean, yerr=np.nan_to_num(se), color=color, capsize=3, lw=1.0, ls="none")
        return
    ax.fill_between(x, mean - np.nan_to_num(se), mean + np.nan_to_num(se), color=color, alpha=0.12, lw=0)


# ---------------------------------------------------------------- Fig. 4


def afid_curve(run: ContinualRuns, strategy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(k = tasks seen, mean AFID@k, standard error, seeds) for one strategy from its summary rows."""
    per_seed = run.afid.get(strategy, {})
    ks = sorted({k for afid in per_seed.values() for k in afid})
    stats = [mean_and_standard_error([afid.get(k, math.nan) for afid in per_seed.values()]) for k in ks]
    return (np.array(ks), np.array([s[0] for s in stats]), np.array([s[1] for s in stats]), len(per_seed))


def fig4_layout(num_datasets: int) -> tuple[float, float]:
    """Figure size (inches) of Fig. 4: one AFID panel per dataset plus the legend column."""
    return (AFID_PANEL_SIZE[0] * num_datasets + LEGEND_WIDTH, AFID_PANEL_SIZE[1])


def fig4_average_fid(runs, out_dir: str | Path, stem: str = "fig4_average_fid") -> FigureOutput:
    """Fig. 4: AFID@k against the number of tasks seen, one line per strategy, one panel per dataset."""
    runs = [r for r in _as_run_list(runs) if r.afid]
    if not runs:
        raise DataError(f"no continual summary rows (with 'afid') found; they are written by {CONTINUAL_COMMAND}")
    styles = _strategy_styles(s for r in runs for s in r.afid)
    fig, axes = new_figure(*fig4_layout(len(runs)), ncols=len(runs))
    handles = {}
    for ax, run in zip(axes[0], runs, strict=True):
        for strategy in order_strategies(run.afid):
            ks, mean, se, _ = afid_curve(run, strategy)
            (line,) = ax.plot(ks, mean, lw=1.6, ms=4, label=strategy, **styles[strategy])
            _standard_error_band(ax, ks, mean, se, styles[strategy]["color"])
            handles[strategy] = line
        ax.set_xlabel("tasks seen k")
        ax.set_ylabel("average FID  AFID@k (lower is better)")
        ax.set_xticks(range(1, run.num_tasks + 1))
        ax.set_title(f"{run.dataset}")
        ax.grid(True, axis="y", color="0.85", lw=0.6)
    ordered = order_strategies(handles)
    fig.legend([handles[s] for s in ordered], ordered, loc="outside right upper", frameon=False, title="strategy")
    fig.suptitle("Fig. 4: average FID during continual learning", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    finals = []
    for run in runs:
        for strategy in order_strategies(run.afid):
            ks, mean, se, _ = afid_curve(run, strategy)
            finals.append(f"{run.dataset} {strategy}: AFID@{ks[-1]} = {mean[-1]:.2f}")
    body = (
        "Average FID over the tasks seen so far, AFID@k = mean_{i<=k} FID_i(m_k), after each task k "
        "(paper Fig. 4). " + "; ".join(_seed_note(r.seeds) for r in runs) + ". " + "; ".join(finals) + "."
    )
    paths = [p for r in runs for p in r.paths]
    caption = write_caption(out_dir, stem, "Fig. 4: AFID@k per strategy", body, paths, _runs_details(runs))
    return FigureOutput(stem, files + [caption], paths)


# ---------------------------------------------------------------- Fig. 7-14 style


def task_fid_curve(run: ContinualRuns, strategy: str, task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(after_task k >= task, mean FID_task(m_k), standard error) over seeds for one strategy."""
    per_seed = run.fid.get(strategy, {})
    ks = sorted({k for cells in per_seed.values() for (k, i) in cells if i == task})
    stats = [mean_and_standard_error([cells.get((k, task), math.nan) for cells in per_seed.values()]) for k in ks]
    return np.array(ks), np.array([s[0] for s in stats]), np.array([s[1] for s in stats])


def task_fid_layout(num_tasks: int) -> tuple[int, int, tuple[float, float]]:
    """(rows, columns, figure size in inches) of the per-task FID grid: one panel per task."""
    cols = min(TASK_PANEL_COLUMNS, num_tasks)
    rows = math.ceil(num_tasks / cols)
    return rows, cols, (TASK_PANEL_SIZE[0] * cols + LEGEND_WIDTH, TASK_PANEL_SIZE[1] * rows + 0.4)


def fig_task_fid(run: ContinualRuns, out_dir: str | Path, stem: str | None = None) -> FigureOutput:
    """Per-task FID curves (paper Fig. 7-14): panel i shows FID_i(m_k) after each task k >= i, one line per strategy."""
    if not run.fid:
        raise DataError(f"no per-task FID rows for {run.dataset}; they are written by {CONTINUAL_COMMAND}")
    stem = stem or f"fig7_task_fid_{_slug(run.dataset)}"
    tasks = sorted({i for per_seed in run.fid.values() for cells in per_seed.values() for (_, i) in cells})
    styles = _strategy_styles(run.fid)
    rows, cols, size = task_fid_layout(len(tasks))
    fig, axes = new_figure(*size, nrows=rows, ncols=cols, sharey=True)
    for ax in axes.ravel()[len(tasks) :]:
        ax.set_axis_off()
    handles = {}
    last_task = max(k for per_seed in run.fid.values() for cells in per_seed.values() for (k, _) in cells)
    for ax, task in zip(axes.ravel(), tasks, strict=False):  # a grid may have more panels than tasks
        for strategy in order_strategies(run.fid):
            ks, mean, se = task_fid_curve(run, strategy, task)
            if ks.size == 0:
                continue
            (line,) = ax.plot(ks, mean, lw=1.4, ms=3.5, **styles[strategy])
            _standard_error_band(ax, ks, mean, se, styles[strategy]["color"])
            handles[strategy] = line
        ax.set_title(f"task {task}")
        ax.set_xlim(-0.3, last_task + 0.3)
        ax.set_xticks(range(0, last_task + 1))
        ax.set_xlabel("after training task k")
        ax.grid(True, axis="y", color="0.85", lw=0.6)
    for r in range(rows):
        axes[r, 0].set_ylabel("FID on task i")
    ordered = order_strategies(handles)
    fig.legend([handles[s] for s in ordered], ordered, loc="outside right upper", frameon=False, title="strategy")
    fig.suptitle(f"Per-task FID during continual learning: {run.dataset}", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    body = (
        f"FID_i(m_k) of each task i (one panel per task) measured after training each task k >= i, {run.dataset} "
        f"(paper Fig. 7-14 style). A rising curve is forgetting. {_seed_note(run.seeds)}."
    )
    caption = write_caption(out_dir, stem, f"Per-task FID curves: {run.dataset}", body, run.paths, _runs_details([run]))
    return FigureOutput(stem, files + [caption], list(run.paths))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "dataset"


# ---------------------------------------------------------------- tables


def _format(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.2f} ± {se:.2f}" if math.isfinite(se) else f"{mean:.2f}"


def final_metrics(run: ContinualRuns, strategy: str) -> dict:
    """AFID@T and forgetting of one strategy: mean, standard error and number of seeds."""
    per_seed = run.afid.get(strategy, {})
    finals = [afid[max(afid)] for afid in per_seed.values() if afid]
    tasks = max((max(afid) for afid in per_seed.values() if afid), default=0)
    afid_mean, afid_se, m = mean_and_standard_error(finals)
    f_mean, f_se, _ = mean_and_standard_error(run.forgetting.get(strategy, {}).values())
    return {
        "tasks": tasks,
        "afid_mean": afid_mean,
        "afid_se": afid_se,
        "forgetting_mean": f_mean,
        "forgetting_se": f_se,
        "seeds": m,
    }


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [
                "" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.6g}" if isinstance(v, float) else v)
                for v in row
            ]
        )
    return buf.getvalue()


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write_table(
    out_dir: Path, stem: str, title: str, note: str, md_header, md_rows, csv_header, csv_rows, paths: list[Path]
) -> FigureOutput:
    from geomprobe.figures.style import display_path

    sources = ", ".join(display_path(p) for p in paths)
    md = f"**{title}**\n\n" + _markdown(md_header, md_rows) + f"\n{note}\n\nData source: {sources}\n"
    files = [
        write_output_text(out_dir / f"{stem}.md", md),
        write_output_text(out_dir / f"{stem}.csv", _csv_text(csv_header, csv_rows)),
    ]
    return FigureOutput(stem, files, paths)


def _final_rows(strategies, runs, label: Callable[[str], str], key: Callable[..., list]) -> tuple[list, list]:
    """Markdown cells (label, then AFID and forgetting per run) and CSV rows (``key(...)`` + the four numbers + seeds)."""
    md_rows, csv_rows = [], []
    for strategy in strategies:
        cells = [label(strategy)]
        for run in runs:
            if strategy not in run.afid:
                cells += ["", ""]
                continue
            m = final_metrics(run, strategy)
            cells += [_format(m["afid_mean"], m["afid_se"]), _format(m["forgetting_mean"], m["forgetting_se"])]
            numbers = [m["afid_mean"], m["afid_se"], m["forgetting_mean"], m["forgetting_se"], m["seeds"]]
            csv_rows.append([*key(strategy, run, m), *numbers])
        md_rows.append(cells)
    return md_rows, csv_rows


def _select(runs: Sequence[ContinualRuns], keep: Callable[[str], bool]) -> list[tuple[ContinualRuns, str]]:
    return [(run, s) for run in runs for s in order_strategies(run.afid) if keep(s)]


def table1_final_afid(runs, out_dir: str | Path, stem: str = "table1") -> FigureOutput:
    """Table 1: AFID at the final task and average forgetting per strategy (rows) and dataset (columns)."""
    runs = [r for r in _as_run_list(runs) if r.afid]
    if not runs:
        raise DataError(f"Table 1 needs continual summary rows; they are written by {CONTINUAL_COMMAND}")
    strategies = order_strategies(s for r in runs for s in r.afid)
    md_header = ["Method"] + [f"{r.dataset} {col}" for r in runs for col in ("AFID ↓", "F ↓")]
    md_rows, csv_rows = _final_rows(strategies, runs, lambda s: s, lambda s, run, m: [s, run.dataset, m["tasks"]])
    seeds = sorted({s for r in runs for s in r.seeds})
    note = (
        f"AFID = average FID at the final task (AFID@T), F = average forgetting (docs/design.md §6), mean ± standard "
        f"error over seeds {seeds}"
        + (" (one seed: no error)" if len(seeds) < 2 else "")
        + ". Lower is better. Paper Table 1 reports MNIST/FMNIST/CIFAR-10/ImageNet-1k with 3 seeds."
    )
    paths = [p for r in runs for p in r.paths]
    return _write_table(
        Path(out_dir),
        stem,
        "Table 1: average FID at the final task and average forgetting",
        note,
        md_header,
        md_rows,
        ["strategy", "dataset", "tasks", "afid_mean", "afid_se", "forgetting_mean", "forgetting_se", "seeds"],
        csv_rows,
        paths,
    )


RANK_STRATEGY = re.compile(r"^rank(?P<k>\d+)\+gd$")


def rank_of_strategy(strategy: str) -> int | None:
    """K of a rank-k EWC + distillation strategy as the runner names it (``rank1+gd``, ``rank5+gd``), else None."""
    m = RANK_STRATEGY.match(strategy)
    return int(m.group("k")) if m else None


def table5_low_rank(runs, out_dir: str | Path, stem: str = "table5") -> FigureOutput:
    """Table 5: rank-k ablation with distillation: final FID and average forgetting per rank (rows) and dataset."""
    runs = [r for r in _as_run_list(runs) if r.afid]
    selected = _select(runs, lambda s: rank_of_strategy(s) is not None)
    if not any(rank_of_strategy(s) not in (None, 1) for _, s in selected):
        raise DataError(
            "Table 5 needs continual runs with low-rank EWC of rank >= 2 and distillation, e.g. "
            "geomprobe continual --dataset digits --fisher rankk --rank 3 --gd --out runs/cl/rank3+gd "
            "(next to a rank1 --gd run)"
        )
    datasets = [r for r in runs if any(rr is r for rr, _ in selected)]
    strategies = sorted({s for _, s in selected}, key=lambda s: (rank_of_strategy(s), s))
    md_header = ["Method"] + [f"{r.dataset} {col}" for r in datasets for col in ("Final FID", "Avg forgetting")]
    md_rows, csv_rows = _final_rows(
        strategies,
        datasets,
        lambda s: f"GD + rank-{rank_of_strategy(s)}" + (" (mean-gradient)" if rank_of_strategy(s) == 1 else ""),
        lambda s, run, m: [s, rank_of_strategy(s), run.dataset],
    )
    note = (
        "Final FID = AFID at the final task; mean ± standard error over seeds. Rank-1 uses c* mu mu^T from the mean "
        "gradient; rank-k uses the runner's top-k eigenpairs (paper Table 5: stochastic power iteration)."
    )
    paths = [p for r in datasets for p in r.paths]
    return _write_table(
        Path(out_dir),
        stem,
        "Table 5: low-rank Fisher ablations (with generative distillation)",
        note,
        md_header,
        md_rows,
        ["strategy", "rank", "dataset", "final_fid_mean", "final_fid_se", "forgetting_mean", "forgetting_se", "seeds"],
        csv_rows,
        paths,
    )


FINETUNE_STRATEGIES = ("finetune",)  # the runner's name for --fisher none --no-gd (and lambda 0 in --compare)


def table6_finetune(runs, out_dir: str | Path, stem: str = "table6") -> FigureOutput:
    """Table 6: continual fine-tuning without regularisation (lambda = 0, no distillation), one row per dataset."""
    runs = [r for r in _as_run_list(runs) if r.afid]
    selected = _select(runs, lambda s: s in FINETUNE_STRATEGIES)
    if not selected:
        raise DataError(
            "Table 6 needs a continual run without regularisation (strategy 'finetune': --fisher none --no-gd); "
            f"{CONTINUAL_COMMAND} includes it"
        )
    md_rows, csv_rows = [], []
    for run, strategy in sorted(selected, key=lambda x: x[0].dataset):
        m = final_metrics(run, strategy)
        md_rows.append(
            [run.dataset, _format(m["afid_mean"], m["afid_se"]), _format(m["forgetting_mean"], m["forgetting_se"])]
        )
        csv_rows.append(
            [run.dataset, strategy, m["afid_mean"], m["afid_se"], m["forgetting_mean"], m["forgetting_se"], m["seeds"]]
        )
    note = "Final FID = AFID at the final task; mean ± standard error over seeds when there are several."
    paths = [p for r, _ in selected for p in r.paths]
    return _write_table(
        Path(out_dir),
        stem,
        "Table 6: continual fine-tuning with no regularisation (lambda = 0)",
        note,
        ["Dataset", "Final FID", "Avg forgetting"],
        md_rows,
        ["dataset", "strategy", "final_fid_mean", "final_fid_se", "forgetting_mean", "forgetting_se", "seeds"],
        csv_rows,
        sorted(set(paths)),
    )

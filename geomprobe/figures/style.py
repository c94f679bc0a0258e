"""Look and output of every figure: palette, fixed sizes, atomic PNG/PDF writing, caption files.

Every figure has a fixed size in inches and is saved at ``DPI`` without ``bbox_inches="tight"``,
so its PNG has a known pixel size (width_in * DPI, height_in * DPI); tests rely on that.
Colours come from the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies); every line also gets its own marker so figures read in greyscale too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from geomprobe.io import atomic_path, write_text

DPI = 150

#: Okabe & Ito (2008), "Color Universal Design"; ordered so the first colours contrast most.
OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "bluish_green": "#009E73",
    "orange": "#E69F00",
    "reddish_purple": "#CC79A7",
    "sky_blue": "#56B4E9",
    "black": "#000000",
    "yellow": "#F0E442",
}
PALETTE: tuple[str, ...] = tuple(OKABE_ITO.values())
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Sequential colour map for maps and heatmaps: perceptually uniform and colour-blind safe.
SEQUENTIAL_CMAP = "viridis"


def series_style(index: int) -> dict:
    """Colour and marker of the ``index``-th line of a plot (cycles after 8)."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)]}


def new_figure(width_in: float, height_in: float, nrows: int = 1, ncols: int = 1, **subplot_kw):
    """A matplotlib (figure, axes array) with constrained layout and readable font sizes.

    ``axes`` is always a 2-D numpy array of shape (nrows, ncols).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 10,
            "axes.labelsize": 10,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "pdf.fonttype": 42,
        }
    )
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width_in, height_in), dpi=DPI, squeeze=False, layout="constrained", **subplot_kw
    )
    return fig, axes


@dataclass
class FigureOutput:
    """Files written for one figure or table and what they were made from."""

    name: str
    files: list[Path]
    sources: list[Path] = field(default_factory=list)

    @property
    def png(self) -> Path | None:
        return next((p for p in self.files if p.suffix == ".png"), None)


def write_output_text(path: Path, text: str) -> Path:
    """Write a caption, table or manifest atomically (:func:`geomprobe.io.write_text`), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf`` in ``out_dir`` atomically; close it.

    The PNG is exactly figsize * DPI pixels. Metadata carries no timestamp, so rerunning on
    the same results gives the same PDF.
    """
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        final = out_dir / f"{stem}.{fmt}"
        with atomic_path(final, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
        written.append(final)
    plt.close(fig)
    return written


def write_caption(
    out_dir: Path, stem: str, title: str, body: str, sources: Sequence[Path], details: Sequence[str]
) -> Path:
    """Write the caption file ``stem.txt``: title, what the figure shows, data source and provenance.

    ``details`` are lines such as ``model: small3 on digits (95,873 parameters)``,
    ``n: 1024 samples per t``, ``seeds: 0``.
    """
    lines = [title, "", body.strip(), "", "data source:"]
    lines += [f"  {display_path(p)}" for p in sources]
    lines += list(details)
    from geomprobe import __version__

    lines.append(f"made by: geomprobe {__version__} `geomprobe figures` (reads stored results, recomputes nothing)")
    return write_output_text(out_dir / f"{stem}.txt", "\n".join(lines) + "\n")


def display_path(path: Path) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

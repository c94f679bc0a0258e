"""How sure, and where (issue 16): bootstrap bands, the n-sweep and block-share heat maps.

Each function reads ``spectrum.json`` rows written by ``geomprobe spectrum --bootstrap B``,
``--n-sweep 64,...`` or ``--shares`` and writes ``<stem>.png``, ``<stem>.pdf`` and ``<stem>.txt``:

    fig_intervals     lambda1, lambda2/lambda1 and lambda1/sum(lambda) against t with 95% bands, one
                      series per spectrum (so two models give Fig. 3c and Fig. 6 with intervals)
    fig_n_sweep       lambda2/lambda1 and lambda1/sum(lambda) against n per t, with the null line
    fig_block_shares  shares of ||mu||^2, ||v1||^2 and tr F per UNet block (blocks x t)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.results import SpectrumFile, read_spectrum
from geomprobe.figures.spectra import _details, _timestep_axis, model_variant_labels
from geomprobe.figures.style import SEQUENTIAL_CMAP, FigureOutput, new_figure, save_figure, series_style, write_caption

INTERVAL_KEYS = (
    ("eigenvalues.0", r"$\lambda_1$"),
    ("lambda2_over_lambda1", r"$\lambda_2/\lambda_1$"),
    ("lambda1_over_trace", r"$\lambda_1/\sum\lambda$"),
)
SHARE_KINDS = (("mu", r"$\|\mu\|^2$"), ("v1", r"$\|v_1\|^2$"), ("trace", r"tr $F$"))


def _spectra(spectra) -> list[SpectrumFile]:
    items = spectra if isinstance(spectra, (list, tuple)) else [spectra]
    return [s if isinstance(s, SpectrumFile) else read_spectrum(s) for s in items]


def _leaf(obj: dict, key: str):
    """``row["eigenvalues"][0]`` for key ``eigenvalues.0``, ``row["lambda2_over_lambda1"]`` otherwise."""
    head, _, tail = key.partition(".")
    value = obj.get(head)
    if tail and isinstance(value, list):
        return value[int(tail)] if int(tail) < len(value) else None
    return value


def _need(spectrum: SpectrumFile, key: str, option: str) -> None:
    if not all(key in r for r in spectrum.rows):
        raise DataError(f"{spectrum.path} has no '{key}'; rerun geomprobe spectrum {option}")


def interval_columns(spectrum: SpectrumFile, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, lo, hi) per t of a scalar and its bootstrap interval (NaN where null)."""
    _need(spectrum, "ci", "--bootstrap 200")
    val, lo, hi = [], [], []
    for r in spectrum.rows:
        v, ci = _leaf(r, key), _leaf(r["ci"], key) or [None, None]
        val.append(np.nan if v is None else v)
        lo.append(np.nan if ci[0] is None else ci[0])
        hi.append(np.nan if ci[1] is None else ci[1])
    return np.array(val, float), np.array(lo, float), np.array(hi, float)


def fig_intervals(spectra, out_dir: str | Path, stem: str = "fig_intervals") -> FigureOutput:
    """lambda1 (log), lambda2/lambda1 and lambda1/sum(lambda) against t with 95% bootstrap bands."""
    spectra = _spectra(spectra)
    labels = model_variant_labels(spectra) if len(spectra) > 1 else [spectra[0].provenance.label]
    fig, axes = new_figure(12.0, 3.6, ncols=3)
    lines = []
    for i, (s, label) in enumerate(zip(spectra, labels, strict=True)):
        for ax, (key, name) in zip(axes[0], INTERVAL_KEYS, strict=True):
            val, lo, hi = interval_columns(s, key)
            style = series_style(i)
            ax.fill_between(s.timesteps, lo, hi, color=style["color"], alpha=0.2, lw=0)
            ax.plot(s.timesteps, val, lw=1.6, ms=4, label=label, **style)
            ax.set_ylabel(name)
            _timestep_axis(ax, s)
        val, lo, hi = interval_columns(s, "lambda2_over_lambda1")
        lines.append(
            f"{label}: "
            + ", ".join(
                f"t={t}: {v:.3g} [{a:.3g}, {b:.3g}]" for t, v, a, b in zip(s.timesteps, val, lo, hi, strict=True)
            )
        )
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(frameon=False)
    fig.suptitle("Top eigenvalue, eigengap ratio and explained share with 95% bootstrap intervals", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    boot = spectra[0].data.get("bootstrap", {})
    body = (
        f"Point estimates (lines) and 95% percentile intervals (bands) over B = {boot.get('replicates')} resamples of "
        f"the rows (seed {boot.get('seed')}), computed from the n x n Gram matrix. lambda2/lambda1 [95%]: "
        + "; ".join(lines)
        + "."
    )
    details = [f"[{lab}] {d}" for s, lab in zip(spectra, labels, strict=True) for d in _details(s)]
    caption = write_caption(
        out_dir, stem, "Eigengap with bootstrap intervals", body, [s.path for s in spectra], details
    )
    return FigureOutput(stem, files + [caption], [s.path for s in spectra])


def fig_n_sweep(spectrum, out_dir: str | Path, stem: str = "fig_n_sweep") -> FigureOutput:
    """lambda2/lambda1 and lambda1/sum(lambda) against the number of rows n, one line per t, null dashed."""
    spectrum = _spectra(spectrum)[0]
    _need(spectrum, "n_sweep", "--n-sweep 64,128,256,512,1024")
    fig, axes = new_figure(10.0, 4.0, ncols=2)
    import matplotlib

    cmap = matplotlib.colormaps[SEQUENTIAL_CMAP]
    ts = spectrum.timesteps
    lines = []
    for i, row in enumerate(spectrum.rows):
        color = cmap(i / max(len(ts) - 1, 1))
        ns = [p["n"] for p in row["n_sweep"]]
        for ax, key in zip(axes[0], ("lambda2_over_lambda1", "lambda1_over_trace"), strict=True):
            ax.plot(ns, [p[key] for p in row["n_sweep"]], color=color, marker="o", ms=3, lw=1.4, label=f"t={row['t']}")
            if all("null" in p for p in row["n_sweep"]):
                ax.plot(ns, [p["null"][key] for p in row["n_sweep"]], color=color, ls="--", lw=0.9)
        lines.append(
            f"t={row['t']}: "
            + ", ".join(f"n={p['n']}: {p['lambda2_over_lambda1']:.3g}" for p in row["n_sweep"])
            + f" (null at n={ns[-1]}: {row['n_sweep'][-1].get('null', {}).get('lambda2_over_lambda1', float('nan')):.3g})"
        )
    for ax, name in zip(axes[0], (r"$\lambda_2/\lambda_1$", r"$\lambda_1/\sum\lambda$"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("rows n (nested subsets: the first n rows)")
        ax.set_ylabel(name)
        ax.grid(True, color="0.9", lw=0.6)
    axes[0, 1].set_yscale("log")
    axes[0, 0].legend(frameon=False, ncol=2, fontsize=7)
    fig.suptitle("n-sweep: solid = store rows, dashed = null (same norms, random directions)", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    body = (
        "The same statistics on the first n rows of each t. Dashed: expected value for rows with the store's "
        "norms and directions uniform on the sphere in R^P (Wishart). lambda2/lambda1: " + "; ".join(lines) + "."
    )
    caption = write_caption(out_dir, stem, "Convergence in n", body, [spectrum.path], _details(spectrum))
    return FigureOutput(stem, files + [caption], [spectrum.path])


def share_matrix(spectrum: SpectrumFile, kind: str) -> tuple[list[str], np.ndarray]:
    """(blocks + ["(norm layers)"], (num_blocks + 1, T) shares of ``kind``) from the rows' ``shares``."""
    _need(spectrum, "shares", "--shares")
    blocks = list(spectrum.rows[0]["shares"][kind]["blocks"])
    M = np.array([[r["shares"][kind]["blocks"].get(b) or np.nan for r in spectrum.rows] for b in blocks], float)
    norm = [r["shares"][kind].get("norm_layers") for r in spectrum.rows]
    return blocks + ["(norm layers)"], np.vstack([M, np.array([np.nan if x is None else x for x in norm], float)])


def fig_block_shares(spectrum, out_dir: str | Path, stem: str = "fig_block_shares") -> FigureOutput:
    """Heat maps (blocks x t) of the shares of ||mu||^2, ||v1||^2 and tr F."""
    spectrum = _spectra(spectrum)[0]
    kinds = [k for k in SHARE_KINDS if k[0] in spectrum.rows[0].get("shares", {"mu": 0})]
    fig, axes = new_figure(4.0 * len(kinds) + 1.0, 4.2, ncols=len(kinds))
    lines = []
    for ax, (kind, name) in zip(axes[0], kinds, strict=True):
        blocks, M = share_matrix(spectrum, kind)
        im = ax.imshow(M, aspect="auto", cmap=SEQUENTIAL_CMAP, vmin=0, vmax=1)
        ax.set_xticks(range(len(spectrum.timesteps)), [str(t) for t in spectrum.timesteps], rotation=90, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks if ax is axes[0, 0] else [""] * len(blocks), fontsize=7)
        ax.set_xlabel("t")
        ax.set_title(f"share of {name}")
        top = [blocks[i] for i in np.nanargmax(M[:-1], axis=0)]
        lines.append(
            f"{kind}: top block per t " + ", ".join(f"{t}:{b}" for t, b in zip(spectrum.timesteps, top, strict=True))
        )
    fig.colorbar(im, ax=axes[0, -1], shrink=0.8)
    fig.suptitle(f"Where the direction lives ({spectrum.provenance.label})", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    body = (
        "Share of ||mu||^2, ||v1||^2 and tr F (= sum ||g_i||^2 / n) in each UNet block, per t. "
        + "; ".join(lines)
        + "."
    )
    caption = write_caption(out_dir, stem, "Block shares", body, [spectrum.path], _details(spectrum))
    return FigureOutput(stem, files + [caption], [spectrum.path])


def uncertainty_figures(spectra: Sequence[SpectrumFile]) -> list[tuple[str, object]]:
    """(name, make(out_dir)) for the figures these spectra have data for (nothing is listed as skipped)."""
    has = {key: [s for s in spectra if all(key in r for r in s.rows)] for key in ("ci", "n_sweep", "shares")}
    jobs: list[tuple[str, object]] = []
    if has["ci"]:
        jobs.append(("fig_intervals", lambda out, s=has["ci"]: fig_intervals(s, out)))
    for key, name, make in (("n_sweep", "fig_n_sweep", fig_n_sweep), ("shares", "fig_block_shares", fig_block_shares)):
        labels = model_variant_labels(has[key]) if len(has[key]) > 1 else [""] * len(has[key])
        for s, lab in zip(has[key], labels, strict=True):
            suffix = "_" + "".join(c if c.isalnum() else "-" for c in lab).strip("-") if lab else ""
            jobs.append((name + suffix, lambda out, s=s, st=name + suffix, f=make: f(s, out, stem=st)))
    return jobs

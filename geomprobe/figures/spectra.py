"""Figures of the gradient geometry (paper Fig. 1, 2, 3a-d and 6) from ``spectrum.json`` and ``cosine_maps.h5``.

Each function reads stored results only, writes ``<stem>.png``, ``<stem>.pdf`` and the caption
``<stem>.txt`` into ``out_dir`` and returns a :class:`FigureOutput`. Sizes are fixed (see
``style``), so the PNG of Fig. 1 is always 960 x 600 pixels, for example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.results import SPECTRUM_COMMAND, SpectrumFile, read_cosine_maps, read_spectrum
from geomprobe.figures.style import (
    SEQUENTIAL_CMAP,
    FigureOutput,
    new_figure,
    save_figure,
    series_style,
    write_caption,
)
from geomprobe.timesteps import LOW_SNR_THRESHOLD

LINE_FIGURE_SIZE = (6.4, 4.0)  # inches: 960 x 600 px at 150 dpi
HEATMAP_SIZE = (6.4, 5.6)  # 960 x 840 px
COSINE_PANEL_SIZE = (2.0, 2.3)  # per panel of Fig. 2
COSINE_MAP_COLUMNS = 5
FIG6_ROW_HEIGHT = 3.0


def _as_spectrum(spectrum: SpectrumFile | str | Path) -> SpectrumFile:
    return spectrum if isinstance(spectrum, SpectrumFile) else read_spectrum(spectrum)


def _details(spectrum: SpectrumFile) -> list[str]:
    return [
        spectrum.provenance.model_line(),
        spectrum.sample_count_line(),
        spectrum.parameter_line(),
        spectrum.provenance.seeds_line() + " (probe seed: the x0 and noise draws)",
        f"timesteps: {', '.join(str(t) for t in spectrum.timesteps)}",
    ]


def _shade_low_snr(ax, spectrum: SpectrumFile) -> None:
    """Grey background over the timesteps whose stored SNR is below the low-SNR threshold."""
    if not all("snr" in r for r in spectrum.rows):
        return
    ts = np.array(spectrum.timesteps, dtype=float)
    snrs = spectrum.column("snr", "signal-to-noise ratio")
    low = np.flatnonzero(snrs < LOW_SNR_THRESHOLD)
    if low.size == 0:
        return
    first = low[0]
    left = ts[first] if first == 0 else (ts[first - 1] + ts[first]) / 2
    right = ts[-1] + (ts[-1] - ts[-2]) / 2 if ts.size > 1 else ts[-1] + 50
    ax.axvspan(left, right, color="0.92", zorder=0, lw=0)
    ax.text(
        (left + right) / 2,
        0.98,
        f"low SNR\n(< {LOW_SNR_THRESHOLD:g})",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="top",
        fontsize=8,
        color="0.35",
    )


def _timestep_axis(ax, spectrum: SpectrumFile) -> None:
    ts = spectrum.timesteps
    ax.set_xlabel("diffusion timestep t (larger t = lower SNR)")
    if len(ts) <= 12:
        ax.set_xticks(ts)
    ax.grid(True, axis="y", color="0.85", lw=0.6)


# ---------------------------------------------------------------- Fig. 1


def fig1_scaled_identity_mse(spectrum, out_dir: str | Path, stem: str = "fig1_scaled_identity_mse") -> FigureOutput:
    """Fig. 1: mean ||x_t - sqrt(1 - alpha_bar_t) eps_hat||^2 against t (``scaled_identity_mse``)."""
    spectrum = _as_spectrum(spectrum)
    mse = spectrum.column("scaled_identity_mse", "Fig. 1's scaled-identity MSE")
    if not np.isfinite(mse).any():
        raise DataError(
            f"{spectrum.path} has scaled_identity_mse = null at every t (the checkpoint was not found when it was "
            f"written); rerun {SPECTRUM_COMMAND} with the store's checkpoint in place"
        )
    fig, axes = new_figure(*LINE_FIGURE_SIZE)
    ax = axes[0, 0]
    _shade_low_snr(ax, spectrum)
    ax.plot(spectrum.timesteps, mse, lw=1.8, **series_style(0))
    ax.set_ylabel(r"MSE$(x_t,\ \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)$")
    ax.set_ylim(bottom=0)
    _timestep_axis(ax, spectrum)
    ax.set_title(f"Fig. 1: input vs scaled noise prediction ({spectrum.provenance.label})")
    files = save_figure(fig, Path(out_dir), stem)
    body = (
        "Mean squared error between the model input x_t and the scaled prediction "
        "sqrt(1 - alpha_bar_t) * eps_theta(x_t, t) at each timestep (paper Fig. 1; Tweedie's identity). "
        "Values near 0 mean the denoiser acts as a scaled identity map, which Proposition 1 predicts at low SNR. "
        f"Values: {', '.join(f't={t}: {v:.4g}' for t, v in zip(spectrum.timesteps, mse, strict=True))}."
    )
    caption = write_caption(
        Path(out_dir), stem, "Fig. 1: scaled-identity MSE against t", body, [spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [spectrum.path])


# ---------------------------------------------------------------- Fig. 2


def cosine_map_grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the near-square pixel grid that shows n per-sample values, cols = ceil(sqrt n)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def fig2_layout(num_timesteps: int) -> tuple[int, int, tuple[float, float]]:
    """(panel rows, panel cols, figure size in inches) of Fig. 2 for ``num_timesteps`` panels."""
    cols = min(COSINE_MAP_COLUMNS, num_timesteps)
    rows = math.ceil(num_timesteps / cols)
    return rows, cols, (COSINE_PANEL_SIZE[0] * cols + 0.9, COSINE_PANEL_SIZE[1] * rows + 0.5)


def fig2_cosine_maps(
    spectrum, out_dir: str | Path, cosine_maps: str | Path | None = None, stem: str = "fig2_cosine_maps"
) -> FigureOutput:
    """Fig. 2: |cos(g_i, mu_t)| per sample, one panel per t, one pixel per sample (store order, row-major)."""
    spectrum = _as_spectrum(spectrum)
    maps_path = Path(cosine_maps) if cosine_maps is not None else spectrum.cosine_maps_path
    if maps_path is None:
        raise DataError(f"no cosine_maps.h5 next to {spectrum.path}; it is written by {SPECTRUM_COMMAND}")
    maps = read_cosine_maps(maps_path)
    ts = list(maps.values)
    snr_of = {int(r["t"]): r.get("snr") for r in spectrum.rows}
    rows, cols, size = fig2_layout(len(ts))
    fig, axes = new_figure(*size, nrows=rows, ncols=cols)
    image = None
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, t in zip(axes.ravel(), ts, strict=False):  # spare panels stay empty
        v = maps.values[t]
        grid_rows, grid_cols = cosine_map_grid_shape(v.size)
        padded = np.full(grid_rows * grid_cols, np.nan)
        padded[: v.size] = v
        image = ax.imshow(
            padded.reshape(grid_rows, grid_cols), cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        snr = snr_of.get(t)
        snr_text = f", SNR {snr:.2g}" if isinstance(snr, (int, float)) else ""
        ax.set_title(f"t = {t}{snr_text}\nmedian {np.median(v):.2f}", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=r"$|\cos(g_i, \mu_t)|$")
    fig.suptitle(f"Fig. 2: per-sample cosine to the mean gradient ({spectrum.provenance.label})", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    n_line = ", ".join(f"t={t}: n={maps.values[t].size}, median {np.median(maps.values[t]):.3f}" for t in ts)
    body = (
        "Absolute cosine similarity between each per-sample gradient g_i = grad_theta l(theta; x_t) and the mean "
        "gradient mu_t at each timestep (paper Fig. 2). Each pixel is one sample, in the order of the gradient "
        "store (sample index, row-major); brighter (yellow) = more collinear with mu_t. " + n_line + "."
    )
    caption = write_caption(
        out_dir, stem, "Fig. 2: cosine-to-mean maps", body, [maps.path, spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [maps.path, spectrum.path])


# ---------------------------------------------------------------- Fig. 3a


def fig3a_mu_cosine(spectrum, out_dir: str | Path, stem: str = "fig3a_mu_cosine") -> FigureOutput:
    """Fig. 3a: pairwise cos(mu_s, mu_t) across timesteps as a heatmap (``mu_cosine`` of spectrum.json)."""
    spectrum = _as_spectrum(spectrum)
    block = spectrum.data.get("mu_cosine")
    if not isinstance(block, dict) or "t" not in block or "matrix" not in block:
        raise DataError(f"{spectrum.path} has no 'mu_cosine' {{t, matrix}}; rerun {SPECTRUM_COMMAND}")
    labels = list(block["t"])
    matrix = np.array(block["matrix"], dtype=np.float64)
    if matrix.shape != (len(labels), len(labels)):
        raise DataError(
            f"{spectrum.path}: mu_cosine.matrix must be {len(labels)}x{len(labels)}, got {matrix.shape}; rerun {SPECTRUM_COMMAND}"
        )
    # keep single timesteps; pooled band rows (t = "band-...") are not part of the paper's heatmap
    keep = [i for i, t in enumerate(labels) if isinstance(t, int) and not isinstance(t, bool)]
    ts = [int(labels[i]) for i in keep]
    matrix = matrix[np.ix_(keep, keep)]
    if len(ts) < 2:
        raise DataError(
            f"{spectrum.path}: mu_cosine needs at least 2 single timesteps; rerun {SPECTRUM_COMMAND} on a store made with --t 100..900"
        )
    signed = bool(np.nanmin(matrix) < 0)
    fig, axes = new_figure(*HEATMAP_SIZE)
    ax = axes[0, 0]
    image = ax.imshow(matrix, cmap="PuOr_r" if signed else SEQUENTIAL_CMAP, vmin=-1.0 if signed else 0.0, vmax=1.0)
    ax.set_xticks(range(len(ts)), [str(t) for t in ts], rotation=90 if len(ts) > 12 else 0)
    ax.set_yticks(range(len(ts)), [str(t) for t in ts])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep s")
    ax.spines[:].set_visible(False)
    if len(ts) <= 12:
        for i in range(len(ts)):
            for j in range(len(ts)):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(matrix[i, j]) > 0.85 else "black",
                )
    fig.colorbar(image, ax=ax, shrink=0.85, label=r"$\cos(\mu_s, \mu_t)$")
    ax.set_title(f"Fig. 3a: pairwise cosine of mean gradients ({spectrum.provenance.label})")
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    off_diagonal = matrix[~np.eye(len(ts), dtype=bool)]
    body = (
        "Cosine similarity between the mean gradients mu_s and mu_t of every pair of timesteps (paper Fig. 3a). "
        "High values everywhere mean one direction serves all timesteps. "
        f"Off-diagonal: min {off_diagonal.min():.3f}, median {np.median(off_diagonal):.3f}, max {off_diagonal.max():.3f}."
    )
    caption = write_caption(
        out_dir, stem, "Fig. 3a: mu_t pairwise cosine heatmap", body, [spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [spectrum.path])


# ---------------------------------------------------------------- Fig. 3b / 3c / 3d


def _eigenvalue_matrix(spectrum: SpectrumFile, top_k: int) -> np.ndarray:
    """(num_t, k) eigenvalues, NaN where a row stored fewer than k; DataError if absent."""
    missing = [r.get("t") for r in spectrum.rows if not isinstance(r.get("eigenvalues"), list) or not r["eigenvalues"]]
    if missing:
        raise DataError(
            f"{spectrum.path} has no 'eigenvalues' for t={missing[0]}; rerun {SPECTRUM_COMMAND} --top-k {top_k}"
        )
    k = min(top_k, max(len(r["eigenvalues"]) for r in spectrum.rows))
    values = np.full((len(spectrum.rows), k), np.nan)
    for i, r in enumerate(spectrum.rows):
        ev = [float(x) for x in r["eigenvalues"][:k]]
        values[i, : len(ev)] = ev
    return values


def _plot_eigenvalues(ax, spectrum: SpectrumFile, top_k: int) -> np.ndarray:
    values = _eigenvalue_matrix(spectrum, top_k)
    for j in range(values.shape[1]):
        positive = np.where(values[:, j] > 0, values[:, j], np.nan)  # log axis: drop non-positive round-off
        ax.plot(spectrum.timesteps, positive, lw=1.5, ms=4, label=rf"$\lambda_{j + 1}$", **series_style(j))
    ax.set_yscale("log")
    ax.set_ylabel("eigenvalue of $F_t$ (log scale)")
    ax.legend(ncols=min(5, values.shape[1]), loc="best", frameon=False)
    _timestep_axis(ax, spectrum)
    return values


def _plot_ratio(ax, spectrum: SpectrumFile) -> np.ndarray:
    ratio = spectrum.column("lambda2_over_lambda1", "eigengap ratio")
    ax.plot(spectrum.timesteps, ratio, lw=1.8, **series_style(1))
    if np.isfinite(ratio).any():
        i = int(np.nanargmin(ratio))
        # ring the minimum and state it in the corner, where it cannot cover the curve
        ax.plot([spectrum.timesteps[i]], [ratio[i]], marker="o", ms=11, mfc="none", mec="0.3", mew=1.0, ls="none")
        ax.text(
            0.02,
            0.97,
            f"min {ratio[i]:.3g} at t={spectrum.timesteps[i]}",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=8,
            color="0.25",
        )
    ax.set_ylabel(r"$r_t = \lambda_2 / \lambda_1$")
    ax.set_ylim(0, max(1.0, float(np.nanmax(ratio)) * 1.05) if np.isfinite(ratio).any() else 1.0)
    _timestep_axis(ax, spectrum)
    return ratio


def fig3b_eigenvalues(spectrum, out_dir: str | Path, top_k: int = 5, stem: str = "fig3b_eigenvalues") -> FigureOutput:
    """Fig. 3b: the top-k eigenvalues of the empirical Fisher F_t against t, log scale."""
    spectrum = _as_spectrum(spectrum)
    fig, axes = new_figure(*LINE_FIGURE_SIZE)
    values = _plot_eigenvalues(axes[0, 0], spectrum, top_k)
    axes[0, 0].set_title(f"Fig. 3b: top-{values.shape[1]} Fisher eigenvalues ({spectrum.provenance.label})")
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    gap = values[:, 0] / values[:, 1] if values.shape[1] > 1 else np.full(len(values), np.nan)
    body = (
        f"Top {values.shape[1]} eigenvalues of the uncentered empirical Fisher F_t = G^T G / n at each timestep, "
        "computed by the Gram trick (paper Fig. 3b). A wide gap between lambda_1 and the rest means F_t is nearly rank-1. "
        f"lambda_1/lambda_2: {', '.join(f't={t}: {g:.3g}' for t, g in zip(spectrum.timesteps, gap, strict=True))}."
    )
    caption = write_caption(
        out_dir, stem, "Fig. 3b: top eigenvalues against t (log)", body, [spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [spectrum.path])


def fig3c_eigengap_ratio(spectrum, out_dir: str | Path, stem: str = "fig3c_eigengap_ratio") -> FigureOutput:
    """Fig. 3c: r_t = lambda_2 / lambda_1 against t."""
    spectrum = _as_spectrum(spectrum)
    fig, axes = new_figure(*LINE_FIGURE_SIZE)
    ratio = _plot_ratio(axes[0, 0], spectrum)
    axes[0, 0].set_title(f"Fig. 3c: eigengap ratio ({spectrum.provenance.label})")
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    body = (
        "Ratio r_t = lambda_2 / lambda_1 of the two largest eigenvalues of F_t (paper Fig. 3c; the paper reports "
        "r_t < 0.4 everywhere and a minimum of 0.022 at t = 700). Smaller = more nearly rank-1. "
        f"Values: {', '.join(f't={t}: {r:.3g}' for t, r in zip(spectrum.timesteps, ratio, strict=True))}."
    )
    caption = write_caption(
        out_dir, stem, "Fig. 3c: lambda2/lambda1 against t", body, [spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [spectrum.path])


def fig3d_approximation_errors(spectrum, out_dir: str | Path, stem: str = "fig3d_approximation_errors") -> FigureOutput:
    """Fig. 3d: relative Frobenius errors of the diagonal and rank-1 approximations against t.

    The best rank-k error (``rel_err_rankk``), when stored, is drawn dashed as a reference floor.
    """
    spectrum = _as_spectrum(spectrum)
    diag = spectrum.column("rel_err_diag", "relative error of the diagonal approximation")
    rank1 = spectrum.column("rel_err_rank1", "relative error of the rank-1 approximation")
    fig, axes = new_figure(*LINE_FIGURE_SIZE)
    ax = axes[0, 0]
    ax.plot(spectrum.timesteps, diag, lw=1.8, label="diagonal", **series_style(0))
    ax.plot(spectrum.timesteps, rank1, lw=1.8, label=r"rank-1 $c^*\mu\mu^\top$", **series_style(1))
    rankk_key = _common_rankk_key(spectrum)
    if rankk_key is not None:
        best = np.array([float(r["rel_err_rankk"][rankk_key]) for r in spectrum.rows])
        ax.plot(
            spectrum.timesteps, best, lw=1.2, ls="--", label=f"best rank-{rankk_key} (reference)", **series_style(2)
        )
    ax.set_ylabel(r"$\|F_t - \hat F_t\|_F \,/\, \|F_t\|_F$")
    ax.set_ylim(0, max(1.05, float(np.nanmax(np.concatenate([diag, rank1]))) * 1.05))
    ax.legend(frameon=False, loc="best")
    _timestep_axis(ax, spectrum)
    ax.set_title(f"Fig. 3d: relative error of Fisher approximations ({spectrum.provenance.label})")
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    body = (
        "Relative Frobenius error ||F_t - F_hat||_F / ||F_t||_F of the diagonal approximation and of the rank-1 "
        "approximation c* mu mu^T (paper eq. 5-6, Fig. 3d; the paper reports about 1.0 for the diagonal at every t)"
        + (f", with the best rank-{rankk_key} error from the top eigenvalues as a floor" if rankk_key else "")
        + ". diagonal: "
        + ", ".join(f"t={t}: {d:.3g}" for t, d in zip(spectrum.timesteps, diag, strict=True))
        + "; rank-1: "
        + ", ".join(f"t={t}: {r:.3g}" for t, r in zip(spectrum.timesteps, rank1, strict=True))
        + "."
    )
    caption = write_caption(
        out_dir, stem, "Fig. 3d: relative Frobenius errors against t", body, [spectrum.path], _details(spectrum)
    )
    return FigureOutput(stem, files + [caption], [spectrum.path])


def _common_rankk_key(spectrum: SpectrumFile) -> str | None:
    """The largest k present in every row's ``rel_err_rankk``, or None."""
    sets = [set(r["rel_err_rankk"]) for r in spectrum.rows if isinstance(r.get("rel_err_rankk"), dict)]
    if len(sets) != len(spectrum.rows) or not sets:
        return None
    common = set.intersection(*sets)
    return max(common, key=int) if common else None


# ---------------------------------------------------------------- Fig. 6


def model_variant_labels(spectra: Sequence[SpectrumFile]) -> list[str]:
    """A distinct legend label per spectrum: the model preset, plus the directory when presets repeat."""
    labels = [s.provenance.label for s in spectra]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{lab} ({s.path.parent.name})" for lab, s in zip(labels, spectra, strict=True)]


def fig6_layout(num_models: int) -> tuple[float, float]:
    """Figure size (inches) of Fig. 6: one row of two panels per model variant."""
    return (10.0, FIG6_ROW_HEIGHT * num_models + 0.4)


def fig6_model_sizes(
    spectra: Sequence, out_dir: str | Path, top_k: int = 5, stem: str = "fig6_model_sizes"
) -> FigureOutput:
    """Fig. 6: top-k eigenvalues (left) and lambda2/lambda1 (right) for each model-size variant (one row each).

    ``spectra``: spectrum.json paths or results from at least two models, drawn in the order given.
    """
    spectra = [_as_spectrum(s) for s in spectra]
    if len(spectra) < 2:
        raise DataError(
            "Fig. 6 compares model sizes and needs spectrum.json from at least two models; train another preset "
            "(geomprobe train --model small1 --out runs/small1), then run geomprobe grads and " + SPECTRUM_COMMAND
        )
    labels = model_variant_labels(spectra)
    fig, axes = new_figure(*fig6_layout(len(spectra)), nrows=len(spectra), ncols=2)
    for row, (spectrum, label) in enumerate(zip(spectra, labels, strict=True)):
        letters = "abcdefghijklmnopqrstuvwxyz"
        _plot_eigenvalues(axes[row, 0], spectrum, top_k)
        _plot_ratio(axes[row, 1], spectrum)
        p = spectrum.rows[0].get("P")
        size = f", P = {int(p):,}" if p else ""
        axes[row, 0].set_title(f"({letters[2 * row]}) {label}{size}: top eigenvalues")
        axes[row, 1].set_title(f"({letters[2 * row + 1]}) {label}: " + r"$\lambda_2/\lambda_1$")
    fig.suptitle("Fig. 6: Fisher spectrum across model sizes", fontsize=10)
    out_dir = Path(out_dir)
    files = save_figure(fig, out_dir, stem)
    lines = []
    for spectrum, label in zip(spectra, labels, strict=True):
        ratio = spectrum.column("lambda2_over_lambda1", "eigengap ratio")
        i = int(np.nanargmin(ratio))
        lines.append(
            f"{label}: min lambda2/lambda1 = {ratio[i]:.3g} at t={spectrum.timesteps[i]}, "
            f"median {np.nanmedian(ratio):.3g}"
        )
    body = (
        "Top eigenvalues of F_t (log scale) and the eigengap ratio lambda_2/lambda_1 for each model variant "
        "(paper Fig. 6: the gap widens as the model grows). " + "; ".join(lines) + "."
    )
    details = []
    for spectrum, label in zip(spectra, labels, strict=True):
        details += [f"[{label}] " + line for line in _details(spectrum)]
    caption = write_caption(
        out_dir,
        stem,
        "Fig. 6: eigenvalues and eigengap for model-size variants",
        body,
        [s.path for s in spectra],
        details,
    )
    return FigureOutput(stem, files + [caption], [s.path for s in spectra])

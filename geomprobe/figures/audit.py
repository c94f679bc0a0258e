"""Figures of ``geomprobe audit`` (the critique's checks, docs/design.md §7) from ``audit.json`` only.

audit_task_dependence     check 1: mean inter-task cos(mu_t) and cos to the x0 = 0 direction vs SNR
audit_true_vs_empirical   check 2: lambda1/trace and effective rank of both Fishers vs t
audit_stability           check 3: Davis-Kahan bound, residual bound and measured sin; Assumption 1
audit_band_ewc            check 4: AFID@T and forgetting per band (mean ± standard error)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from geomprobe.errors import DataError
from geomprobe.figures.style import FigureOutput, new_figure, save_figure, series_style, write_caption

AUDIT_JSON = "audit.json"
AUDIT_COMMAND = "geomprobe audit --ckpt DIR --out DIR"
AUDIT_FIGURES = ("audit_task_dependence", "audit_true_vs_empirical", "audit_stability", "audit_band_ewc")
SIZE = (6.4, 4.0)
WIDE = (9.6, 4.0)


def read_audit(path: str | Path) -> dict:
    """An audit.json as a dict (DataError when unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _rows(doc: dict, key: str, path: Path) -> list[dict]:
    rows = (doc.get(key) or {}).get("rows") or []
    if not rows:
        raise DataError(f"{path} has no {key} rows; run {AUDIT_COMMAND} with the check that writes them")
    return rows


def _load(path: str | Path, key: str, sort: str = "t") -> tuple[Path, dict, list[dict]]:
    """(path, audit.json, the rows of check ``key`` sorted by ``sort``)."""
    path = Path(path)
    doc = read_audit(path)
    return path, doc, sorted(_rows(doc, key, path), key=lambda r: r[sort])


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _ci(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([_num((r.get(key) or [None, None])[0]) for r in rows])
    hi = np.array([_num((r.get(key) or [None, None])[1]) for r in rows])
    return lo, hi


def _line_with_ci(ax, x, rows: list[dict], name: str, label: str, style: int, ci_key: str | None = None) -> None:
    """Plot rows[name] against x with its bootstrap interval (rows[ci_key], default name + "_ci") as a band."""
    st = series_style(style)
    ax.plot(x, [_num(r[name]) for r in rows], lw=1.8, label=label, **st)
    lo, hi = _ci(rows, ci_key or name + "_ci")
    ax.fill_between(x, lo, hi, alpha=0.2, color=st["color"])


def _details(doc: dict) -> list[str]:
    ck = doc.get("checkpoint") or {}
    return [f"model: {ck.get('path')} (checksum {str(ck.get('checksum'))[:12]})",
            f"n: {doc.get('samples')} rows per store; t: {doc.get('t')}; seeds: {doc.get('seeds')}",
            "intervals: 2.5-97.5 percentiles of bootstrap replicates over rows, pooled over seeds"]  # fmt: skip


def fig_task_dependence(path: str | Path, out_dir: str | Path, stem: str = "audit_task_dependence") -> FigureOutput:
    """Check 1: mean inter-task cosine of the mean gradients and cos to the pure-noise direction against SNR."""
    out_dir = Path(out_dir)
    path, doc, rows = _load(path, "task_dependence", "snr")
    snr = np.array([r["snr"] for r in rows])
    fig, axes = new_figure(*SIZE)
    ax = axes[0, 0]
    _line_with_ci(ax, snr, rows, "mean_inter_task_cos", "mean inter-task cos(μ_a, μ_b)", 0, ci_key="ci")
    ctrl = np.array([_num(r["shuffled_control"]["value"]) for r in rows])
    clo = np.array([_num(r["shuffled_control"]["interval"][0]) for r in rows])
    chi = np.array([_num(r["shuffled_control"]["interval"][1]) for r in rows])
    ax.plot(snr, ctrl, lw=1.2, ls="--", label="shuffled class-balanced splits (control)", **series_style(1))
    ax.fill_between(snr, clo, chi, alpha=0.15, color=series_style(1)["color"])
    _line_with_ci(ax, snr, rows, "cos_to_noise_direction", "cos(μ_data, μ_noise), x0 = 0", 2)
    ax.plot(snr, [_num(r["v1_inter_task_cos"]) for r in rows], lw=1.0, ls=":", label="mean inter-task |cos(v1_a, v1_b)|",
            **series_style(3))  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("SNR(t) = ᾱ/(1-ᾱ)  (t: " + ", ".join(str(r["t"]) for r in rows) + ")")
    ax.set_ylabel("cosine")
    ax.set_title("Check 1 (critique §2): does μ_t depend on the task?")
    ax.legend(frameon=False, loc="best")
    files = save_figure(fig, out_dir, stem)
    body = (
        "Mean pairwise cosine between the mean gradients mu_t of the class-incremental tasks, against SNR, with the "
        "same statistic for random class-balanced splits of the same rows (control) and the cosine between the mean "
        "gradient of all rows and that of pure-noise inputs (x0 = 0). The critique predicts that at low SNR the "
        "inter-task cosine reaches the control and the noise direction. Values: "
        + ", ".join(f"t={r['t']}: {_num(r['mean_inter_task_cos']):.3f} (control {_num(r['shuffled_control']['value']):.3f}, "
                    f"noise {_num(r['cos_to_noise_direction']):.3f})" for r in rows) + "."
    )  # fmt: skip
    cap = write_caption(out_dir, stem, "Audit check 1: task dependence of mu_t", body, [path], _details(doc))
    return FigureOutput(stem, files + [cap], [path])


def fig_true_vs_empirical(path: str | Path, out_dir: str | Path, stem: str = "audit_true_vs_empirical") -> FigureOutput:
    """Check 2: explained share lambda1/trace and effective rank of the true and the empirical Fisher against t."""
    out_dir = Path(out_dir)
    path, doc, rows = _load(path, "true_vs_empirical", "t")
    t = [r["t"] for r in rows]
    fig, axes = new_figure(*WIDE, ncols=3)
    for i, side in enumerate(("empirical", "true")):
        st = series_style(i)
        for j, (name, label) in enumerate((("lambda1_over_trace", "λ1 / tr F"), ("effective_rank", "effective rank"))):
            ax = axes[0, j]
            y = [_num(r[side][name]) for r in rows]
            lo, hi = _ci([r[side] for r in rows], name + "_ci")
            ax.plot(t, y, lw=1.8, label=side, **st)
            ax.fill_between(t, lo, hi, alpha=0.2, color=st["color"])
            ax.set_ylabel(label)
        ax = axes[0, 2]
        for k in range(len(rows[0][side]["eigenvalues"])):
            ax.plot(t, [_num(r[side]["eigenvalues"][k]) for r in rows], lw=1.0 if k else 1.8, color=st["color"],
                    alpha=1.0 if k == 0 else 0.5, label=f"{side} λ1..λk" if k == 0 else None)  # fmt: skip
    axes[0, 2].set_yscale("log")
    axes[0, 2].set_ylabel("top eigenvalues")
    for ax in axes[0]:
        ax.set_xlabel("t")
        ax.legend(frameon=False, loc="best")
    axes[0, 0].set_title("Check 2 (critique §5): true vs empirical Fisher")
    files = save_figure(fig, out_dir, stem)
    body = (
        "Spectra of the empirical Fisher (target: the noise) and of the true Fisher (target: eps_theta(x_t) + xi, "
        "a unit-variance Gaussian predictive) of the same samples, per t: explained share lambda1/trace, effective "
        "rank exp(entropy of lambda/sum lambda) and the top eigenvalues. The critique predicts a near-isotropic true "
        "Fisher where the empirical one is rank-1. |cos(v1_true, v1_emp)| and tr ratio: "
        + ", ".join(f"t={r['t']}: {_num(r['cos_v1']):.3f}, {_num(r['trace_ratio']):.3g}" for r in rows)
        + "."
    )
    cap = write_caption(out_dir, stem, "Audit check 2: true vs empirical Fisher", body, [path], _details(doc))
    return FigureOutput(stem, files + [cap], [path])


def fig_stability(path: str | Path, out_dir: str | Path, stem: str = "audit_stability") -> FigureOutput:
    """Check 3: Davis-Kahan bound, residual bound and measured sin angle(v1, mu); Assumption 1's residuals."""
    out_dir = Path(out_dir)
    path, doc, rows = _load(path, "stability", "t")
    t = [r["t"] for r in rows]
    fig, axes = new_figure(*WIDE, ncols=2)
    ax = axes[0, 0]
    for i, (name, label) in enumerate((("dk_bound", "Davis–Kahan ‖R‖/(λ1−λ2)"), ("residual_bound", "‖R v1‖/λ1"),
                                       ("measured_sin", "measured sin∠(v1, μ)"))):  # fmt: skip
        _line_with_ci(ax, t, rows, name, label, i)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("bound on / value of sin∠(v1, μ)")
    ax.set_title("Check 3 (critique §4): eigenspace stability (≥ 1: vacuous)")
    ax.legend(frameon=False, loc="best")
    ax = axes[0, 1]
    for i, (name, label) in enumerate(
        (("linear_map_residual", "‖ε̂ − A x_t‖/‖ε̂‖"), ("identity_distance", "‖A − aI‖_F/‖A‖_F"))
    ):
        _line_with_ci(ax, t, rows, name, label, i + 3)
    ax.set_xlabel("t")
    ax.set_title(f"Assumption 1: least-squares linear map (n = {rows[0].get('n_linear')})")
    ax.legend(frameon=False, loc="best")
    files = save_figure(fig, out_dir, stem)
    body = (
        "Left: with F = c* mu mu^T + R, the Davis-Kahan bound ||R||_op / (lambda1 - lambda2), the residual bound "
        "||R v1|| / lambda1 (valid without a gap) and the measured sin of the angle between v1 and mu, per t; above "
        "the dashed line a bound says nothing. Right: relative residual of the least-squares linear map from x_t to "
        "eps_theta(x_t, t, y) and its distance from the best scaled identity. Values (DK, residual bound, sin): "
        + ", ".join(f"t={r['t']}: {_num(r['dk_bound']):.3g}, {_num(r['residual_bound']):.3g}, {_num(r['measured_sin']):.3g}"
                    for r in rows) + "."
    )  # fmt: skip
    cap = write_caption(
        out_dir, stem, "Audit check 3: eigenspace stability and Assumption 1", body, [path], _details(doc)
    )
    return FigureOutput(stem, files + [cap], [path])


def fig_band_ewc(path: str | Path, out_dir: str | Path, stem: str = "audit_band_ewc") -> FigureOutput:
    """Check 4: AFID@T and forgetting of rank-1 EWC + GD with the Fisher from each SNR band."""
    out_dir = Path(out_dir)
    path, doc, rows = _load(path, "band_ewc", "band")
    rows = sorted(rows, key=lambda r: ("high-snr", "mid-snr", "low-snr", "all").index(r["band"]))
    bands = [r["band"] for r in rows]
    fig, axes = new_figure(*WIDE, ncols=2)
    for j, (name, label) in enumerate((("afid", "AFID@T (↓)"), ("forgetting", "forgetting (↓)"))):
        ax = axes[0, j]
        ax.bar(bands, [_num(r[name]) for r in rows], yerr=[_num(r[name + "_se"]) if r[name + "_se"] is not None else 0 for r in rows],
               color=[series_style(i)["color"] for i in range(len(rows))], capsize=4)  # fmt: skip
        ax.set_ylabel(label)
    axes[0, 0].set_title("Check 4 (critique §3): rank-1 EWC + GD, Fisher per SNR band")
    files = save_figure(fig, out_dir, stem)
    body = (
        "Rank-1 EWC with generative distillation, the Fisher estimated from one SNR band (or all t), the same seeds "
        f"and lambda; mean ± standard error over seeds {doc.get('seeds')}. ||mu_band|| and cos(mu_band, mu_all) of "
        "the first task's Fisher: "
        + ", ".join(f"{r['band']}: {_num(r['mu_norm']):.3g}, {_num(r['cos_to_all']):.3f}" for r in rows)
        + "."
    )
    cap = write_caption(out_dir, stem, "Audit check 4: band-restricted EWC", body, [path], _details(doc))
    return FigureOutput(stem, files + [cap], [path])


AUDIT_FIGURE_MAKERS = {
    "audit_task_dependence": fig_task_dependence,
    "audit_true_vs_empirical": fig_true_vs_empirical,
    "audit_stability": fig_stability,
    "audit_band_ewc": fig_band_ewc,
}

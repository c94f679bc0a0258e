"""How sure, and where: bootstrap intervals, the n-sweep and block shares of one spectrum row.

:func:`entry_extras` adds to one spectrum.json row (the formulas are in
:mod:`geomprobe.fisher.resample` and :mod:`geomprobe.fisher.spectrum`):

    "ci"       flat-to-nested [lo, hi] 95% percentile intervals of every scalar over B row resamples
               (``--bootstrap B``), computed from K (and Q = (G o G)(G o G)^T for rel_err_diag)
    "n_sweep"  the same scalars on the first m rows for each m, with the random-direction null
    "shares"   shares of ||mu||^2, ||v1||^2 and tr F per UNet block and tensor (``--shares``)

:func:`summarize_spectra` is the spread across stores (``spectrum --from``): mean and standard
error over several spectrum.json files of every scalar, per t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geomprobe.analysis.shares import direction_shares
from geomprobe.errors import DataError, UsageError
from geomprobe.fisher.resample import CI_LEVEL, bootstrap_intervals, n_sweep, nest_scalars, squared_gram
from geomprobe.fisher.rows import GramStatistics
from geomprobe.fisher.spectrum import FisherSpectrum, top_fisher_direction

NULL_REPLICATES = 8


@dataclass
class UncertaintyOptions:
    """What :func:`entry_extras` computes: B bootstrap replicates (0 = off), n-sweep sizes, shares."""

    bootstrap: int = 0
    seed: int = 0
    n_sweep: list[int] = field(default_factory=list)
    null_replicates: int = NULL_REPLICATES
    shares: bool = False

    @property
    def active(self) -> bool:
        return self.bootstrap > 0 or bool(self.n_sweep) or self.shares

    def header(self) -> dict[str, Any]:
        """Top-level spectrum.json keys that describe the settings (seeds, B, sizes)."""
        out: dict[str, Any] = {}
        if self.bootstrap > 0:
            out["bootstrap"] = {
                "replicates": self.bootstrap,
                "seed": self.seed,
                "level": CI_LEVEL,
                "method": "percentile interval over rows resampled with replacement",
            }
        if self.n_sweep:
            out["n_sweep"] = {
                "sizes": list(self.n_sweep),
                "subsets": "first m rows of the store",
                "null_replicates": self.null_replicates,
                "seed": self.seed,
            }
        return out


def parse_sizes(text: str | None) -> list[int]:
    """``"64,128,256"`` -> [64, 128, 256] (UsageError on anything else)."""
    if not text:
        return []
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--n-sweep wants comma-separated row counts like 64,128,256, got {text!r}") from None
    return sorted(set(sizes))


def entry_extras(
    source: Any,
    stats: GramStatistics,
    spectrum: FisherSpectrum,
    options: UncertaintyOptions,
    layout: tuple[list[str], list[tuple[int, int]]] | None,
    top_k: int,
    max_memory: int,
) -> dict[str, Any]:
    """The "ci", "n_sweep" and "shares" keys of one spectrum.json row.

    Args:
        source: the row source of this key (read again for Q and for v1).
        stats: its Gram statistics.
        spectrum: its :class:`FisherSpectrum` (u1 in ``top_vector``).
        options: what to compute.
        layout: (param names, slices) of the rows; None for a projected store.
        top_k: eigenvalues per resample.
        max_memory: bytes for the extra passes over the rows.
    """
    centered = spectrum.centered
    out: dict[str, Any] = {}
    Q = squared_gram(source, max_memory) if (options.bootstrap or options.n_sweep) and not centered else None
    if options.bootstrap:
        ci = bootstrap_intervals(stats.K, Q, options.bootstrap, options.seed, top_k, centered)
        out["ci"] = nest_scalars(ci)
    if options.n_sweep:
        out["n_sweep"] = n_sweep(
            stats.K, options.n_sweep, stats.P, Q, top_k, centered, options.null_replicates, options.seed
        )
    if options.shares:
        if layout is None:
            raise UsageError("--shares needs a store of raw parameters (this store holds projected gradients)")
        mu = stats.mu
        diag = stats.diag_fisher - (mu * mu if centered else 0.0)
        v1 = None
        if spectrum.top_vector is not None and spectrum.eigenvalues[0] > 0:
            v1 = top_fisher_direction(
                source, spectrum.top_vector, float(spectrum.eigenvalues[0]), mu if centered else None, max_memory
            )
        out["shares"] = direction_shares(*layout, mu, diag, v1)
    return out


def _scalar_leaves(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a spectrum.json row (nested dicts and the eigenvalue list), flat ``a.b`` keys."""
    skip = {"t", "n", "P", "snr", "ci", "n_sweep", "shares"}
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalar_leaves(value, name + "."))
        elif isinstance(value, list):
            out.update({f"{name}.{j}": float(v) for j, v in enumerate(value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def summarize_spectra(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Mean and standard error across spectrum.json files (e.g. stores drawn with different --seed).

    Args:
        paths: spectrum.json files or directories holding one.

    Returns:
        {"sources": [...], "rows": [{"t", "count", "mean": {...}, "se": {...}}]} with the row layout
        of spectrum.json; se = sample standard deviation / sqrt(count) (null with one store).
    """
    import json

    from geomprobe.io import SPECTRUM_JSON

    files = [Path(p) / SPECTRUM_JSON if Path(p).is_dir() else Path(p) for p in paths]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"no spectrum.json at {', '.join(missing)}; run `geomprobe spectrum` on those stores first")
    per_t: dict[Any, list[dict[str, float]]] = {}
    for f in files:
        try:
            rows = json.loads(f.read_text())["rows"]
            for row in rows:
                per_t.setdefault(row["t"], []).append(_scalar_leaves(row))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise DataError(f"{f} is not a spectrum.json (written by `geomprobe spectrum`)") from None
    rows = []
    for t, leaves in per_t.items():
        keys = sorted(set.intersection(*(set(x) for x in leaves)))
        mean, se = {}, {}
        for k in keys:
            a = np.array([x[k] for x in leaves])
            mean[k] = float(a.mean())
            se[k] = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else None
        rows.append({"t": t, "count": len(leaves), "mean": nest_scalars(mean), "se": nest_scalars(se)})
    return {"sources": [str(f) for f in files], "rows": rows}


SPREAD_JSON = "spectrum_spread.json"


def write_spread(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """:func:`summarize_spectra` written to ``out_dir/spectrum_spread.json`` (default: the first spectrum's directory)."""
    from geomprobe.io import write_json

    summary = summarize_spectra(paths)
    out = Path(out_dir) if out_dir is not None else Path(summary["sources"][0]).parent
    out.mkdir(parents=True, exist_ok=True)
    return summary, write_json(out / SPREAD_JSON, summary)


def _fmt(x: Any) -> str:
    return "–" if x is None else format(x, ".3g")


def summary_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows of strings) for the CLI: intervals, n-sweep and top blocks, when present.

    Args:
        report: a spectrum.json object (``SpectrumResult.to_json()``).
    """
    rows = report["rows"]
    tables = []
    if all("ci" in r for r in rows):
        keys = ("lambda2_over_lambda1", "lambda1_over_trace", "effective_rank", "rel_err_rank1", "cos_v1_mu")
        lines = [
            [str(r["t"])] + [f"{_fmt(r[k])} [{_fmt(r['ci'][k][0])}, {_fmt(r['ci'][k][1])}]" for k in keys] for r in rows
        ]
        boot = report.get("bootstrap", {})
        title = f"95% bootstrap intervals (B={boot.get('replicates')}, seed {boot.get('seed')})"
        tables.append((title, ["t", "λ2/λ1", "λ1/Σλ", "eff. rank", "err_rank1", "cos(v1,μ)"], lines))
    if all("n_sweep" in r for r in rows) and rows:
        sizes = [p["n"] for p in rows[0]["n_sweep"]]
        lines = [
            [str(r["t"])]
            + [
                f"{_fmt(p['lambda2_over_lambda1'])} ({_fmt(p.get('null', {}).get('lambda2_over_lambda1'))})"
                for p in r["n_sweep"]
            ]
            for r in rows
        ]
        tables.append(("λ2/λ1 on the first n rows (null)", ["t", *[f"n={m}" for m in sizes]], lines))
    if all("shares" in r for r in rows):
        kinds = [k for k in ("mu", "v1", "trace") if k in rows[0]["shares"]]
        lines = []
        for r in rows:
            line = [str(r["t"])]
            for k in kinds:
                blocks = r["shares"][k]["blocks"]
                top = max(blocks, key=lambda b: blocks[b] or 0.0)
                line.append(f"{top} {_fmt(blocks[top])} (norm {_fmt(r['shares'][k]['norm_layers'])})")
            lines.append(line)
        tables.append(("largest block share", ["t", *[f"top block of {k}" for k in kinds]], lines))
    return tables

"""``geomprobe spectrum``: spectra, gaps, errors and cosine maps of a gradient store, per t and band.

For every selected key of the store (a timestep ``t700`` or a band key ``band-low-snr``) the rows
are streamed once per block pair into the Gram statistics (K = G G^T / n, G^T 1, column sums of
G^2; memory bounded by ``max_memory``), and :func:`geomprobe.fisher.spectrum.fisher_spectrum`
turns them into one row of ``spectrum.json`` (docs/design.md §9). When the t-range is an SNR band
and the store holds fixed timesteps of that band, one more row pools them (t = ``band-<name>``,
the rows of all its timesteps stacked: the Fisher of t drawn uniformly from the stored ones).

Outputs, written next to the shards (or into ``out_dir``):

    spectrum.json     {"store", "centered", "rows": [...], "mu_cosine": {"t", "matrix"}}
    cosine_maps.h5    per key: cos_to_mean (n,) signed cos(g_i, mu), labels, sample_index, t;
                      mu_cosine/matrix (T, T) and mu_cosine/t
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from geomprobe.analysis.identity import scaled_identity_mse
from geomprobe.analysis.means import MeanGradients
from geomprobe.analysis.uncertainty import UncertaintyOptions, entry_extras
from geomprobe.errors import DataError, UsageError
from geomprobe.fisher.rows import ConcatRows, StoreRows, gram_statistics
from geomprobe.fisher.spectrum import FisherSpectrum, fisher_spectrum
from geomprobe.io import COSINE_MAPS, DEFAULT_MAX_MEMORY, SPECTRUM_JSON, atomic_path, write_json
from geomprobe.timesteps import parse_timesteps

ProgressFn = Callable[[str, int, int], None]


@dataclass
class SpectrumEntry:
    """One analysed key: its label (int t or ``band-...``), SNR, store keys it pools, and the spectrum."""

    label: int | str
    snr: float
    keys: list[str]
    spectrum: FisherSpectrum
    scaled_identity_mse: float | None = None
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-row provenance for cosine_maps.h5: ``labels``, ``sample_index``, ``t`` (n,) int64."""
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpectrumResult:
    """Every analysed key of one spectrum run (``store``: its source), the mu cosine matrix, notes and extras."""

    store: str
    centered: bool
    top_k: int
    entries: list[SpectrumEntry] = field(default_factory=list)
    mu_cosine: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The spectrum.json object, exactly the keys of docs/design.md §9 (NaN becomes null)."""
        rows = []
        for e in self.entries:
            s = e.spectrum
            rows.append(
                {
                    "t": e.label,
                    "snr": _num(e.snr),
                    "n": s.n,
                    "P": s.P,
                    "eigenvalues": [_num(x) for x in s.eigenvalues],
                    "lambda2_over_lambda1": _num(s.lambda2_over_lambda1),
                    "lambda1_over_trace": _num(s.lambda1_over_trace),
                    "effective_rank": _num(s.effective_rank),
                    "trace": _num(s.trace),
                    "frobenius": _num(s.frobenius),
                    "mu_norm": _num(s.mu_norm),
                    "c_star": _num(s.c_star),
                    "rel_err_diag": _num(s.rel_err_diag),
                    "rel_err_rank1": _num(s.rel_err_rank1),
                    "rel_err_rankk": {k: _num(v) for k, v in s.rel_err_rankk.items()},
                    "cos_to_mean": {k: _num(v) for k, v in s.cos_summary().items()},
                    "cos_v1_mu": _num(s.cos_v1_mu),
                    "scaled_identity_mse": _num(e.scaled_identity_mse),
                    **_nums(e.extras),
                }
            )
        matrix = self.mu_cosine if self.mu_cosine is not None else np.zeros((0, 0))
        return {
            "store": self.store,
            "centered": self.centered,
            "rows": rows,
            "mu_cosine": {"t": [e.label for e in self.entries], "matrix": [[_num(x) for x in r] for r in matrix]},
            **self.extras,
        }


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _nums(obj: Any) -> Any:
    """Nested dicts/lists of numbers with NaN and inf as None (for spectrum.json)."""
    if isinstance(obj, dict):
        return {k: _nums(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nums(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def select_entries(store: Any, t_range: str | None) -> list[tuple[int | str, list[str]]]:
    """(label, [store keys]) to analyse. No t-range: every key of the store.

    A range or list selects the store's timesteps in it (all must be present). A band name uses
    the store's band key when it has one; otherwise the store's timesteps inside the band, each on
    its own row, plus one pooled row labelled ``band-<name>``.
    """
    keys = store.keys
    if not t_range:
        return [(store.timesteps[i], [k]) for i, k in enumerate(keys)]
    spec = parse_timesteps(t_range)
    if spec.is_band:
        band_key = f"band-{spec.band}"
        if band_key in keys:
            return [(band_key, [band_key])]
        inside = [k for k in keys if k.startswith("t") and int(k[1:]) in set(spec.timesteps)]
        if not inside:
            raise UsageError(
                f"store {store.path} has no rows in band {spec.band!r} (it has {', '.join(map(str, store.timesteps))})"
            )
        return [(int(k[1:]), [k]) for k in inside] + ([(band_key, inside)] if len(inside) > 1 else [])
    missing = [t for t in spec.timesteps if f"t{t}" not in keys]
    if missing:
        raise UsageError(
            f"store {store.path} has no rows for t={', '.join(map(str, missing))}; it has {', '.join(map(str, store.timesteps))}"
        )
    return [(t, [f"t{t}"]) for t in spec.timesteps]


def _load_model(store: Any, notes: list[str], device: str = "cpu"):
    """The store's model (checksum verified), or None with a note when it is not available.

    Any layout :func:`geomprobe.checkpoints.load_model` reads; the model's own notes join ``notes``.
    """
    from geomprobe.checkpoints import checkpoint_checksum, load_model

    ckpt = getattr(store, "checkpoint", {}) or {}
    path = ckpt.get("path")
    if not path or not Path(path).is_dir():
        notes.append(f"checkpoint {path!r} not found: scaled_identity_mse is null")
        return None
    actual = checkpoint_checksum(path)
    if ckpt.get("checksum") and actual != ckpt["checksum"]:
        raise DataError(
            f"checkpoint {path} has changed since the store was written (checksum {actual} != {ckpt['checksum']}); "
            "the scaled-identity MSE would come from another model"
        )
    model = load_model(path, device=device)
    notes.extend(model.notes)
    return model


def analyze_store(
    store: Any,
    t_range: str | None = None,
    top_k: int = 5,
    centered: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    with_model: bool = True,
    progress: ProgressFn | None = None,
    device: str = "cpu",
    gram_dtype: str = "float64",
    uncertainty: UncertaintyOptions | None = None,
) -> SpectrumResult:
    """Spectrum rows of a gradient store (path or :class:`GradientStore`), streamed in bounded memory.

    ``max_memory``: bytes for one key's working set (two row blocks + the n x n Gram matrix).
    ``with_model``: compute the scaled-identity MSE with
    the store's checkpoint (needs the checkpoint directory, verified by checksum). ``gram_dtype``:
    float64 (default) or float32 products for K (see :func:`geomprobe.fisher.rows.gram_statistics`).
    ``uncertainty``: bootstrap intervals, n-sweep and block shares per row
    (:mod:`geomprobe.analysis.uncertainty`; default none).
    """
    from geomprobe.probe import GradientStore

    if not isinstance(store, GradientStore):
        store = GradientStore(store)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    budget = int(max_memory)
    if gram_dtype not in ("float64", "float32"):
        raise UsageError(f"--gram-dtype must be float64 or float32, got {gram_dtype!r}")
    compute_dtype = getattr(torch, gram_dtype)
    selection = select_entries(store, t_range)
    result = SpectrumResult(store=str(store.path), centered=centered, top_k=top_k)
    checkpoint = _load_model(store, result.notes, device) if with_model else None
    uncertainty = uncertainty or UncertaintyOptions()
    result.extras = uncertainty.header()
    layout = None if store.projection else (store.param_names, store.param_slices)

    means = MeanGradients(budget)
    for label, keys in selection:
        source = StoreRows(store, keys[0]) if len(keys) == 1 else ConcatRows([StoreRows(store, k) for k in keys])
        name = f"t={label}" if isinstance(label, int) else str(label)
        on_pair = (lambda d, tot, _n=name: progress(_n, d, tot)) if progress else None
        stats = gram_statistics(source, budget, compute_dtype=compute_dtype, progress=on_pair)
        spectrum = fisher_spectrum(stats, top_k=top_k, centered=centered)
        extras = entry_extras(source, stats, spectrum, uncertainty, layout, top_k, budget) if uncertainty.active else {}
        means.add(spectrum.mu)
        spectrum.mu = None  # held by ``means`` within the budget
        mse = _store_identity_mse(checkpoint, store, keys) if checkpoint is not None else None
        rows = {
            name: torch.cat([getter(k) for k in keys]).numpy()
            for name, getter in (
                ("labels", store.labels),
                ("sample_index", store.sample_index),
                ("t", store.row_timesteps),
            )
        }
        snr = float(np.mean([float(store.meta(k)["snr"]) for k in keys]))
        result.entries.append(SpectrumEntry(label, snr, keys, spectrum, mse, rows=rows, extras=extras))
    result.mu_cosine = means.cosine_matrix()
    means.close()
    return result


def _store_identity_mse(checkpoint: Any, store: Any, keys: list[str]) -> float:
    """The scaled-identity MSE (paper Fig. 1) over the stored inputs of ``keys``, weighted by rows."""
    sq_sum, count = 0.0, 0
    for k in keys:
        batch = store.inputs(k)
        value = scaled_identity_mse(
            checkpoint.unet, batch.x0, batch.noise, batch.t, batch.y, checkpoint.scheduler.alphas_cumprod
        )
        sq_sum += value * len(batch)
        count += len(batch)
    return sq_sum / count


def write_spectrum(result: SpectrumResult, store: Any = None, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write spectrum.json and cosine_maps.h5 into ``out_dir`` (default: the store), atomically. Returns both paths.

    ``store`` is not read (each entry carries its rows' provenance); it is kept for callers.
    """
    out = Path(out_dir) if out_dir is not None else Path(result.store)
    out.mkdir(parents=True, exist_ok=True)
    json_path, maps_path = out / SPECTRUM_JSON, out / COSINE_MAPS
    write_json(json_path, result.to_json())
    with atomic_path(maps_path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["store"] = result.store
        f.attrs["centered"] = result.centered
        f.attrs["description"] = "cos_to_mean: signed cos(g_i, mu) per row (paper Fig. 2 plots |cos|)"
        for e in result.entries:
            g = f.create_group(str(e.label) if not isinstance(e.label, int) else f"t{e.label}")
            g.attrs["t"] = str(e.label)
            g.attrs["snr"] = e.snr
            g.attrs["eigenvalues"] = e.spectrum.eigenvalues
            g.create_dataset("cos_to_mean", data=e.spectrum.cos_to_mean.astype(np.float32))
            for name, values in e.rows.items():
                g.create_dataset(name, data=values)
        m = f.create_group("mu_cosine")
        m.create_dataset("matrix", data=result.mu_cosine if result.mu_cosine is not None else np.zeros((0, 0)))
        m.create_dataset("t", data=np.array([str(e.label) for e in result.entries], dtype=h5py.string_dtype()))
    return json_path, maps_path

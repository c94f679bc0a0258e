"""Analysis of gradient geometry: reports over gradient stores, the scaled-identity check, audits.

The Fisher formulas themselves live in :mod:`geomprobe.fisher.spectrum`; this package reads
stores, calls them and writes the results (re-exported here for convenience):

    analyze_store(store, t_range, top_k, centered, max_memory) -> SpectrumResult
    write_spectrum(result, store) -> (spectrum.json, cosine_maps.h5)
    fisher_spectrum(GramStatistics, top_k, centered) -> FisherSpectrum   (geomprobe.fisher.spectrum)
    mean_cosine_matrix([mu_t]) -> (T, T)                                paper Fig. 3a
    scaled_identity_mse(unet, x0, noise, t, y, alphas_cumprod)         paper Fig. 1
    davis_kahan_check / task_dependence                                  docs/design.md §7 audits
"""

from geomprobe.analysis.audit import DavisKahanCheck, davis_kahan_check, task_dependence
from geomprobe.analysis.identity import scaled_identity_mse
from geomprobe.analysis.report import (
    COSINE_MAPS,
    SPECTRUM_JSON,
    SpectrumEntry,
    SpectrumResult,
    analyze_store,
    select_entries,
    write_spectrum,
)
from geomprobe.fisher.spectrum import FisherSpectrum, fisher_spectrum, mean_cosine_matrix
from geomprobe.fisher.spectrum import top_eigenpairs as top_eigenvalues

__all__ = [
    "COSINE_MAPS",
    "SPECTRUM_JSON",
    "DavisKahanCheck",
    "FisherSpectrum",
    "SpectrumEntry",
    "SpectrumResult",
    "analyze_store",
    "davis_kahan_check",
    "fisher_spectrum",
    "mean_cosine_matrix",
    "scaled_identity_mse",
    "select_entries",
    "task_dependence",
    "top_eigenvalues",
    "write_spectrum",
]

"""Audits of the rank-1 claim (docs/design.md §7): eigenspace stability and task dependence.

Davis-Kahan: write F = c* mu mu^T + R. If the residual R is small against the eigengap, the top
eigenvector v1 of F must lie close to mu: sin angle(v1, mu) <= ||R||_op / (lambda1 - lambda2)
(the form of docs/design.md §7, with lambda of F). ||R||_op comes exactly from the Gram
statistics (:func:`geomprobe.fisher.spectrum.rank1_residual_op_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from geomprobe.fisher.rows import GramStatistics
from geomprobe.fisher.spectrum import fisher_spectrum, mean_cosine_matrix, rank1_residual_op_norm


@dataclass
class DavisKahanCheck:
    """lambda1, lambda2 of F; ||R||_op of R = F - c* mu mu^T; the bound and the measured sin angle."""

    lambda1: float
    lambda2: float
    residual_op_norm: float
    bound: float
    measured_sin: float

    @property
    def holds(self) -> bool:
        return self.measured_sin <= self.bound * (1 + 1e-9) + 1e-12

    def to_json(self) -> dict[str, float | bool]:
        return {
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "residual_op_norm": self.residual_op_norm,
            "gap": self.lambda1 - self.lambda2,
            "bound": self.bound,
            "measured_sin": self.measured_sin,
            "holds": self.holds,
        }


def davis_kahan_check(stats: GramStatistics) -> DavisKahanCheck:
    """The Davis-Kahan audit of one uncentered empirical Fisher (see the module docstring)."""
    spec = fisher_spectrum(stats, top_k=2, centered=False)
    lam = list(spec.eigenvalues) + [0.0, 0.0]
    l1, l2 = float(lam[0]), float(lam[1])
    r_op = rank1_residual_op_norm(stats, spec.c_star)
    gap = l1 - l2
    bound = r_op / gap if gap > 0 else math.inf
    cos = spec.cos_v1_mu if not math.isnan(spec.cos_v1_mu) else 0.0
    return DavisKahanCheck(l1, l2, r_op, bound, math.sqrt(max(0.0, 1.0 - cos**2)))


def task_dependence(mu_a: Mapping[int, np.ndarray], mu_b: Mapping[int, np.ndarray]) -> dict[int, float]:
    """cos(mu_t^A, mu_t^B) for every t both tasks have (docs/design.md §7, check 1). Signed."""
    common = sorted(set(mu_a) & set(mu_b))
    return {t: float(mean_cosine_matrix([mu_a[t], mu_b[t]])[0, 1]) for t in common}

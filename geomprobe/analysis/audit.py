"""Audits of the rank-1 claim (DESIGN section 7): eigenspace stability and task dependence.

Davis-Kahan: write F = c* mu mu^T + R. If the residual R is small against the eigengap, the top
eigenvector v1 of F must lie close to mu: sin angle(v1, mu) <= ||R||_op / (lambda1 - lambda2)
(the form of DESIGN section 7, with lambda of F). We compute ||R||_op exactly from the Gram
statistics: R = G^T M G with M = I/n - c* 1 1^T / n^2 (since mu = G^T 1 / n), whose nonzero
eigenvalues are those of the symmetric n x n matrix S^{1/2} M S^{1/2}, S = G G^T = n K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from geomprobe.analysis.spectrum import fisher_spectrum, mean_cosine_matrix
from geomprobe.fisher.rows import GramStatistics


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
            "lambda1": self.lambda1, "lambda2": self.lambda2, "residual_op_norm": self.residual_op_norm,
            "gap": self.lambda1 - self.lambda2, "bound": self.bound, "measured_sin": self.measured_sin,
            "holds": self.holds,
        }


def rank1_residual_op_norm(stats: GramStatistics, c_star: float) -> float:
    """||F - c* mu mu^T||_op (uncentered F = G^T G / n, mu = G^T 1 / n) from K alone."""
    n = stats.n
    S = n * stats.K
    w, U = np.linalg.eigh(S)
    root = (U * np.sqrt(np.clip(w, 0.0, None))) @ U.T  # S^{1/2}
    M = np.eye(n) / n - c_star * np.ones((n, n)) / n**2
    eig = np.linalg.eigvalsh(root @ M @ root)
    return float(np.abs(eig).max())


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
    """cos(mu_t^A, mu_t^B) for every t both tasks have (DESIGN section 7 check 1). Signed."""
    common = sorted(set(mu_a) & set(mu_b))
    return {t: float(mean_cosine_matrix([mu_a[t], mu_b[t]])[0, 1]) for t in common}

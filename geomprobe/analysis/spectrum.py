"""Spectral summary of one empirical Fisher from its Gram statistics (paper section 3.2, App. C).

Input: :class:`geomprobe.fisher.rows.GramStatistics` of the n x P gradient matrix G at one t
(or band): K = G G^T / n, G^T 1 and the column sums of G^2. Everything below follows from them
without forming F (DESIGN section 6); with ``centered=True`` F is the covariance
Sigma = (G - 1 mu^T)^T (G - 1 mu^T) / n = F - mu mu^T, whose Gram matrix is H K H.

    eigenvalues        top-k eigenvalues of K (= those of F)
    trace              tr F = tr K = sum ||g_i||^2 / n
    frobenius          ||F||_F = ||K||_F
    mu_norm            ||mu||, mu = G^T 1 / n (always the uncentered mean)
    c_star             mu^T F mu / ||mu||^4, with G mu = n K 1 / n = K 1 (paper eq. 6)
    rel_err_diag       sqrt(||F||^2 - ||diag F||^2) / ||F||
    rel_err_rank1      sqrt(||F||^2 - (mu^T F mu)^2 / ||mu||^4) / ||F||
    rel_err_rankk[k]   sqrt(||F||^2 - sum_{j<=k} lambda_j^2) / ||F||      (best rank-k, Eckart-Young)
    cos_to_mean        |g_i^T mu| / (||g_i|| ||mu||) = |(K 1)_i| / (sqrt(n K_ii) ||mu||), raw rows
    cos_v1_mu          |v1^T mu| / ||mu|| with v1 = G_c^T u1 / sqrt(n lambda1)

Relative errors are clipped at 0 before the square root (round-off can make the difference of
squares slightly negative when an approximation is nearly exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from geomprobe.fisher.gram import centering_matrix_apply
from geomprobe.fisher.rows import GramStatistics


@dataclass
class FisherSpectrum:
    """The numbers of one spectrum.json row (DESIGN section 9) plus the per-sample cosine map.

    ``cos_to_mean``: (n,) signed cosines cos(g_i, mu) (the paper plots their absolute value).
    ``mu``: (P,) float64 mean gradient, kept for the cosine matrix across timesteps.
    """

    n: int
    P: int
    eigenvalues: np.ndarray
    trace: float
    frobenius: float
    mu_norm: float
    c_star: float
    rel_err_diag: float
    rel_err_rank1: float
    rel_err_rankk: dict[str, float]
    cos_to_mean: np.ndarray
    cos_v1_mu: float
    mu: np.ndarray
    centered: bool = False

    @property
    def lambda2_over_lambda1(self) -> float:
        ev = self.eigenvalues
        return float(ev[1] / ev[0]) if ev.size >= 2 and ev[0] > 0 else float("nan")

    @property
    def lambda1_over_trace(self) -> float:
        return float(self.eigenvalues[0] / self.trace) if self.eigenvalues.size and self.trace > 0 else float("nan")

    def cos_summary(self) -> dict[str, float]:
        a = np.abs(self.cos_to_mean)
        return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90))}


def _relative(residual_sq: float, total_sq: float) -> float:
    if total_sq <= 0:
        return float("nan")
    return math.sqrt(max(residual_sq, 0.0) / total_sq)


LANCZOS_MIN_N = 256


def top_eigenvalues(K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of the symmetric (n, n) K, descending: values (k,), vectors (n, k).

    For n >= 256 Lanczos (scipy ``eigsh``, tolerance = machine precision, seeded start) on the
    dense K: a few dozen n^2 products instead of an O(n^3) decomposition (about 5-10x faster at
    n = 1024); LAPACK ``eigh`` otherwise, or when Lanczos does not converge.
    """
    n = K.shape[0]
    k = max(1, min(k, n))
    if n >= LANCZOS_MIN_N and k < n // 4:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        try:
            v0 = np.random.default_rng(0).standard_normal(n)
            w, U = eigsh(K, k=k, which="LA", tol=0.0, v0=v0, ncv=min(n, max(2 * k + 1, 24)))
            order = np.argsort(w)[::-1]
            return w[order], U[:, order]
        except ArpackNoConvergence:
            pass
    w, U = scipy.linalg.eigh(K, subset_by_index=[n - k, n - 1])
    return w[::-1].copy(), U[:, ::-1].copy()


def fisher_spectrum(stats: GramStatistics, top_k: int = 5, centered: bool = False) -> FisherSpectrum:
    """All spectrum.json numbers of one Fisher from its Gram statistics (see the module docstring)."""
    n = stats.n
    K_raw = stats.K
    K = centering_matrix_apply(K_raw) if centered else K_raw
    mu = stats.mu
    mu_norm_sq = float(mu @ mu)
    diag_F = stats.diag_fisher - (mu * mu if centered else 0.0)

    eigenvalues, U = top_eigenvalues(K, top_k)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    trace = float(np.trace(K))
    frob_sq = float(np.sum(K * K))

    # G mu = K 1 (uncentered rows); for the centered rows G_c mu = K 1 - ||mu||^2 1
    G_mu = K_raw.sum(axis=1)
    Gc_mu = G_mu - mu_norm_sq if centered else G_mu
    mu_F_mu = float(Gc_mu @ Gc_mu) / n  # mu^T F mu (or mu^T Sigma mu: mean((G_c mu)^2))
    c_star = mu_F_mu / mu_norm_sq**2 if mu_norm_sq > 0 else float("nan")
    rank1_residual = frob_sq - (mu_F_mu**2 / mu_norm_sq**2 if mu_norm_sq > 0 else 0.0)

    rel_err_rankk = {str(top_k): _relative(frob_sq - float(np.sum(eigenvalues[:top_k] ** 2)), frob_sq)}

    row_norms = np.sqrt(np.clip(n * np.diag(K_raw), 0.0, None))  # ||g_i||
    denom = row_norms * math.sqrt(mu_norm_sq)
    cos_to_mean = np.divide(G_mu, denom, out=np.zeros(n), where=denom > 0)

    if eigenvalues.size and eigenvalues[0] > 0 and mu_norm_sq > 0:
        cos_v1_mu = abs(float(U[:, 0] @ Gc_mu)) / math.sqrt(n * eigenvalues[0] * mu_norm_sq)
    else:
        cos_v1_mu = float("nan")

    return FisherSpectrum(
        n=n,
        P=stats.P,
        eigenvalues=eigenvalues,
        trace=trace,
        frobenius=math.sqrt(frob_sq),
        mu_norm=math.sqrt(mu_norm_sq),
        c_star=c_star,
        rel_err_diag=_relative(frob_sq - float(diag_F @ diag_F), frob_sq),
        rel_err_rank1=_relative(rank1_residual, frob_sq),
        rel_err_rankk=rel_err_rankk,
        cos_to_mean=cos_to_mean,
        cos_v1_mu=min(cos_v1_mu, 1.0) if not math.isnan(cos_v1_mu) else cos_v1_mu,
        mu=mu,
        centered=centered,
    )


def mean_cosine_matrix(mus: list[np.ndarray]) -> np.ndarray:
    """Pairwise cosines cos(mu_a, mu_b) (signed) of mean gradients across timesteps (paper Fig. 3a): (T, T)."""
    M = np.stack([np.asarray(m, dtype=np.float64) for m in mus])
    norms = np.linalg.norm(M, axis=1)
    norms[norms == 0] = 1.0
    Mn = M / norms[:, None]
    return np.clip(Mn @ Mn.T, -1.0, 1.0)

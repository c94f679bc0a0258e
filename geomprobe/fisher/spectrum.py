"""Spectral quantities of an empirical Fisher, each written once (docs/design.md §6).

Everything here works from the n x n Gram matrix K = G G^T / n of the per-sample gradients
G (n x P), never from the P x P matrix F = G^T G / n, whose nonzero spectrum equals K's:

    top_eigenpairs      the one eigensolver: LAPACK ``eigh`` for small dense K, Lanczos (scipy
                        ``eigsh``) for large K or a matrix-free operator
    rank1_scale         c* = mu^T F mu / ||mu||^4 (paper eq. 6), the least-squares scale along mu
    relative_error      sqrt(residual^2 / ||F||^2), clipped at 0
    fisher_spectrum     every spectrum.json number of one Fisher from its Gram statistics
    mean_cosine_matrix  cos(mu_a, mu_b) across timesteps (paper Fig. 3a)
    rank1_residual_op_norm  ||F - c* mu mu^T||_op from K alone (the Davis-Kahan audit)

With ``centered=True`` F is the covariance Sigma = F - mu mu^T, whose Gram matrix is H K H
(:func:`centered_gram`).

    eigenvalues        top-k eigenvalues of K (= those of F)
    trace              tr F = tr K = sum ||g_i||^2 / n
    frobenius          ||F||_F = ||K||_F
    mu_norm            ||mu||, mu = G^T 1 / n (always the uncentered mean)
    c_star             mean((G mu)^2) / ||mu||^4, with G mu = K 1 (uncentered rows)
    rel_err_diag       sqrt(||F||^2 - ||diag F||^2) / ||F||
    rel_err_rank1      sqrt(||F||^2 - (mu^T F mu)^2 / ||mu||^4) / ||F||
    rel_err_rankk[k]   sqrt(||F||^2 - sum_{j<=k} lambda_j^2) / ||F||      (best rank-k, Eckart-Young)
    cos_to_mean        g_i^T mu / (||g_i|| ||mu||) = (K 1)_i / (sqrt(n K_ii) ||mu||), signed, raw rows
    cos_v1_mu          |v1^T mu| / ||mu|| with v1 = G_c^T u1 / sqrt(n lambda1)
    effective_rank     exp(-sum_j p_j log p_j) over p_j = lambda_j / tr F (j <= k) plus one bucket
                       p_rest = 1 - sum_j p_j for the remainder of the spectrum (1 = rank 1, <= k+1)

:func:`spectrum_from_gram` computes all of these from K and two scalars (||mu||^2, ||diag F||^2),
so a resampled or subsampled Gram matrix (geomprobe.fisher.resample) gets the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from geomprobe.errors import DataError
from geomprobe.fisher.rows import GramStatistics
from geomprobe.io import numpy_generator

LANCZOS_MIN_N = 256
"""Dense K at least this large (and k < n/4) takes Lanczos instead of a full decomposition."""


def top_eigenpairs(
    A: np.ndarray | Any, k: int, *, seed: int = 0, tol: float = 0.0, ncv: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of a symmetric matrix or operator, descending.

    Args:
        A: a dense symmetric (n, n) array, or a scipy ``LinearOperator`` (matrix-free, e.g. an
            implicit Fisher), which always takes the Lanczos path (needs k < n).
        k: how many eigenpairs (clipped to 1..n for dense A).
        seed: seed of the Lanczos start vector (results are reproducible).
        tol: Lanczos relative tolerance (0 = machine precision).
        ncv: Lanczos basis size; default max(2k+1, 24) for dense A and max(4k, 20) for an
            operator (scipy's 2k+1 restarts far too often when trailing eigenvalues cluster).

    Returns:
        (values (k,), vectors (n, k)), float64, values descending, vector signs arbitrary.

    Dense A with n >= 256 and k < n/4 uses Lanczos on A (a few dozen n^2 products instead of an
    O(n^3) decomposition, 5-10x faster at n = 1024) and falls back to LAPACK when it does not
    converge; smaller dense A uses LAPACK ``eigh`` directly.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = A.shape[0]
    dense = isinstance(A, np.ndarray)
    k = max(1, min(k, n)) if dense else k
    if not dense or (n >= LANCZOS_MIN_N and k < n // 4):
        basis = ncv if ncv is not None else (max(2 * k + 1, 24) if dense else max(4 * k, 20))
        v0 = numpy_generator(seed).standard_normal(n)
        try:
            w, U = eigsh(A, k=k, which="LA", tol=tol, v0=v0, ncv=min(n, basis))
            order = np.argsort(w)[::-1]
            return w[order], U[:, order]
        except ArpackNoConvergence:
            if not dense:
                raise
    w, U = scipy.linalg.eigh(A, subset_by_index=[n - k, n - 1])
    return w[::-1].copy(), U[:, ::-1].copy()


def rank1_scale(mu_F_mu: float, mu_norm_sq: float) -> float:
    """c* = mu^T F mu / ||mu||^4 (paper eq. 6): the c minimising ||F - c mu mu^T||_F.

    Args:
        mu_F_mu: mu^T F mu = mean((G mu)^2).
        mu_norm_sq: ||mu||^2.

    Raises:
        DataError: the mean gradient is zero (c* undefined).
    """
    if mu_norm_sq == 0.0:
        raise DataError("the mean gradient is zero; c* = mu^T F mu / ||mu||^4 is undefined")
    return mu_F_mu / mu_norm_sq**2


def relative_error(residual_sq: float, total_sq: float) -> float:
    """sqrt(residual_sq / total_sq) with round-off below 0 clipped (nan when total_sq <= 0)."""
    if total_sq <= 0:
        return float("nan")
    return math.sqrt(max(residual_sq, 0.0) / total_sq)


def centered_gram(K: np.ndarray) -> np.ndarray:
    """H K H with H = I - 1 1^T / n: the Gram matrix of the centered rows (same scaling as K)."""
    row_mean = K.mean(axis=1, keepdims=True)
    col_mean = K.mean(axis=0, keepdims=True)
    return K - row_mean - col_mean + K.mean()


@dataclass
class FisherSpectrum:
    """The numbers of one spectrum.json row (docs/design.md §9) plus the per-sample cosine map.

    ``cos_to_mean``: (n,) signed cosines cos(g_i, mu) (the paper plots their absolute value).
    ``mu``: (P,) float64 mean gradient, for the cosine matrix across timesteps (a report may drop it
    to None once it has taken it, see :class:`geomprobe.analysis.means.MeanGradients`).
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
    mu: np.ndarray | None
    centered: bool = False
    top_vector: np.ndarray | None = None

    @property
    def effective_rank(self) -> float:
        """exp(entropy) of (lambda_1..k / tr F, remainder / tr F): 1 for rank 1, at most k + 1."""
        if self.trace <= 0 or not self.eigenvalues.size:
            return float("nan")
        p = self.eigenvalues / self.trace
        p = np.append(p, max(1.0 - float(p.sum()), 0.0))
        p = p[p > 0]
        return float(np.exp(-np.sum(p * np.log(p))))

    @property
    def lambda2_over_lambda1(self) -> float:
        """The eigengap ratio lambda2 / lambda1 (nan with fewer than two eigenvalues)."""
        ev = self.eigenvalues
        return float(ev[1] / ev[0]) if ev.size >= 2 and ev[0] > 0 else float("nan")

    @property
    def lambda1_over_trace(self) -> float:
        """The explained share lambda1 / sum(lambda) = lambda1 / tr F."""
        return float(self.eigenvalues[0] / self.trace) if self.eigenvalues.size and self.trace > 0 else float("nan")

    def cos_summary(self) -> dict[str, float]:
        """Median, 10th and 90th percentile of |cos(g_i, mu)|."""
        a = np.abs(self.cos_to_mean)
        return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90))}


def _cosines(K_raw: np.ndarray, G_mu: np.ndarray, mu_norm_sq: float) -> np.ndarray:
    """Signed cos(g_i, mu) = (G mu)_i / (||g_i|| ||mu||), ||g_i|| = sqrt(n K_ii): (n,)."""
    n = K_raw.shape[0]
    row_norms = np.sqrt(np.clip(n * np.diag(K_raw), 0.0, None))
    denom = row_norms * math.sqrt(mu_norm_sq)
    return np.divide(G_mu, denom, out=np.zeros(n), where=denom > 0)


def _cos_v1_mu(U: np.ndarray, eigenvalues: np.ndarray, Gc_mu: np.ndarray, n: int, mu_norm_sq: float) -> float:
    """|v1^T mu| / ||mu|| with v1 = G_c^T u1 / sqrt(n lambda1), so v1^T mu = u1^T (G_c mu) / sqrt(n lambda1)."""
    if not (eigenvalues.size and eigenvalues[0] > 0 and mu_norm_sq > 0):
        return float("nan")
    return min(abs(float(U[:, 0] @ Gc_mu)) / math.sqrt(n * eigenvalues[0] * mu_norm_sq), 1.0)


def fisher_spectrum(stats: GramStatistics, top_k: int = 5, centered: bool = False) -> FisherSpectrum:
    """All spectrum.json numbers of one Fisher from its Gram statistics (see the module docstring).

    Args:
        stats: K = G G^T / n, column sums and column sums of squares of G (one pass over G).
        top_k: eigenvalues to report, and the rank of the best rank-k error.
        centered: the covariance Sigma = F - mu mu^T instead of the second moment.

    Returns:
        A :class:`FisherSpectrum` (float64 numbers).
    """
    mu = stats.mu
    diag_F = stats.diag_fisher - (mu * mu if centered else 0.0)
    return spectrum_from_gram(
        stats.K, float(mu @ mu), float(diag_F @ diag_F), top_k=top_k, centered=centered, P=stats.P, mu=mu
    )


def spectrum_from_gram(
    K_raw: np.ndarray,
    mu_norm_sq: float,
    diag_sq: float,
    top_k: int = 5,
    centered: bool = False,
    P: int = 0,
    mu: np.ndarray | None = None,
    eig: tuple[np.ndarray, np.ndarray] | None = None,
) -> FisherSpectrum:
    """The spectrum.json numbers from the uncentered Gram matrix and two scalars.

    Args:
        K_raw: (n, n) uncentered K = G G^T / n (rows may repeat, e.g. a bootstrap replicate).
        mu_norm_sq: ||mu||^2 (= 1^T K 1 / n).
        diag_sq: ||diag F||^2 (of Sigma when centered); nan gives a nan rel_err_diag.
        top_k: eigenvalues to report, and the rank of the best rank-k error.
        centered: analyse Sigma = F - mu mu^T (Gram matrix H K H).
        P: number of parameters (recorded only).
        mu: (P,) mean gradient to keep (recorded only; default empty).
        eig: the top-k eigenpairs of K (or H K H), (values (k,), vectors (n, k)), when already
            known (e.g. from a smaller equivalent matrix); default: :func:`top_eigenpairs`.

    Returns:
        A :class:`FisherSpectrum`; ``top_vector`` is u1 (n,), the top eigenvector of K (or H K H).
    """
    n = K_raw.shape[0]
    K = centered_gram(K_raw) if centered else K_raw
    eigenvalues, U = eig if eig is not None else top_eigenpairs(K, top_k)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    frob_sq = float(np.sum(K * K))

    G_mu = K_raw.sum(axis=1)  # G mu = K 1 (uncentered rows); centered rows: G_c mu = K 1 - ||mu||^2 1
    Gc_mu = G_mu - mu_norm_sq if centered else G_mu
    mu_F_mu = float(Gc_mu @ Gc_mu) / n  # mu^T F mu (or mu^T Sigma mu)
    c_star = rank1_scale(mu_F_mu, mu_norm_sq) if mu_norm_sq > 0 else float("nan")
    rank1_captured = mu_F_mu**2 / mu_norm_sq**2 if mu_norm_sq > 0 else 0.0

    return FisherSpectrum(
        n=n,
        P=P,
        eigenvalues=eigenvalues,
        trace=float(np.trace(K)),
        frobenius=math.sqrt(frob_sq),
        mu_norm=math.sqrt(mu_norm_sq),
        c_star=c_star,
        rel_err_diag=relative_error(frob_sq - diag_sq, frob_sq) if math.isfinite(diag_sq) else float("nan"),
        rel_err_rank1=relative_error(frob_sq - rank1_captured, frob_sq),
        # the best rank-k error for the k actually available: at most n eigenvalues exist
        rel_err_rankk={str(min(top_k, n)): relative_error(frob_sq - float(np.sum(eigenvalues[:top_k] ** 2)), frob_sq)},
        cos_to_mean=_cosines(K_raw, G_mu, mu_norm_sq),
        cos_v1_mu=_cos_v1_mu(U, eigenvalues, Gc_mu, n, mu_norm_sq),
        mu=mu if mu is not None else np.zeros(0),
        centered=centered,
        top_vector=U[:, 0].copy() if U.size else None,
    )


def mean_cosine_matrix(mus: list[np.ndarray]) -> np.ndarray:
    """Pairwise signed cosines cos(mu_a, mu_b) of mean gradients (paper Fig. 3a): (T, T)."""
    M = np.stack([np.asarray(m, dtype=np.float64) for m in mus])
    norms = np.linalg.norm(M, axis=1)
    norms[norms == 0] = 1.0
    Mn = M / norms[:, None]
    return np.clip(Mn @ Mn.T, -1.0, 1.0)


def rank1_residual_op_norm(stats: GramStatistics, c_star: float) -> float:
    """||F - c* mu mu^T||_op (uncentered F = G^T G / n, mu = G^T 1 / n) from K alone.

    R = G^T M G with M = I/n - c* 1 1^T / n^2, whose nonzero eigenvalues are those of the
    symmetric n x n matrix S^{1/2} M S^{1/2}, S = G G^T = n K.
    """
    n = stats.n
    w, U = np.linalg.eigh(n * stats.K)
    root = (U * np.sqrt(np.clip(w, 0.0, None))) @ U.T  # S^{1/2}
    M = np.eye(n) / n - c_star * np.ones((n, n)) / n**2
    return float(np.abs(np.linalg.eigvalsh(root @ M @ root)).max())


def top_fisher_direction(
    source: Any, u1: np.ndarray, lambda1: float, mu: np.ndarray | None = None, max_memory: int | None = None
) -> np.ndarray:
    """v1 = G_c^T u1 / sqrt(n lambda1), the unit top eigenvector of F (or Sigma), streamed in one pass.

    Args:
        source: the row source G (n, P) the Gram matrix was built from.
        u1: (n,) top eigenvector of K (of H K H when centered).
        lambda1: its eigenvalue (> 0).
        mu: (P,) mean gradient when centered (G_c^T u1 = G^T u1 - mu (1^T u1) n / n); None: uncentered.
        max_memory: bytes for the row blocks (default: geomprobe.io.DEFAULT_MAX_MEMORY).

    Returns:
        (P,) float64 unit vector v1.
    """
    import torch

    from geomprobe.fisher.rows import transpose_times
    from geomprobe.io import DEFAULT_MAX_MEMORY

    if not lambda1 > 0:
        raise DataError("the top eigenvalue is zero; v1 is undefined")
    n = u1.shape[0]
    v = transpose_times(source, torch.from_numpy(np.asarray(u1, dtype=np.float64)), max_memory or DEFAULT_MAX_MEMORY)
    v = v.numpy()
    if mu is not None:
        v = v - mu * float(np.sum(u1))
    return v / math.sqrt(n * lambda1)

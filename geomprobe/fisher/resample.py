"""Resampled and subsampled Fisher spectra from the Gram matrix alone (docs/design.md §6).

Resampling the rows of G (n x P) with replacement, indices idx (m,), gives the rows G[idx] and
the Gram matrix K_idx = G[idx] G[idx]^T / m = (n / m) K[idx][:, idx]: every spectrum.json number
of the resampled Fisher F_w = sum_i w_i g_i g_i^T / m (w = multiplicities) follows from K_idx by
:func:`geomprobe.fisher.spectrum.spectrum_from_gram`, with two scalars:

    ||mu_w||^2     = 1^T K_idx 1 / m
    ||diag F_w||^2 = w^T Q w / m^2,  Q = (G o G)(G o G)^T  (n x n, one streamed pass: :func:`squared_gram`)

So a bootstrap replicate costs O(n^2) + one top-k eigensolve, and never touches G. Nested
subsets (the n-sweep) are idx = 0..m-1.

The null line of the n-sweep: rows g_i = r_i z_i / ||z_i||, z_i ~ N(0, I_P), with the store's row
norms r_i (no shared direction). Their Gram matrix is drawn exactly without P-dimensional
vectors: Z Z^T ~ Wishart(P, I_m) by the Bartlett decomposition (O(m^3)), then normalised to
cosines and scaled by r_i r_j / m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.rows import gram_statistics
from geomprobe.fisher.spectrum import FisherSpectrum, spectrum_from_gram, top_eigenpairs

CI_LEVEL = 0.95


class _SquaredRows:
    """The row source G o G (elementwise squares), block by block."""

    def __init__(self, source: Any):
        self.source, self.n, self.P = source, source.n, source.P

    def blocks(self, rows: int):
        for b in self.source.blocks(rows):
            b = b if b.is_floating_point() and b.dtype != torch.float16 else b.float()
            yield b * b


def squared_gram(source: Any, max_memory: int) -> np.ndarray:
    """Q = (G o G)(G o G)^T, (n, n) float64, one streamed pass (for ||diag F_w||^2 = w^T Q w / m^2).

    Args:
        source: a row source G (n, P) (geomprobe.fisher.rows).
        max_memory: bytes for two row blocks plus the n x n result.
    """
    stats = gram_statistics(_SquaredRows(source), max_memory)
    return stats.K * stats.n


def bootstrap_indices(n: int, replicates: int, seed: int) -> np.ndarray:
    """(B, n) row indices drawn with replacement by ``np.random.default_rng(seed).integers``."""
    if replicates < 1:
        raise UsageError(f"--bootstrap needs at least 1 replicate, got {replicates}")
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def subsample_spectrum(
    K: np.ndarray, idx: np.ndarray, Q: np.ndarray | None = None, top_k: int = 5, centered: bool = False
) -> FisherSpectrum:
    """The spectrum of the Fisher of rows G[idx] (repeats allowed) from K = G G^T / n.

    Args:
        K: (n, n) uncentered Gram matrix of all rows.
        idx: (m,) row indices (a bootstrap draw, or 0..m-1 for a nested subset).
        Q: (n, n) :func:`squared_gram`, or None (rel_err_diag is then nan). Centered: always nan,
            since ||diag Sigma_w||^2 involves sum_p mu_p^4, which is quartic in w and not in Q.
        top_k: eigenvalues to report.
        centered: the covariance instead of the second moment.

    Returns:
        A :class:`FisherSpectrum` of the m resampled rows (its ``mu`` is empty).
    """
    n, m = K.shape[0], idx.shape[0]
    K_idx = K[np.ix_(idx, idx)] * (n / m)
    mu_norm_sq = float(K_idx.sum()) / m
    diag_sq = float("nan")
    if Q is not None and not centered:
        w = np.bincount(idx, minlength=n).astype(np.float64)
        diag_sq = float(w @ Q @ w) / m**2
    eig = _distinct_row_eigenpairs(K, idx, top_k, centered)
    return spectrum_from_gram(K_idx, mu_norm_sq, diag_sq, top_k=top_k, centered=centered, eig=eig)


def _distinct_row_eigenpairs(
    K: np.ndarray, idx: np.ndarray, top_k: int, centered: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of K_idx = S K_u S^T (n/m) from the smaller D K_u D (D = diag(sqrt(counts))).

    With S (m, u) selecting the u distinct rows and C = S^T S = diag(counts): if D K_u D y = lam y
    then K_idx (S D^-1 y) = lam S D^-1 y, and ||S D^-1 y|| = ||y||; a bootstrap draw has u ~ 0.63 m,
    so Lanczos costs ~0.4x. Centered: K_u -> P K_u P^T with P = I - 1 c^T / m (weighted mean).
    """
    n, m = K.shape[0], idx.shape[0]
    rows, inverse, counts = np.unique(idx, return_inverse=True, return_counts=True)
    K_u = K[np.ix_(rows, rows)] * (n / m)
    if centered:
        Pm = np.eye(rows.size) - np.outer(np.ones(rows.size), counts) / m
        K_u = Pm @ K_u @ Pm.T
    d = np.sqrt(counts.astype(np.float64))
    values, Y = top_eigenpairs(K_u * d[:, None] * d[None, :], top_k)
    return values, (Y / d[:, None])[inverse]


def spectrum_scalars(s: FisherSpectrum) -> dict[str, float]:
    """Every scalar of a spectrum.json row, flat: ``eigenvalues.0``, ``rel_err_rankk.5``, ``cos_to_mean.median``..."""
    out = {f"eigenvalues.{j}": float(v) for j, v in enumerate(s.eigenvalues)}
    out.update(
        lambda2_over_lambda1=s.lambda2_over_lambda1,
        lambda1_over_trace=s.lambda1_over_trace,
        effective_rank=s.effective_rank,
        trace=s.trace,
        frobenius=s.frobenius,
        mu_norm=s.mu_norm,
        c_star=s.c_star,
        rel_err_diag=s.rel_err_diag,
        rel_err_rank1=s.rel_err_rank1,
        cos_v1_mu=s.cos_v1_mu,
    )
    out.update({f"rel_err_rankk.{k}": v for k, v in s.rel_err_rankk.items()})
    out.update({f"cos_to_mean.{k}": v for k, v in s.cos_summary().items()})
    return out


def nest_scalars(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat ``a.b`` keys back into the spectrum.json row layout (``eigenvalues`` becomes a list)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = value
    if isinstance(out.get("eigenvalues"), dict):
        ev = out["eigenvalues"]
        out["eigenvalues"] = [ev[str(j)] for j in range(len(ev))]
    return out


def bootstrap_intervals(
    K: np.ndarray,
    Q: np.ndarray | None,
    replicates: int,
    seed: int,
    top_k: int = 5,
    centered: bool = False,
    level: float = CI_LEVEL,
) -> dict[str, list[float]]:
    """Percentile intervals of every spectrum scalar over rows resampled with replacement.

    Args:
        K: (n, n) uncentered Gram matrix.
        Q: (n, n) :func:`squared_gram` or None.
        replicates: B.
        seed: seed of :func:`bootstrap_indices` (the same draws for every key).
        top_k: eigenvalues per replicate.
        centered: the covariance instead of the second moment.
        level: coverage of the central percentile interval.

    Returns:
        Flat key (as :func:`spectrum_scalars`) -> [lo, hi]; [nan, nan] when a scalar is never finite.
    """
    draws = bootstrap_indices(K.shape[0], replicates, seed)
    values: dict[str, list[float]] = {}
    for idx in draws:
        for key, v in spectrum_scalars(subsample_spectrum(K, idx, Q, top_k, centered)).items():
            values.setdefault(key, []).append(v)
    tail = 100 * (1 - level) / 2
    out = {}
    for key, vs in values.items():
        a = np.asarray(vs, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[key] = [float(x) for x in np.percentile(a, [tail, 100 - tail])] if a.size else [math.nan, math.nan]
    return out


def null_gram(norms: np.ndarray, P: int, rng: np.random.Generator) -> np.ndarray:
    """K of rows r_i z_i / ||z_i||, z_i ~ N(0, I_P): (m, m) with K_ij = r_i r_j cos(z_i, z_j) / m.

    Z Z^T ~ Wishart(P, I_m) is drawn by the Bartlett decomposition (A lower triangular,
    A_ii^2 ~ chi2(P - i), A_ij ~ N(0, 1) below the diagonal, Z Z^T = A A^T); when P < m, Z itself.
    """
    m = norms.shape[0]
    if P >= m:
        A = np.tril(rng.standard_normal((m, m)), -1)
        A[np.diag_indices(m)] = np.sqrt(rng.chisquare(P - np.arange(m)))
        W = A @ A.T
    else:
        Z = rng.standard_normal((m, P))
        W = Z @ Z.T
    d = np.sqrt(np.diag(W))
    return (norms[:, None] * norms[None, :]) * (W / np.outer(d, d)) / m


def null_ratios(norms: np.ndarray, P: int, replicates: int, seed: int) -> dict[str, float]:
    """Expected lambda2/lambda1 and lambda1/tr F of rows with these norms and random directions.

    Args:
        norms: (m,) row norms ||g_i||.
        P: row length.
        replicates: Wishart draws averaged.
        seed: seed of the numpy Generator.

    Returns:
        {"lambda2_over_lambda1": mean, "lambda1_over_trace": mean} over the draws.
    """
    rng = np.random.default_rng(seed)
    ratios, shares = [], []
    for _ in range(replicates):
        K = null_gram(norms, P, rng)
        ev, _ = top_eigenpairs(K, 2)
        ratios.append(ev[1] / ev[0])
        shares.append(ev[0] / np.trace(K))
    return {"lambda2_over_lambda1": float(np.mean(ratios)), "lambda1_over_trace": float(np.mean(shares))}


def n_sweep(
    K: np.ndarray,
    sizes: Sequence[int],
    P: int,
    Q: np.ndarray | None = None,
    top_k: int = 5,
    centered: bool = False,
    null_replicates: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Spectrum scalars of the first m rows for each m in ``sizes``, with the random-direction null.

    Args:
        K: (n, n) uncentered Gram matrix.
        sizes: subset sizes m (each 2..n).
        P: row length (for the null).
        Q: (n, n) :func:`squared_gram` or None.
        top_k: eigenvalues per subset.
        centered: the covariance instead of the second moment.
        null_replicates: Wishart draws per size for the null (0: no null).
        seed: seed of the null draws.

    Returns:
        One dict per size: {"n": m, **nested scalars, "null": {...}}.
    """
    n = K.shape[0]
    bad = [m for m in sizes if not 2 <= m <= n]
    if bad:
        raise UsageError(f"--n-sweep sizes must lie in 2..{n} (the rows per t), got {bad}")
    norms = np.sqrt(np.clip(np.diag(K) * n, 0.0, None))
    out = []
    for m in sizes:
        s = subsample_spectrum(K, np.arange(m), Q, top_k, centered)
        row = {"n": int(m), **nest_scalars(spectrum_scalars(s))}
        if null_replicates > 0:
            row["null"] = null_ratios(norms[:m], P, null_replicates, seed)
        out.append(row)
    return out

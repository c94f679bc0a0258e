"""Fisher numbers of the critique's audit (docs/design.md §7), from Gram matrices and row weights.

Everything works in the n-dimensional row space. ``S = G G^T`` (n x n, float64) is the Gram
matrix of the rows (unnormalised; ``S = n K`` for the K of :class:`GramStatistics`) and ``w`` (n,)
are row weights that sum to n (all ones for the estimate itself, multinomial counts for a bootstrap
replicate: resampling rows = reweighting them). With W = diag(w):

    F_w = G^T W G / n,  mu_w = G^T w / n,   nonzero spectrum of F_w = spectrum of D S D / n, D = W^{1/2}
    v_j = G^T D u_j / sqrt(n lambda_j)       (D S D / n) u_j = lambda_j u_j
    ||mu||^2 = w^T S w / n^2,  G mu = S w / n,  mu^T F mu = sum_i w_i (G mu)_i^2 / n,  c* = mu^T F mu / ||mu||^4
    mu^T v_1 = w^T S D u_1 / (n sqrt(n lambda_1))
    R = F - c* mu mu^T = G^T M G,  M = W / n - c* w w^T / n^2: nonzero eigenvalues of S^{1/2} M S^{1/2}
    ||R v_1||^2 = lambda_1^2 - 2 c* lambda_1 (mu^T v_1)^2 + c*^2 (mu^T v_1)^2 ||mu||^2

Bounds on sin angle(v1, mu) (F v1 = lambda1 v1, so the part of R v1 orthogonal to mu is
lambda1 (I - mu mu^T/||mu||^2) v1, of norm lambda1 sin angle):

    Davis-Kahan      sin <= ||R||_op / (lambda1 - lambda2)
    residual bound   sin <= ||R v1|| / lambda1 <= ||R||_op / lambda1

(c* mu mu^T has 0 as its only other eigenvalue, so the residual bound needs no gap.)

Also: the effective rank exp(H(lambda / sum lambda)), group means and group top eigenvectors from a
stacked Gram matrix (cosines between tasks, or between the true and the empirical Fisher of the same
samples), bootstrap weights and intervals, and the least-squares linear map of Assumption 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from geomprobe.fisher.spectrum import rank1_scale, top_eigenpairs


def effective_rank(eigenvalues: np.ndarray) -> float:
    """exp(entropy of p = lambda / sum lambda) (eigenvalues clipped at 0): 1 for rank 1, d for isotropic."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return float("nan")
    p = lam[lam > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def _weights(n: int, w: np.ndarray | None) -> np.ndarray:
    return np.ones(n) if w is None else np.asarray(w, dtype=np.float64)


def weighted_eigen(S: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of D S D / n (descending, clipped at 0): the nonzero spectrum of F_w and its u_j."""
    n = S.shape[0]
    d = np.sqrt(_weights(n, w))
    lam, U = np.linalg.eigh((d[:, None] * S * d[None, :]) / n)
    return np.clip(lam[::-1], 0.0, None), U[:, ::-1]


def spectrum_numbers(S: np.ndarray, w: np.ndarray | None = None, top_k: int = 5) -> dict:
    """Top-k eigenvalues, lambda2/lambda1, lambda1/trace and the effective rank of F_w."""
    lam, _ = weighted_eigen(S, w)
    trace = float(lam.sum())
    return {
        "eigenvalues": [float(x) for x in lam[:top_k]],
        "lambda2_over_lambda1": float(lam[1] / lam[0]) if lam.size > 1 and lam[0] > 0 else float("nan"),
        "lambda1_over_trace": float(lam[0] / trace) if trace > 0 else float("nan"),
        "effective_rank": effective_rank(lam),
        "trace": trace,
    }


def _sqrt_psd(S: np.ndarray) -> np.ndarray:
    w, U = np.linalg.eigh(S)
    return (U * np.sqrt(np.clip(w, 0.0, None))) @ U.T


def stability_numbers(S: np.ndarray, w: np.ndarray | None = None, S_root: np.ndarray | None = None) -> dict:
    """lambda1, lambda2, ||R||_op, the Davis-Kahan and residual bounds and the measured sin angle(v1, mu).

    ``S_root``: S^{1/2}, when the caller reuses it across bootstrap replicates. ``vacuous`` means the
    Davis-Kahan bound is >= 1 (it then says nothing, since sin <= 1 anyway).
    """
    n = S.shape[0]
    w = _weights(n, w)
    lam, U = weighted_eigen(S, w)
    l1, l2 = float(lam[0]), float(lam[1]) if lam.size > 1 else 0.0
    Sw = S @ w
    mu_sq = float(w @ Sw) / n**2
    G_mu = Sw / n
    c_star = rank1_scale(float(w @ G_mu**2) / n, mu_sq)
    mu_v1 = float(Sw @ (np.sqrt(w) * U[:, 0])) / (n * math.sqrt(n * l1)) if l1 > 0 else 0.0
    cos = min(abs(mu_v1) / math.sqrt(mu_sq), 1.0)
    root = _sqrt_psd(S) if S_root is None else S_root
    M = np.diag(w) / n - c_star * np.outer(w, w) / n**2
    r_op = float(np.abs(np.linalg.eigvalsh(root @ M @ root)).max())
    rv1_sq = l1**2 - 2 * c_star * l1 * mu_v1**2 + c_star**2 * mu_v1**2 * mu_sq
    gap = l1 - l2
    dk = r_op / gap if gap > 0 else math.inf
    return {
        "lambda1": l1,
        "lambda2": l2,
        "c_star": c_star,
        "residual_op_norm": r_op,
        "dk_bound": dk,
        "residual_bound": math.sqrt(max(rv1_sq, 0.0)) / l1 if l1 > 0 else math.inf,
        "residual_op_bound": r_op / l1 if l1 > 0 else math.inf,
        "measured_sin": math.sqrt(max(0.0, 1.0 - cos**2)),
        "vacuous": bool(dk >= 1.0),
    }


# --------------------------------------------------------------------------- groups of rows


def group_mean_cosines(
    S: np.ndarray,
    groups: Sequence[np.ndarray],
    w: np.ndarray | None = None,
    cross: np.ndarray | None = None,
    cross_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed cos(mu_a, mu_b) of the weighted group means (groups: index arrays into the rows of S).

    ``cross`` (n,) = G z for a fixed direction z of norm ``cross_norm`` (e.g. the pure-noise mean
    gradient): then also cos(mu_a, z) per group. Returns (matrix (A, A), cosines to z (A,) or None).
    """
    n = S.shape[0]
    w = _weights(n, w)
    M = np.zeros((len(groups), n))
    for a, idx in enumerate(groups):
        M[a, idx] = w[idx] / max(w[idx].sum(), 1e-300)
    inner = M @ S @ M.T
    norms = np.sqrt(np.clip(np.diag(inner), 1e-300, None))
    C = np.clip(inner / np.outer(norms, norms), -1.0, 1.0)
    to_z = None
    if cross is not None and cross_norm:
        to_z = np.clip((M @ cross) / (norms * cross_norm), -1.0, 1.0)
    return C, to_z


def group_top_vector_cosines(S: np.ndarray, groups: Sequence[np.ndarray], w: np.ndarray | None = None) -> np.ndarray:
    """|cos(v1_a, v1_b)| of the top eigenvectors of each group's own (weighted) Fisher: (A, A).

    v1_a = G_a^T D_a u_a / sqrt(n_a lambda_a), so v1_a^T v1_b = u_a^T D_a S_ab D_b u_b / sqrt(n_a lambda_a n_b lambda_b).
    """
    n = S.shape[0]
    w = _weights(n, w)
    vecs = []
    for idx in groups:
        sub = S[np.ix_(idx, idx)]
        d = np.sqrt(w[idx])
        lam, U = top_eigenpairs((d[:, None] * sub * d[None, :]) / len(idx), 1)
        vecs.append((idx, d * U[:, 0] / math.sqrt(max(len(idx) * lam[0], 1e-300))))
    A = len(groups)
    C = np.eye(A)
    for a in range(A):
        for b in range(a + 1, A):
            (ia, xa), (ib, xb) = vecs[a], vecs[b]
            C[a, b] = C[b, a] = min(abs(float(xa @ S[np.ix_(ia, ib)] @ xb)), 1.0)
    return C


def mean_off_diagonal(C: np.ndarray) -> float:
    """Mean of the entries above the diagonal (the mean pairwise cosine)."""
    iu = np.triu_indices(C.shape[0], 1)
    return float(C[iu].mean()) if iu[0].size else float("nan")


def stratified_partition(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random split of rows into ``parts`` groups with the same class mix (each class dealt out evenly)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, i in enumerate(idx):
            groups[(j + offset) % parts].append(int(i))
        offset += len(idx)
    return [np.sort(np.array(g, dtype=np.int64)) for g in groups]


# --------------------------------------------------------------------------- bootstrap


def bootstrap_weights(n: int, replicates: int, seed: int, groups: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(replicates, n) multinomial counts: rows resampled with replacement (within each group if given)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    groups = [np.arange(n)] if groups is None else groups
    W = np.zeros((replicates, n))
    for idx in groups:
        W[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=replicates)
    return W


def interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] of bootstrap replicates (non-finite values dropped; nan if none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


# --------------------------------------------------------------------------- Assumption 1


def linear_map_fit(X: np.ndarray, Y: np.ndarray) -> dict:
    """Least-squares linear map A (D x D) with Y ~ X A^T over the n rows; its residual and distance from aI.

    With n < D the system is underdetermined and ``lstsq`` returns the minimum-norm solution
    (``min_norm`` is then True and the residual is ~0 by construction).
    Returns ``residual`` = ||Y - X A^T||_F / ||Y||_F, ``identity_distance`` = ||A - aI||_F / ||A||_F
    with the best a = tr A / D, ``scale`` = a, and ``A``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    At, *_ = np.linalg.lstsq(X, Y, rcond=None)
    A = At.T
    D = A.shape[0]
    a = float(np.trace(A)) / D
    normA = float(np.linalg.norm(A))
    return {
        "residual": float(np.linalg.norm(Y - X @ At) / max(np.linalg.norm(Y), 1e-300)),
        "identity_distance": float(np.linalg.norm(A - a * np.eye(D)) / normA) if normA > 0 else float("nan"),
        "scale": a,
        "min_norm": bool(X.shape[0] < X.shape[1]),
        "A": A,
    }

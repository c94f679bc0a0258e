"""Spectrum formulas (Gram route, docs/design.md §6 identities) against explicit dense computations.

Reference: F = G^T G / n (or the covariance) formed in numpy float64, numpy.linalg.eigh, and
each error as the explicit Frobenius norm of the difference matrix. Tolerance 1e-8 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomprobe.analysis import (
    davis_kahan_check,
    fisher_spectrum,
    mean_cosine_matrix,
    scaled_identity_mse,
    task_dependence,
)
from geomprobe.fisher import TensorRows, gram_statistics

TOP_K = 5


def make_gradients(n=64, p=50, noise=0.3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(p)
    c = 1.0 + 0.5 * rng.standard_normal(n)
    return c[:, None] * u[None, :] + noise * rng.standard_normal((n, p))


def dense_reference(G: np.ndarray, centered: bool, k: int = TOP_K) -> dict:
    n = G.shape[0]
    mu = G.mean(0)
    Gc = G - mu if centered else G
    F = Gc.T @ Gc / n
    w, V = np.linalg.eigh(F)
    w, V = w[::-1], V[:, ::-1]
    norm = np.linalg.norm(F)
    c_star = mu @ F @ mu / (mu @ mu) ** 2
    Fk = (V[:, :k] * w[:k]) @ V[:, :k].T
    cos = (G @ mu) / (np.linalg.norm(G, axis=1) * np.linalg.norm(mu))
    return {
        "eigenvalues": w[:k],
        "trace": np.trace(F),
        "frobenius": norm,
        "mu_norm": np.linalg.norm(mu),
        "c_star": c_star,
        "rel_err_diag": np.linalg.norm(F - np.diag(np.diag(F))) / norm,
        "rel_err_rank1": np.linalg.norm(F - c_star * np.outer(mu, mu)) / norm,
        "rel_err_rankk": np.linalg.norm(F - Fk) / norm,
        "cos_to_mean": cos,
        "cos_v1_mu": abs(V[:, 0] @ mu) / np.linalg.norm(mu),
        "lambda2_over_lambda1": w[1] / w[0],
        "lambda1_over_trace": w[0] / np.trace(F),
    }


@pytest.mark.parametrize("centered", [False, True], ids=["uncentered", "centered"])
@pytest.mark.parametrize("shape", [(64, 50), (40, 120)], ids=["n>P", "n<P"])
def test_spectrum_matches_dense_computation(centered, shape):
    G = make_gradients(*shape)
    ref = dense_reference(G, centered)
    stats = gram_statistics(TensorRows(torch.from_numpy(G)))
    s = fisher_spectrum(stats, top_k=TOP_K, centered=centered)
    np.testing.assert_allclose(s.eigenvalues, ref["eigenvalues"], rtol=1e-8, atol=1e-12)
    for key in (
        "trace",
        "frobenius",
        "mu_norm",
        "c_star",
        "rel_err_diag",
        "rel_err_rank1",
        "cos_v1_mu",
        "lambda2_over_lambda1",
        "lambda1_over_trace",
    ):
        value = getattr(s, key)
        assert value == pytest.approx(ref[key], rel=1e-7, abs=1e-10), key
    assert s.rel_err_rankk[str(TOP_K)] == pytest.approx(ref["rel_err_rankk"], rel=1e-6, abs=1e-8)
    np.testing.assert_allclose(s.cos_to_mean, ref["cos_to_mean"], rtol=1e-9)
    summary = s.cos_summary()
    assert summary["median"] == pytest.approx(np.median(np.abs(ref["cos_to_mean"])))


def test_top_eigenvalues_lanczos_path_matches_eigh():
    """n >= 256 takes the Lanczos path on K; compare with the full LAPACK decomposition."""
    from geomprobe.analysis import top_eigenvalues

    G = make_gradients(n=400, p=300, seed=9)
    K = G @ G.T / 400
    w, U = top_eigenvalues(K, 5)
    ref_w, ref_U = np.linalg.eigh(K)
    np.testing.assert_allclose(w, ref_w[::-1][:5], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(U * ref_U[:, ::-1][:, :5], axis=0)), 1.0, atol=1e-8)


def test_spectrum_blockwise_equals_single_block():
    """Streaming through 9-row blocks (forced by --max-memory) gives the same numbers."""
    G = make_gradients(n=50, p=40)
    n, p = G.shape
    small = 8 * n * n + 24 * p + 2 * p * 4 * 9
    a = fisher_spectrum(gram_statistics(TensorRows(torch.from_numpy(G)), max_memory=small))
    b = fisher_spectrum(gram_statistics(TensorRows(torch.from_numpy(G))))
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-12)
    assert a.rel_err_rank1 == pytest.approx(b.rel_err_rank1, rel=1e-10)


def test_exact_rank1_gradients_give_zero_rank1_error_and_unit_cosines():
    """g_i = c_i u: F = mean(c^2) u u^T is rank 1, so err_rank1 = 0, |cos| = 1, lambda2 = 0."""
    rng = np.random.default_rng(5)
    u = rng.standard_normal(30)
    c = 1.0 + rng.random(20)
    s = fisher_spectrum(gram_statistics(TensorRows(torch.from_numpy(np.outer(c, u)))), top_k=3)
    assert s.rel_err_rank1 < 1e-6
    assert s.lambda2_over_lambda1 < 1e-10
    np.testing.assert_allclose(np.abs(s.cos_to_mean), 1.0, atol=1e-12)
    assert s.cos_v1_mu == pytest.approx(1.0, abs=1e-12)
    assert s.rel_err_diag > 0.5


def test_mean_cosine_matrix_and_task_dependence():
    rng = np.random.default_rng(6)
    mus = [rng.standard_normal(10) for _ in range(3)]
    M = mean_cosine_matrix(mus)
    for i in range(3):
        for j in range(3):
            assert M[i, j] == pytest.approx(mus[i] @ mus[j] / np.linalg.norm(mus[i]) / np.linalg.norm(mus[j]))
    cos = task_dependence({100: mus[0], 700: mus[1]}, {700: 2 * mus[1], 900: mus[2]})
    assert cos == {700: pytest.approx(1.0)}


@pytest.mark.parametrize("noise", [0.05, 0.8])
def test_davis_kahan_residual_norm_and_bound(noise):
    """||F - c* mu mu^T||_op from K equals the dense operator norm; the measured angle obeys the bound."""
    G = make_gradients(n=30, p=25, noise=noise, seed=7)
    n = G.shape[0]
    mu = G.mean(0)
    F = G.T @ G / n
    c_star = mu @ F @ mu / (mu @ mu) ** 2
    R = F - c_star * np.outer(mu, mu)
    check = davis_kahan_check(gram_statistics(TensorRows(torch.from_numpy(G))))
    assert check.residual_op_norm == pytest.approx(np.abs(np.linalg.eigvalsh(R)).max(), rel=1e-8)
    w, V = np.linalg.eigh(F)
    sin = np.sqrt(1 - (V[:, -1] @ mu / np.linalg.norm(mu)) ** 2)
    assert check.measured_sin == pytest.approx(sin, abs=1e-7)
    assert check.holds


def test_scaled_identity_mse_matches_explicit_loop(tiny_unet):
    """Per-pixel mean of (x_t - sqrt(1 - abar) eps_hat)^2, against a per-sample loop written here."""
    from geomprobe.models import build_scheduler

    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([100, 100, 500, 500, 900, 900])
    y = torch.arange(6) % 10
    ours = scaled_identity_mse(tiny_unet, x0, noise, t, y, ac, batch_size=4)
    errs = []
    with torch.no_grad():
        for i in range(6):
            a = float(ac[t[i]])
            x_t = a**0.5 * x0[i : i + 1] + (1 - a) ** 0.5 * noise[i : i + 1]
            eps = tiny_unet(x_t, t[i : i + 1], class_labels=y[i : i + 1]).sample
            errs.append(((x_t - (1 - a) ** 0.5 * eps) ** 2).mean().item())
    assert ours == pytest.approx(np.mean(errs), rel=1e-5)

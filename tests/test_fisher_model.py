"""Model-based Fisher builders (jvp/vjp, Lanczos, power iteration) against the stored-G route.

Reference: G from ``per_sample_grads`` on a tiny UNet with P <= 2000 selected parameters, then
F = G^T G / n in float64 and numpy.linalg.eigh. The model routes never form G. Tolerances are
float32 ones (1e-4 relative for products, 1e-3 for Lanczos eigenvalues).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomprobe.fisher import (
    ModelFisherOperator,
    diagonal_from_model,
    fisher_from_rows,
    lowrank_from_model,
    power_iteration_from_model,
    rank1_from_model,
    stochastic_power_iteration,
    weighted_gradient,
)
from geomprobe.models import build_scheduler
from geomprobe.probe import ProbeBatch, per_sample_grads, select_parameters

PARAM_REGEX = r"^(conv_in|conv_out|class_embedding)|norm"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads spin against other
    jobs and made these tests 15x slower (measured: Lanczos 74 s vs 4.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def probe_setup(tiny_unet):
    names = select_parameters(tiny_unet, PARAM_REGEX)
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(1)
    batches = []
    for t_value in (300, 700):
        B = 12
        batches.append(
            ProbeBatch(
                x0=torch.randn(B, 1, 8, 8, generator=g),
                noise=torch.randn(B, 1, 8, 8, generator=g),
                t=torch.full((B,), t_value),
                y=torch.randint(0, 10, (B,), generator=g),
            )
        )
    G = torch.cat([per_sample_grads(tiny_unet, names, b.x0, b.noise, b.t, b.y, ac) for b in batches]).double()
    assert G.shape[1] <= 2000
    return tiny_unet, names, batches, ac, G


def test_weighted_gradient_is_G_transpose_w(probe_setup):
    unet, names, batches, ac, G = probe_setup
    w = torch.linspace(-1, 2, len(batches[0]))
    ours = weighted_gradient(unet, names, batches[0], ac, w).double()
    ref = G[: len(batches[0])].T @ w.double()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("centered", [False, True])
def test_fisher_vector_product_matches_stored_G(probe_setup, centered):
    unet, names, batches, ac, G = probe_setup
    op = ModelFisherOperator(unet, names, batches, ac, centered=centered)
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(2))
    ref = fisher_from_rows(G, "gram", centered=centered).mv(v.double())
    torch.testing.assert_close(op.mv(v).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_rank1_from_model_matches_rows(probe_setup):
    unet, names, batches, ac, G = probe_setup
    ours = rank1_from_model(unet, names, batches, ac, t_range="300,700")
    ref = fisher_from_rows(G, "rank1")
    torch.testing.assert_close(ours.mu.double(), ref.mu, rtol=1e-4, atol=1e-6 * ref.mu.abs().max().item())
    assert ours.c_star == pytest.approx(ref.c_star, rel=1e-4)
    assert ours.info.n == G.shape[0] and ours.info.param_names == list(names)


def test_lanczos_from_model_matches_dense_eigh(probe_setup):
    unet, names, batches, ac, G = probe_setup
    k = 3
    ours = lowrank_from_model(unet, names, batches, ac, k=k, tol=1e-6)
    F = (G.T @ G / G.shape[0]).numpy()
    w, V = np.linalg.eigh(F)
    w, V = w[::-1][:k], V[:, ::-1][:, :k]
    np.testing.assert_allclose(ours.eigenvalues.numpy(), w, rtol=1e-3)
    # eigenvectors (up to sign) wherever the eigenvalue is separated from its neighbours
    overlaps = np.abs(np.sum(ours.eigenvectors.numpy() * V, axis=0))
    separated = [j for j in range(k) if all(abs(w[j] - w[i]) > 1e-3 * w[0] for i in range(k) if i != j)]
    assert separated and np.all(overlaps[separated] > 0.999)
    assert ours.info.extra["fisher_vector_products"] > 0


def test_diagonal_from_model_matches_rows(probe_setup):
    unet, names, batches, ac, G = probe_setup
    ours = diagonal_from_model(unet, names, batches, ac)
    ref = (G**2).mean(0)
    torch.testing.assert_close(ours.diagonal.double(), ref, rtol=1e-4, atol=1e-8 * ref.max().item())


def test_stochastic_power_iteration_recovers_top_eigenpairs_exactly_with_full_batches():
    """With an exact matmat (every 'minibatch' the full matrix) it is subspace iteration: exact answer."""
    rng = np.random.default_rng(3)
    P, k = 60, 3
    Q, _ = np.linalg.qr(rng.standard_normal((P, P)))
    w = np.concatenate([[10.0, 5.0, 2.5], 0.1 * rng.random(P - 3)])
    F = torch.from_numpy((Q * w) @ Q.T)
    low = stochastic_power_iteration(lambda V, step: F @ V, P, k, num_iters=60, dtype=torch.float64)
    np.testing.assert_allclose(low.eigenvalues.numpy(), w[:k], rtol=1e-8)
    overlaps = np.abs(np.sum(low.eigenvectors.numpy() * Q[:, :k], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)


def test_stochastic_power_iteration_with_noisy_minibatches_is_close():
    """Minibatch estimates of F (rows resampled each step) still find the dominant direction."""
    rng = np.random.default_rng(4)
    P, n = 40, 4000
    u = rng.standard_normal(P)
    u /= np.linalg.norm(u)
    G = torch.from_numpy(3.0 * rng.standard_normal(n)[:, None] * u + 0.3 * rng.standard_normal((n, P)))
    gen = torch.Generator().manual_seed(0)

    def matmat(V, step):
        idx = torch.randint(0, n, (256,), generator=gen)
        Gb = G[idx]
        return Gb.T @ (Gb @ V) / len(idx)

    low = stochastic_power_iteration(matmat, P, 1, num_iters=10, average_last=10, dtype=torch.float64)
    assert abs(float(low.eigenvectors[:, 0] @ torch.from_numpy(u))) > 0.99
    ref = np.linalg.eigvalsh((G.T @ G / n).numpy())[-1]
    assert float(low.eigenvalues[0]) == pytest.approx(ref, rel=0.15)


def test_power_iteration_from_model_top_eigenvalue(probe_setup):
    unet, names, batches, ac, G = probe_setup
    both = [
        ProbeBatch(
            torch.cat([b.x0 for b in batches]),
            torch.cat([b.noise for b in batches]),
            torch.cat([b.t for b in batches]),
            torch.cat([b.y for b in batches]),
        )
    ]
    low = power_iteration_from_model(unet, names, both, ac, k=1, num_iters=25, average_last=1)
    F = (G.T @ G / G.shape[0]).numpy()
    w, V = np.linalg.eigh(F)
    assert float(low.eigenvalues[0]) == pytest.approx(w[-1], rel=1e-3)
    assert abs(float(low.eigenvectors[:, 0].double() @ torch.from_numpy(V[:, -1]))) > 0.99

"""Every Fisher kind against the dense matrix the test builds itself (numpy float64).

Reference for each kind (what the representation stands for):
    dense, gram, implicit   F = G^T G / n            (or G_c^T G_c / n, centered)
    diagonal      diag(diag F)
    rank1         c* mu mu^T with c* = mu^T F mu / ||mu||^4
    lowrank       sum_{j<=k} lambda_j v_j v_j^T from numpy.linalg.eigh(F)
Tolerance: 1e-9 relative (float64 throughout). ``check_against_dense`` is the one helper every
kind goes through (also the float32 model branch of the implicit kind in test_fisher_implicit.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomprobe.errors import DataError, UsageError
from geomprobe.fisher import (
    ConcatRows,
    DenseFisher,
    DiagonalFisher,
    FunctionGradients,
    GramFisher,
    ImplicitFisher,
    IterableRows,
    LowRankFisher,
    Rank1Fisher,
    TensorRows,
    fisher_from_rows,
    gram_statistics,
    load_fisher,
)

N, P, K_RANK = 48, 36, 3
RTOL = 1e-9


def make_gradients(n=N, p=P, seed=0) -> np.ndarray:
    """Per-sample gradients with a dominant shared direction plus noise: g_i = c_i u + 0.3 z_i."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(p)
    c = 1.0 + 0.5 * rng.standard_normal(n)
    return c[:, None] * u[None, :] + 0.3 * rng.standard_normal((n, p))


def reference_matrix(G: np.ndarray, kind: str, centered: bool, k: int = K_RANK) -> np.ndarray:
    n = G.shape[0]
    mu = G.mean(0)
    Gc = G - mu if centered else G
    F = Gc.T @ Gc / n
    if kind in ("dense", "gram", "implicit"):
        return F
    if kind == "diagonal":
        return np.diag(np.diag(F))
    if kind == "rank1":
        c_star = mu @ F @ mu / (mu @ mu) ** 2
        return c_star * np.outer(mu, mu)
    if kind == "lowrank":
        w, V = np.linalg.eigh(F)
        w, V = w[::-1][:k], V[:, ::-1][:, :k]
        return (V * w) @ V.T
    raise AssertionError(kind)


SAVED_KINDS = ["dense", "diagonal", "rank1", "lowrank", "gram", "gram-streamed"]
KINDS = [*SAVED_KINDS, "implicit"]


def build(kind: str, G: np.ndarray, centered: bool):
    if kind == "implicit":  # a linear model whose per-sample loss gradients are exactly the rows of G
        G_t = torch.from_numpy(G)
        return ImplicitFisher(
            FunctionGradients(lambda theta: G_t @ theta, torch.zeros(G.shape[1], dtype=torch.float64)), centered
        )
    if kind == "gram-streamed":
        blocks = [torch.from_numpy(G[a : a + 7]) for a in range(0, G.shape[0], 7)]
        return GramFisher(IterableRows(blocks), centered=centered)
    return fisher_from_rows(torch.from_numpy(G), kind, k=K_RANK, centered=centered)


def close(a, b, rtol=RTOL, atol=1e-12):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max(initial=0))))


@pytest.mark.parametrize("centered", [False, True], ids=["uncentered", "centered"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_its_dense_reference(kind, centered):
    G = make_gradients()
    R = reference_matrix(G, kind.replace("-streamed", ""), centered)
    check_against_dense(build(kind, G, centered), R, diagonal=kind == "diagonal")


def check_against_dense(
    fisher,
    R: np.ndarray,
    rtol: float = RTOL,
    eig_rtol: float = 1e-8,
    vec_atol: float = 1e-6,
    diagonal: bool = False,
    dense: bool = True,
) -> None:
    """Every protocol method of ``fisher`` against the dense float64 matrix R it stands for.

    ``dense=False`` skips ``to_dense`` (P products for a matrix-free kind; ``mv`` of a (P, 4) matrix
    is still checked).
    """
    P = R.shape[0]
    rng = np.random.default_rng(1)
    v = rng.standard_normal(P)
    V = rng.standard_normal((P, 4))
    assert fisher.P == P

    atol = 1e-12 if rtol <= RTOL else rtol
    close(fisher.mv(torch.from_numpy(v)), R @ v, rtol, atol)
    close(fisher.mv(torch.from_numpy(V)), R @ V, rtol, atol)  # matrix right-hand side
    close(fisher.mv(v), R @ v, rtol, atol)  # numpy input accepted
    close(fisher.quad(torch.from_numpy(v)), v @ R @ v, rtol, atol)
    assert fisher.trace() == pytest.approx(np.trace(R), rel=rtol)
    assert fisher.frobenius() == pytest.approx(np.linalg.norm(R), rel=rtol)
    close(fisher.diag(), np.diag(R), rtol, atol)
    if dense:
        close(fisher.to_dense(), R, rtol, atol)

    # eigenvalues against numpy.linalg.eigh of the reference; eigenvectors up to sign
    w_ref, V_ref = np.linalg.eigh(R)
    w_ref, V_ref = w_ref[::-1], V_ref[:, ::-1]
    lam, vecs = fisher.top_eigen(K_RANK)
    r = lam.shape[0]
    assert 1 <= r <= K_RANK
    close(lam, w_ref[:r], rtol=eig_rtol)
    if not diagonal:  # diagonal's eigenvectors are unit vectors; ties are fine there
        overlaps = np.abs(np.sum(vecs.numpy() * V_ref[:, :r], axis=0))
        np.testing.assert_allclose(overlaps, 1.0, atol=vec_atol)
    np.testing.assert_allclose(vecs.numpy().T @ vecs.numpy(), np.eye(r), atol=max(1e-8, vec_atol * 1e-2))

    # penalty: value strength/2 d^T R d, autograd gradient strength R d
    strength = 3.5
    theta_star = torch.from_numpy(rng.standard_normal(P))
    theta = torch.from_numpy(rng.standard_normal(P)).requires_grad_(True)
    value = fisher.penalty(theta, theta_star, strength)
    d = (theta - theta_star).detach().numpy()
    assert float(value.detach()) == pytest.approx(0.5 * strength * d @ R @ d, rel=rtol)
    (grad,) = torch.autograd.grad(value, theta)
    close(grad, strength * R @ d, rtol, atol)


@pytest.mark.parametrize("kind", SAVED_KINDS)
def test_save_load_round_trip(kind, tmp_path):
    G = make_gradients()
    fisher = build(kind, G, centered=False)
    fisher.info.t_range = "700"
    fisher.info.checkpoint = {"path": "runs/x", "checksum": "abc123"}
    fisher.info.param_names = ["w", "b"]
    fisher.info.param_shapes = [[6, 5], [6]]
    path = fisher.save(tmp_path / f"{kind}.h5")
    loaded = load_fisher(path)
    assert type(loaded) is type(fisher)
    assert loaded.info.t_range == "700"
    assert loaded.info.checkpoint == {"path": "runs/x", "checksum": "abc123"}
    assert loaded.info.param_names == ["w", "b"] and loaded.info.param_shapes == [[6, 5], [6]]
    assert loaded.info.n == N
    v = torch.from_numpy(np.random.default_rng(2).standard_normal(P))
    close(loaded.mv(v), fisher.mv(v).detach().numpy())
    assert type(fisher).load(path).kind == fisher.kind


def test_implicit_fisher_refuses_to_be_saved(tmp_path):
    with pytest.raises(UsageError, match="to_rank1"):
        build("implicit", make_gradients(), centered=False).save(tmp_path / "f.h5")
    assert not list(tmp_path.iterdir())


def test_load_rejects_wrong_kind_and_missing_file(tmp_path):
    path = DiagonalFisher(torch.ones(4)).save(tmp_path / "d.h5")
    with pytest.raises(DataError):
        Rank1Fisher.load(path)
    with pytest.raises(DataError):
        load_fisher(tmp_path / "missing.h5")


def test_float32_penalty_keeps_theta_dtype():
    G = make_gradients().astype(np.float32)
    for kind in ("diagonal", "rank1", "lowrank", "gram"):
        fisher = fisher_from_rows(torch.from_numpy(G), kind, k=2)
        theta = torch.zeros(P, dtype=torch.float32, requires_grad=True)
        value = fisher.penalty(theta, torch.ones(P))
        assert value.dtype == torch.float32 and value.dim() == 0
        value.backward()
        assert theta.grad is not None and theta.grad.dtype == torch.float32


def test_rank1_penalty_gradient_is_lambda_cstar_mu_mu_t_d():
    """The rank-1 EWC gradient (paper eq. 6): d/dtheta = lambda c* mu (mu^T (theta - theta*))."""
    rng = np.random.default_rng(3)
    mu = torch.from_numpy(rng.standard_normal(P))
    c_star = 0.73
    lam = 15000.0
    fisher = Rank1Fisher(mu, c_star)
    theta_star = torch.from_numpy(rng.standard_normal(P))
    theta = torch.from_numpy(rng.standard_normal(P)).requires_grad_(True)
    (grad,) = torch.autograd.grad(fisher.penalty(theta, theta_star, lam), theta)
    d = (theta - theta_star).detach().numpy()
    close(grad, lam * c_star * np.outer(mu.numpy(), mu.numpy()) @ d)


def test_gram_statistics_blockwise_equals_dense():
    """K, G^T 1 and column sums of G^2 from small blocks (forced by the memory budget) vs numpy."""
    G = make_gradients(n=50, p=30)
    n, p = G.shape
    budget = 8 * n * n + 24 * p + 2 * p * 4 * 7  # exactly 7 rows per block
    seen_pairs = []
    stats = gram_statistics(
        TensorRows(torch.from_numpy(G)), max_memory=budget, progress=lambda d, t: seen_pairs.append(t)
    )
    n_blocks = -(-n // 7)
    assert seen_pairs[-1] == n_blocks * (n_blocks + 1) // 2
    close(stats.K, G @ G.T / n)
    close(stats.mu, G.mean(0))
    close(stats.diag_fisher, (G**2).mean(0))
    with pytest.raises(UsageError):
        gram_statistics(TensorRows(torch.from_numpy(G)), max_memory=8 * n * n)


def test_concat_rows_pool_two_sources():
    A, B = make_gradients(n=20, seed=4), make_gradients(n=30, seed=5)
    pooled = GramFisher(ConcatRows([TensorRows(torch.from_numpy(A)), IterableRows([torch.from_numpy(B)])]))
    G = np.vstack([A, B])
    assert pooled.frobenius() == pytest.approx(np.linalg.norm(G.T @ G / 50), rel=RTOL)


def test_one_shot_iterator_is_refused_with_a_clear_error():
    gen = (torch.zeros(2, 3) for _ in range(2))
    with pytest.raises(UsageError, match="one-shot"):
        IterableRows(gen)


def test_bad_shapes_raise_usage_error():
    with pytest.raises(UsageError):
        DenseFisher(torch.zeros(3, 4))
    with pytest.raises(UsageError):
        LowRankFisher(torch.ones(2), torch.zeros(5, 3))
    with pytest.raises(UsageError):
        DiagonalFisher(torch.ones(4)).mv(torch.ones(5))
    with pytest.raises(UsageError):
        fisher_from_rows(torch.zeros(3, 4), "kfac")

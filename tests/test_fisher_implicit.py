"""The implicit (matrix-free) Fisher of a real UNet against the dense matrix of its stored rows.

Reference: G from ``per_sample_grads`` (checked elsewhere against an explicit per-sample loop),
F = G^T G / n formed in float64. The implicit kind never forms G except for its exact diag,
trace and frobenius. Float32 tolerances: 2e-4 relative for products, 1e-3 for Lanczos
eigenvalues. Conditional and unconditional UNets (labels must not reach an unconditional one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomprobe.fisher import ImplicitFisher, rank1_from_model
from geomprobe.models import build_scheduler, build_unet
from geomprobe.probe import ProbeBatch, per_sample_grads, select_parameters
from tests.test_fisher import check_against_dense

PARAM_REGEX = r"^conv_out\."


pytestmark = pytest.mark.usefixtures("one_thread")


def probe(conditional: bool):
    torch.manual_seed(0)
    unet = build_unet("small1", 8, 1, 10 if conditional else None)
    names = select_parameters(unet, PARAM_REGEX)
    ac = build_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(1)
    batches = [
        ProbeBatch(
            torch.randn(10, 1, 8, 8, generator=g),
            torch.randn(10, 1, 8, 8, generator=g),
            torch.full((10,), t),
            torch.randint(0, 10, (10,), generator=g),
        )
        for t in (200, 800)
    ]
    G = torch.cat([per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, ac) for b in batches]).double()
    return unet, names, batches, ac, G.numpy()


@pytest.mark.parametrize("centered", [False, True], ids=["uncentered", "centered"])
@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
def test_implicit_fisher_of_a_unet_matches_its_dense_reference(conditional, centered):
    unet, names, batches, ac, G = probe(conditional)
    mu = G.mean(0)
    Gc = G - mu if centered else G
    R = Gc.T @ Gc / G.shape[0]
    fisher = ImplicitFisher.from_model(unet, names, batches, ac, centered=centered)
    check_against_dense(fisher, R, rtol=2e-4, eig_rtol=1e-3, vec_atol=1e-2)


def test_labels_do_not_reach_an_unconditional_unet():
    """Changing the labels changes nothing for an unconditional model (and nothing raises)."""
    unet, names, batches, ac, _ = probe(conditional=False)
    other = [ProbeBatch(b.x0, b.noise, b.t, (b.y + 3) % 10) for b in batches]
    a = rank1_from_model(unet, names, batches, ac)
    b = rank1_from_model(unet, names, other, ac)
    torch.testing.assert_close(a.mu, b.mu, rtol=0, atol=0)
    assert a.c_star == b.c_star


def test_hutchinson_estimates_cover_the_exact_values():
    """trace and diag estimates within 4 standard errors of the exact values (seeded)."""
    unet, names, batches, ac, G = probe(conditional=True)
    fisher = ImplicitFisher.from_model(unet, names, batches, ac)
    exact_trace = float((G**2).sum() / G.shape[0])
    estimate, error = fisher.trace_estimate(probes=100, seed=0)
    assert abs(estimate - exact_trace) < 4 * error
    diag, diag_error = fisher.diag_estimate(probes=30, seed=1)
    exact = (G**2).mean(0)
    z = np.abs(diag.numpy() - exact) / np.maximum(diag_error.numpy(), 1e-30)
    assert np.mean(z < 3) > 0.95

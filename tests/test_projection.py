"""The seeded projections of ``grads --project K``: CountSketch against its explicit matrix, inner products.

References: the dense (K, P) matrix built independently from the same hashes (explicit scatter of
+-1 entries), exact float64 inner products, and the closed-form CountSketch variance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomprobe.errors import UsageError
from geomprobe.probe.projection import CountSketch, make_projection


def test_countsketch_equals_its_explicit_matrix_and_does_not_depend_on_row_chunks():
    P, K = 1000, 37
    sketch = CountSketch(P, K, seed=3, block=128)  # several column blocks
    G = torch.randn(11, P, dtype=torch.float64)
    S = torch.zeros(K, P, dtype=torch.float64)
    for j in range(sketch.num_blocks):
        buckets, signs = sketch.hashes(j)
        for c, (b, s) in enumerate(zip(buckets.tolist(), signs.tolist(), strict=True)):
            S[b, j * 128 + c] = s
    torch.testing.assert_close(sketch.project(G).double(), (G @ S.T).float().double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sketch.matrix().double(), S)
    torch.testing.assert_close(torch.cat([sketch.project(G[:4]), sketch.project(G[4:])]), sketch.project(G))
    assert torch.equal(CountSketch(P, K, seed=3, block=128).project(G), sketch.project(G))
    assert not torch.equal(CountSketch(P, K, seed=4, block=128).project(G), sketch.project(G))


def test_countsketch_preserves_inner_products_in_expectation():
    """Mean over 400 seeds of <Sa, Sb> within 4 standard errors of a^T b (closed-form variance)."""
    rng = np.random.default_rng(0)
    P, K = 300, 16
    a, b = rng.standard_normal(P), rng.standard_normal(P)
    values = [
        float(CountSketch(P, K, seed=s).project(torch.from_numpy(np.stack([a, b]))).double().prod(0).sum())
        for s in range(400)
    ]
    var = ((a @ a) * (b @ b) + (a @ b) ** 2 - 2 * np.sum(a**2 * b**2)) / K
    assert abs(np.mean(values) - a @ b) < 4 * np.sqrt(var / len(values))
    assert np.var(values) == pytest.approx(var, rel=0.25)


def test_projection_choices_and_errors():
    assert make_projection("gaussian", 50, 5, 0).describe()["kind"] == "gaussian"
    assert make_projection("countsketch", 50, 5, 0).describe()["kind"] == "countsketch"
    with pytest.raises(UsageError):
        make_projection("srht", 50, 5, 0)
    with pytest.raises(UsageError):
        CountSketch(50, 50, 0)

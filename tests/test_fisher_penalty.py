"""The stacked EWC penalty against the Fisher protocol's own ``FisherMatrix.penalty`` (template test).

Reference: sum over tasks k of ``F_k.penalty(theta, theta*_k, lambda)`` and its autograd
gradient, for every kind on a tiny random G. float64: rtol 1e-10. float32 (the training path:
rows, matrices and differences in float32, sums of squares in float64): rtol 1e-4 on the value
and the gradient relative to its largest entry, the error of float32 dot products over P = 9
terms of mixed sign.
"""

from __future__ import annotations

import pytest
import torch

from geomprobe.fisher import DenseFisher, DiagonalFisher, GramFisher, LowRankFisher, Rank1Fisher
from geomprobe.fisher.penalty import StackedPenalty

P, N, LAM = 9, 6, 3.7
KINDS = ["dense", "diagonal", "rank1", "lowrank", "gram", "gram-centered", "mixed"]


def _fisher(kind: str, g: torch.Generator):
    G = torch.randn(N, P, generator=g, dtype=torch.float64)
    if kind == "dense":
        return DenseFisher(G.T @ G / N)
    if kind == "diagonal":
        return DiagonalFisher(G.pow(2).mean(0))
    if kind == "rank1":
        return Rank1Fisher(G.mean(0), 0.3 + float(torch.rand(1, generator=g, dtype=torch.float64)))
    if kind == "lowrank":
        V, _ = torch.linalg.qr(torch.randn(P, 3, generator=g, dtype=torch.float64))
        return LowRankFisher(torch.rand(3, generator=g, dtype=torch.float64) + 0.1, V)
    return GramFisher(G, centered=(kind == "gram-centered"))


def _problem(kind: str, tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kinds = ["dense", "diagonal", "rank1", "lowrank", "gram-centered"] if kind == "mixed" else [kind] * tasks
    fishers = [_fisher(k, g) for k in kinds]
    anchors = [torch.randn(P, generator=g, dtype=torch.float64) for _ in fishers]
    theta = torch.randn(P, generator=g, dtype=torch.float64)
    return fishers, anchors, theta


def _reference(fishers, anchors, theta):
    th = theta.clone().requires_grad_(True)
    value = sum(F.penalty(th, a, LAM) for F, a in zip(fishers, anchors))
    (grad,) = torch.autograd.grad(value, th)
    return float(value.detach()), grad


def _stacked(fishers, anchors, theta, dtype):
    penalty = StackedPenalty(LAM, dtype=dtype, pairs=list(zip(fishers, anchors)))
    th = theta.to(dtype).clone().requires_grad_(True)
    value = penalty.value(th)
    (grad,) = torch.autograd.grad(value, th)
    return value, grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tasks", [2, 3])
def test_stacked_penalty_equals_sum_of_fisher_penalties_float64(kind, tasks):
    fishers, anchors, theta = _problem(kind, tasks)
    ref_value, ref_grad = _reference(fishers, anchors, theta)
    value, grad = _stacked(fishers, anchors, theta, torch.float64)
    assert value.dtype == torch.float64 and grad.dtype == torch.float64
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_penalty_float32(kind):
    fishers, anchors, theta = _problem(kind, 3, seed=1)
    ref_value, ref_grad = _reference(fishers, anchors, theta)
    value, grad = _stacked(fishers, anchors, theta, torch.float32)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS[:-1])
def test_stacked_penalty_is_exactly_zero_at_the_anchor_and_never_negative(kind, dtype):
    fishers, anchors, _ = _problem(kind, 1, seed=2)
    anchors = [a.to(dtype).double() for a in anchors]  # an anchor is a parameter vector of the training dtype
    penalty = StackedPenalty(LAM, dtype=dtype, pairs=[(fishers[0], anchors[0])])
    at_anchor = anchors[0].to(dtype)
    value, grad = penalty.value_and_grad(at_anchor)
    assert float(value) == 0.0 and float(penalty.value(at_anchor)) == 0.0
    assert torch.count_nonzero(grad) == 0
    g = torch.Generator().manual_seed(3)
    for scale in (1e-8, 1e-3, 1.0, 1e3):  # near the anchor, where an expanded form cancels
        theta = anchors[0] + scale * torch.randn(P, generator=g, dtype=torch.float64)
        assert float(penalty.value(theta.to(dtype))) >= 0.0


def test_stacked_penalty_splits_its_gradient_over_parameter_tensors():
    fishers, anchors, theta = _problem("mixed", 0, seed=4)
    penalty = StackedPenalty(LAM, dtype=torch.float64, pairs=list(zip(fishers, anchors)))
    a, b = theta[:4].reshape(2, 2).clone().requires_grad_(True), theta[4:].clone().requires_grad_(True)
    value = penalty.value(a, b)
    value.backward()
    _, ref_grad = _reference(fishers, anchors, theta)
    torch.testing.assert_close(torch.cat([a.grad.reshape(-1), b.grad]), ref_grad, rtol=1e-10, atol=1e-12)


def test_an_operator_fisher_falls_back_to_its_mv():
    """A kind without a stacked form (here a wrapper exposing only ``kind``, ``P`` and ``mv``)."""

    class Operator:
        kind, P = "implicit", P

        def __init__(self, inner):
            self.inner = inner

        def mv(self, v):
            return self.inner.mv(v)

    fishers, anchors, theta = _problem("gram", 2, seed=5)
    ref_value, ref_grad = _reference(fishers, anchors, theta)
    value, grad = _stacked([Operator(F) for F in fishers], anchors, theta, torch.float64)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_an_empty_penalty_is_zero_and_a_wrong_size_is_refused():
    from geomprobe.errors import DataError

    penalty = StackedPenalty(LAM)
    theta = torch.randn(P, requires_grad=True)
    assert float(penalty.value(theta).detach()) == 0.0 and penalty.num_tasks == 0
    with pytest.raises(DataError, match="P="):
        penalty.add(DiagonalFisher(torch.ones(P)), torch.zeros(P + 1))

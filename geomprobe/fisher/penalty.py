"""The EWC penalty of several Fisher objects, stacked: sum_k strength/2 (theta - theta*_k)^T F_k (theta - theta*_k).

:class:`StackedPenalty` is the stacked form of :meth:`FisherMatrix.penalty
<geomprobe.fisher.base.FisherMatrix.penalty>` over tasks k with anchors theta*_k, for Fishers of
any kind. Its value equals ``sum(F_k.penalty(theta, theta*_k, strength))`` and so does its
gradient (tests/test_fisher_penalty.py), but one step costs a few batched operations on the flat
parameter vector instead of K calls. The Fishers are converted once, when added, into one stack
per representation:

    diagonal              (K, P) diagonals and anchors, float64: value strength/2 sum_kj F_kj d_kj^2
                          computed from d = theta - theta*_k (exactly 0 at theta = theta*_k)
    rank1, lowrank, gram  projection rows: strength/2 sum_k sum_r w_kr (u_kr^T d_k)^2 with rows u
                          (mu, v_j, g_i or g_i - mu) and weights w (c*, lambda_j, 1/n)
    dense                 (K, P, P) matrices: strength/2 sum_k d_k^T F_k d_k
    any other (implicit)  the Fisher's own ``mv``: value strength/2 d^T F d, gradient strength F d

A penalty is one autograd node (:class:`_QuadraticPenalty`): its value and closed-form gradient
come from a no-grad concatenation of the parameter tensors, and the backward pass hands each
tensor a slice of the flat gradient (no autograd ``cat`` and no chain of elementwise nodes per
step, which on small3 would cost more than the penalty itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from geomprobe.errors import DataError, UsageError

PROJECTION_KINDS = ("rank1", "lowrank", "gram")


class _QuadraticPenalty(torch.autograd.Function):
    """Value of a quadratic penalty with its closed-form gradient, as one autograd node.

    Inputs: the penalty object and the tensors whose concatenation is theta (P,). The forward
    pass computes (value, dvalue/dtheta) without building a graph; the backward pass hands each
    tensor its slice of the flat gradient.
    """

    @staticmethod
    def forward(ctx, penalty, *tensors):  # type: ignore[override]
        with torch.no_grad():
            # C++ flatten/unflatten (as in DDP): one call instead of a Python loop over parameters
            theta = _flatten_dense_tensors(tensors) if len(tensors) > 1 else tensors[0].reshape(-1)
            value, grad = penalty.value_and_grad(theta)
        ctx.like = tensors  # only their shapes are used
        ctx.save_for_backward(grad)
        return value.to(tensors[0].dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad = grad * grad_out
        if len(ctx.like) == 1:
            return None, grad.view(ctx.like[0].shape)
        return (None, *_unflatten_dense_tensors(grad, ctx.like))


def _named(fisher) -> str:
    """The Fisher's file (set by ``load_fisher``) for an error message, else "Fisher"."""
    path = getattr(fisher, "path", None)
    return f"Fisher {path}" if path is not None else "Fisher"


class _Stack:
    """Tasks of one representation. Subclasses: ``num_tasks``, ``value_and_grad(theta)``, ``to``."""

    num_tasks = 0

    def __init__(self, strength: float):
        self.strength = float(strength)

    def add(self, fisher, anchor) -> None:
        """Append task k: a FisherMatrix F_k and its anchor theta*_k (P,)."""
        anchor = torch.as_tensor(anchor).detach().reshape(-1)
        if fisher.P != anchor.numel():
            raise DataError(f"{_named(fisher)} has P={fisher.P} but the model has {anchor.numel()} parameters")
        self.add_task(*self.task_arguments(fisher), anchor)

    def task_arguments(self, fisher) -> tuple:
        """What ``add_task`` takes of a Fisher, before the anchor (each representation's stack says)."""
        raise TypeError(f"{type(self).__name__} has no task arguments; add Fisher objects to a StackedPenalty")

    def value(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The penalty at theta = cat(tensors) (each flattened): a 0-dim tensor, differentiable."""
        if self.num_tasks == 0:
            return tensors[0].sum() * 0.0
        return _QuadraticPenalty.apply(self, *tensors)


def _vector(x, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(x).detach().reshape(-1).to(dtype).cpu()


def _append(stacked: torch.Tensor | None, item: torch.Tensor) -> torch.Tensor:
    """``stacked`` (K, ...) with ``item`` (...) appended as row K, on ``stacked``'s device."""
    if stacked is None:
        return item[None]
    return torch.cat([stacked, item[None].to(stacked.device)])


class DiagonalStack(_Stack):
    """strength/2 sum_k sum_j F_kj (theta_j - theta*_kj)^2 with F (K, P) and anchors (K, P) in float64.

    The value is formed from d = theta - theta*_k itself (never an expanded
    theta.(S theta - 2B) + C), so it is exactly 0 at theta = theta*_k and never negative.
    """

    def __init__(self, strength: float):
        super().__init__(strength)
        self.diagonals: torch.Tensor | None = None  # (K, P) float64
        self.anchors: torch.Tensor | None = None  # (K, P) float64

    @property
    def num_tasks(self) -> int:
        return 0 if self.diagonals is None else int(self.diagonals.shape[0])

    def add_task(self, diagonal, anchor) -> None:
        """Append task k: diagonal (P,) of F_k, anchor theta*_k (P,)."""
        d, a = _vector(diagonal, torch.float64), _vector(anchor, torch.float64)
        if d.shape != a.shape:
            raise DataError(f"Fisher diagonal has {d.shape[0]} entries but the anchor has {a.shape[0]}")
        self.diagonals, self.anchors = _append(self.diagonals, d), _append(self.anchors, a)

    def task_arguments(self, fisher) -> tuple:
        return (fisher.diag(),)

    def to(self, device) -> DiagonalStack:
        if self.diagonals is not None:
            self.diagonals, self.anchors = self.diagonals.to(device), self.anchors.to(device)
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = theta.double().unsqueeze(0) - self.anchors  # (K, P)
        Fd = self.diagonals * d
        value = 0.5 * self.strength * torch.dot(Fd.reshape(-1), d.reshape(-1))
        grad = Fd[0] if self.num_tasks == 1 else Fd.sum(0)
        return value, (self.strength * grad).to(theta.dtype)


class ProjectionStack(_Stack):
    """strength/2 sum_k sum_r w_kr (u_kr^T (theta - theta*_k))^2 (rank-1, low-rank and Gram Fishers).

    Per task k: rows U_k (r_k, P), weights w_k (r_k,), anchor theta*_k (P,). Stored stacked as
    U (K, R, P) and anchors (K, P) in ``dtype``, w (K, R) float64, with R = max r_k (shorter
    tasks padded with zero weights). A step costs one (K, P) difference, one batched product for
    the projections and one matrix-vector product for the gradient strength sum U^T (w * proj).
    """

    def __init__(self, strength: float, dtype: torch.dtype = torch.float32):
        super().__init__(strength)
        self.dtype = dtype
        self.rows: torch.Tensor | None = None  # (K, R, P)
        self.weights: torch.Tensor | None = None  # (K, R)
        self.anchors: torch.Tensor | None = None  # (K, P)

    @property
    def num_tasks(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])

    def add_task(self, rows, weights, anchor) -> None:
        """Append task k: rows (r, P), weights (r,), anchor (P,)."""
        anchor = _vector(anchor, self.dtype).reshape(1, -1)
        rows = torch.as_tensor(rows).detach().to(self.dtype).reshape(-1, anchor.shape[1]).cpu()
        weights = _vector(weights, torch.float64)
        if rows.shape[0] != weights.shape[0]:
            raise DataError(f"{rows.shape[0]} penalty rows but {weights.shape[0]} weights")
        if self.rows is None:
            self.rows, self.weights, self.anchors = rows[None], weights[None], anchor
            return
        device = self.rows.device
        R = max(self.rows.shape[1], rows.shape[0])
        old = self._pad(self.rows, self.weights, R)
        new = self._pad(rows[None].to(device), weights[None].to(device), R)
        self.rows = torch.cat([old[0], new[0]])
        self.weights = torch.cat([old[1], new[1]])
        self.anchors = torch.cat([self.anchors, anchor.to(device)])

    def task_arguments(self, fisher) -> tuple:
        return penalty_rows(fisher)

    @staticmethod
    def _pad(rows: torch.Tensor, weights: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = R - rows.shape[1]
        if extra == 0:
            return rows, weights
        K, _, P = rows.shape
        return (torch.cat([rows, rows.new_zeros(K, extra, P)], 1), torch.cat([weights, weights.new_zeros(K, extra)], 1))

    def to(self, device) -> ProjectionStack:
        if self.rows is not None:
            self.rows, self.weights, self.anchors = (
                self.rows.to(device),
                self.weights.to(device),
                self.anchors.to(device),
            )
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = theta.to(self.dtype).unsqueeze(0) - self.anchors  # (K, P)
        proj = torch.bmm(self.rows, d.unsqueeze(2)).squeeze(2).double()  # (K, R)
        wp = self.weights * proj
        value = 0.5 * self.strength * (wp * proj).sum()
        K, R, P = self.rows.shape
        grad = ((self.strength * wp).reshape(1, K * R).to(self.dtype) @ self.rows.reshape(K * R, P)).reshape(P)
        return value, grad.to(theta.dtype)


class DenseStack(_Stack):
    """strength/2 sum_k d_k^T F_k d_k with the explicit matrices F (K, P, P) in ``dtype`` (small P only)."""

    def __init__(self, strength: float, dtype: torch.dtype = torch.float32):
        super().__init__(strength)
        self.dtype = dtype
        self.matrices: torch.Tensor | None = None  # (K, P, P)
        self.anchors: torch.Tensor | None = None  # (K, P)

    @property
    def num_tasks(self) -> int:
        return 0 if self.matrices is None else int(self.matrices.shape[0])

    def add_task(self, matrix, anchor) -> None:
        """Append task k: matrix (P, P), anchor (P,)."""
        a = _vector(anchor, self.dtype)
        F = torch.as_tensor(matrix).detach().to(self.dtype).cpu()
        if F.shape != (a.numel(), a.numel()):
            raise DataError(f"a {tuple(F.shape)} Fisher matrix for an anchor of {a.numel()} entries")
        self.matrices, self.anchors = _append(self.matrices, F), _append(self.anchors, a)

    def task_arguments(self, fisher) -> tuple:
        return (fisher.matrix,)

    def to(self, device) -> DenseStack:
        if self.matrices is not None:
            self.matrices, self.anchors = self.matrices.to(device), self.anchors.to(device)
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = theta.to(self.dtype).unsqueeze(0) - self.anchors  # (K, P)
        Fd = torch.bmm(self.matrices, d.unsqueeze(2)).squeeze(2)  # (K, P)
        value = 0.5 * self.strength * (Fd.double() * d.double()).sum()
        return value, (self.strength * Fd.sum(0)).to(theta.dtype)


class OperatorStack(_Stack):
    """Fishers without a stacked form (e.g. ``implicit``): strength/2 d^T F d and strength F d by ``fisher.mv``."""

    def __init__(self, strength: float):
        super().__init__(strength)
        self.fishers: list = []
        self.anchors: list[torch.Tensor] = []

    @property
    def num_tasks(self) -> int:
        return len(self.fishers)

    def add_task(self, fisher, anchor) -> None:
        self.fishers.append(fisher)
        self.anchors.append(torch.as_tensor(anchor).detach().reshape(-1))

    def task_arguments(self, fisher) -> tuple:
        return (fisher,)

    def to(self, device) -> OperatorStack:
        return self  # the Fisher object places its own products

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = torch.zeros((), dtype=torch.float64, device=theta.device)
        grad = torch.zeros_like(theta)
        for fisher, anchor in zip(self.fishers, self.anchors, strict=True):
            d = theta - anchor.to(theta)
            Fd = torch.as_tensor(fisher.mv(d)).to(theta.device)
            value = value + 0.5 * self.strength * torch.dot(Fd.double().reshape(-1), d.double())
            grad = grad + self.strength * Fd.to(theta)
        return value, grad


def _gram_rows(fisher) -> torch.Tensor:
    """G (n, P) of a GramFisher, in memory or streamed from its file."""
    src = fisher.source
    if getattr(src, "G", None) is not None:
        return torch.as_tensor(src.G)
    return torch.cat([torch.as_tensor(b) for b in src.blocks(max(1, fisher.n))])


def penalty_rows(fisher) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (r, P), weights (r,)) with fisher.quad(d) == sum_r w_r (rows_r^T d)^2.

    rank1: (mu, c*); lowrank: (eigenvectors^T, eigenvalues); gram: (G, 1/n), or (G - 1 mu^T, 1/n)
    when centered (a sum of squares, so never negative).
    """
    kind = fisher.kind
    if kind == "rank1":
        return torch.as_tensor(fisher.mu).reshape(1, -1), torch.tensor([fisher.c_star], dtype=torch.float64)
    if kind == "lowrank":
        return torch.as_tensor(fisher.eigenvectors).T, torch.as_tensor(fisher.eigenvalues)
    if kind == "gram":
        G = _gram_rows(fisher)
        if fisher.centered:
            G = (G.double() - G.double().mean(0)).to(G.dtype)
        return G, torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=torch.float64)
    raise UsageError(f"a {kind!r} Fisher is not a projection penalty")


class StackedPenalty(_Stack):
    """sum_k strength/2 (theta - theta*_k)^T F_k (theta - theta*_k) over (Fisher, anchor) pairs of any kind.

    Args:
        strength: lambda (the weight of every task's term).
        dtype: the dtype of projection rows, dense matrices and their differences theta - theta*_k
            (float32 for training; float64 for references). Diagonal stacks are always float64
            and sums of squares are accumulated in float64.

    ``add(fisher, anchor)`` appends one task; ``value(*tensors)`` is the penalty at theta =
    cat(tensors), one autograd node; ``value_and_grad(theta)`` the closed form, no graph.
    """

    def __init__(self, strength: float, dtype: torch.dtype = torch.float32, pairs: Sequence[tuple] = ()):
        super().__init__(strength)
        self.dtype = dtype
        self.stacks: dict[str, _Stack] = {}
        self.P: int | None = None
        for fisher, anchor in pairs:
            self.add(fisher, anchor)

    @property
    def num_tasks(self) -> int:
        return sum(s.num_tasks for s in self.stacks.values())

    def _stack(self, name: str) -> _Stack:
        if name not in self.stacks:
            makers = {
                "diagonal": lambda: DiagonalStack(self.strength),
                "projection": lambda: ProjectionStack(self.strength, self.dtype),
                "dense": lambda: DenseStack(self.strength, self.dtype),
                "operator": lambda: OperatorStack(self.strength),
            }
            self.stacks[name] = makers[name]()
        return self.stacks[name]

    def add(self, fisher, anchor) -> None:
        """Append task k: a FisherMatrix F_k of any kind and its anchor theta*_k (P,)."""
        if self.P is not None and fisher.P != self.P:
            raise DataError(f"{_named(fisher)} has P={fisher.P} but the penalty's earlier tasks have P={self.P}")
        kind = fisher.kind
        if kind == "diagonal":
            self._stack("diagonal").add(fisher, anchor)
        elif kind in PROJECTION_KINDS:
            self._stack("projection").add(fisher, anchor)
        elif kind == "dense":
            self._stack("dense").add(fisher, anchor)
        else:
            self._stack("operator").add(fisher, anchor)
        self.P = fisher.P

    def to(self, device) -> StackedPenalty:
        for stack in self.stacks.values():
            stack.to(device)
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value 0-dim float64, gradient (P,) in theta's dtype) at flat parameters theta (P,)."""
        parts = [s.value_and_grad(theta) for s in self.stacks.values() if s.num_tasks]
        if not parts:
            return torch.zeros((), dtype=torch.float64, device=theta.device), torch.zeros_like(theta)
        if len(parts) == 1:
            return parts[0]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

"""Strategies as small loss-term objects for the one training loop (STYLE.md).

Each object is a callable ``term(unet, step) -> {name: scalar tensor}`` that
:func:`geomprobe.training.training_loop` adds to the denoising loss (``extra_loss``). The runner
composes them with :func:`combine_terms`; none of them overrides the loop.

EWC penalties (DESIGN section 6), summed over earlier tasks k with anchors theta*_k:

    diag     lambda/2 sum_k sum_j F_kj (theta_j - theta*_kj)^2
    rank-1   lambda/2 sum_k c*_k (mu_k^T (theta - theta*_k))^2
    rank-k   lambda/2 sum_k sum_j lambda_kj (v_kj^T (theta - theta*_k))^2
    full     lambda/2 sum_k ||G_k (theta - theta*_k)||^2 / n_k

rank-1, rank-k and full are one form, a weighted sum of squared projections
lambda/2 sum_k sum_r w_kr (u_kr^T (theta - theta*_k))^2 with rows u (mu, v_j or g_i) and weights
w (c*, lambda_j or 1/n); :class:`ProjectionPenalty` evaluates it for all tasks at once on the flat
parameter vector (one batched matrix-vector product, no Python loop over parameters or tasks).
The Fisher objects of :mod:`geomprobe.fisher` are converted once per task (anchors stacked, the
diagonal sums precomputed). A penalty is one autograd node (:class:`_QuadraticPenalty`): its
value and closed-form gradient come from a no-grad concatenation of the parameters, and the
backward pass hands each parameter a slice of the flat gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Callable, Sequence

import torch
from diffusers import UNet2DModel
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from geomprobe.diffusion import add_noise
from geomprobe.errors import DataError, UsageError

LossTerm = Callable[[UNet2DModel, int], dict[str, torch.Tensor]]


def flat_parameters(unet: torch.nn.Module, names: Sequence[str]) -> torch.Tensor:
    """theta: (P,) concatenation of the parameters ``names`` (in that order), differentiable."""
    params = dict(unet.named_parameters())
    return torch.cat([params[n].reshape(-1) for n in names])


class _FlatView:
    """The parameters ``names`` of a model, looked up once (their order is the flat layout)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._module: torch.nn.Module | None = None
        self._params: list[torch.Tensor] = []

    def __call__(self, unet: torch.nn.Module) -> list[torch.Tensor]:
        if unet is not self._module:
            params = dict(unet.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise DataError(f"the model has no parameter {missing[0]!r} named by the Fisher")
            self._params = [params[n] for n in self.names]
            self._module = unet
        return self._params


class _QuadraticPenalty(torch.autograd.Function):
    """Value of a quadratic penalty with its closed-form gradient, as one autograd node.

    Inputs: the penalty object and the tensors whose concatenation is theta (P,). The forward
    pass computes (value, dvalue/dtheta) without building a graph; the backward pass hands each
    tensor its slice of the flat gradient. This avoids an autograd ``cat`` node and a chain of
    elementwise nodes per step (about 3 ms on small3), which is most of a penalty's cost.
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


class _Penalty(ABC):
    """Shared behaviour: ``value(theta)`` on a flat vector, ``term(unet, step)`` for the loop."""

    name = "ewc"

    def __init__(self, names: Sequence[str], strength: float):
        self.view = _FlatView(names)
        self.strength = float(strength)

    @abstractmethod
    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value 0-dim, gradient (P,)) of the penalty at flat parameters theta (P,), in closed form."""

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """The penalty at flat parameters theta (P,): a 0-dim tensor, differentiable in theta."""
        if self.num_tasks == 0:
            return theta.sum() * 0.0
        return _QuadraticPenalty.apply(self, theta)

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        params = self.view(unet)
        if self.num_tasks == 0:
            return {self.name: params[0].sum() * 0.0}
        return {self.name: _QuadraticPenalty.apply(self, *params)}


class DiagonalPenalty(_Penalty):
    """lambda/2 sum_k sum_j F_kj (theta_j - theta*_kj)^2, F_k: (P,) per task, anchors theta*_k: (P,).

    Summed over tasks once, in float64: S = sum_k F_k, B = sum_k F_k theta*_k,
    C = sum_k F_k . theta*_k^2, so value = lambda/2 (theta.(S theta - 2 B) + C) and
    gradient = lambda (S theta - B): a handful of (P,) operations per step whatever K is.
    """

    def __init__(self, names: Sequence[str], strength: float):
        super().__init__(names, strength)
        self.S: torch.Tensor | None = None  # (P,) float64
        self.B: torch.Tensor | None = None  # (P,) float64
        self.C = 0.0
        self.num_tasks = 0

    def add_task(self, diagonal: torch.Tensor, anchor: torch.Tensor) -> None:
        """Append task k: diagonal (P,) of F_k, anchor theta*_k (P,)."""
        d = torch.as_tensor(diagonal).detach().reshape(-1).double().cpu()
        a = torch.as_tensor(anchor).detach().reshape(-1).double().cpu()
        if d.shape != a.shape:
            raise DataError(f"Fisher diagonal has {d.shape[0]} entries but the anchor has {a.shape[0]}")
        if self.S is None:
            self.S, self.B = torch.zeros_like(d), torch.zeros_like(d)
        device = self.S.device
        self.S = self.S + d.to(device)
        self.B = self.B + (d * a).to(device)
        self.C += float((d * a * a).sum())
        self.num_tasks += 1

    def to(self, device: torch.device) -> "DiagonalPenalty":
        if self.S is not None:
            self.S, self.B = self.S.to(device), self.B.to(device)
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        th = theta.double()
        Sth = self.S * th
        value = 0.5 * self.strength * (torch.dot(th, Sth - 2.0 * self.B) + self.C)
        return value, (self.strength * (Sth - self.B)).to(theta.dtype)


class ProjectionPenalty(_Penalty):
    """lambda/2 sum_k sum_r w_kr (u_kr^T (theta - theta*_k))^2 (rank-1, rank-k and full EWC).

    Per task k: rows U_k (r_k, P), weights w_k (r_k,), anchor theta*_k (P,). Stored stacked as
    U (K, R, P) float32, w (K, R) float64, anchors (K, P), with R = max r_k (shorter tasks padded
    with zero weights). A step costs one (K, P) difference, one batched product for the
    projections and one matrix-vector product for the gradient lambda sum U^T (w * proj).
    """

    def __init__(self, names: Sequence[str], strength: float):
        super().__init__(names, strength)
        self.rows: torch.Tensor | None = None  # (K, R, P)
        self.weights: torch.Tensor | None = None  # (K, R)
        self.anchors: torch.Tensor | None = None  # (K, P)

    @property
    def num_tasks(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])

    def add_task(self, rows: torch.Tensor, weights: torch.Tensor, anchor: torch.Tensor) -> None:
        """Append task k: rows (r, P), weights (r,), anchor (P,)."""
        anchor = torch.as_tensor(anchor).detach().float().reshape(1, -1).cpu()
        rows = torch.as_tensor(rows).detach().float().reshape(-1, anchor.shape[1]).cpu()
        weights = torch.as_tensor(weights).detach().double().reshape(-1).cpu()
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

    @staticmethod
    def _pad(rows: torch.Tensor, weights: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        extra = R - rows.shape[1]
        if extra == 0:
            return rows, weights
        K, _, P = rows.shape
        return (torch.cat([rows, rows.new_zeros(K, extra, P)], 1), torch.cat([weights, weights.new_zeros(K, extra)], 1))

    def to(self, device: torch.device) -> "ProjectionPenalty":
        if self.rows is not None:
            self.rows, self.weights, self.anchors = self.rows.to(device), self.weights.to(device), self.anchors.to(device)
        return self

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = theta.float().unsqueeze(0) - self.anchors  # (K, P)
        proj = torch.bmm(self.rows, d.unsqueeze(2)).squeeze(2).double()  # (K, R)
        wp = self.weights * proj
        value = 0.5 * self.strength * (wp * proj).sum()
        K, R, P = self.rows.shape
        grad = ((self.strength * wp).reshape(1, K * R).float() @ self.rows.reshape(K * R, P)).reshape(P)
        return value, grad.to(theta.dtype)


def _gram_rows(fisher) -> torch.Tensor:
    """G (n, P) of a GramFisher, in memory or streamed from its file."""
    src = fisher.source
    if getattr(src, "G", None) is not None:
        return torch.as_tensor(src.G)
    return torch.cat([torch.as_tensor(b) for b in src.blocks(max(1, fisher.n))])


def penalty_rows(fisher) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (r, P), weights (r,)) with fisher.quad(d) == sum_r w_r (rows_r^T d)^2.

    rank1: (mu, c*); lowrank: (eigenvectors^T, eigenvalues); gram: (G, 1/n), plus (mu, -1) when
    centered, since G^T H G / n = G^T G / n - mu mu^T.
    """
    kind = fisher.kind
    if kind == "rank1":
        return fisher.mu.reshape(1, -1), torch.tensor([fisher.c_star], dtype=torch.float64)
    if kind == "lowrank":
        return fisher.eigenvectors.T, fisher.eigenvalues
    if kind == "gram":
        G = _gram_rows(fisher)
        rows, weights = G, torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=torch.float64)
        if fisher.centered:
            mu = G.double().mean(0)
            rows = torch.cat([rows.to(mu), mu[None]])
            weights = torch.cat([weights, torch.tensor([-1.0], dtype=torch.float64)])
        return rows, weights
    raise UsageError(f"a {kind!r} Fisher is not a projection penalty")


def make_penalty(kind: str, names: Sequence[str], strength: float) -> DiagonalPenalty | ProjectionPenalty:
    """An empty penalty for ``--fisher`` kind (diag | rank1 | rankk | full)."""
    if kind == "diag":
        return DiagonalPenalty(names, strength)
    if kind in ("rank1", "rankk", "full"):
        return ProjectionPenalty(names, strength)
    raise UsageError(f"no EWC penalty for --fisher {kind!r}")


def add_fisher_to_penalty(penalty: DiagonalPenalty | ProjectionPenalty, fisher, anchor: torch.Tensor) -> None:
    """Append one task's Fisher object (from :mod:`geomprobe.fisher`) and anchor theta*_k (P,)."""
    if fisher.P != anchor.numel():
        raise DataError(f"Fisher has P={fisher.P} but the model has {anchor.numel()} parameters")
    if isinstance(penalty, DiagonalPenalty):
        penalty.add_task(fisher.diag(), anchor)
    else:
        rows, weights = penalty_rows(fisher)
        penalty.add_task(rows, weights, anchor)


class DistillationTerm:
    """Generative distillation (paper section 3.4): gd_weight * mean_i 1/2 ||eps_theta - eps_teacher||^2.

    Each step draws ``batch_size`` replay images from the pool (images (M, C, H, W) in [-1, 1],
    labels (M,)), t uniform in 0..N-1 and noise, all from ``generator`` (so a run is
    reproducible), noises them and regresses the student on the frozen teacher's prediction.
    The squared norm sums over pixels, like the denoising loss.
    """

    name = "distill"

    def __init__(
        self,
        teacher: UNet2DModel,
        images: torch.Tensor,
        labels: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        batch_size: int,
        weight: float,
        generator: torch.Generator,
    ):
        if len(labels) == 0:
            raise DataError("generative distillation needs a non-empty replay pool")
        self.teacher = teacher.eval().requires_grad_(False)
        self.images, self.labels = images, labels
        self.alphas_cumprod = alphas_cumprod
        self.batch_size, self.weight, self.generator = int(batch_size), float(weight), generator

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        device = next(unet.parameters()).device
        idx = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        x0, y = self.images[idx].float(), self.labels[idx]
        t = torch.randint(0, len(self.alphas_cumprod), (self.batch_size,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        x0, y, t, noise = x0.to(device), y.to(device), t.to(device), noise.to(device)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod.to(device))
        with torch.no_grad():
            target = self.teacher(x_t, t, class_labels=y).sample
        eps = unet(x_t, t, class_labels=y).sample
        return {self.name: self.weight * 0.5 * (eps - target).pow(2).flatten(1).sum(1).mean()}


def combine_terms(terms: list[LossTerm]) -> LossTerm | None:
    """One ``extra_loss`` for the training loop from several terms (None when there are none)."""
    if not terms:
        return None

    def extra(unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for term in terms:
            out.update(term(unet, step))
        return out

    return extra

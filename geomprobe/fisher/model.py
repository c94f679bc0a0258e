"""Fisher objects straight from a model and data, without storing G (DESIGN section 6).

The data are probe batches (:class:`geomprobe.probe.grads.ProbeBatch`: x0, noise (B, C, H, W),
t, y (B,), optional target); n is their total size and g_i the gradient of sample i's loss with
respect to the parameters ``names`` (flattened in that order, P entries).

    mu       = G^T 1 / n               one batched backward per batch            (mean_gradient)
    G v      = (v^T g_i)_i             one forward-mode jvp per batch            (directional_derivatives)
    G^T w    = grad sum_i w_i l_i      one backward per batch                    (weighted_gradient)
    F v      = G^T (G v) / n           jvp then vjp: O(P) memory, never O(nP)

On top of these: Rank1Fisher (mu, c*), LowRankFisher by Lanczos (scipy ``eigsh`` on a
``LinearOperator``), DiagonalFisher (per-sample gradients in chunks, squares accumulated) and
the stochastic power iteration of paper App. E.4.1 for a rank-k estimate from minibatches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from geomprobe.diffusion import per_sample_loss
from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo
from geomprobe.fisher.explicit import DiagonalFisher, LowRankFisher, Rank1Fisher
from geomprobe.probe.grads import (
    ProbeBatch,
    directional_derivatives,
    mean_gradient,
    param_layout,
    per_sample_grads,
)


def _batches(batches: ProbeBatch | Iterable[ProbeBatch]) -> list[ProbeBatch]:
    if isinstance(batches, ProbeBatch):
        return [batches]
    out = [b if isinstance(b, ProbeBatch) else ProbeBatch(*b) for b in batches]
    if not out:
        raise UsageError("no probe batches given")
    return out


def model_info(unet: torch.nn.Module, names: Sequence[str], batches: Sequence[ProbeBatch], t_range: str = "") -> FisherInfo:
    layout = param_layout(unet, names)
    return FisherInfo(
        t_range=t_range,
        n=sum(len(b) for b in batches),
        param_names=list(layout.names),
        param_shapes=[list(s) for s in layout.shapes],
    )


def weighted_gradient(
    unet: torch.nn.Module,
    names: Sequence[str],
    batch: ProbeBatch,
    alphas_cumprod: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """G^T w = sum_i w_i g_i: (P,) float32, from one backward of the weighted loss sum_i w_i l_i.

    weights: (B,). The vjp half of a Fisher-vector product. (Written here because the probe
    engine has mean_gradient, the special case w = 1/n, but no general weighted version.)
    """
    device = next(unet.parameters()).device
    params = dict(unet.named_parameters())
    wanted = [params[n] for n in names]
    flags = [p.requires_grad for p in wanted]
    for p in wanted:
        p.requires_grad_(True)
    try:
        target = None if batch.target is None else batch.target.to(device)
        losses = per_sample_loss(
            unet, batch.x0.to(device), batch.noise.to(device), batch.t.to(device), batch.y.to(device),
            alphas_cumprod.to(device), target,
        )
        grads = torch.autograd.grad((losses * weights.to(device=device, dtype=losses.dtype)).sum(), wanted)
    finally:
        for p, f in zip(wanted, flags):
            p.requires_grad_(f)
    return torch.cat([g.reshape(-1).float() for g in grads])


@dataclass
class ModelFisherOperator:
    """F v = G^T (G v) / n for the probe data, by one jvp and one vjp per batch (O(P) memory).

    ``centered``: the covariance F - mu mu^T (mu computed once, one backward per batch).
    ``products`` counts calls of :meth:`mv`; ``seconds`` their total time.
    """

    unet: torch.nn.Module
    names: Sequence[str]
    batches: list[ProbeBatch]
    alphas_cumprod: torch.Tensor
    centered: bool = False
    products: int = 0
    seconds: float = 0.0
    _mu: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def P(self) -> int:
        return param_layout(self.unet, self.names).P

    def mean(self) -> torch.Tensor:
        if self._mu is None:
            self._mu = mean_gradient(self.unet, self.names, self.batches, alphas_cumprod=self.alphas_cumprod)
        return self._mu

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """F v for v (P,): (P,) float32."""
        start = time.perf_counter()
        v = v.float()
        out = torch.zeros_like(v)
        for b in self.batches:
            Gv = directional_derivatives(self.unet, self.names, b.x0, b.noise, b.t, b.y, self.alphas_cumprod, v, b.target)
            out += weighted_gradient(self.unet, self.names, b, self.alphas_cumprod, Gv).to(out.device)
        out /= self.n
        if self.centered:
            mu = self.mean().to(out.device)
            out -= mu * (mu @ v.to(mu.device))
        self.products += 1
        self.seconds += time.perf_counter() - start
        return out

    def linear_operator(self):
        """A scipy ``LinearOperator`` (P x P, float64 interface) over :meth:`mv`."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
            return self.mv(v).double().cpu().numpy()

        return LinearOperator((self.P, self.P), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def rank1_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: ProbeBatch | Iterable[ProbeBatch],
    alphas_cumprod: torch.Tensor,
    centered: bool = False,
    t_range: str = "",
) -> Rank1Fisher:
    """Rank1Fisher(mu, c*) from the model: mu by one batched backward per batch, all mu^T g_i by one jvp.

    c* = mean((mu^T g_i)^2) / ||mu||^4 (paper eq. 6); centered: c* - 1. Memory O(P).
    """
    batches = _batches(batches)
    mu = mean_gradient(unet, names, batches, alphas_cumprod=alphas_cumprod)
    dots = torch.cat(
        [directional_derivatives(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, mu, b.target) for b in batches]
    ).double()
    mu_norm_sq = float(mu.double().pow(2).sum())
    if mu_norm_sq == 0.0:
        raise UsageError("the mean gradient is zero; c* is undefined")
    c_star = float(dots.pow(2).mean()) / mu_norm_sq**2 - (1.0 if centered else 0.0)
    info = model_info(unet, names, batches, t_range)
    info.centered = centered
    return Rank1Fisher(mu.cpu(), c_star, info)


def lowrank_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: ProbeBatch | Iterable[ProbeBatch],
    alphas_cumprod: torch.Tensor,
    k: int = 5,
    centered: bool = False,
    tol: float = 1e-6,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    t_range: str = "",
) -> LowRankFisher:
    """Top-k eigenpairs of F by Lanczos (scipy ``eigsh``, which='LA') on jvp/vjp Fisher-vector products.

    Memory O(P) per product; cost about (number of Lanczos steps) x (jvp + backward over the data).
    The start vector is seeded, so the result is reproducible. ``ncv`` (Lanczos basis size)
    defaults to max(4k, 20): scipy's default 2k+1 restarts far too often on a nearly rank-1 F
    whose trailing eigenvalues cluster.
    """
    from scipy.sparse.linalg import eigsh

    batches = _batches(batches)
    op = ModelFisherOperator(unet, list(names), batches, alphas_cumprod, centered=centered)
    P = op.P
    if not 1 <= k < P:
        raise UsageError(f"k must be in 1..{P - 1}, got {k}")
    v0 = np.random.default_rng(seed).standard_normal(P)
    ncv = min(P, ncv if ncv is not None else max(4 * k, 20))
    evals, evecs = eigsh(op.linear_operator(), k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0, ncv=ncv)
    info = model_info(unet, names, batches, t_range)
    info.centered = centered
    info.extra = {"method": "lanczos", "fisher_vector_products": op.products}
    return LowRankFisher(torch.from_numpy(evals.copy()), torch.from_numpy(evecs.copy()), info)


def diagonal_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: ProbeBatch | Iterable[ProbeBatch],
    alphas_cumprod: torch.Tensor,
    centered: bool = False,
    max_memory: int | str | None = None,
    t_range: str = "",
) -> DiagonalFisher:
    """DiagonalFisher (column means of G^2) from per-sample gradients computed in memory-bounded chunks.

    G is never stored: each chunk's rows are squared, summed and dropped. Memory O(chunk x P).
    """
    batches = _batches(batches)
    total, s, n = None, None, 0
    for b in batches:
        G = per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, b.target, max_memory=max_memory).double()
        total = G.pow(2).sum(0) if total is None else total + G.pow(2).sum(0)
        s = G.sum(0) if s is None else s + G.sum(0)
        n += G.shape[0]
        del G
    diagonal = total / n - ((s / n).pow(2) if centered else 0.0)
    info = model_info(unet, names, batches, t_range)
    info.centered = centered
    return DiagonalFisher(diagonal.cpu(), info)


def stochastic_power_iteration(
    minibatch_matmat: Callable[[torch.Tensor, int], torch.Tensor],
    P: int,
    k: int,
    num_iters: int = 20,
    average_last: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    info: FisherInfo | None = None,
) -> LowRankFisher:
    """Rank-k Fisher by stochastic subspace (power) iteration (paper App. E.4.1).

    ``minibatch_matmat(V, step)`` returns an unbiased minibatch estimate of F V for V (P, k) (a
    different minibatch each step). Iterates V <- orth(F_step V) ``num_iters`` times from a seeded
    Gaussian start; then averages the k x k Rayleigh quotients V^T F_step V over ``average_last``
    further minibatches and rotates V to their eigenvectors (Rayleigh-Ritz). Returns eigenvalue
    estimates (k,) and orthonormal V (P, k). Like any power method it converges at rate
    lambda_{k+1}/lambda_k, noisily: it is the paper's baseline, not an exact solver.
    """
    if not 1 <= k <= P:
        raise UsageError(f"k must be in 1..{P}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(P, k, generator=gen, dtype=torch.float64))
    V = V.to(dtype)
    step = 0
    for _ in range(num_iters):
        W = minibatch_matmat(V, step).to(dtype)
        step += 1
        V, _ = torch.linalg.qr(W.double())
        V = V.to(dtype)
    T = torch.zeros(k, k, dtype=torch.float64)
    for _ in range(max(1, average_last)):
        T += (V.double().T @ minibatch_matmat(V, step).double())
        step += 1
    T /= max(1, average_last)
    T = 0.5 * (T + T.T)
    evals, rot = torch.linalg.eigh(T)
    evals, rot = evals.flip(0), rot.flip(1)
    V = (V.double() @ rot).to(dtype)
    info = info if info is not None else FisherInfo()
    info.extra = {**info.extra, "method": "stochastic_power_iteration", "iterations": num_iters, "average_last": average_last}
    return LowRankFisher(evals.clamp_min(0.0).to(dtype), V, info)


def power_iteration_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: Iterable[ProbeBatch] | Callable[[], Iterator[ProbeBatch]],
    alphas_cumprod: torch.Tensor,
    k: int = 5,
    num_iters: int = 20,
    average_last: int = 5,
    seed: int = 0,
    t_range: str = "",
) -> LowRankFisher:
    """Stochastic power iteration with minibatch F_b V = G_b^T (G_b V) / |b| by jvp/vjp (O(kP) memory).

    ``batches``: a list of probe batches (cycled through) or a function returning a fresh iterator
    (e.g. a data loader drawing new x0, noise, t each call), so each step sees a new minibatch.
    """
    if callable(batches):
        make = batches
    else:
        fixed = _batches(batches)
        make = lambda: iter(fixed)  # noqa: E731
    stream = make()

    def next_batch() -> ProbeBatch:
        nonlocal stream
        try:
            return next(stream)
        except StopIteration:
            stream = make()
            return next(stream)

    def matmat(V: torch.Tensor, step: int) -> torch.Tensor:
        b = next_batch()
        cols = []
        for j in range(V.shape[1]):
            Gv = directional_derivatives(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, V[:, j].float(), b.target)
            cols.append(weighted_gradient(unet, names, b, alphas_cumprod, Gv).cpu() / len(b))
        return torch.stack(cols, dim=1)

    layout = param_layout(unet, names)
    info = FisherInfo(t_range=t_range, param_names=list(layout.names), param_shapes=[list(s) for s in layout.shapes])
    return stochastic_power_iteration(matmat, layout.P, k, num_iters, average_last, seed, torch.float32, info)

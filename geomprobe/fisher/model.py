"""Fisher summaries straight from a model and probe data, without storing G (docs/design.md §6).

Each builder is a named use of :class:`geomprobe.fisher.implicit.ImplicitFisher` (the matrix-free
Fisher of the model's DDPM loss on the probe batches):

    rank1_from_model           mu and all mu^T g_i (paper eq. 6), one pass while the layer records fit max_memory
    lowrank_from_model         top-k eigenpairs by Lanczos on jvp/vjp Fisher-vector products
    diagonal_from_model        column means of G^2 from per-sample gradients in memory-bounded chunks
    power_iteration_from_model the stochastic power iteration of paper App. E.4.1 on fresh minibatches

``batches``: :class:`geomprobe.probe.ProbeBatch` objects (x0, noise (B, C, H, W), t, y (B,),
optional target); ``names``: the parameters (flattened in that order, P entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo
from geomprobe.fisher.diagonal import DiagonalFisher
from geomprobe.fisher.implicit import ImplicitFisher
from geomprobe.fisher.lowrank import LowRankFisher
from geomprobe.fisher.rank1 import Rank1Fisher
from geomprobe.io import DEFAULT_MAX_MEMORY, torch_generator

ModelFisherOperator = ImplicitFisher.from_model
"""The matrix-free Fisher of a model (older name of :meth:`ImplicitFisher.from_model`)."""


def rank1_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches,
    alphas_cumprod: torch.Tensor,
    centered: bool = False,
    t_range: str = "",
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Rank1Fisher:
    """Rank1Fisher(mu, c*) with c* = mean((mu^T g_i)^2) / ||mu||^4 (centered: c* - 1).

    Memory: O(P) plus the layer records kept within ``max_memory`` bytes
    (:func:`geomprobe.probe.mean_and_projections`).
    """
    fisher = ImplicitFisher.from_model(unet, names, batches, alphas_cumprod, centered, max_memory, t_range)
    return fisher.to_rank1()


def lowrank_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches,
    alphas_cumprod: torch.Tensor,
    k: int = 5,
    centered: bool = False,
    tol: float = 1e-6,
    ncv: int | None = None,
    seed: int = 0,
    t_range: str = "",
) -> LowRankFisher:
    """Top-k eigenpairs of F by Lanczos (scipy ``eigsh``, seeded start) on jvp/vjp products.

    Memory O(P) per product; cost about (Lanczos steps) x (jvp + backward over the data).
    """
    fisher = ImplicitFisher.from_model(unet, names, batches, alphas_cumprod, centered, t_range=t_range)
    return fisher.to_low_rank(k, seed=seed, tol=tol, ncv=ncv)


def diagonal_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches,
    alphas_cumprod: torch.Tensor,
    centered: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    t_range: str = "",
) -> DiagonalFisher:
    """DiagonalFisher (column means of G^2) from per-sample gradients in chunks within ``max_memory`` bytes."""
    fisher = ImplicitFisher.from_model(unet, names, batches, alphas_cumprod, centered, max_memory, t_range)
    return fisher.to_diagonal()


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
    gen = torch_generator(seed)
    V, _ = torch.linalg.qr(torch.randn(P, k, generator=gen, dtype=torch.float64))
    V = V.to(dtype)
    for step in range(num_iters):
        V, _ = torch.linalg.qr(minibatch_matmat(V, step).to(dtype).double())
        V = V.to(dtype)
    T = torch.zeros(k, k, dtype=torch.float64)
    for step in range(num_iters, num_iters + max(1, average_last)):
        T += V.double().T @ minibatch_matmat(V, step).double()
    T /= max(1, average_last)
    evals, rot = torch.linalg.eigh(0.5 * (T + T.T))
    evals, rot = evals.flip(0), rot.flip(1)
    V = (V.double() @ rot).to(dtype)
    info = info if info is not None else FisherInfo()
    info.extra = {
        **info.extra,
        "method": "stochastic_power_iteration",
        "iterations": num_iters,
        "average_last": average_last,
    }
    return LowRankFisher(evals.clamp_min(0.0).to(dtype), V, info)


def power_iteration_from_model(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: Iterable | Callable[[], Iterator],
    alphas_cumprod: torch.Tensor,
    k: int = 5,
    num_iters: int = 20,
    average_last: int = 5,
    seed: int = 0,
    t_range: str = "",
) -> LowRankFisher:
    """Stochastic power iteration with minibatch F_b V = G_b^T (G_b V) / |b| by jvp/vjp (O(kP) memory).

    ``batches``: a list of probe batches (cycled through) or a function returning a fresh iterator
    (e.g. drawing new x0, noise, t each call), so each step sees a new minibatch.
    """
    if callable(batches):
        make = batches
    else:
        fixed = list(batches)
        if not fixed:
            raise UsageError("no probe batches given")
        make = lambda: iter(fixed)  # noqa: E731
    stream = make()

    def next_batch():
        nonlocal stream
        try:
            return next(stream)
        except StopIteration:
            stream = make()
            return next(stream)

    def matmat(V: torch.Tensor, step: int) -> torch.Tensor:
        return ImplicitFisher.from_model(unet, names, next_batch(), alphas_cumprod).mv(V).cpu()

    from geomprobe.probe import param_layout

    layout = param_layout(unet, names)
    info = FisherInfo(t_range=t_range, param_names=list(layout.names), param_shapes=[list(s) for s in layout.shapes])
    return stochastic_power_iteration(matmat, layout.P, k, num_iters, average_last, seed, torch.float32, info)

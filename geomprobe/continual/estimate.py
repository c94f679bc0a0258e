"""The Fisher of one task at its optimum theta*_k, with the builders of :mod:`geomprobe.fisher`.

Probe data: ``n`` images of the task (without replacement when the task has that many), t drawn
uniformly from the ``--t-range`` timesteps, fresh Gaussian noise, all from one seeded generator.
The kinds map to the fisher package's builders:

    diag   diagonal_from_model        per-sample gradients in chunks, squares averaged
    rank1  rank1_from_model           mu and all mu^T g_i from one pass (paper eq. 6; under torchrun
                                      each rank's gradient sum is all-reduced inside that pass)
    rankk  power_iteration_from_model stochastic power iteration on fresh minibatches (App. E.4.1),
           or lowrank_from_model      Lanczos on the n fixed samples (``method="lanczos"``)
    full   GramFisher(G)              the n x P per-sample gradients (exact empirical Fisher)

Under an initialised torch.distributed process group (torchrun) every rank draws the same probe
batches and takes rows [rank::world] of each. diag and rank1: the sums (n mu, column sums of g^2,
sum of (mu^T g_i)^2) are all-reduced in float64; rankk by power iteration: each minibatch product
G_b^T (G_b V) is the all-reduced sum of the ranks' rows; rankk by Lanczos: every rank runs the same
Lanczos iteration on the all-reduced products G^T (G v); full: each rank's rows of G are gathered.
So the Fisher equals one process's up to the order of float sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geomprobe.data import ImageDataset
from geomprobe.distributed import group_world, sum_over_ranks
from geomprobe.errors import UsageError
from geomprobe.fisher.kinds import canonical_kind
from geomprobe.io import DEFAULT_MAX_MEMORY
from geomprobe.timesteps import TimestepSpec

RANKK_METHODS = ("power", "lanczos")
LANCZOS_TOL = 1e-6  # relative tolerance of the rank-k Lanczos estimate
ESTIMATED_KINDS = ("diagonal", "rank1", "lowrank", "gram")  # the kinds of --fisher diag | rank1 | rankk | full
SHARDED_KINDS = ("diagonal", "rank1", "gram")  # shared among torchrun ranks (module docstring; + power rankk)


def probe_batches(
    data: ImageDataset, n: int, timesteps: TimestepSpec, generator: torch.Generator, batch_size: int = 64
):
    """``n`` probe samples of ``data`` as a list of :class:`geomprobe.probe.grads.ProbeBatch`."""
    from geomprobe.probe import ProbeBatch

    if n <= 0:
        raise UsageError(f"--fisher-samples must be positive, got {n}")
    if len(data) >= n:
        idx = torch.randperm(len(data), generator=generator)[:n]
    else:
        idx = torch.randint(0, len(data), (n,), generator=generator)
    ts = torch.tensor(timesteps.timesteps, dtype=torch.long)
    batches = []
    for s in range(0, n, batch_size):
        x0, y = data.batch(idx[s : s + batch_size])
        t = ts[torch.randint(0, len(ts), (len(y),), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        batches.append(ProbeBatch(x0, noise, t, y))
    return batches


def estimate_task_fisher(
    kind: str,
    unet: torch.nn.Module,
    names: Sequence[str],
    data: ImageDataset,
    alphas_cumprod: torch.Tensor,
    timesteps: TimestepSpec,
    n: int,
    generator: torch.Generator,
    rank: int = 5,
    method: str = "power",
    batch_size: int = 64,
    power_iterations: int = 20,
    max_memory: int = DEFAULT_MAX_MEMORY,
):
    """A Fisher object of ``kind`` (a kind or CLI name: diag | rank1 | rankk | full) for ``data`` at the model's parameters.

    Returns a :class:`geomprobe.fisher.FisherMatrix`: DiagonalFisher, Rank1Fisher, LowRankFisher
    (rank ``rank``) or GramFisher holding G (n, P) float32. ``timesteps``: the run's parsed
    ``--t-range``; ``max_memory``: bytes for per-sample gradients (default 2 GiB).
    """
    kind = canonical_kind(kind)
    if kind == "lowrank" and method not in RANKK_METHODS:
        raise UsageError(f"unknown rank-k method {method!r}; expected one of {', '.join(RANKK_METHODS)}")
    if kind not in ESTIMATED_KINDS:
        raise UsageError(f"no task Fisher of kind {kind!r}; expected diag, rank1, rankk or full")
    was_training = unet.training
    unet.eval()  # no dropout in these UNets, but keep the estimate independent of the mode
    try:
        batches = probe_batches(data, n, timesteps, generator, batch_size)
        if group_world() > 1 and (kind in SHARDED_KINDS or (kind == "lowrank" and method == "lanczos")):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if kind == "lowrank" else 0
            return _sharded(kind, unet, names, batches, alphas_cumprod, timesteps, max_memory, rank, seed)
        if kind == "lowrank" and method == "power":
            return _power_iteration(
                unet, names, data, alphas_cumprod, timesteps, generator, rank, batch_size, power_iterations
            )
        return _from_batches(kind, unet, names, batches, alphas_cumprod, timesteps, generator, rank, max_memory)
    finally:
        unet.train(was_training)


def _from_batches(kind, unet, names, batches, alphas_cumprod, timesteps: TimestepSpec, generator, rank, max_memory):
    """diag, rank1, lanczos rank-k and full from the fixed probe batches."""
    from geomprobe.fisher import GramFisher, ImplicitFisher
    from geomprobe.fisher.model import diagonal_from_model, lowrank_from_model, rank1_from_model
    from geomprobe.probe import per_sample_grads

    if kind == "rank1":
        return rank1_from_model(unet, names, batches, alphas_cumprod, t_range=timesteps.text, max_memory=max_memory)
    if kind == "diagonal":
        return diagonal_from_model(unet, names, batches, alphas_cumprod, t_range=timesteps.text, max_memory=max_memory)
    if kind == "lowrank":
        return lowrank_from_model(
            unet,
            names,
            batches,
            alphas_cumprod,
            k=rank,
            t_range=timesteps.text,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)),
            tol=LANCZOS_TOL,
        )
    G = torch.cat(
        [
            per_sample_grads(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, max_memory=max_memory).cpu()
            for b in batches
        ]
    )
    return GramFisher(
        G, info=ImplicitFisher.from_model(unet, names, batches, alphas_cumprod, t_range=timesteps.text).info
    )


def _sharded(kind, unet, names, batches, alphas_cumprod, timesteps: TimestepSpec, max_memory, k=5, seed=0):
    """The diag or rank1 Fisher from this rank's rows [rank::world] of every probe batch, sums all-reduced (float64)."""
    import torch.distributed as dist

    from geomprobe.fisher import DiagonalFisher, ImplicitFisher, Rank1Fisher
    from geomprobe.fisher.spectrum import rank1_scale

    world = dist.get_world_size()
    n = sum(len(b) for b in batches)
    if n < world:
        raise UsageError(f"--fisher-samples {n} is fewer than the {world} torchrun processes")
    mine = [_my_rows(b) for b in batches]
    if kind == "gram":
        return _gathered_gram(unet, names, batches, mine, alphas_cumprod, timesteps, max_memory)
    local = ImplicitFisher.from_model(
        unet, names, [b for b in mine if len(b)], alphas_cumprod, max_memory=max_memory, t_range=timesteps.text
    )
    info = local._derived_info()
    info.n = n
    if kind == "lowrank":
        return _sharded_lanczos(local, n, k, seed, info)
    if kind == "diagonal":
        d = local.diag().cpu()
        return DiagonalFisher((sum_over_ranks(d * local.n) / n).to(d.dtype), info)
    mu, dots = local.gradients.mean_and_projections(max_memory, lambda total, _: (sum_over_ranks(total) / n).float())
    dots_sq = float(sum_over_ranks(dots.double().pow(2).sum()))
    c_star = rank1_scale(dots_sq / n, float(mu.double().pow(2).sum()))
    return Rank1Fisher(mu, c_star, info)


def _my_rows(batch):
    """This rank's rows [rank::world] of a probe batch (the batch itself without a process group)."""
    from geomprobe.distributed import group_rank, rank_slice
    from geomprobe.probe import ProbeBatch

    return ProbeBatch(*rank_slice((batch.x0, batch.noise, batch.t, batch.y), group_rank(), group_world()))


def _gathered_gram(unet, names, batches, mine, alphas_cumprod, timesteps: TimestepSpec, max_memory):
    """full: per-sample gradients of this rank's contiguous share of every batch, gathered in row order."""
    from geomprobe.distributed import gather_rows, my_rows
    from geomprobe.fisher import GramFisher, ImplicitFisher
    from geomprobe.probe import param_layout, per_sample_grads

    blocks = []
    for b in batches:
        r = my_rows(len(b))
        x0, noise, t, y = (v[r.start : r.stop] for v in (b.x0, b.noise, b.t, b.y))
        if len(r):
            G = per_sample_grads(unet, names, x0, noise, t, y, alphas_cumprod, max_memory=max_memory).cpu()
        else:  # a batch with fewer rows than ranks
            G = torch.zeros(0, param_layout(unet, names).P)
        blocks.append(gather_rows(G, len(b)))
    info = ImplicitFisher.from_model(unet, names, [m for m in mine if len(m)], alphas_cumprod, t_range=timesteps.text)
    info = info._derived_info()
    info.n = sum(len(b) for b in batches)
    return GramFisher(torch.cat(blocks), info=info)


def _power_iteration(
    unet, names, data, alphas_cumprod, timesteps: TimestepSpec, generator, rank, batch_size, power_iterations
):
    """Stochastic power iteration on a fresh minibatch per step, drawn from the same generator (App. E.4.1)."""
    from geomprobe.fisher.model import power_iteration_from_model

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))

    def fresh():
        while True:
            yield probe_batches(data, batch_size, timesteps, generator, batch_size)[0]

    if group_world() > 1:
        fisher = _sharded_power_iteration(unet, names, fresh, alphas_cumprod, timesteps, rank, power_iterations, seed)
    else:
        fisher = power_iteration_from_model(
            unet, names, fresh, alphas_cumprod, k=rank, num_iters=power_iterations, seed=seed, t_range=timesteps.text
        )
    fisher.info.n = batch_size * (power_iterations + 5)
    return fisher


def _sharded_power_iteration(unet, names, fresh, alphas_cumprod, timesteps: TimestepSpec, k, iterations, seed):
    """Power iteration whose minibatch product F_b V is the all-reduced sum over ranks of their rows' G^T (G V)."""
    from geomprobe.fisher import FisherInfo, ImplicitFisher
    from geomprobe.fisher.model import stochastic_power_iteration
    from geomprobe.probe import param_layout

    stream = fresh()

    def matmat(V: torch.Tensor, step: int) -> torch.Tensor:
        batch = next(stream)
        mine = _my_rows(batch)
        local = (
            torch.zeros_like(V)
            if len(mine) == 0
            else ImplicitFisher.from_model(unet, names, mine, alphas_cumprod).mv(V)
        )
        return (sum_over_ranks(local.cpu() * len(mine)) / len(batch)).to(V.dtype)

    layout = param_layout(unet, names)
    info = FisherInfo(
        t_range=timesteps.text, param_names=list(layout.names), param_shapes=[list(s) for s in layout.shapes]
    )
    return stochastic_power_iteration(matmat, layout.P, k, iterations, 5, seed, torch.float32, info)


def _sharded_lanczos(local, n: int, k: int, seed: int, info):
    """Top-k eigenpairs by Lanczos on F v = (sum over ranks of G_r^T (G_r v)) / n; the same iteration on every rank."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    from geomprobe.fisher import LowRankFisher
    from geomprobe.fisher.spectrum import top_eigenpairs

    products, mean_product = 0, local.linear_operator()  # this rank's (1/n_r) G_r^T G_r v, float64

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal products
        products += 1
        return (sum_over_ranks(torch.from_numpy(mean_product.matvec(x) * local.n)) / n).numpy()

    op = LinearOperator((local.P, local.P), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    evals, evecs = top_eigenpairs(op, k, seed=seed, tol=LANCZOS_TOL)
    info.extra = {**info.extra, "method": "lanczos", "fisher_vector_products": products}
    return LowRankFisher(torch.from_numpy(evals.copy()), torch.from_numpy(evecs.copy()), info)

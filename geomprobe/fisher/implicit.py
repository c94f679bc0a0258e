"""The implicit kind: the exact empirical Fisher of a model, matrix-free (docs/design.md §6, §11).

F = G^T G / n for per-sample gradients G (n x P) that are never stored. G is reached only through
products (a :class:`PerSampleGradients`):

    G v      (n,)   all v^T g_i: one forward-mode jvp of the per-sample loss vector
    G^T w    (P,)   sum_i w_i g_i: one backward of the weighted loss
    rows            per-sample gradients in row blocks within a memory budget (exact diag / trace / K)

so that, in O(P) memory,

    F v = G^T (G v) / n              mv (vectors and (P, m) matrices, column by column)
    v^T F v = ||G v||^2 / n           quad (one jvp)
    tr F, diag F                      exact from the row blocks (one pass), or Hutchinson estimates
                                      with their standard error (jvp / mv only)
    ||F||_F = ||K||_F                 exact from the Gram matrix of the row blocks
    top-k eigenpairs                  Lanczos on mv (:func:`geomprobe.fisher.spectrum.top_eigenpairs`)
    penalty                           strength/2 d^T F d, gradient strength F d by one mv

``centered=True`` gives the covariance F - mu mu^T. Two sources of products: :class:`ModelGradients`
(a diffusers UNet on probe batches, the DDPM loss of :mod:`geomprobe.diffusion`) and
:class:`FunctionGradients` (any differentiable per-sample loss vector of a flat parameter vector,
e.g. a linear model whose gradients are a given G, as the tests use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from geomprobe.errors import UsageError
from geomprobe.fisher.base import FisherInfo, FisherMatrix, matrix_free_penalty, promoted
from geomprobe.fisher.diagonal import DiagonalFisher
from geomprobe.fisher.gram import GramFisher
from geomprobe.fisher.lowrank import LowRankFisher
from geomprobe.fisher.rank1 import Rank1Fisher
from geomprobe.fisher.rows import GramStatistics, IterableRows, rows_per_block
from geomprobe.fisher.spectrum import rank1_scale, top_eigenpairs
from geomprobe.io import DEFAULT_MAX_MEMORY, torch_generator


class PerSampleGradients(Protocol):
    """Products with the (n, P) per-sample gradient matrix G, which is never formed whole."""

    n: int
    P: int
    dtype: torch.dtype

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """G v for v (P,): (n,)."""
        ...

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        """G^T w for w (n,): (P,)."""
        ...

    def mean(self) -> torch.Tensor:
        """Mu = G^T 1 / n: (P,)."""
        ...

    def mean_and_projections(
        self, max_memory: int, reduce_mean: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu (P,), G mu (n,)): what the rank-1 Fisher needs (a source may share work between the two).

        ``reduce_mean(G^T 1, n)`` -> mu (default G^T 1 / n; torchrun ranks all-reduce here).
        """
        ...

    def row_blocks(self, max_memory: int) -> Iterator[torch.Tensor]:
        """Consecutive (b, P) blocks of G (rows 0..n-1 in order), each within ``max_memory`` bytes."""
        ...


@dataclass
class FunctionGradients:
    """G = the Jacobian of ``losses(theta)`` (n,) at ``theta`` (P,), by ``torch.func`` transforms.

    For tests and non-diffusion models: with ``losses = lambda th: G0 @ th`` the per-sample
    gradients are exactly the rows of ``G0``.
    """

    losses: Callable[[torch.Tensor], torch.Tensor]
    theta: torch.Tensor

    def __post_init__(self) -> None:
        self.theta = self.theta.detach()
        self.P, self.dtype = int(self.theta.numel()), self.theta.dtype
        self.n = int(self.losses(self.theta).shape[0])

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self.losses, (self.theta,), (v.to(self.theta),))[1]

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        _, pullback = torch.func.vjp(self.losses, self.theta)
        return pullback(w.to(self.theta))[0]

    def mean(self) -> torch.Tensor:
        return self.vjp(torch.full((self.n,), 1.0 / self.n, dtype=self.dtype))

    def mean_and_projections(self, max_memory: int, reduce_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.mean() if reduce_mean is None else reduce_mean(self.mean() * self.n, self.n).to(self.dtype)
        return mu, self.jvp(mu)

    def row_blocks(self, max_memory: int) -> Iterator[torch.Tensor]:
        rows = rows_per_block(self.P, max_memory, live_blocks=2, bytes_per_value=self.theta.element_size())
        G = torch.func.jacrev(self.losses)(self.theta)
        for a in range(0, self.n, rows):
            yield G[a : a + rows]


class ModelGradients:
    """G of a UNet's per-sample DDPM losses on probe batches, w.r.t. the parameters ``names``.

    ``batches``: :class:`geomprobe.probe.ProbeBatch` list (x0, noise, t, y, optional target); the
    rows of G are their samples in order. Products run batch by batch on the model's device.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        names: Sequence[str],
        batches: Sequence,
        alphas_cumprod: torch.Tensor,
    ):
        from geomprobe.probe import param_layout

        if not batches:
            raise UsageError("no probe batches given")
        self.unet, self.names, self.batches = unet, list(names), list(batches)
        self.alphas_cumprod = alphas_cumprod
        self.layout = param_layout(unet, self.names)
        self.n, self.P, self.dtype = sum(len(b) for b in self.batches), self.layout.P, torch.float32

    def _slices(self) -> Iterator[tuple[object, slice]]:
        a = 0
        for b in self.batches:
            yield b, slice(a, a + len(b))
            a += len(b)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        from geomprobe.probe import directional_derivatives

        ac, v = self.alphas_cumprod, v.float()
        return torch.cat(
            [
                directional_derivatives(self.unet, self.names, b.x0, b.noise, b.t, b.y, ac, v, b.target).to(v.device)
                for b in self.batches
            ]
        )

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        from geomprobe.probe import weighted_gradient

        out = torch.zeros(self.P, dtype=torch.float32, device=w.device)
        for b, rows in self._slices():
            out += weighted_gradient(self.unet, self.names, b, self.alphas_cumprod, w[rows]).to(w.device)
        return out

    def mean(self) -> torch.Tensor:
        from geomprobe.probe import mean_gradient

        return mean_gradient(self.unet, self.names, self.batches, alphas_cumprod=self.alphas_cumprod).cpu()

    def mean_and_projections(self, max_memory: int, reduce_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, G mu) from one forward + backward per batch while the layer records fit in ``max_memory``."""
        from geomprobe.probe import mean_and_projections

        ac = self.alphas_cumprod
        return mean_and_projections(self.unet, self.names, self.batches, ac, max_memory, reduce_mean)

    def row_blocks(self, max_memory: int) -> Iterator[torch.Tensor]:
        from geomprobe.probe import ProbeBatch, per_sample_grads

        rows = rows_per_block(self.P, max_memory, live_blocks=2)
        for b in self.batches:
            for a in range(0, len(b), rows):
                part = ProbeBatch(
                    *(None if x is None else x[a : a + rows] for x in (b.x0, b.noise, b.t, b.y, b.target))
                )
                yield per_sample_grads(
                    self.unet,
                    self.names,
                    part.x0,
                    part.noise,
                    part.t,
                    part.y,
                    self.alphas_cumprod,
                    part.target,
                    max_memory=max_memory,
                ).cpu()


class ImplicitFisher(FisherMatrix):
    """F = G^T G / n (or the covariance with ``centered=True``) through products with G only.

    ``gradients``: a :class:`PerSampleGradients` (:class:`ModelGradients`, :class:`FunctionGradients`).
    ``max_memory``: bytes for the row blocks of the exact ``trace``/``diag``/``frobenius`` (delegated to
    a :class:`GramFisher` over rows computed chunk by chunk, ``self.rows``).
    ``products`` counts Fisher-vector products (``mv`` columns), e.g. of a Lanczos run.
    """

    kind = "implicit"

    def __init__(
        self,
        gradients: PerSampleGradients,
        centered: bool = False,
        info: FisherInfo | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ):
        super().__init__(info)
        self.gradients, self.centered, self.max_memory = gradients, bool(centered), int(max_memory)
        self.info.centered, self.info.n = self.centered, self.info.n or gradients.n
        self.products = 0
        self._mu: torch.Tensor | None = None
        # the same Fisher with its rows computed chunk by chunk: exact trace, diag, K and frobenius
        blocks = IterableRows(lambda: gradients.row_blocks(self.max_memory), n=gradients.n, P=gradients.P)
        self.rows = GramFisher(blocks, centered=self.centered, max_memory=self.max_memory)

    @classmethod
    def from_model(
        cls,
        unet: torch.nn.Module,
        names: Sequence[str],
        batches: Sequence,
        alphas_cumprod: torch.Tensor,
        centered: bool = False,
        max_memory: int = DEFAULT_MAX_MEMORY,
        t_range: str = "",
    ) -> ImplicitFisher:
        """The implicit Fisher of a UNet's DDPM loss on probe ``batches`` (ProbeBatch list or one ProbeBatch)."""
        from geomprobe.probe import ProbeBatch

        batches = (
            [batches]
            if isinstance(batches, ProbeBatch)
            else [b if isinstance(b, ProbeBatch) else ProbeBatch(*b) for b in batches]
        )
        gradients = ModelGradients(unet, names, batches, alphas_cumprod)
        info = FisherInfo(
            t_range=t_range,
            n=gradients.n,
            param_names=list(gradients.layout.names),
            param_shapes=[list(s) for s in gradients.layout.shapes],
        )
        return cls(gradients, centered=centered, info=info, max_memory=max_memory)

    @property
    def P(self) -> int:
        return self.gradients.P

    @property
    def n(self) -> int:
        return self.gradients.n

    def mean(self) -> torch.Tensor:
        """Mu = G^T 1 / n, (P,) (cached)."""
        if self._mu is None:
            self._mu = self.gradients.mean()
        return self._mu

    # ---- products
    def _mv_column(self, v: torch.Tensor) -> torch.Tensor:
        out = self.gradients.vjp(self.gradients.jvp(v)) / self.n
        if self.centered:
            mu = self.mean().to(out)
            out = out - mu * (mu @ v.to(out))
        self.products += 1
        return out

    def mv(self, v):
        v = self._check_vector(v, allow_matrix=True)
        dtype = promoted(v, torch.empty(0, dtype=self.gradients.dtype))
        if v.dim() == 1:
            return self._mv_column(v).to(dtype)
        return torch.stack([self._mv_column(v[:, j]) for j in range(v.shape[1])], dim=1).to(dtype)

    def quad(self, v):
        v = self._check_vector(v)
        dtype = promoted(v, torch.empty(0, dtype=self.gradients.dtype))
        Gv = self.gradients.jvp(v).to(torch.float64)
        value = Gv.pow(2).sum() / self.n
        if self.centered:
            value = value - (self.mean().double() @ v.double()).pow(2)
        return value.to(dtype)

    # ---- exact statistics from the row blocks (the same code as the stored-rows kind)
    def gram_statistics(self) -> GramStatistics:
        """K = G G^T / n and the column statistics from the row blocks (cached; about (blocks+1)/2 passes)."""
        return self.rows.gram_statistics()

    def trace(self) -> float:
        return self.rows.trace()

    def diag(self) -> torch.Tensor:
        return self.rows.diag()

    def frobenius(self) -> float:
        return self.rows.frobenius()

    # ---- stochastic estimates (products only)
    def trace_estimate(self, probes: int = 64, seed: int = 0) -> tuple[float, float]:
        """Hutchinson: tr F = E[z^T F z] = E ||G z||^2 / n for Rademacher z; (estimate, standard error).

        Costs ``probes`` jvps; the standard error is the sample standard deviation / sqrt(probes).
        """
        gen = torch_generator(seed)
        values = [float(self.quad(_rademacher(self.P, gen, self.gradients.dtype))) for _ in range(probes)]
        return _mean_and_error(np.array(values))

    def diag_estimate(self, probes: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Hutchinson: diag F = E[z * (F z)] for Rademacher z; (estimate (P,), standard error (P,)).

        Costs ``probes`` Fisher-vector products; the error is per entry, sample std / sqrt(probes).
        """
        gen = torch_generator(seed)
        total = torch.zeros(self.P, dtype=torch.float64)
        total_sq = torch.zeros(self.P, dtype=torch.float64)
        for _ in range(probes):
            z = _rademacher(self.P, gen, self.gradients.dtype)
            sample = (z * self.mv(z)).double()
            total += sample
            total_sq += sample.pow(2)
        mean = total / probes
        var = (total_sq - probes * mean.pow(2)).clamp_min(0.0) / max(probes - 1, 1)
        return mean, (var / probes).sqrt()

    # ---- eigenpairs and conversions
    def linear_operator(self):
        """A scipy ``LinearOperator`` (P x P, float64 interface) over :meth:`mv` (vectors in the gradients' dtype)."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(self.gradients.dtype)
            return self._mv_column(v).double().cpu().numpy()

        return LinearOperator((self.P, self.P), matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def top_eigen(self, k: int, seed: int = 0, tol: float = 0.0, ncv: int | None = None):
        """Top-k eigenpairs by Lanczos on Fisher-vector products (k < P); float64 tensors."""
        k = min(int(k), self.P - 1)
        if k < 1:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(self.P, 0, dtype=torch.float64)
        evals, evecs = top_eigenpairs(self.linear_operator(), k, seed=seed, tol=tol, ncv=ncv)
        return torch.from_numpy(evals.copy()), torch.from_numpy(evecs.copy())

    def to_rank1(self) -> Rank1Fisher:
        """Rank1Fisher(mu, c*) (paper eq. 6) from mu and all mu^T g_i.

        One pass over the batches where the source can share it
        (:meth:`PerSampleGradients.mean_and_projections`); with mu already known, one jvp.
        """
        if self._mu is None:
            self._mu, dots = self.gradients.mean_and_projections(self.max_memory)
        else:
            dots = self.gradients.jvp(self._mu)
        mu, dots = self._mu, dots.double()
        c_star = rank1_scale(float(dots.pow(2).mean()), float(mu.double().pow(2).sum()))
        return Rank1Fisher(mu.cpu(), c_star - (1.0 if self.centered else 0.0), self._derived_info())

    def to_low_rank(self, k: int = 5, seed: int = 0, tol: float = 0.0, ncv: int | None = None) -> LowRankFisher:
        """The top-k eigenpairs (Lanczos) as a LowRankFisher; ``info.extra`` records the product count."""
        if not 1 <= k < self.P:
            raise UsageError(f"k must be in 1..{self.P - 1}, got {k}")
        before = self.products
        evals, evecs = self.top_eigen(k, seed=seed, tol=tol, ncv=ncv)
        info = self._derived_info()
        info.extra = {**info.extra, "method": "lanczos", "fisher_vector_products": self.products - before}
        return LowRankFisher(evals, evecs, info)

    def to_diagonal(self) -> DiagonalFisher:
        """The exact diagonal (column means of G^2, one pass over the row blocks) as a DiagonalFisher."""
        return DiagonalFisher(self.diag().cpu(), self._derived_info())

    def _derived_info(self) -> FisherInfo:
        return replace(self.info, extra=dict(self.info.extra))

    def penalty(self, theta, theta_star, strength: float = 1.0):
        return matrix_free_penalty(self, self._difference(theta, theta_star), strength)

    # ---- storage: an implicit Fisher is bound to a model and its probe data
    def save(self, path):
        raise UsageError(
            "an implicit Fisher is bound to its model and probe data and cannot be saved; "
            "save one of its summaries: to_rank1(), to_low_rank(k) or to_diagonal()"
        )

    def _tensors(self):
        return (torch.empty(0, dtype=self.gradients.dtype),)

    def _write(self, f) -> None:  # pragma: no cover - save() refuses first
        raise UsageError("an implicit Fisher cannot be saved")

    @classmethod
    def _read(cls, f, info):  # pragma: no cover - never written
        raise UsageError("an implicit Fisher cannot be loaded from a file")


def _rademacher(P: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, (P,), generator=gen) * 2 - 1).to(dtype)


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    from scipy.stats import sem

    return float(values.mean()), float(sem(values)) if values.size > 1 else float("nan")

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
The Fisher objects of :mod:`geomprobe.fisher` are converted once per task, with their anchors
stacked, so a training step pays one ``torch.cat`` of the parameters and a few fused ops.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import UNet2DModel

from geomprobe.diffusion import add_noise
from geomprobe.errors import DataError, UsageError

LossTerm = Callable[[UNet2DModel, int], dict[str, torch.Tensor]]


def flat_parameters(unet: torch.nn.Module, names: Sequence[str]) -> torch.Tensor:
    """theta: (P,) concatenation of the parameters ``names`` (in that order), differentiable."""
    params = dict(unet.named_parameters())
    return torch.cat([params[n].reshape(-1) for n in names])


class _FlatView:
    """Caches the parameter list so a step does one ``torch.cat`` and nothing else per parameter."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._module: torch.nn.Module | None = None
        self._params: list[torch.Tensor] = []

    def __call__(self, unet: torch.nn.Module) -> torch.Tensor:
        if unet is not self._module:
            params = dict(unet.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise DataError(f"the model has no parameter {missing[0]!r} named by the Fisher")
            self._params = [params[n] for n in self.names]
            self._module = unet
        return torch.cat([p.reshape(-1) for p in self._params])


class DiagonalPenalty:
    """lambda/2 sum_k sum_j F_kj (theta_j - theta*_kj)^2 with F: (K, P) and anchors: (K, P)."""

    name = "ewc"

    def __init__(self, names: Sequence[str], strength: float):
        self.view = _FlatView(names)
        self.strength = float(strength)
        self.weights: torch.Tensor | None = None  # (K, P) float32
        self.anchors: torch.Tensor | None = None  # (K, P) float32

    @property
    def num_tasks(self) -> int:
        return 0 if self.weights is None else int(self.weights.shape[0])

    def add_task(self, diagonal: torch.Tensor, anchor: torch.Tensor) -> None:
        """Append task k: diagonal (P,) of F_k, anchor theta*_k (P,)."""
        d = diagonal.detach().reshape(1, -1).float()
        a = anchor.detach().reshape(1, -1).float()
        if d.shape != a.shape:
            raise DataError(f"Fisher diagonal has {d.shape[1]} entries but the anchor has {a.shape[1]}")
        self.weights = d if self.weights is None else torch.cat([self.weights, d.to(self.weights)])
        self.anchors = a if self.anchors is None else torch.cat([self.anchors, a.to(self.anchors)])

    def to(self, device: torch.device) -> "DiagonalPenalty":
        if self.weights is not None:
            self.weights, self.anchors = self.weights.to(device), self.anchors.to(device)
        return self

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """The penalty at flat parameters theta (P,): a 0-dim tensor (zero without tasks)."""
        if self.weights is None:
            return theta.new_zeros(())
        return 0.5 * self.strength * (self.weights * (theta.unsqueeze(0) - self.anchors).pow(2)).sum()

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        return {self.name: self.value(self.view(unet))}


class ProjectionPenalty:
    """lambda/2 sum_k sum_r w_kr (u_kr^T (theta - theta*_k))^2 (rank-1, rank-k and full EWC).

    Per task k: rows U_k (r_k, P), weights w_k (r_k,), anchor theta*_k (P,). Stored stacked as
    U (K, R, P), w (K, R), anchors (K, P), with R = max r_k (shorter tasks padded with zero
    weights), so a step costs one batched (K, R, P) x (K, P) product.
    """

    name = "ewc"

    def __init__(self, names: Sequence[str], strength: float):
        self.view = _FlatView(names)
        self.strength = float(strength)
        self.rows: torch.Tensor | None = None  # (K, R, P)
        self.weights: torch.Tensor | None = None  # (K, R)
        self.anchors: torch.Tensor | None = None  # (K, P)

    @property
    def num_tasks(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])

    def add_task(self, rows: torch.Tensor, weights: torch.Tensor, anchor: torch.Tensor) -> None:
        """Append task k: rows (r, P), weights (r,), anchor (P,)."""
        rows = rows.detach().float().reshape(-1, anchor.numel())
        weights = weights.detach().float().reshape(-1)
        anchor = anchor.detach().float().reshape(1, -1)
        if rows.shape[0] != weights.shape[0]:
            raise DataError(f"{rows.shape[0]} penalty rows but {weights.shape[0]} weights")
        if self.rows is None:
            self.rows, self.weights, self.anchors = rows[None], weights[None], anchor
            return
        R = max(self.rows.shape[1], rows.shape[0])
        old = self._pad(self.rows, self.weights, R)
        new = self._pad(rows[None].to(self.rows), weights[None].to(self.weights), R)
        self.rows = torch.cat([old[0], new[0]])
        self.weights = torch.cat([old[1], new[1]])
        self.anchors = torch.cat([self.anchors, anchor.to(self.anchors)])

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

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """The penalty at flat parameters theta (P,): a 0-dim tensor (zero without tasks)."""
        if self.rows is None:
            return theta.new_zeros(())
        d = theta.unsqueeze(0) - self.anchors  # (K, P)
        proj = torch.bmm(self.rows, d.unsqueeze(2)).squeeze(2)  # (K, R)
        return 0.5 * self.strength * (self.weights * proj.pow(2)).sum()

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        return {self.name: self.value(self.view(unet))}


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

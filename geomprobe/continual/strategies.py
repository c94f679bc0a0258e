"""Strategies as small loss-term objects for the one training loop (docs/design.md §1).

Each object is a callable ``term(unet, step) -> {name: scalar tensor}`` that
:func:`geomprobe.training.training_loop` adds to the denoising loss (``extra_loss``). The runner
composes them with :func:`combine_terms`; none of them overrides the loop.

The EWC term is an adapter: :class:`PenaltyTerm` evaluates a penalty of
:mod:`geomprobe.fisher.penalty` (sum over earlier tasks k of lambda/2 (theta - theta*_k)^T F_k
(theta - theta*_k), docs/design.md §6) at the model's parameters ``names``, in that order (the
flat layout of the Fisher files). Generative distillation is :mod:`geomprobe.continual.distill`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import UNet2DModel

from geomprobe.errors import DataError, UsageError
from geomprobe.fisher.kinds import canonical_kind
from geomprobe.fisher.penalty import DiagonalStack, ProjectionStack, StackedPenalty

LossTerm = Callable[[UNet2DModel, int], dict[str, torch.Tensor]]
PENALTY_FISHERS = ("diag", "rank1", "rankk", "full")  # the ``--fisher`` choices with an EWC penalty


def flat_parameters(unet: torch.nn.Module, names: Sequence[str]) -> torch.Tensor:
    """theta: (P,) concatenation of the parameters ``names`` (in that order), differentiable."""
    params = dict(unet.named_parameters())
    return torch.cat([params[n].reshape(-1) for n in names])


def parameter_shapes(unet: torch.nn.Module, names: Sequence[str]) -> list[list[int]]:
    """The shapes of the parameters ``names`` of ``unet``, in that order (the flat layout of theta)."""
    params = dict(unet.named_parameters())
    return [list(params[n].shape) for n in names]


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


class PenaltyTerm:
    """The loss term ``{"ewc": penalty(theta)}`` with theta the model's parameters ``names``.

    ``penalty``: a :class:`~geomprobe.fisher.penalty.StackedPenalty` (or one of its stacks);
    ``add`` / ``add_task`` / ``to`` / ``value`` / ``num_tasks`` are the penalty's.
    """

    name = "ewc"

    def __init__(self, names: Sequence[str], penalty):
        self.view = _FlatView(names)
        self.penalty = penalty

    @property
    def num_tasks(self) -> int:
        return self.penalty.num_tasks

    def add(self, fisher, anchor: torch.Tensor) -> None:
        self.penalty.add(fisher, anchor)

    def add_task(self, *args) -> None:
        self.penalty.add_task(*args)

    def to(self, device) -> PenaltyTerm:
        self.penalty.to(device)
        return self

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """The penalty at flat parameters theta (P,): a 0-dim tensor, differentiable in theta."""
        return self.penalty.value(theta)

    def __call__(self, unet: UNet2DModel, step: int) -> dict[str, torch.Tensor]:
        return {self.name: self.penalty.value(*self.view(unet))}


class DiagonalPenalty(PenaltyTerm):
    """An EWC term over raw diagonals: ``add_task(diagonal (P,), anchor (P,))``."""

    def __init__(self, names: Sequence[str], strength: float):
        super().__init__(names, DiagonalStack(strength))


class ProjectionPenalty(PenaltyTerm):
    """An EWC term over raw projection rows: ``add_task(rows (r, P), weights (r,), anchor (P,))``."""

    def __init__(self, names: Sequence[str], strength: float):
        super().__init__(names, ProjectionStack(strength))


def make_penalty(kind: str, names: Sequence[str], strength: float) -> PenaltyTerm:
    """An empty EWC term for ``--fisher`` kind (diag | rank1 | rankk | full, or any Fisher kind)."""
    if kind == "none":
        raise UsageError(f"no EWC penalty for --fisher {kind!r}")
    canonical_kind(kind)  # raises for an unknown name
    return PenaltyTerm(names, StackedPenalty(strength))


def add_fisher_to_penalty(penalty: PenaltyTerm, fisher, anchor: torch.Tensor) -> None:
    """Append one task's Fisher object (from :mod:`geomprobe.fisher`) and anchor theta*_k (P,)."""
    penalty.add(fisher, anchor)


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

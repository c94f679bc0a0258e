"""Which parameters a probe differentiates and how a flat gradient row maps back to them.

A gradient row is (P,) float32: the selected parameters flattened and concatenated in the order of
``names`` (:class:`ParamLayout` holds the slices). Only the selected parameters are differentiated;
every other parameter and every buffer enters :func:`torch.func.functional_call` as a constant
(:func:`split_state`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from geomprobe.errors import UsageError


def select_parameters(unet: torch.nn.Module, regex: str | None = None) -> list[str]:
    """Names of the parameters whose name matches ``regex`` (``re.search``), in model order.

    ``None`` or an empty string selects every parameter that requires grad. A malformed regex or
    one that selects nothing is a :class:`UsageError`.
    """
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not regex:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise UsageError(f"malformed --params regex {regex!r}: {exc}") from None
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        sample = ", ".join(names[:4])
        raise UsageError(f"--params {regex!r} selects no parameter (names look like: {sample}, ...)")
    return chosen


@dataclass(frozen=True)
class ParamLayout:
    """How a flat gradient row maps back to named tensors.

    ``names[k]`` occupies ``row[slices[k][0]:slices[k][1]]`` reshaped to ``shapes[k]``; ``P`` is the
    row length.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[tuple[int, int], ...]

    @property
    def P(self) -> int:
        return self.slices[-1][1] if self.slices else 0

    def view(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a row (P,) into ``{name: tensor of the parameter's shape}`` (views, no copy)."""
        if row.shape[-1] != self.P:
            raise UsageError(f"row has {row.shape[-1]} entries, the parameter layout has P={self.P}")
        return {n: row[a:b].view(s) for n, s, (a, b) in zip(self.names, self.shapes, self.slices, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`view`: concatenate ``tensors[name]`` in layout order to (P,) float32."""
        return torch.cat([tensors[n].reshape(-1).float() for n in self.names])


def param_layout(unet: torch.nn.Module, names: Sequence[str]) -> ParamLayout:
    """The :class:`ParamLayout` of ``names`` in ``unet`` (rows concatenate them in this order)."""
    params = dict(unet.named_parameters())
    shapes, slices, start = [], [], 0
    for n in names:
        if n not in params:
            raise UsageError(f"model has no parameter named {n!r}")
        shape = tuple(params[n].shape)
        size = math.prod(shape)
        shapes.append(shape)
        slices.append((start, start + size))
        start += size
    return ParamLayout(tuple(names), tuple(shapes), tuple(slices))


def split_state(unet: torch.nn.Module, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(selected params {name: detached tensor}, constants {name: tensor} incl. buffers)."""
    chosen = set(names)
    params = dict(unet.named_parameters())
    selected = {n: params[n].detach() for n in names}
    constants = {n: p.detach() for n, p in params.items() if n not in chosen}
    constants.update({n: b for n, b in unet.named_buffers()})
    return selected, constants


def flat_row(grads: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """One row (P,): ``grads[name]`` flattened and concatenated in ``names`` order (dtype kept)."""
    return torch.cat([grads[n].reshape(-1) for n in names])


def device_of(unet: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(unet.parameters()).device

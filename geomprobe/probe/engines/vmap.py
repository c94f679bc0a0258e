"""The ``vmap`` engine: ``torch.func.vmap(grad_and_value(loss))`` over ``functional_call``.

Works for any model; only the parameters in ``names`` are differentiated (every other parameter
and every buffer is a constant, :func:`geomprobe.probe.params.split_state`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import grad_and_value, vmap

from geomprobe.probe.losses import NoisedBatch, functional_losses
from geomprobe.probe.params import split_state


def vmap_grads(
    unet: torch.nn.Module,
    names: Sequence[str],
    batch: NoisedBatch,
    chunk_size: int,
    out: torch.Tensor,
    losses: torch.Tensor,
) -> None:
    """Fill ``out`` (B, P) with per-sample gradients and ``losses`` (B,) with the losses.

    Runs ``chunk_size`` samples per ``vmap`` call. ``batch`` is on the model's device
    (:func:`geomprobe.probe.losses.probe_inputs`).
    """
    selected, constants = split_state(unet, names)

    def loss(params, x_t, t, y, target):  # ONE sample (no batch dim) -> scalar
        one = NoisedBatch(x_t.unsqueeze(0), t.unsqueeze(0), None if y is None else y.unsqueeze(0), target.unsqueeze(0))
        return functional_losses(unet, params, constants, one)[0]

    gfn = vmap(grad_and_value(loss), in_dims=(None, 0, 0, None if batch.y is None else 0, 0))
    for a in range(0, batch.n, chunk_size):
        b = min(a + chunk_size, batch.n)
        g, losses[a:b] = gfn(selected, *batch.rows(a, b))
        col = 0
        for n in names:
            k = selected[n].numel()
            out[a:b, col : col + k] = g[n].reshape(b - a, k)
            col += k
        del g

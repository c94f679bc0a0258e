"""Per-sample gradients of the per-sample DDPM loss (paper section 3.2): the engine dispatcher.

The loss of sample i is ``l_i(theta) = 1/2 ||target_i - eps_theta(x_t_i, t_i, y_i)||^2`` summed over
pixels (:func:`geomprobe.diffusion.denoising_loss`), with ``x_t_i = sqrt(abar) x0_i +
sqrt(1 - abar) noise_i`` and ``target_i = noise_i`` (empirical Fisher) or a user-given target
(the "true Fisher" probe: ``eps_theta(x_t).detach() + xi``, see
:func:`geomprobe.probe.products.true_fisher_target`).

Shapes used throughout (B samples, P selected parameters):

- ``x0``, ``noise``, ``target``: (B, C, H, W) float32
- ``t``: (B,) int64 scheduler indices in 0..N-1 (every row may have its own t)
- ``y``: (B,) int64 class labels (ignored by an unconditional model)
- ``alphas_cumprod``: (N,) float tensor (``scheduler.alphas_cumprod``)
- a gradient row: (P,) float32, the selected parameters flattened and concatenated in the order
  of ``names`` (see :func:`geomprobe.probe.params.param_layout` for the slices).

Two engines compute the same rows (:mod:`geomprobe.probe.engines`, ``engine=``): ``vmap`` is
``torch.func.vmap(grad_and_value(loss))`` over ``functional_call`` and works for any model;
``layerwise`` (the default where it applies: every selected parameter in a Conv2d, Linear, GroupNorm
or Embedding, as in all presets) runs one batched forward and one backward to the module outputs and
forms the per-sample weight gradients in closed form. On 2 CPU cores it is 1.1-1.3x a batched
forward+backward against 1.5-2.2x for vmap (bench/README.md; measured under the ``geomprobe``
command's allocator setting, :mod:`geomprobe.allocator`, with the (B, P) result buffer reused).

The names other modules import from here (``select_parameters``, ``param_layout``, ``ProbeBatch``,
``mean_gradient``, ``directional_derivatives``) are re-exported; new code imports them from
:mod:`geomprobe.probe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geomprobe.errors import UsageError
from geomprobe.io import DEFAULT_MAX_MEMORY
from geomprobe.probe.engines.layerwise import LayerwiseUnsupported, layerwise_grads, layerwise_owners
from geomprobe.probe.engines.vmap import vmap_grads
from geomprobe.probe.losses import NoisedBatch, probe_inputs
from geomprobe.probe.memory import chunk_size_for
from geomprobe.probe.params import ParamLayout, param_layout, select_parameters
from geomprobe.probe.products import ProbeBatch, directional_derivatives, mean_gradient

ENGINES = ("auto", "vmap", "layerwise")

__all__ = [
    "ENGINES",
    "ProbeBatch",
    "directional_derivatives",
    "mean_gradient",
    "param_layout",
    "per_sample_grads",
    "select_parameters",
]


def per_sample_grads(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
    chunk_size: int | None = None,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    return_losses: bool = False,
    engine: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients G: (B, P) float32; row i is grad_theta l_i over the parameters ``names``.

    Columns are the parameters in ``names`` order, each flattened (see :func:`param_layout`).
    Computed in chunks of ``chunk_size`` samples (default: as many as fit in ``max_memory`` bytes,
    :func:`geomprobe.probe.memory.chunk_size_for`; ``None`` is the default budget). The result
    lives on the model's device. ``target`` (B, C, H, W) replaces ``noise`` as the regression target.
    With ``return_losses`` also returns the (B,) per-sample losses (free with either engine).
    ``out``: an optional preallocated (B, P) float32 buffer on the model's device (reused across
    calls it saves the page faults of a fresh B x P allocation).

    ``engine``: ``"vmap"`` is ``torch.func.vmap(grad_and_value(loss))`` over ``functional_call``
    (any model). ``"layerwise"`` does one batched forward and one backward to the outputs of the
    modules owning the selected parameters (no weight gradients), then forms each per-sample weight
    gradient in closed form (Conv2d: one grouped weight-gradient call with the batch folded into
    the groups; Linear: outer products; GroupNorm: grad . x_hat; Embedding: scatter); it needs
    every selected parameter to belong to an ``nn.Conv2d`` (zero padding), ``nn.Linear``,
    ``nn.GroupNorm`` or ``nn.Embedding`` used once per forward. ``"auto"`` (default) takes
    layerwise when it applies, else vmap. Both are checked against an explicit loop of
    single-sample backward passes in the tests.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown per-sample gradient engine {engine!r}; expected auto, vmap or layerwise")
    layout = param_layout(unet, list(names))
    batch = probe_inputs(unet, x0, noise, t, y, alphas_cumprod, target)
    if chunk_size is None:
        chunk_size = chunk_size_for(unet, layout.P, tuple(batch.x_t.shape[1:]), max_memory)
    out = _output_buffer(out, batch.n, layout.P, batch.x_t.device)
    losses = torch.empty(batch.n, dtype=torch.float32, device=batch.x_t.device)
    if engine == "vmap" or not _layerwise(unet, layout, engine, batch, chunk_size, out, losses):
        vmap_grads(unet, layout.names, batch, chunk_size, out, losses)
    return (out, losses) if return_losses else out


def _layerwise(unet, layout: ParamLayout, engine: str, batch: NoisedBatch, chunk_size: int, out, losses) -> bool:
    """Run the layerwise engine; False when it does not apply and ``engine`` is ``"auto"``."""
    owners = layerwise_owners(unet, layout.names)
    try:
        if owners is None:
            raise LayerwiseUnsupported("it supports Conv2d, Linear, GroupNorm and Embedding parameters only")
        layerwise_grads(unet, owners, layout, batch, chunk_size, out, losses)
        return True
    except LayerwiseUnsupported as exc:
        if engine == "layerwise":
            raise UsageError(f"the layerwise engine cannot handle this model: {exc}") from None
        return False


def _output_buffer(out: torch.Tensor | None, B: int, P: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(B, P, dtype=torch.float32, device=device)
    if out.shape != (B, P) or out.dtype != torch.float32 or out.device != device:
        raise UsageError(
            f"out buffer must be ({B}, {P}) float32 on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out

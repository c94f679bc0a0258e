"""Products of the per-sample gradient matrix G (B, P) computed without forming it (O(P) memory).

    mean_gradient            G^T 1 / n     one batched backward per batch
    weighted_gradient        G^T w         one backward of sum_i w_i l_i
    directional_derivatives  G v           one forward-mode jvp of the (B,) loss vector
    mean_and_projections     mu, G mu      one forward + backward per batch (layer records reused)
    per_sample_losses        (l_i)_i       one forward, no gradients
    true_fisher_target       eps_theta(x_t).detach() + xi, the "true Fisher" regression target

The data are :class:`ProbeBatch` es (x0, noise, target (B, C, H, W); t, y (B,) int64); a row
g_i is the gradient of sample i's loss over the parameters ``names`` in :func:`param_layout` order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.func import jvp

from geomprobe.diffusion import per_sample_loss, predict_noise
from geomprobe.errors import UsageError
from geomprobe.probe.autodiff import autodiff_safe
from geomprobe.probe.engines.layerwise import (
    LayerwiseUnsupported,
    directional_from_records,
    layer_records,
    layerwise_directional,
    layerwise_owners,
    requiring_grad,
)
from geomprobe.probe.losses import functional_losses, on_device, probe_inputs
from geomprobe.probe.params import device_of, flat_row, param_layout, split_state


@dataclass
class ProbeBatch:
    """One batch of probe inputs: x0, noise, target (B, C, H, W); t, y (B,) int64.

    ``target`` is ``None`` for the empirical Fisher (the target is ``noise``).
    """

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])


def _as_batches(batches) -> Iterable[ProbeBatch]:
    for b in batches:
        yield b if isinstance(b, ProbeBatch) else ProbeBatch(*b)


def _loss_gradients(
    unet: torch.nn.Module,
    names: Sequence[str],
    selected: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    batch: ProbeBatch,
    alphas_cumprod: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Grad of sum_i w_i l_i (w = 1 when ``weights`` is None) over ``names``: one tensor per name."""
    inputs = probe_inputs(unet, batch.x0, batch.noise, batch.t, batch.y, alphas_cumprod, batch.target)
    with torch.enable_grad(), autodiff_safe(unet):  # enable_grad: also inside an autograd backward (EWC penalty)
        params = {n: p.clone().requires_grad_(True) for n, p in selected.items()}
        losses = functional_losses(unet, params, constants, inputs)
        if weights is not None:
            losses = losses * weights.to(device=losses.device, dtype=losses.dtype)
        return torch.autograd.grad(losses.sum(), [params[n] for n in names])


def mean_gradient(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor | Iterable[ProbeBatch] | Iterable[tuple],
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mu = (1/n) sum_i grad l_i: (P,) float32, from one batched backward of the mean loss per batch.

    Either pass one batch (``x0, noise, t, y, alphas_cumprod[, target]`` as tensors), or pass an
    iterable of :class:`ProbeBatch` (or tuples ``(x0, noise, t, y[, target])``) as ``x0`` together with
    ``alphas_cumprod=``; batches are weighted by their size, so the result is the mean over all
    samples. Equals ``per_sample_grads(...).mean(0)`` without forming G (O(P) memory).
    """
    if alphas_cumprod is None:
        raise UsageError("mean_gradient needs alphas_cumprod")
    batches = [ProbeBatch(x0, noise, t, y, target)] if isinstance(x0, torch.Tensor) else _as_batches(x0)
    names = list(names)
    selected, constants = split_state(unet, names)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in selected.items()}
    n_total = 0
    for b in batches:
        for n, g in zip(names, _loss_gradients(unet, names, selected, constants, b, alphas_cumprod), strict=True):
            acc[n] += g.float()
        n_total += len(b)
    if n_total == 0:
        raise UsageError("mean_gradient got no samples")
    return flat_row(acc, names) / n_total


def weighted_gradient(
    unet: torch.nn.Module,
    names: Sequence[str],
    batch: ProbeBatch,
    alphas_cumprod: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """G^T w = sum_i w_i g_i: (P,) float32, from one backward of the weighted loss sum_i w_i l_i.

    weights: (B,). The vjp half of a Fisher-vector product (:func:`directional_derivatives` is the jvp
    half); :func:`mean_gradient` is the case w = 1/n.
    """
    names = list(names)
    selected, constants = split_state(unet, names)
    grads = _loss_gradients(unet, names, selected, constants, batch, alphas_cumprod, weights)
    return torch.cat([g.reshape(-1).float() for g in grads])


def directional_derivatives(
    unet: torch.nn.Module,
    names: Sequence[str],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    v: torch.Tensor,
    target: torch.Tensor | None = None,
    route: str = "auto",
) -> torch.Tensor:
    """All v^T g_i: (B,) float32 without forming G (O(P) memory).

    ``v``: (P,) in the layout of ``names`` (:func:`param_layout`); equals ``per_sample_grads(...) @ v``.
    ``route``: ``"layerwise"`` is one forward + one backward to the selected modules' outputs plus
    one forward per module with its weights replaced by v (Conv2d, Linear, GroupNorm, Embedding
    parameters; 1.0x a batched forward + backward on the DDPM CIFAR-10 UNet, bench/README.md);
    ``"jvp"`` is one forward-mode ``torch.func.jvp`` of the loss vector (any model; about 1.9x, with
    the math attention backend on CPU, :mod:`geomprobe.probe.autodiff`). ``"auto"``: layerwise
    where it applies, else jvp.
    """
    if route not in ("auto", "layerwise", "jvp"):
        raise UsageError(f"unknown route {route!r}; expected auto, layerwise or jvp")
    device = device_of(unet)
    names = list(names)
    layout = param_layout(unet, names)
    if v.shape != (layout.P,):
        raise UsageError(f"direction v has shape {tuple(v.shape)}, expected ({layout.P},)")
    params = dict(unet.named_parameters())
    tangents = {n: tv.to(device=device, dtype=params[n].dtype) for n, tv in layout.view(v.detach()).items()}
    inputs = probe_inputs(unet, x0, noise, t, y, alphas_cumprod, target)
    owners = layerwise_owners(unet, names) if route != "jvp" else None
    if owners is not None:
        try:
            with autodiff_safe(unet):
                return layerwise_directional(unet, owners, inputs, tangents)
        except LayerwiseUnsupported:
            if route == "layerwise":
                raise UsageError("the layerwise route cannot see through this model; use route='jvp'") from None
    elif route == "layerwise":
        raise UsageError("the layerwise route needs Conv2d, Linear, GroupNorm or Embedding parameters only")
    return _jvp_directional(unet, names, inputs, tangents)


def mean_and_projections(
    unet: torch.nn.Module,
    names: Sequence[str],
    batches: Sequence[ProbeBatch],
    alphas_cumprod: torch.Tensor,
    max_memory: int,
    reduce_mean: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (P,), all mu^T g_i (n,)), float32: the two products of the rank-1 Fisher (paper eq. 6).

    ``reduce_mean(gradient sum (P,), rows)`` turns the sum over these batches into mu; the default
    divides by the rows. Torchrun ranks holding disjoint rows pass an all-reduce here, so every rank
    projects its own rows on the global mu.

    With the layerwise route (every selected parameter in a Conv2d, Linear, GroupNorm or
    Embedding), each batch's one forward + backward gives both its share of mu (the parameter
    gradients) and the layer inputs and output gradients that mu^T g_i needs once mu is known
    (:func:`~geomprobe.probe.engines.layerwise.directional_from_records`). Those records are kept
    while their total stays within ``max_memory`` bytes; the batches beyond are run a second time.
    So the cost is one forward + backward per batch plus one forward per layer when the records fit,
    and at most :func:`mean_gradient` + :func:`directional_derivatives` (two passes) otherwise; the
    peak memory is the kept records plus one batch's forward + backward. The values equal those two
    functions' (float rounding).
    """
    names, batches = list(names), list(batches)
    reduce_mean = reduce_mean or (lambda total, rows: total / rows)
    owners = layerwise_owners(unet, names)
    if owners is not None:
        try:
            return _mean_and_projections_layerwise(
                unet, names, owners, batches, alphas_cumprod, max_memory, reduce_mean
            )
        except LayerwiseUnsupported:
            pass
    rows = sum(len(b) for b in batches)
    mu = reduce_mean(mean_gradient(unet, names, batches, alphas_cumprod=alphas_cumprod) * rows, rows)
    dots = [
        directional_derivatives(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, mu, b.target) for b in batches
    ]
    return mu.cpu(), torch.cat([d.cpu() for d in dots])


def _mean_and_projections_layerwise(unet, names, owners, batches, alphas_cumprod, max_memory, reduce_mean):
    """:func:`mean_and_projections` through the layer records of each batch's forward + backward."""
    params = dict(unet.named_parameters())
    selected = [params[n] for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in selected]
    kept, held, n = [], 0, 0
    with requiring_grad(selected), autodiff_safe(unet):
        for b in batches:
            inputs = probe_inputs(unet, b.x0, b.noise, b.t, b.y, alphas_cumprod, b.target)
            grads, records = layer_records(unet, owners, inputs, selected)
            for a, g in zip(acc, grads, strict=True):
                a += g.float()
            held += records.nbytes()
            kept.append(records if held <= max_memory else None)
            n += len(b)
    if n == 0:
        raise UsageError("mean_and_projections got no samples")
    mu = reduce_mean(flat_row(dict(zip(names, acc, strict=True)), names), n).to(acc[0])
    layout = param_layout(unet, names)
    tangents = {k: v.to(params[k].dtype) for k, v in layout.view(mu).items()}
    dots = []
    for b, records in zip(batches, kept, strict=True):
        if records is None:
            dots.append(directional_derivatives(unet, names, b.x0, b.noise, b.t, b.y, alphas_cumprod, mu, b.target))
        else:
            dots.append(directional_from_records(owners, records, tangents))
    return mu.cpu(), torch.cat([d.cpu() for d in dots])


def _jvp_directional(
    unet: torch.nn.Module, names: list[str], inputs, tangents: dict[str, torch.Tensor]
) -> torch.Tensor:
    """All v^T g_i by one ``torch.func.jvp`` of the per-sample loss vector."""
    selected, constants = split_state(unet, names)

    def losses(params):
        return functional_losses(unet, params, constants, inputs)

    with autodiff_safe(unet, forward_mode=True):
        _, dots = jvp(losses, (selected,), (tangents,))
    return dots.float()


@torch.no_grad()
def per_sample_losses(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) float32 per-sample losses l_i, without gradients."""
    x0, noise, t, y, target, alphas_cumprod = on_device(unet, x0, noise, t, y, target, alphas_cumprod)
    return per_sample_loss(unet, x0, noise, t, y, alphas_cumprod, target).float()


@torch.no_grad()
def true_fisher_target(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    xi: torch.Tensor,
) -> torch.Tensor:
    """The "true Fisher" target eps_theta(x_t, t, y).detach() + xi: (B, C, H, W) (docs/design.md §6).

    ``xi`` (B, C, H, W) ~ N(0, I) is drawn by the caller so it can be stored and replayed.
    """
    x_t, t, y, _ = probe_inputs(unet, x0, noise, t, y, alphas_cumprod)
    return predict_noise(unet, x_t, t, y) + xi.to(x_t.device)

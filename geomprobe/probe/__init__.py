"""The probe engine: per-sample gradients (torch.func) and the HDF5 gradient store.

Public API (shapes: B samples, P selected parameters, rows concatenate parameters in ``names`` order)::

    select_parameters(unet, regex) -> list[str]
    param_layout(unet, names) -> ParamLayout            (row <-> named tensors)
    per_sample_grads(unet, names, x0, noise, t, y, alphas_cumprod, target=None,
                     engine="auto"|"layerwise"|"vmap", max_memory=bytes) -> (B, P) float32
    chunk_size_for(unet, P, sample_shape, max_memory=bytes) -> samples per engine call
    per_sample_losses(unet, x0, noise, t, y, alphas_cumprod, target=None) -> (B,)
    mean_gradient(unet, names, x0 | batches, noise, t, y, alphas_cumprod, target=None) -> (P,)
    weighted_gradient(unet, names, batch, alphas_cumprod, w) -> (P,)                   w: (B,)
    directional_derivatives(unet, names, x0, noise, t, y, alphas_cumprod, v) -> (B,)   v: (P,)
    mean_and_projections(unet, names, batches, alphas_cumprod, max_memory) -> (mu (P,), G mu (n,))
    true_fisher_target(unet, x0, noise, t, y, alphas_cumprod, xi) -> (B, C, H, W)
    RandomProjection(P, K, seed).project(G) -> (B, K)
    GradientStore(path): .timesteps .n(t) .P .iter_blocks(t, rows) .load(t) .labels(t) .meta(t)
                         .param_view(row) .param_names .manifest .checkpoint .inputs(t)
    extract_gradients(ExtractConfig(...), out, ...) -> ExtractResult   (the ``grads`` command)
    select_samples(labels, num_classes, classes, samples, seed) -> dataset rows (n,)
    probe_batches(dataset, rows, spec, key, seed, ...) -> iterator of ProbeBatch (a store's inputs)

Modules: params (selection, layout), losses (inputs, loss with substituted parameters), engines/
(vmap, layerwise), grads (per_sample_grads: engine choice), products (G^T 1, G^T w, G v, losses),
memory (chunk sizes from a byte budget), extract (the ``grads`` command), store, projection.

Store keys: ``GradientStore.timesteps`` lists int t for fixed timesteps and ``'band-<name>'`` for
bands; methods accept 700, '700', 't700', 'band-low-snr' or 'low-snr'.
"""

from geomprobe.io import parse_memory  # re-exported for the CLI until it imports geomprobe.io
from geomprobe.probe.extract import ExtractConfig, ExtractResult, extract_gradients, probe_batches, select_samples
from geomprobe.probe.grads import per_sample_grads
from geomprobe.probe.memory import chunk_size_for
from geomprobe.probe.params import ParamLayout, param_layout, select_parameters
from geomprobe.probe.products import (
    ProbeBatch,
    directional_derivatives,
    mean_and_projections,
    mean_gradient,
    per_sample_losses,
    true_fisher_target,
    weighted_gradient,
)
from geomprobe.probe.projection import RandomProjection
from geomprobe.probe.store import GradientStore, key_for

__all__ = [
    "ExtractConfig",
    "ExtractResult",
    "GradientStore",
    "ParamLayout",
    "ProbeBatch",
    "RandomProjection",
    "chunk_size_for",
    "directional_derivatives",
    "extract_gradients",
    "key_for",
    "mean_and_projections",
    "mean_gradient",
    "param_layout",
    "parse_memory",
    "per_sample_grads",
    "per_sample_losses",
    "probe_batches",
    "select_parameters",
    "select_samples",
    "true_fisher_target",
    "weighted_gradient",
]

"""The probe engine: per-sample gradients (torch.func) and the HDF5 gradient store.

Public API (shapes: B samples, P selected parameters, rows concatenate parameters in ``names`` order)::

    select_parameters(unet, regex) -> list[str]
    param_layout(unet, names) -> ParamLayout            (row <-> named tensors)
    per_sample_grads(unet, names, x0, noise, t, y, alphas_cumprod, target=None,
                     engine="auto"|"layerwise"|"vmap") -> (B, P) float32
    per_sample_losses(unet, x0, noise, t, y, alphas_cumprod, target=None) -> (B,)
    mean_gradient(unet, names, x0 | batches, noise, t, y, alphas_cumprod, target=None) -> (P,)
    directional_derivatives(unet, names, x0, noise, t, y, alphas_cumprod, v) -> (B,)   v: (P,)
    true_fisher_target(unet, x0, noise, t, y, alphas_cumprod, xi) -> (B, C, H, W)
    RandomProjection(P, K, seed).project(G) -> (B, K)
    GradientStore(path): .timesteps .n(t) .P .iter_blocks(t, rows) .load(t) .labels(t) .meta(t)
                         .param_view(row) .param_names .manifest .checkpoint .inputs(t)
    extract_gradients(ExtractConfig(...), out, ...) -> ExtractResult   (the ``grads`` command)
    select_samples(labels, num_classes, classes, samples, seed) -> dataset rows (n,)
    probe_batches(dataset, rows, spec, key, seed, ...) -> iterator of ProbeBatch (a store's inputs)

Store keys: ``GradientStore.timesteps`` lists int t for fixed timesteps and ``'band-<name>'`` for
bands; methods accept 700, '700', 't700', 'band-low-snr' or 'low-snr'.
"""

from geomprobe.probe.extract import ExtractConfig, ExtractResult, extract_gradients, probe_batches, select_samples
from geomprobe.probe.grads import (
    ParamLayout,
    ProbeBatch,
    chunk_size_for,
    directional_derivatives,
    mean_gradient,
    param_layout,
    parse_memory,
    per_sample_grads,
    per_sample_losses,
    select_parameters,
    true_fisher_target,
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
    "mean_gradient",
    "param_layout",
    "probe_batches",
    "select_samples",
    "parse_memory",
    "per_sample_grads",
    "per_sample_losses",
    "select_parameters",
    "true_fisher_target",
]

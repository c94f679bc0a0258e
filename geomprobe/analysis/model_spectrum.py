"""``geomprobe spectrum --ckpt``: every spectrum.json number of a model without a gradient store.

For each key of the t-spec the probe rows are exactly those ``geomprobe grads`` would store for the
same options (samples, classes, split, seed, parameters; rows keyed by (seed, t, row)), and the
Gram statistics come from :func:`geomprobe.fisher.blockgram.block_gram_statistics` (per-sample
gradients of one parameter block at a time, float64 accumulation, within ``max_memory``). The
result is the same :class:`~geomprobe.analysis.report.SpectrumResult` as for a store, written by
:func:`~geomprobe.analysis.report.write_spectrum`.

Cost per key: (number of parameter blocks) passes of one forward + backward over the n rows
(docs/design.md §11 gives the block width as a function of n, P and the budget). Under
``torchrun --nproc-per-node K`` the ranks share the blocks and all-reduce the statistics; every
rank then holds the result and rank 0 writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from geomprobe.analysis.identity import scaled_identity_mse
from geomprobe.analysis.means import MeanGradients
from geomprobe.analysis.report import SpectrumEntry, SpectrumResult
from geomprobe.errors import UsageError
from geomprobe.fisher.blockgram import (
    all_reduce_statistics,
    block_columns,
    block_gram_statistics,
    model_gradients,
    parameter_blocks,
)
from geomprobe.fisher.spectrum import fisher_spectrum
from geomprobe.io import DEFAULT_MAX_MEMORY

ProgressFn = Callable[[str, int, int], None]


def plan_blocks(n: int, sizes: list[int], names: list[str], max_memory: int):
    """The parameter blocks for n rows within ``max_memory`` (see :mod:`geomprobe.fisher.blockgram`)."""
    return parameter_blocks(names, sizes, block_columns(n, int(sum(sizes)), max_memory))


def analyze_model(
    config: Any,
    top_k: int = 5,
    centered: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: ProgressFn | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> SpectrumResult:
    """Spectrum rows of the model in ``config`` (a :class:`geomprobe.probe.ExtractConfig`) without storing G.

    Args:
        config: checkpoint, t-spec, samples, classes, split, parameter regex, target and seed, as
            for ``geomprobe grads`` (``project`` and ``dtype`` do not apply and must be unset).
        top_k: eigenvalues to report per t (at least 1), as for :func:`geomprobe.analysis.analyze_store`.
        centered: the covariance Sigma = F - mu mu^T instead of the second moment F.
        max_memory: bytes for one parameter block of n rows, the n x n Gram matrix and (P,) vectors.
        progress: ``progress(key name, blocks done, blocks)``.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` for the model's forward and backward passes.
        batch_size: probe rows per per-sample-gradient call.

    Returns:
        A SpectrumResult whose ``store`` field names the checkpoint.
    """
    from geomprobe.probe.extract import plan_probe

    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if config.project:
        raise UsageError("--project applies to stored rows; spectrum --ckpt computes the exact Gram matrix")
    plan = plan_probe(config, None, device, int(max_memory))
    sizes = [math.prod(s) for s in plan.layout.shapes]
    blocks = plan_blocks(plan.n, sizes, list(plan.layout.names), int(max_memory))
    mine = blocks[plan.rank :: plan.world]  # torchrun: each rank adds its share of the blocks
    result = SpectrumResult(store=str(config.ckpt), centered=centered, top_k=top_k)
    result.notes.append(
        f"{len(blocks)} parameter block(s) per t: {len(mine)} passes over the {plan.n} rows per t"
        + (f" on each of {plan.world} ranks" if plan.world > 1 else "")
    )
    means = MeanGradients(int(max_memory))
    for key in plan.keys:
        on_block = (lambda d, tot, _k=key: progress(_k, d, tot)) if progress else None
        batches, spectrum = _key_spectrum(
            plan, key, mine, sizes, top_k, centered, int(max_memory), batch_size, on_block
        )
        means.add(spectrum.mu)
        spectrum.mu = None  # held by ``means`` within the budget
        result.entries.append(_entry(plan, key, batches, spectrum))
    result.mu_cosine = means.cosine_matrix()
    means.close()
    return result


def _key_spectrum(
    plan: Any,
    key: str,
    blocks: list,
    sizes: list[int],
    top_k: int,
    centered: bool,
    max_memory: int,
    batch_size: int,
    on_block,
):
    """(probe batches, FisherSpectrum) of one key: the rows ``grads`` would store, Gram over ``blocks``."""
    from geomprobe.probe.extract import probe_batches

    config = plan.config
    batches = list(
        probe_batches(
            plan.dataset,
            plan.sample_rows,
            plan.spec,
            key,
            config.seed,
            batch_size,
            plan.unet,
            plan.alphas_cumprod,
            config.target,
        )
    )
    fill = model_gradients(plan.unet, batches, plan.alphas_cumprod, max_memory)
    stats = block_gram_statistics(fill, list(plan.layout.names), sizes, plan.n, max_memory, on_block, blocks)
    return batches, fisher_spectrum(all_reduce_statistics(stats), top_k=top_k, centered=centered)


def _entry(plan: Any, key: str, batches: list, spectrum: Any) -> SpectrumEntry:
    """One spectrum row: label, SNR, the scaled-identity MSE on the same rows, and the rows' provenance."""
    info = plan.key_info[key]
    x0, noise, t, y = (torch.cat([getattr(b, f) for b in batches]) for f in ("x0", "noise", "t", "y"))
    mse = scaled_identity_mse(plan.unet, x0, noise, t, y, plan.alphas_cumprod)
    rows = {"labels": y.numpy(), "sample_index": np.asarray(plan.sample_rows, dtype=np.int64), "t": t.numpy()}
    return SpectrumEntry(info["t"], float(info["snr"]), [key], spectrum, mse, rows)
